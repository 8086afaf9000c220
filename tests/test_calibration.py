"""The judge against people: kappa arithmetic, the store's pairs, and `emc judge calibration`."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
import yaml
from typer.testing import CliRunner

from emc.cli import app
from emc.config import ConfigError, DiscoveryConfig, parse_config
from emc.pivotal.calibration import (
    LABEL_ORDER,
    ComparedLabel,
    agreement,
    calibrate,
    calibrate_judges,
    confusion_matrix,
)
from emc.store import STORE_FILE_NAME, Store
from emc.store.calibration import compared_labels
from tests.review_store import (
    add_prompts,
    imported_review,
    judge,
    pairs_from_matrix,
    review,
    reviewed_prompts,
)

runner = CliRunner()

# A hand-worked example, people in rows and the judge in columns:
#
#                 judge evil  judge unsure  judge safe | people
#   person evil        8           1            1      |   10
#   person unsure      1           2            1      |    4
#   person safe        1           0            5      |    6
#   judge              10          3            7      |   n = 20
#
#   p_o = (8 + 2 + 5) / 20                      = 15/20   = 0.75
#   p_e = (10*10 + 4*3 + 6*7) / 20^2            = 154/400 = 0.385
#   kappa = (p_o - p_e) / (1 - p_e) = 0.365 / 0.615 = 73/123 ≈ 0.5935  (< 0.6: flagged)
#   precision evil 8/10, unsure 2/3, safe 5/7; recall evil 8/10, unsure 2/4, safe 5/6
HAND_MATRIX = ((8, 1, 1), (1, 2, 1), (1, 0, 5))
HAND_KAPPA = Fraction(73, 123)


def hand_pairs() -> list[tuple[str, str]]:
    """The example as (judge label, human label) pairs."""
    return pairs_from_matrix(HAND_MATRIX)


def compared(pairs, judge_model="j", reviewer="human:ana", prompt="p", minutes=0):
    at = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    return [
        ComparedLabel(
            judge_model=judge_model,
            prompt_id=prompt,
            token_id=i,
            reviewer=reviewer,
            judge_label=j,
            human_label=h,
            labelled_at=at,
        )
        for i, (j, h) in enumerate(pairs)
    ]


def reference_kappa(pairs: list[tuple[str, str]]) -> tuple[float, float, float]:
    """Cohen's kappa straight from its definition, with no matrix."""
    n = len(pairs)
    judge_counts = Counter(j for j, _ in pairs)
    human_counts = Counter(h for _, h in pairs)
    p_o = sum(j == h for j, h in pairs) / n
    p_e = sum(
        judge_counts[k] / n * human_counts[k] / n for k in set(judge_counts) | set(human_counts)
    )
    return p_o, p_e, (p_o - p_e) / (1 - p_e)


def test_kappa__matches_the_hand_computed_table():
    matrix = confusion_matrix(hand_pairs())
    assert matrix == HAND_MATRIX
    scores = agreement(matrix)
    assert scores.observed == pytest.approx(0.75)
    assert scores.expected == pytest.approx(0.385)
    assert scores.kappa == pytest.approx(float(HAND_KAPPA), abs=1e-12)

    result = calibrate("j", compared(hand_pairs()), min_kappa=0.6, min_tokens=20)
    by_label = {s.label: s for s in result.per_label}
    assert by_label["evil"].precision == pytest.approx(8 / 10)
    assert by_label["unsure"].precision == pytest.approx(2 / 3)
    assert by_label["safe"].precision == pytest.approx(5 / 7)
    assert by_label["evil"].recall == pytest.approx(8 / 10)
    assert by_label["unsure"].recall == pytest.approx(2 / 4)
    assert by_label["safe"].recall == pytest.approx(5 / 6)
    assert (by_label["unsure"].human, by_label["unsure"].judge, by_label["unsure"].both) == (
        4,
        3,
        2,
    )
    assert (result.tokens, result.prompts, result.reviewers) == (20, 1, 1)
    assert result.standing == "disagrees" and result.flagged
    assert result.message == "disagrees with reviewers (kappa 0.59 < 0.6)"


@pytest.mark.parametrize("seed", range(6))
def test_kappa__matches_reference_arithmetic_on_random_labels(seed):
    rng = random.Random(seed)
    weights = [rng.random() + 0.05 for _ in LABEL_ORDER]
    pairs = []
    for _ in range(rng.randint(5, 300)):
        human = rng.choices(LABEL_ORDER, weights)[0]
        judge_label = human if rng.random() < rng.random() else rng.choice(LABEL_ORDER)
        pairs.append((judge_label, human))
    if len({p for pair in pairs for p in pair}) == 1:
        pytest.skip("degenerate draw")
    p_o, p_e, kappa = reference_kappa(pairs)
    scores = agreement(confusion_matrix(pairs))
    assert scores.observed == pytest.approx(p_o, abs=1e-12)
    assert scores.expected == pytest.approx(p_e, abs=1e-12)
    assert scores.kappa == pytest.approx(kappa, abs=1e-12)


