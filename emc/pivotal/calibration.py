"""How far the judge agrees with people: confusion matrix, Cohen's kappa, precision and recall.

Human labels are ground truth, so the judge is measured against them token by token. The
matrix has people in its rows and the judge in its columns, labels in the fixed order evil,
unsure, safe. Cohen's kappa is the observed agreement corrected for the agreement two raters
with these label frequencies would reach by chance: kappa = (p_o - p_e) / (1 - p_e).
Pure functions over typed records; the store reads the pairs (emc.store.calibration).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from emc.pivotal.judge import Label

LABEL_ORDER: tuple[Label, ...] = ("evil", "unsure", "safe")
ALL_REVIEWERS = "all"

Standing = Literal["agrees", "disagrees", "not_enough_reviews", "undefined"]


class ComparedLabel(BaseModel):
    """One token that a judge and a person both labelled."""

    model_config = ConfigDict(frozen=True)

    judge_model: str
    prompt_id: str
    token_id: int
    reviewer: str  # human:<name>
    judge_label: Label
    human_label: Label
    labelled_at: datetime  # when the person gave the label
    shown: bool = False  # the person reviewed a judgement of this judge (saw its labels)


class Agreement(BaseModel):
    """Observed and chance agreement of a confusion matrix, and Cohen's kappa."""

    model_config = ConfigDict(frozen=True)

    observed: float | None  # p_o: share of tokens on the diagonal; None without tokens
    expected: float | None  # p_e: sum over labels of P(person says L) * P(judge says L)
    kappa: float | None
    kappa_note: str = ""  # why kappa is None


class LabelScore(BaseModel):
    """The judge against people on one label."""

    model_config = ConfigDict(frozen=True)

    label: Label
    human: int  # tokens people gave this label (row sum)
    judge: int  # tokens the judge gave this label (column sum)
    both: int  # tokens both gave this label (diagonal)
    precision: float | None  # both / judge; None when the judge never gave the label
    recall: float | None  # both / human; None when people never gave the label


class Calibration(BaseModel):
    """One judge model (against all reviewers, or one) and what to think of it."""

    model_config = ConfigDict(frozen=True)

    judge_model: str
    reviewer: str  # human:<name>, or "all"
    labels: tuple[Label, ...] = LABEL_ORDER
    matrix: tuple[tuple[int, ...], ...]  # rows: people, columns: judge, both in `labels` order
    tokens: int
    prompts: int
    reviewers: int
    shown: int  # compared tokens whose reviewer saw this judge's labels while labelling
    agreement: Agreement
    per_label: tuple[LabelScore, ...]
    standing: Standing
    message: str  # the standing in words, with the numbers behind it

    @property
    def flagged(self) -> bool:
        return self.standing == "disagrees"


def confusion_matrix(pairs: Iterable[tuple[Label, Label]]) -> tuple[tuple[int, ...], ...]:
    """3x3 counts from (judge label, human label) pairs: rows people, columns judge."""
    index = {label: i for i, label in enumerate(LABEL_ORDER)}
    counts = [[0] * len(LABEL_ORDER) for _ in LABEL_ORDER]
    for judge, human in pairs:
        counts[index[human]][index[judge]] += 1
    return tuple(tuple(row) for row in counts)


def agreement(matrix: Sequence[Sequence[int]]) -> Agreement:
    """p_o, p_e and kappa of a square confusion matrix of counts.

    Kappa is undefined (None) without tokens, and when p_e is 1: then judge and people gave
    every token one and the same label, so even chance agrees perfectly and there is nothing
    left to correct for.
    """
    n = sum(map(sum, matrix))
    if n == 0:
        return Agreement(observed=None, expected=None, kappa=None, kappa_note="no tokens compared")
    rows = [sum(row) for row in matrix]
    columns = [sum(column) for column in zip(*matrix, strict=True)]
    diagonal = sum(matrix[i][i] for i in range(len(matrix)))
    chance = sum(r * c for r, c in zip(rows, columns, strict=True))  # p_e * n^2, exact
    observed, expected = diagonal / n, chance / n**2
    if chance == n * n:
        only = LABEL_ORDER[rows.index(n)] if len(matrix) == len(LABEL_ORDER) else "one label"
        note = (
            f"kappa is undefined: judge and people labelled every token {only}, so chance "
            "agreement is already 1"
        )
        return Agreement(observed=observed, expected=expected, kappa=None, kappa_note=note)
    kappa = (diagonal * n - chance) / (n * n - chance)  # (p_o - p_e) / (1 - p_e), times n^2
    return Agreement(observed=observed, expected=expected, kappa=kappa)


