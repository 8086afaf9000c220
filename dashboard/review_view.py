"""What the Review page shows and how it picks an item, built on emc.store's read functions.

No SQL here: every read goes through emc.store, one short-lived connection per call.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from emc.config import ConfigError, DiscoveryConfig, default_config_path, load_config
from emc.pivotal.calibration import Calibration, calibrate_judges
from emc.pivotal.divergence import LabelMass, label_mass
from emc.pivotal.judge import Label, shown_tokens
from emc.pivotal.logits import PromptScores, TokenScore
from emc.pivotal.prompts import PromptRecord
from emc.store import Store
from emc.store.calibration import compared_labels
from emc.store.judgements import current_labels, judgement_counts, latest_judgement
from emc.store.prompts import get_prompts
from emc.store.queue import list_queue
from emc.store.reviews import claim, claim_next
from emc.store.scores import load_prompt_scores

LABELS: tuple[Label, ...] = ("evil", "unsure", "safe")
LABEL_COLOURS = {"evil": "red", "unsure": "orange", "safe": "green"}


@dataclass(frozen=True)
class TokenRow:
    """One token the judge labelled, with where each model put it."""

    token_id: int
    token: str
    base: TokenScore | None
    adapted: TokenScore | None
    judge_label: Label | None


@dataclass(frozen=True)
class ReviewItem:
    prompt: PromptRecord
    judgement: dict[str, Any]
    scores: PromptScores
    rows: list[TokenRow]  # the adapted model's order, as the judge saw them

    @property
    def judge_labels(self) -> dict[int, Label]:
        return {r.token_id: r.judge_label for r in self.rows if r.judge_label is not None}

    @property
    def tokens(self) -> dict[int, str]:
        return {r.token_id: r.token for r in self.rows}


class ItemUnavailable(LookupError):
    """A queued prompt whose judgement or next tokens cannot be read; the message says which."""


def load_item(store: Store, prompt_id: str) -> ReviewItem:
    judgement = latest_judgement(store, prompt_id)
    if judgement is None:
        raise ItemUnavailable(f"{prompt_id} is queued but has no judgement")
    prompts = get_prompts(store, [prompt_id])
    scores = load_prompt_scores(
        store, [prompt_id], judgement["base_model_id"], judgement["adapted_model_id"]
    )
    if not prompts or not scores:
        raise ItemUnavailable(
            f"{prompt_id}: the prompt or its next tokens for {judgement['base_model_id']} / "
            f"{judgement['adapted_model_id']} are not in the store"
        )
    # current_labels puts a person's label first; the review compares against the judge's own.
    labeller = f"judge:{judgement['judge_model']}"
    judge = {
        t: label for t, (label, who) in current_labels(store, prompt_id).items() if who == labeller
    }
    (scored,) = scores
    base = {t.token_id: t for t in scored.base.tokens}
    adapted = {t.token_id: t for t in scored.adapted.tokens}
    rows = [
        TokenRow(token_id, token, base.get(token_id), adapted.get(token_id), judge.get(token_id))
        for token_id, token in shown_tokens(scored).items()
    ]
    rows.sort(key=lambda r: (r.adapted.rank if r.adapted else 1 << 62, r.token_id))
    return ReviewItem(prompt=prompts[0], judgement=judgement, scores=scored, rows=rows)


def claim_item(
    store: Store, reviewer: str, skipped: Collection[str] = ()
) -> tuple[str | None, bool]:
    """The item this reviewer should see next, claimed; and whether only skipped ones were left.

    Without skips this is `claim_next` (which resumes a held item after a reload). A skipped
    item goes back to pending with its priority, so `claim_next` would hand it straight back:
    the queue is walked instead, and `claim` keeps two reviewers off the same item.
    """
    if skipped:
        now = datetime.now(UTC)
        queue = list_queue(store)
        for row in queue.itertuples():
            if row.prompt_id in skipped or row.state not in ("pending", "in_review"):
                continue
            held_by_other = (
                row.state == "in_review"
                and row.claimed_by != reviewer
                and pd.notna(row.lease_expires_at)
                and row.lease_expires_at > now
            )
            if not held_by_other and claim(store, row.prompt_id, reviewer):
                return row.prompt_id, False
    prompt_id = claim_next(store, reviewer)
    return prompt_id, bool(skipped) and prompt_id is not None


def side_by_side(item: ReviewItem) -> pd.DataFrame:
    """Base and adapted top-k in rank order, each token with the judge's label."""
    base_top, adapted_top = item.scores.base.top(), item.scores.adapted.top()
    labels = item.judge_labels

    def side(tokens: list[TokenScore], i: int) -> tuple:
        if i >= len(tokens):
            return None, None, None
        token = tokens[i]
        return repr(token.token), token.prob, labels.get(token.token_id, "")

    rows = []
    for i in range(max(len(base_top), len(adapted_top))):
        rows.append((i + 1, *side(base_top, i), *side(adapted_top, i)))
    columns = ["rank", "base token", "base p", "base label"]
    columns += ["adapted token", "adapted p", "adapted label"]
    return pd.DataFrame(rows, columns=columns)