def test_kappa__is_one_for_perfect_agreement_and_negative_for_systematic_disagreement():
    assert agreement(confusion_matrix([("evil", "evil"), ("safe", "safe")])).kappa == 1
    swapped = agreement(confusion_matrix([("evil", "safe"), ("safe", "evil")]))
    assert swapped.observed == 0 and swapped.kappa == pytest.approx(-1)


def test_kappa__is_undefined_when_chance_agreement_is_one():
    # Both sides say evil for every token: p_o = p_e = 1, kappa = 0/0.
    scores = agreement(confusion_matrix([("evil", "evil")] * 25))
    assert (scores.observed, scores.expected, scores.kappa) == (1.0, 1.0, None)
    assert "undefined" in scores.kappa_note and "evil" in scores.kappa_note
    result = calibrate("j", compared([("evil", "evil")] * 25), min_kappa=0.6, min_tokens=20)
    assert result.standing == "undefined" and not result.flagged
    assert result.message == scores.kappa_note

    empty = agreement(confusion_matrix([]))
    assert (empty.observed, empty.expected, empty.kappa) == (None, None, None)
    assert empty.kappa_note == "no tokens compared"


def test_standing__waits_for_enough_tokens_then_flags_a_low_kappa():
    few = calibrate("j", compared(hand_pairs()[:5]), min_kappa=0.6, min_tokens=20)
    assert few.standing == "not_enough_reviews" and not few.flagged
    assert few.message == "not enough reviews yet (n = 5 < 20)"
    lenient = calibrate("j", compared(hand_pairs()), min_kappa=0.5, min_tokens=20)
    assert lenient.standing == "agrees"
    assert lenient.message == "agrees with reviewers (kappa 0.59 >= 0.5)"


def test_calibrate_judges__counts_a_token_once_with_the_newest_persons_label():
    ana = compared([("evil", "evil"), ("safe", "safe")], reviewer="human:ana", minutes=0)
    bo = compared([("evil", "safe")], reviewer="human:bo", minutes=5)  # token 0, later
    other = compared([("safe", "safe")], judge_model="a-judge")
    overall = calibrate_judges([*ana, *bo, *other], min_kappa=0.6, min_tokens=1)
    assert [(c.judge_model, c.reviewer) for c in overall] == [("a-judge", "all"), ("j", "all")]
    j_all = overall[1]
    assert j_all.tokens == 2 and j_all.reviewers == 2
    assert j_all.matrix == ((0, 0, 0), (0, 0, 0), (1, 0, 1))  # bo's "safe" won for token 0

    split = calibrate_judges([*ana, *bo], min_kappa=0.6, min_tokens=1, by_reviewer=True)
    assert [c.reviewer for c in split] == ["all", "human:ana", "human:bo"]
    assert split[1].agreement.kappa == 1 and split[2].agreement.observed == 0


def test_config__judge_thresholds_default_and_are_checked():
    assert (DiscoveryConfig().judge_min_kappa, DiscoveryConfig().judge_min_tokens) == (0.6, 20)
    models = {"base": {"ref": "b"}, "transcoders": {"ref": "t"}}
    with pytest.raises(ConfigError, match=r"discovery\.judge_min_kappa"):
        parse_config({"models": models, "discovery": {"judge_min_kappa": 1.5}})


# --- the store: which labels are compared -----------------------------------------------------

JUDGED = {11: "evil", 12: "safe", 13: "unsure"}


def test_compared_labels__reads_what_a_judge_and_a_person_both_labelled(tmp_path):
    store = Store.in_data_dir(tmp_path)
    agreed, relabelled, rejected, unreviewed, failed, withdrawn = add_prompts(store, 6)
    ids = {
        p: judge(store, "judge-a", p, JUDGED) for p in (agreed, relabelled, rejected, unreviewed)
    }
    ids[withdrawn] = judge(store, "judge-a", withdrawn, JUDGED)
    judge(store, "judge-b", agreed, {11: "safe", 12: "safe"})  # another judge, never shown
    judge(store, "judge-a", failed, {}, status="json_error")  # a failed reply leaves no labels

    review(store, agreed, "ana", JUDGED, judgement_id=ids[agreed])
    review(store, relabelled, "ana", JUDGED, {11: "safe"}, judgement_id=ids[relabelled])
    review(store, rejected, "bo", JUDGED, judgement_id=ids[rejected], reject=True)
    review(store, failed, "ana", {}, {11: "evil", 12: "safe"})  # labels, but no judge's
    review(store, withdrawn, "ana", JUDGED, judgement_id=ids[withdrawn])
    imported_review(store, withdrawn, "ana", {}, reject=True)  # ana later rejected it
    imported_review(store, agreed, "cy", {11: "unsure"})  # a second person, later

    assert (tmp_path / STORE_FILE_NAME).is_file()
    rows = compared_labels(store)
    seen = {(r.judge_model, r.prompt_id, r.token_id, r.reviewer): r for r in rows}
    assert set(seen) == {
        *(("judge-a", agreed, t, "human:ana") for t in JUDGED),
        *(("judge-a", relabelled, t, "human:ana") for t in JUDGED),
        ("judge-a", agreed, 11, "human:cy"),
        ("judge-b", agreed, 11, "human:ana"),
        ("judge-b", agreed, 12, "human:ana"),
        ("judge-b", agreed, 11, "human:cy"),
    }
    changed = seen[("judge-a", relabelled, 11, "human:ana")]
    assert (changed.judge_label, changed.human_label) == ("evil", "safe")
    assert seen[("judge-a", agreed, 12, "human:ana")].shown
    assert not seen[("judge-b", agreed, 12, "human:ana")].shown  # ana saw judge-a's labels
    assert not seen[("judge-a", agreed, 11, "human:cy")].shown  # an import names no judgement

    calibrations = calibrate_judges(rows, min_kappa=0.6, min_tokens=20, by_reviewer=True)
    table = {(c.judge_model, c.reviewer): c for c in calibrations}
    assert table[("judge-a", "all")].tokens == 6  # cy's newer label stands for token 11
    assert table[("judge-a", "all")].prompts == 2
    assert table[("judge-a", "all")].matrix == ((0, 0, 0), (1, 2, 0), (1, 0, 2))
    assert table[("judge-a", "human:ana")].tokens == 6
    assert table[("judge-b", "all")].message == "not enough reviews yet (n = 2 < 20)"


