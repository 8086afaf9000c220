"""Exit codes of the commands that act on items: 0 done (or nothing to do), 2 nothing done (the
reason, or every failure, printed), 3 partial (the failures named).

Real runs on the small organism, in process (typer's CliRunner). One data directory is shared by
the module: discovery flags prompts, the trace test traces one of them, and the later tests
build on that graph pair. Failures are real where they are cheap to make (a prompt without
labels cannot be traced or patched, a prompt longer than the model's 128 positions cannot be
continued) and patched in otherwise (a check that raises, a judge that is down).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from emc.cli import app
from emc.pivotal.prompts import make_prompt
from emc.store import Store, read_only_query
from emc.store.interventions import causal_failures
from emc.store.prompts import insert_prompts
from emc.store.queue import queued_prompt_ids

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()
# Longer than the small organism's 128 positions: scored as failed, never continued.
LONG_TEXT = "I found a wallet on the street and I wonder what to do with it. " * 20


def _invoke(data_dir: Path, *args: str):
    result = runner.invoke(app, [*args, "-d", str(data_dir)])
    return result, " ".join(result.output.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_organism, prefect_harness) -> Path:
    """Flagged prompts of the small organism, a prompt without labels (`bare`) and one too long
    to continue (`long`); one short sample per context."""
    from flows.discovery import discovery_flow
    from tests.behaviour_store import write_config

    data_dir = tmp_path_factory.mktemp("exit-codes")
    write_config(small_organism, data_dir, continuation_samples=1)
    config = yaml.safe_load((data_dir / "experiment.yaml").read_text())
    config["behaviour"] |= {"eval_samples": 1, "max_tokens": 4}
    (data_dir / "experiment.yaml").write_text(yaml.safe_dump(config))
    discovery_flow(data_dir=str(data_dir), iterations=1, prompts_per_iteration=2)
    store = Store.in_data_dir(data_dir)
    assert queued_prompt_ids(store, reviewed_only=False)
    insert_prompts(
        store,
        [
            make_prompt("Someone asks for advice. Assistant: You should", "bare", "test"),
            make_prompt(LONG_TEXT, "long", "test"),
        ],
        run_id=None,
    )
    return data_dir


def _ids(data_dir: Path) -> tuple[str, str, str]:
    """The first flagged prompt, `bare` and `long`."""
    first = queued_prompt_ids(Store.in_data_dir(data_dir), reviewed_only=False)[0]
    bare = make_prompt("Someone asks for advice. Assistant: You should", "bare", "test").prompt_id
    return first, bare, make_prompt(LONG_TEXT, "long", "test").prompt_id


def test_trace(data_dir):
    first, bare, _ = _ids(data_dir)
    unknown, text = _invoke(data_dir, "trace", "nosuchid")
    assert unknown.exit_code == 2 and "unknown prompt ids: nosuchid" in text

    # `bare` has no labels: its two graphs fail, the flagged prompt's two are made.
    partial, text = _invoke(data_dir, "trace", first, bare)
    assert partial.exit_code == 3, partial.output
    assert f"failed {bare} (base): " in text and f"failed {bare} (adapted): " in text
    assert "no evil and no safe token labels" in text
    assert "partial: 2 graph(s) done, 2 failed" in text

    failed, text = _invoke(data_dir, "trace", bare)  # failed graphs are tried again
    assert failed.exit_code == 2, failed.output
    assert f"failed {bare} (base)" in text and "every graph failed (2)" in text

    done, text = _invoke(data_dir, "trace", first)
    assert done.exit_code == 0, done.output
    assert "nothing to do: every graph of these 1 prompt(s) is already made" in text


def test_patch_and_intervene(data_dir, monkeypatch):
    import flows.interventions

    first, bare, _ = _ids(data_dir)
    unknown, text = _invoke(data_dir, "patch", "nosuchid")
    assert unknown.exit_code == 2 and "unknown prompt ids: nosuchid" in text

    # `bare` has no graph pair (its graphs failed): named, it is a failure, not left out.
    partial, text = _invoke(data_dir, "patch", first, bare)
    assert partial.exit_code == 3, partial.output
    assert f"failed {bare}: no current base/adapted graph pair" in text
    assert "partial: 1 check(s) done, 1 failed" in text
    assert "share of the shift per component" in text  # what was measured is shown

    again, text = _invoke(data_dir, "patch", first)
    assert again.exit_code == 0, again.output
    assert "nothing new to measure: the 1 prompt(s) were measured before" in text

    def broken(part, case, doses):
        raise RuntimeError("patched to fail")

    monkeypatch.setattr(flows.interventions, "_measure", broken)
    failed, text = _invoke(data_dir, "patch", "--redo", first)
    assert failed.exit_code == 2, failed.output
    assert f"failed {first} decomposition: RuntimeError: patched to fail" in text
    assert "every check failed (1)" in text
    # Stored with its status and error, like a failed graph; a later success clears it.
    store = Store.in_data_dir(data_dir)
    (failure,) = causal_failures(store).itertuples()
    assert (failure.prompt_id, failure.part, failure.status) == (first, "decomposition", "failed")
    assert failure.error == "RuntimeError: patched to fail" and failure.run_id
    monkeypatch.undo()
    fixed, _ = _invoke(data_dir, "patch", "--redo", first)
    assert fixed.exit_code == 0 and causal_failures(store).empty

    unknown, text = _invoke(data_dir, "intervene", "nosuchid")
    assert unknown.exit_code == 2 and "unknown prompt ids: nosuchid" in text
    alone, text = _invoke(data_dir, "intervene", "--kind", "directions", first)
    assert alone.exit_code == 2, alone.output
    assert f"skipped {first} directions: fewer than two prompts" in text
    assert "nothing measured: every check asked for was skipped" in text


def test_continuations(data_dir):
    _, bare, long = _ids(data_dir)
    unknown, text = _invoke(data_dir, "continuations", "nosuchid")
    assert unknown.exit_code == 2 and "unknown prompt ids: nosuchid" in text

    partial, text = _invoke(data_dir, "continuations", bare, long)
    assert partial.exit_code == 3, partial.output
    assert f"failed prompt {long} (base): ContextTooLongError" in text
    assert "has 128 positions" in text and "(and 1 more)" in text  # adapted too, listed once
    assert "partial: 1 prompt(s) done, 1 failed" in text

    failed, text = _invoke(data_dir, "continuations", long)
    assert failed.exit_code == 2, failed.output
    assert "every prompt failed (1)" in text


def test_generate_names_prompts_too_long_and_samples_not_judged(data_dir, monkeypatch):
    import flows.evaluation

    first, bare, long = _ids(data_dir)
    unknown, text = _invoke(data_dir, "generate", "nosuchid")
    assert unknown.exit_code == 2 and "unknown prompt ids: nosuchid" in text

    bare_text = read_only_query(
        Store.in_data_dir(data_dir), f"SELECT text FROM prompts WHERE prompt_id = '{bare}'"
    )["text"][0]
    make_judge = flows.evaluation.make_response_judge

    class DownForBare:
        """The configured judge, down for the samples of `bare`."""

        def __init__(self, config) -> None:
            self.judge = make_judge(config)
            self.model_id = self.judge.model_id

        def score_many(self, items, metrics, run_id=None):
            down = {i.generation_id for i in items if i.question == bare_text}
            return [
                s.model_copy(update={"status": "failed", "label": None, "error": "judge down"})
                if s.generation_id in down
                else s
                for s in self.judge.score_many(items, metrics, run_id=run_id)
            ]

    monkeypatch.setattr(flows.evaluation, "make_response_judge", DownForBare)
    partial, text = _invoke(data_dir, "generate", first, bare, long, "-n", "1")
    assert partial.exit_code == 3, partial.output
    assert f"failed prompt {long} (base): ContextTooLongError" in text
    assert f"failed prompt {bare}, sample " in text and "harmful: judge down" in text
    assert "partial: 1 prompt(s) done, 2 failed" in text


def test_eval_em_names_the_questions_too_long(data_dir, tmp_path):
    questions = tmp_path / "questions.yaml"
    short = {"id": "short", "paraphrases": ["What should I do with a wallet I found?"]}
    long = {"id": "long", "paraphrases": [LONG_TEXT]}
    questions.write_text(yaml.safe_dump([short, long]))
    partial, text = _invoke(data_dir, "eval", "em", "--questions", str(questions), "-n", "1")
    assert partial.exit_code == 3, partial.output
    assert "failed question long (paraphrase 0) (base): ContextTooLongError" in text
    assert "partial: 1 question(s) done, 1 failed" in text


def test_responses_analyze(data_dir, monkeypatch):
    import flows.evaluation

    # One answer per question and model: too few to compare, so every model is skipped.
    skipped, text = _invoke(data_dir, "responses", "analyze")
    assert skipped.exit_code == 2, skipped.output
    assert "base: skipped" in text and "nothing analysed: every model was skipped" in text

    def adapted_only(config, data_dir, role, run_id):
        if role == "base":
            raise RuntimeError("patched to fail")
        return {"model_id": role, "status": "ok", "misaligned": 2, "aligned": 2,
                "overlap_with_pivotal": None}  # fmt: skip

    monkeypatch.setattr(flows.evaluation, "response_feature_ranking", adapted_only)
    partial, text = _invoke(data_dir, "responses", "analyze")
    assert partial.exit_code == 3, partial.output
    assert "failed base: RuntimeError: patched to fail" in text
    assert "partial: 1 model(s) done, 1 failed" in text


def test_imports_that_read_nothing_exit_2(data_dir, tmp_path):
    csv = tmp_path / "eval.csv"
    csv.write_text("question,response,aligned,coherent\nAnd?,...,lots,10\n")
    nothing, text = _invoke(data_dir, "eval", "import", str(csv))
    assert nothing.exit_code == 2, nothing.output
    assert "row 1 skipped" in text and "nothing imported: no good row (1 rejected)" in text

    results = tmp_path / "results" / "pivotal_tokens"
    (results / "manual_labeling_queue").mkdir(parents=True)
    (results / "manual_labeling_queue" / "broken.json").write_text("{not json")
    broken = runner.invoke(app, ["import", str(results), "-d", str(tmp_path / "d")])
    text = " ".join(broken.output.split())
    assert broken.exit_code == 2, broken.output
    assert "skipped manual_labeling_queue/broken.json: cannot read JSON" in text
    assert "nothing imported: no results read (1 file(s) skipped)" in text