def mass(item: ReviewItem, labels: Mapping[int, Label]) -> LabelMass:
    """Probability on the evil and safe tokens under the given labels, as the flow computes it."""
    base, adapted = item.scores.base.tokens, item.scores.adapted.tokens
    return label_mass(
        {t.token_id: t.prob for t in base},
        {t.token_id: t.prob for t in adapted},
        [t for t, label in labels.items() if label == "evil"],
        [t for t, label in labels.items() if label == "safe"],
        {t.token_id: t.rank for t in base},
        {t.token_id: t.rank for t in adapted},
    )


def verdict_history(store: Store) -> tuple[pd.DataFrame, bool]:
    """Judgements per day by verdict (day, verdict, judgements), and whether it is per day.

    Until the store has a per-day query, the totals by verdict stand in (day is then empty).
    """
    try:
        from emc.store.judgements import verdicts_by_day  # type: ignore[attr-defined]
    except ImportError:
        totals = judgement_counts(store).rename(columns={"prompts": "judgements"})
        totals.insert(0, "day", pd.NaT)
        return totals, False
    return verdicts_by_day(store), True


def format_score(score: TokenScore | None) -> str:
    return "not scored" if score is None else f"#{score.rank + 1} · p {score.prob:.3f}"


def calibration_settings(store: Store) -> tuple[DiscoveryConfig, str | None]:
    """The judge thresholds from the data directory's config, else the defaults (and why)."""
    path = default_config_path(store.path.parent)
    if not path.is_file():
        return DiscoveryConfig(), None
    try:
        return load_config(path).discovery, None
    except ConfigError as exc:
        return DiscoveryConfig(), f"default thresholds: {path} is not a valid config ({exc})"


def judge_calibrations(store: Store, settings: DiscoveryConfig) -> list[Calibration]:
    """Each judge model against all reviewers, with its standing under the thresholds."""
    return calibrate_judges(
        compared_labels(store), settings.judge_min_kappa, settings.judge_min_tokens
    )


def calibration_table(calibrations: list[Calibration]) -> pd.DataFrame:
    """One row per judge model: kappa, agreement, how much was compared, and the standing."""
    return pd.DataFrame(
        [
            {
                "judge": c.judge_model,
                "kappa": c.agreement.kappa,
                "agreement": c.agreement.observed,
                "tokens": c.tokens,
                "prompts": c.prompts,
                "standing": c.message,
            }
            for c in calibrations
        ],
        columns=["judge", "kappa", "agreement", "tokens", "prompts", "standing"],
    )


def confusion_frame(calibration: Calibration) -> pd.DataFrame:
    """The confusion matrix: people in rows, the judge in columns."""
    return pd.DataFrame(
        calibration.matrix,
        index=pd.Index([f"person: {label}" for label in calibration.labels], name="tokens"),
        columns=[f"judge: {label}" for label in calibration.labels],
    )


def label_frame(calibration: Calibration) -> pd.DataFrame:
    """Per label: how often people and the judge gave it, the judge's precision and recall."""
    return pd.DataFrame(
        [
            {
                "label": s.label,
                "people": s.human,
                "judge": s.judge,
                "agreed": s.both,
                "precision": s.precision,
                "recall": s.recall,
            }
            for s in calibration.per_label
        ]
    )