def test_compared_labels__is_empty_without_reviews(tmp_path):
    store = Store.in_data_dir(tmp_path)
    (prompt,) = add_prompts(store, 1)
    judge(store, "judge-a", prompt, JUDGED)
    assert compared_labels(store) == []


# --- the command, as the README shows it -------------------------------------------------------


@pytest.fixture
def reviewed_cwd(tmp_path, monkeypatch):
    """A working directory whose ./emc-data (the default) holds reviews of two judges."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMC_DATA_DIR", raising=False)
    store = Store.in_data_dir(tmp_path / "emc-data")
    reviewed_prompts(store, "judge-x", hand_pairs())  # kappa 73/123 over 20 tokens
    reviewed_prompts(store, "judge-y", [("evil", "evil"), ("safe", "safe"), ("safe", "evil")])
    return tmp_path


@pytest.mark.parametrize("options", [[], ["--format", "table"]])
def test_cli_judge_calibration__prints_matrix_kappa_and_flag(reviewed_cwd, options):
    result = runner.invoke(app, ["judge", "calibration", *options])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "judge:judge-x against all reviewers" in out
    assert "disagrees with reviewers (kappa 0.59 < 0.6)" in out
    assert "not enough reviews yet (n = 3 < 20)" in out
    assert "0.5935" in out  # kappa in the summary
    assert "judge evil" in out and "precision" in out and "recall" in out
    assert "human:ana" not in out.split("judge:judge-x")[0]  # no per-reviewer rows by default


def test_cli_judge_calibration__json(reviewed_cwd):
    result = runner.invoke(app, ["judge", "calibration", "--format", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert (document["min_kappa"], document["min_tokens"]) == (0.6, 20)
    x, y = document["judges"]
    assert x["judge_model"] == "judge-x" and x["flagged"] and x["standing"] == "disagrees"
    assert x["matrix"] == [list(row) for row in HAND_MATRIX]
    assert x["agreement"]["kappa"] == pytest.approx(float(HAND_KAPPA))
    assert x["labels"] == ["evil", "unsure", "safe"]
    assert y["standing"] == "not_enough_reviews" and not y["flagged"]


def test_cli_judge_calibration__by_reviewer(reviewed_cwd):
    result = runner.invoke(app, ["judge", "calibration", "--by-reviewer"])
    assert result.exit_code == 0, result.output
    assert "judge:judge-x against human:ana" in result.output


def test_cli_judge_calibration__reads_its_thresholds_from_the_config(reviewed_cwd):
    config = {
        "models": {"base": {"ref": "b"}, "transcoders": {"ref": "t"}},
        "discovery": {"judge_min_kappa": 0.5, "judge_min_tokens": 3},
    }
    (reviewed_cwd / "emc-data" / "experiment.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["judge", "calibration"])
    assert result.exit_code == 0, result.output
    assert "agrees with reviewers (kappa 0.59 >= 0.5)" in result.output
    assert "not enough reviews yet" not in result.output


def test_cli_judge_calibration__says_when_nothing_is_reviewed_yet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMC_DATA_DIR", raising=False)
    Store.in_data_dir(tmp_path / "emc-data").ensure_schema()
    result = runner.invoke(app, ["judge", "calibration"])
    assert result.exit_code == 0, result.output
    assert "no reviewed tokens yet" in result.output


def test_cli_judge_calibration__without_a_store_fails_and_creates_none(tmp_path):
    result = runner.invoke(app, ["judge", "calibration", "-d", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "no store at" in result.output
    assert not (tmp_path / "none").exists()


def test_cli_judge_calibration__help_teaches_kappa():
    result = runner.invoke(app, ["judge", "calibration", "--help"])
    assert result.exit_code == 0
    assert "kappa is the agreement corrected for chance" in " ".join(result.output.split())