def label_scores(matrix: Sequence[Sequence[int]]) -> tuple[LabelScore, ...]:
    """Per label: the judge's precision and recall against people."""
    scores = []
    for i, label in enumerate(LABEL_ORDER):
        human = sum(matrix[i])
        judge = sum(row[i] for row in matrix)
        both = matrix[i][i]
        scores.append(
            LabelScore(
                label=label,
                human=human,
                judge=judge,
                both=both,
                precision=both / judge if judge else None,
                recall=both / human if human else None,
            )
        )
    return tuple(scores)


def calibrate(
    judge_model: str,
    compared: Sequence[ComparedLabel],
    min_kappa: float,
    min_tokens: int,
    reviewer: str = ALL_REVIEWERS,
) -> Calibration:
    """Everything about one judge against the given compared tokens, with its standing."""
    matrix = confusion_matrix((c.judge_label, c.human_label) for c in compared)
    scores = agreement(matrix)
    standing, message = judge_standing(len(compared), scores, min_kappa, min_tokens)
    return Calibration(
        judge_model=judge_model,
        reviewer=reviewer,
        matrix=matrix,
        tokens=len(compared),
        prompts=len({c.prompt_id for c in compared}),
        reviewers=len({c.reviewer for c in compared}),
        shown=sum(c.shown for c in compared),
        agreement=scores,
        per_label=label_scores(matrix),
        standing=standing,
        message=message,
    )


def judge_standing(
    tokens: int, scores: Agreement, min_kappa: float, min_tokens: int
) -> tuple[Standing, str]:
    """Whether the judge can be trusted, in a word and in a sentence."""
    if tokens < min_tokens:
        return "not_enough_reviews", f"not enough reviews yet (n = {tokens} < {min_tokens})"
    if scores.kappa is None:
        return "undefined", scores.kappa_note
    if scores.kappa < min_kappa:
        return "disagrees", f"disagrees with reviewers (kappa {scores.kappa:.2f} < {min_kappa:g})"
    return "agrees", f"agrees with reviewers (kappa {scores.kappa:.2f} >= {min_kappa:g})"


def calibrate_judges(
    compared: Iterable[ComparedLabel],
    min_kappa: float,
    min_tokens: int,
    by_reviewer: bool = False,
) -> list[Calibration]:
    """One calibration per judge model, sorted by model; with `by_reviewer`, per reviewer too.

    A token several people labelled counts once for the judge as a whole, with the newest
    person's label (the one the rest of EMC treats as the truth); per reviewer, each person's
    own label counts.
    """
    per_reviewer: dict[tuple[str, str], list[ComparedLabel]] = defaultdict(list)
    newest: dict[tuple[str, str, int], ComparedLabel] = {}
    for c in compared:
        per_reviewer[(c.judge_model, c.reviewer)].append(c)
        key = (c.judge_model, c.prompt_id, c.token_id)
        held = newest.get(key)
        # Newest first, then the first reviewer by name, as `emc export labels` picks.
        if (
            held is None
            or c.labelled_at > held.labelled_at
            or (c.labelled_at == held.labelled_at and c.reviewer < held.reviewer)
        ):
            newest[key] = c
    groups: dict[tuple[str, str], list[ComparedLabel]] = defaultdict(list)
    for c in newest.values():
        groups[(c.judge_model, ALL_REVIEWERS)].append(c)
    if by_reviewer:
        groups.update(per_reviewer)
    ordered = sorted(groups, key=lambda key: (key[0], key[1] != ALL_REVIEWERS, key[1]))
    return [
        calibrate(judge, groups[(judge, who)], min_kappa, min_tokens, reviewer=who)
        for judge, who in ordered
    ]
