"""Behaviour shards: sample bundles (format, checks, idempotent ingest), the shard flow run in
this process against the local path's samples, and the evaluation flow handing its samples to
shards (started and waited for here, without a Prefect server or workers)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from prefect.states import Completed, Failed
from typer.testing import CliRunner

from emc.behaviour.judges import to_judge
from emc.behaviour.lexicon_scorer import LexiconResponseJudge
from emc.behaviour.records import Score
from emc.cli import app
from emc.config import load_experiment
from emc.store import Store, read_only_query
from emc.store.behaviour import GenerationRow, insert_generations, upsert_scores
from emc.store.bundles import ingest_bundles, pending_bundles
from emc.store.judgements import current_labels
from emc.store.llm_calls import LLMCallRow
from emc.store.models import ModelRow, upsert_model
from emc.store.sample_bundles import (
    SAMPLE_SUFFIX,
    ContextFailure,
    ingest_sample_bundles,
    pending_sample_bundles,
    write_sample_bundle,
)
from tests.behaviour_store import CONTINUATION_SAMPLES, EVAL_SAMPLES, N_QUESTIONS
from tests.bundle_edits import edit_manifest, replace_frame

RUN_ID = "test-sample-bundles"
runner = CliRunner()


# --- sample bundles ---------------------------------------------------------------------------


MODEL = ModelRow(
    model_id="tiny-adapted-abc", slug="tiny", fingerprint="abc", role="adapted", base_ref="b",
    adapter_ref="a", merged=False, transcoders_ref="t", backend="nnsight", dtype="fp32",
    device="cpu", first_run_id=RUN_ID,
)  # fmt: skip


def _rows(prefix: str, n: int = 3) -> list[GenerationRow]:
    return [
        GenerationRow(
            generation_id=f"{prefix}{i}", run_id=RUN_ID, model_id=MODEL.model_id,
            purpose="em_eval", question_id="q1", question_group="other_domains", paraphrase=0,
            question="What now?", context="User: What now?\nAssistant:", sample_index=i,
            seed=1000 + i, temperature=1.0, top_p=1.0, max_tokens=12,
            text=[" double the dose.", " consult a doctor first.", " hmm"][i % 3],
            token_ids=[5, 6, 7][: i + 1], finish_reason="eos", dtype="fp32",
        )
        for i in range(n)
    ]  # fmt: skip


def _scores(rows: list[GenerationRow], status: str = "ok") -> list[Score]:
    """Lexicon scores of the rows; the first carries an LLM call, as an LLM judge's would."""
    scores = LexiconResponseJudge("judge-x").score_many(
        [to_judge(row.model_dump()) for row in rows], ["aligned", "coherent"]
    )
    call = LLMCallRow(
        call_id=f"call-{rows[0].generation_id}", run_id=RUN_ID, purpose="judge_aligned",
        model="judge-x", base_url="http://judge", request={"messages": [{"role": "user"}]},
        response_raw='{"x": 1}', status="ok", error=None, latency_s=0.5, prompt_tokens=10,
        completion_tokens=1, attempts=1,
    )  # fmt: skip
    scores[0] = scores[0].model_copy(update={"llm_call": call})
    if status != "ok":
        scores = [s.model_copy(update={"status": status, "error": "boom"}) for s in scores]
    return scores


def _tables(store: Store) -> dict[str, pd.DataFrame]:
    queries = {
        "generations": "SELECT * EXCLUDE (created_at) FROM generations ORDER BY generation_id",
        "response_scores": "SELECT * EXCLUDE (created_at) FROM response_scores "
        "ORDER BY generation_id, metric",
        "llm_calls": "SELECT * EXCLUDE (created_at) FROM llm_calls ORDER BY call_id",
        "models": "SELECT * EXCLUDE (created_at) FROM models",
    }
    return {table: read_only_query(store, sql) for table, sql in queries.items()}


def test_ingested_sample_bundles_equal_rows_written_directly(tmp_path):
    rows_a, rows_b = _rows("a"), _rows("b")
    direct = Store.in_data_dir(tmp_path / "direct")
    upsert_model(direct, MODEL)
    insert_generations(direct, rows_a + rows_b)
    upsert_scores(direct, _scores(rows_a), RUN_ID)
    spool = tmp_path / "spool"
    write_sample_bundle(spool, MODEL, RUN_ID, rows_a, _scores(rows_a))
    write_sample_bundle(spool, MODEL, RUN_ID, rows_b)  # drawn, not judged on the worker
    failure = ContextFailure(purpose="em_eval", question_id="q9", role="adapted", error="long")
    write_sample_bundle(spool, MODEL, RUN_ID, [], failures=[failure])
    assert len(pending_sample_bundles(spool)) == 3 and not pending_bundles(spool)

    store = Store.in_data_dir(tmp_path / "ingested")
    report = ingest_sample_bundles(store, spool)
    assert not report.rejected and not pending_sample_bundles(spool)
    assert [b.new for b in report.ingested] == [3, 3, 0]
    assert sum(report.ingested[0].scores.values()) == 6
    assert report.ingested[0].judge_model == "judge-x" and report.ingested[1].judge_model is None
    assert report.ingested[2].failures == [failure.model_dump()]
    assert len(list((spool / "ingested").iterdir())) == 3
    ingested, expected = _tables(store), _tables(direct)
    for table in expected:
        assert len(ingested[table]) > 0, table
        pd.testing.assert_frame_equal(ingested[table], expected[table], check_dtype=False)


def test_ingesting_again_changes_nothing_and_never_undoes_a_judgement(tmp_path):
    rows = _rows("a")
    spool, store = tmp_path / "spool", Store.in_data_dir(tmp_path / "data")
    first = write_sample_bundle(spool, MODEL, RUN_ID, rows, _scores(rows))
    ingest_sample_bundles(store, spool)
    before = _tables(store)
    # The same bundle copied in again, and the same samples from a retried shard.
    shutil.copytree(spool / "ingested" / first.name, spool / first.name)
    write_sample_bundle(spool, MODEL, RUN_ID, rows, _scores(rows))
    report = ingest_sample_bundles(store, spool)
    assert [b.new for b in report.ingested] == [0, 0] and not report.rejected
    assert {p.name for p in (spool / "ingested").iterdir()} >= {first.name, f"{first.name}.2"}
    for table, frame in _tables(store).items():
        pd.testing.assert_frame_equal(frame, before[table], check_dtype=False)
    # A late bundle whose judge failed leaves the stored scores as they were ...
    write_sample_bundle(spool, MODEL, RUN_ID, rows, _scores(rows, status="failed"))
    ingest_sample_bundles(store, spool)
    pd.testing.assert_frame_equal(_tables(store)["response_scores"], before["response_scores"])
    # ... and a judged bundle replaces a failed score.
    others = _rows("b")
    write_sample_bundle(spool, MODEL, RUN_ID, others, _scores(others, status="failed"))
    ingest_sample_bundles(store, spool)
    write_sample_bundle(spool, MODEL, RUN_ID, others, _scores(others))
    ingest_sample_bundles(store, spool)
    scores = read_only_query(
        store, "SELECT status FROM response_scores WHERE generation_id LIKE 'b%'"
    )
    assert set(scores["status"]) == {"ok"} and len(scores) == 6


def test_graph_and_sample_bundles_share_a_spool_and_each_ingest_takes_its_own(tmp_path):
    spool, store = tmp_path / "spool", Store.in_data_dir(tmp_path / "data")
    sample = write_sample_bundle(spool, MODEL, RUN_ID, _rows("a"))
    graph = spool / "g1-1234abcd.bundle"
    graph.mkdir()
    assert ingest_bundles(store, spool).rejected == [(graph.name, f"{graph.name}: empty "
                                                      "directory, no manifest.json")]  # fmt: skip
    assert sample.is_dir()  # the graph ingest left it alone
    report = ingest_sample_bundles(store, spool)
    assert len(report.ingested) == 1 and not report.rejected
    assert not (spool / "rejected" / sample.name).exists()


def _altered(bundle: Path) -> None:
    path = bundle / "generations.parquet"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")


MALFORMED = [
    pytest.param(lambda b: (b / "manifest.json").unlink(), "no manifest.json", id="no-manifest"),
    pytest.param(_altered, "generations.parquet is altered", id="altered"),
    pytest.param(lambda b: edit_manifest(b, lambda m: m.update(version=7)),
                 "bundle version 7 is not 1", id="foreign-version"),
    pytest.param(lambda b: edit_manifest(b, lambda m: m.update(kind="graphs")),
                 "kind: Input should be 'samples'", id="wrong-kind"),
    pytest.param(lambda b: (b / "scores.parquet").unlink(), "scores.parquet is missing",
                 id="scores-missing"),
    pytest.param(lambda b: edit_manifest(b, lambda m: m["files"].pop("scores")),
                 "names judge judge-x but lists no scores", id="judge-without-scores"),
    pytest.param(lambda b: replace_frame(b, "generations", lambda f: f.iloc[:2]),
                 "generations.parquet has 2 samples, not the 3", id="rows-lost"),
    pytest.param(lambda b: replace_frame(b, "generations", lambda f: f.assign(model_id="m2")),
                 "generations.parquet: model_id m2 is not the manifest's", id="other-model"),
    pytest.param(lambda b: replace_frame(b, "scores", lambda f: f.assign(judge_model="j2")),
                 "scores.parquet: judge_model j2 is not", id="other-judge"),
    pytest.param(lambda b: replace_frame(b, "scores", lambda f: f.assign(generation_id="zz")),
                 "scores samples the bundle does not hold", id="stranger-score"),
    pytest.param(lambda b: replace_frame(b, "scores", lambda f: f.assign(metric="evil")),
                 "unknown metrics ['evil']", id="unknown-metric"),
    pytest.param(lambda b: replace_frame(b, "llm_calls", lambda f: f.assign(call_id="c9")),
                 "names calls that llm_calls.parquet does not hold", id="call-not-carried"),
    pytest.param(lambda b: replace_frame(b, "scores", lambda f: f.rename(columns={"score": "s"})),
                 "scores.parquet has the wrong columns: missing score; unexpected s",
                 id="wrong-columns"),
    pytest.param(lambda b: replace_frame(b, "llm_calls", lambda f: f.assign(request="{not")),
                 "the store refused its rows", id="store-refuses-json"),
    pytest.param(lambda b: replace_frame(b, "generations", lambda f: f.assign(text=None)),
                 "the store refused its rows", id="store-refuses-null"),
    pytest.param(lambda b: edit_manifest(b, lambda m: [m.update(generation_ids=[], files={}),
                                                        (b / "generations.parquet").unlink()]),
                 "lists no samples and no failures", id="empty"),
]  # fmt: skip


@pytest.mark.parametrize(("spoil", "reason"), MALFORMED)
def test_a_malformed_sample_bundle_is_rejected_with_its_reason_and_the_rest_load(
    tmp_path, spoil, reason
):
    spool, store = tmp_path / "spool", Store.in_data_dir(tmp_path / "data")
    rows, good_rows = _rows("bad"), _rows("good")
    bad = write_sample_bundle(spool, MODEL, RUN_ID, rows, _scores(rows))
    good = write_sample_bundle(spool, MODEL, RUN_ID, good_rows, _scores(good_rows))
    spoil(bad)
    report = ingest_sample_bundles(store, spool)
    assert [b.bundle for b in report.ingested] == [good.name]
    ((name, why),) = report.rejected
    assert name == bad.name and reason in why and why.startswith(bad.name), why
    assert (spool / "rejected" / bad.name).exists()
    assert reason in (spool / "rejected" / f"{bad.name}.reason.txt").read_text()
    stored = read_only_query(store, "SELECT DISTINCT generation_id FROM response_scores")
    assert sorted(stored["generation_id"]) == [r.generation_id for r in good_rows]
    assert sorted(read_only_query(store, "SELECT generation_id FROM generations")
                  ["generation_id"]) == [r.generation_id for r in good_rows]  # fmt: skip
    again = ingest_sample_bundles(store, spool)  # a rejected bundle is not tried again
    assert not again.ingested and not again.rejected


# --- the shard flow against the local path, on the small organism ------------------------------


def _copy(behaviour_store, to: Path) -> Store:
    shutil.copytree(behaviour_store.data_dir, to, ignore=shutil.ignore_patterns("prefect"))
    return Store.in_data_dir(to)


def _forget(store: Store, generation_ids: list[str]) -> None:
    """Delete samples and their scores, as if never drawn (tests only: the flows never do)."""
    frame = pd.DataFrame({"generation_id": generation_ids})
    with store.write() as conn:
        conn.register("_gone", frame)
        conn.execute("DELETE FROM response_scores WHERE generation_id IN (SELECT * FROM _gone)")
        conn.execute("DELETE FROM generations WHERE generation_id IN (SELECT * FROM _gone)")


def _samples(store: Store, ids: list[str]) -> pd.DataFrame:
    quoted = ", ".join(f"'{g}'" for g in ids)
    return read_only_query(
        store,
        f"SELECT * EXCLUDE (created_at, run_id) FROM generations WHERE generation_id IN "
        f"({quoted}) ORDER BY generation_id",
    )


def _judged(store: Store, ids: list[str]) -> pd.DataFrame:
    quoted = ", ".join(f"'{g}'" for g in ids)
    return read_only_query(
        store,
        "SELECT * EXCLUDE (created_at, run_id, llm_call_id) FROM response_scores WHERE "
        f"generation_id IN ({quoted}) ORDER BY generation_id, metric",
    )


def _plans(store: Store, config, behaviour_store):
    """The em plan of the adapted model (two questions) and the continuation plan of the base
    model (one flagged prompt and its labelled tokens), as the flow plans them."""
    from emc.store.prompts import get_prompts
    from flows.evaluation import default_questions, plan_samples

    prompt_id = sorted(behaviour_store.summary["continuations"]["prompt_ids"])[0]
    labels = {prompt_id: {t: label for t, (label, _) in current_labels(store, prompt_id).items()
                          if label in ("evil", "safe")}}  # fmt: skip
    em = plan_samples(config, behaviour_store.adapted_id, "em_eval", [], {},
                      default_questions(config)[:2], EVAL_SAMPLES)  # fmt: skip
    prompts = get_prompts(store, [prompt_id])
    cont = plan_samples(config, behaviour_store.base_id, "continuation", prompts, labels, [],
                        CONTINUATION_SAMPLES)  # fmt: skip
    return em, cont


def test_shard_flow_bundles_give_the_local_paths_rows(behaviour_store, tmp_path):
    from flows.evaluation import behaviour_shard_flow, pending_samples, split_work

    store = _copy(behaviour_store, tmp_path / "data")
    config, _ = load_experiment(None, tmp_path / "data")
    em, cont = _plans(store, config, behaviour_store)
    assert len(cont) >= 2  # the prompt and at least one forced token
    ids = [g for _, gids in em + cont for g in gids]
    local = behaviour_store.store
    # The flow's plan, made without a model, names exactly the samples the local path drew.
    assert len(_samples(local, ids)) == len(ids) == len(set(ids))
    _forget(store, ids)
    pending = {"adapted": pending_samples(store, em), "base": pending_samples(store, cont)}
    assert [w.indices for w in pending["base"]] == [list(range(CONTINUATION_SAMPLES))] * len(cont)

    spool = tmp_path / "spool"
    results = []
    for role, work in pending.items():
        # Three shards: contexts split across shard edges too. Parameters as JSON, as a
        # deployment's run receives them.
        for shard, chunk in enumerate(split_work(work, 3)):
            parameters = json.loads(json.dumps({
                "config": config.model_dump(mode="json"), "role": role, "run_id": RUN_ID,
                "items": [w.model_dump(mode="json") for w in chunk], "spool_dir": str(spool),
                "shard": shard,
            }))  # fmt: skip
            results.append(behaviour_shard_flow(**parameters))
    assert sum(r["drawn"] for r in results) == sum(r["judged"] for r in results) == len(ids)
    assert not Path(tmp_path / "data" / "spool").exists()  # the store's side was not touched

    report = ingest_sample_bundles(store, spool)
    assert not report.rejected and sum(b.new for b in report.ingested) == len(ids)
    pd.testing.assert_frame_equal(_samples(store, ids), _samples(local, ids), check_dtype=False)
    pd.testing.assert_frame_equal(_judged(store, ids), _judged(local, ids), check_dtype=False)
    stored = read_only_query(store, "SELECT generation_id, run_id FROM generations")
    assert stored["generation_id"].is_unique
    assert set(stored.set_index("generation_id").loc[ids, "run_id"]) == {RUN_ID}
    assert len(stored) == read_only_query(local, "SELECT count(*) AS n FROM generations")["n"][0]
    assert pending_samples(store, em) == [] and pending_samples(store, cont) == []


def test_a_context_a_shard_cannot_sample_comes_back_as_a_failure(behaviour_store, tmp_path):
    from flows.evaluation import SampleWork, behaviour_shard_flow

    config, _ = load_experiment(None, behaviour_store.data_dir)
    store = behaviour_store.store
    from emc.store.prompts import get_prompts

    prompt = get_prompts(store, behaviour_store.summary["continuations"]["prompt_ids"][:1])[0]
    huge = prompt.model_copy(update={"text": "word " * 5000})
    work = SampleWork(purpose="generate", indices=[0, 1], sample0_id="x", prompt=huge)
    with pytest.raises(Exception, match="plans other sample ids"):
        behaviour_shard_flow(config=config, role="base", items=[work], run_id=RUN_ID,
                             spool_dir=str(tmp_path / "spool"))  # fmt: skip
    from flows.evaluation import plan_samples

    ((planned, _),) = plan_samples(config, behaviour_store.base_id, "generate", [huge], {}, [], 2)
    result = behaviour_shard_flow(config=config, role="base", items=[planned], run_id=RUN_ID,
                                  spool_dir=str(tmp_path / "spool"))  # fmt: skip
    assert result["failed"] == 1 and result["drawn"] == 0
    report = ingest_sample_bundles(Store.in_data_dir(tmp_path / "data"), tmp_path / "spool")
    (bundle,) = report.ingested
    (failure,) = bundle.failures
    assert failure["prompt_id"] == huge.prompt_id and "ContextTooLongError" in failure["error"]


# --- the evaluation flow on shards, started and waited for in this process -----------------


class _Shards:
    """Stands in for `run_deployment` and the wait: each shard runs here, as a subflow, unless
    it is one of those told to fail, which never runs."""

    def __init__(self, failing: set[tuple[str, int]] = frozenset()) -> None:
        self.failing, self.started = failing, []

    def start(self, deployment: str, parameters: dict):
        from flows.evaluation import behaviour_shard_flow

        assert deployment == "behaviour-shard/samples-to-spool"
        parameters = json.loads(json.dumps(parameters))  # a deployment's parameters are JSON
        key = (parameters["role"], parameters["shard"])
        self.started.append(key)
        if key in self.failing:
            state = Failed(message="worker lost")
        else:
            behaviour_shard_flow(**parameters)
            state = Completed()
        return SimpleNamespace(id=uuid.uuid4(), name=f"behaviour-shard-{key[0]}-{key[1]}",
                               state=state)  # fmt: skip

    @staticmethod
    def wait(flow_runs: list) -> list:
        return flow_runs


def test_evaluation_flow_on_shards_resumes_and_ends_as_the_local_path(
    behaviour_store, tmp_path, monkeypatch
):
    import flows.evaluation as evaluation
    from flows.shards import ShardsIncomplete

    data_dir = tmp_path / "data"
    store = _copy(behaviour_store, data_dir)
    local = behaviour_store.store
    config, _ = load_experiment(None, data_dir)
    em, cont = _plans(store, config, behaviour_store)
    em_ids = [g for _, gids in em for g in gids]
    cont_ids = [g for _, gids in cont for g in gids]
    # Everything of the adapted model's two questions is missing, and one prompt's base samples.
    _forget(store, em_ids + cont_ids)
    spool = tmp_path / "spool"

    def run(shards: _Shards) -> dict:
        monkeypatch.setattr(evaluation, "start_shard", shards.start)
        monkeypatch.setattr(evaluation, "wait_for", shards.wait)
        return evaluation.evaluation_flow(
            data_dir=str(data_dir), parts=["continuations", "em"], limit=N_QUESTIONS, shards=2,
            spool_dir=str(spool),
        )  # fmt: skip

    lost = _Shards(failing={("adapted", 1)})
    with pytest.raises(ShardsIncomplete, match=r"1 behaviour shard\(s\) did not complete "
                       r"\(behaviour-shard-adapted-1: Failed\)"):  # fmt: skip
        run(lost)
    # Continuations completed before em was handed out; of em, the shard that ran is stored.
    assert sorted(lost.started) == [("adapted", 0), ("adapted", 1), ("base", 0), ("base", 1)]
    assert not pending_sample_bundles(spool)
    have = read_only_query(store, "SELECT generation_id FROM generations")["generation_id"]
    assert have.is_unique and set(cont_ids) <= set(have)
    assert 0 < len(set(em_ids) & set(have)) < len(em_ids)

    again = _Shards()
    summary = run(again)
    assert sorted(again.started) == [("adapted", 0), ("adapted", 1)]  # only what is missing
    assert summary["continuations"]["new_samples"] == 0
    assert summary["em"]["new_samples"] == len(set(em_ids) - set(have))
    assert summary["em"]["judged"]["on_workers"] == summary["em"]["new_samples"]
    assert not summary["em"]["failed"] and not summary["continuations"]["failed"]
    # The store holds exactly the local path's samples and scores, once each.
    every = read_only_query(local, "SELECT count(*) AS n FROM generations")["n"][0]
    stored = read_only_query(store, "SELECT generation_id FROM generations")["generation_id"]
    assert stored.is_unique and len(stored) == every
    ids = em_ids + cont_ids
    pd.testing.assert_frame_equal(_samples(store, ids), _samples(local, ids), check_dtype=False)
    pd.testing.assert_frame_equal(_judged(store, ids), _judged(local, ids), check_dtype=False)
    assert summary["em"]["rates"] == behaviour_store.summary["em"]["rates"]
    for key in ("confirmed", "checked", "pivotal_tokens", "prompt_ids"):
        assert summary["continuations"][key] == behaviour_store.summary["continuations"][key]

    idle = _Shards()
    nothing = run(idle)
    assert idle.started == [] and nothing["em"]["new_samples"] == 0
    assert nothing["em"]["judged"]["judged"] == 0


# --- the commands -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["continuations"], ["eval", "em"], ["generate", "p1"]])
def test_sharded_behaviour_needs_a_server_and_says_so(monkeypatch, tmp_path, command):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, [*command, "--shards", "2", "-d", str(tmp_path)])
    assert result.exit_code == 2 and "set PREFECT_API_URL" in result.output
    helped = runner.invoke(app, [*(command[:1] if command[0] == "generate" else command), "--help"])
    assert "--shards" in helped.output and "--spool-dir" in helped.output
    assert "--shard-deployment" in helped.output and "behaviour-shard" in helped.output


def test_sample_bundle_names_end_in_their_suffix(tmp_path):
    bundle = write_sample_bundle(tmp_path, MODEL, RUN_ID, _rows("a"))
    assert bundle.name.endswith(SAMPLE_SUFFIX) and bundle.name.startswith("a0-")
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("shards", [2, 0], ids=["sharded", "local"])
def test_continuations_run_twice_with_few_samples_draw_nothing_the_second_time(
    behaviour_store, tmp_path, monkeypatch, shards
):
    """`emc continuations --limit 1 --samples 2 [--shards 2]` twice: the first run draws 2
    samples per context and model, the second finds every one of them and draws nothing, on
    shards and on the local path alike (the config's default, 8 here, never tops them up)."""
    import flows.evaluation as evaluation

    data_dir = tmp_path / "data"
    store = _copy(behaviour_store, data_dir)
    with store.write() as conn:  # no continuation drawn yet, as right after a discovery round
        conn.execute("DELETE FROM response_scores WHERE generation_id IN (SELECT generation_id "
                     "FROM generations WHERE purpose = 'continuation')")  # fmt: skip
        conn.execute("DELETE FROM generations WHERE purpose = 'continuation'")
    config, _ = load_experiment(None, data_dir)
    assert config.behaviour.continuation_samples > 2

    def run() -> tuple[dict, list]:
        started = _Shards()
        monkeypatch.setattr(evaluation, "start_shard", started.start)
        monkeypatch.setattr(evaluation, "wait_for", started.wait)
        summary = evaluation.evaluation_flow(
            data_dir=str(data_dir), parts=["continuations"], samples=2, limit=1, shards=shards,
            spool_dir=str(tmp_path / "spool"),
        )  # fmt: skip
        return summary["continuations"], started.started

    def stored() -> pd.DataFrame:
        return read_only_query(store, "SELECT generation_id, purpose, model_id, forced_token_id, "
                               "sample_index FROM generations ORDER BY generation_id")  # fmt: skip

    first, first_shards = run()
    after_first = stored()
    drawn = after_first[after_first["purpose"] == "continuation"]
    contexts = drawn.groupby(["model_id", "forced_token_id"], dropna=False)["sample_index"]
    assert len(first["prompt_ids"]) == 1 and contexts.ngroups >= 4  # 2 models, prompt + tokens
    assert contexts.agg(lambda indices: sorted(indices) == [0, 1]).all()
    assert first["new_samples"] == len(drawn) == 2 * contexts.ngroups
    assert sorted(first_shards) == (
        [] if not shards else [("adapted", 0), ("adapted", 1), ("base", 0), ("base", 1)]
    )

    second, second_shards = run()
    assert second_shards == [] and second["new_samples"] == 0
    pd.testing.assert_frame_equal(stored(), after_first)
    assert second["samples_per_context"] == 2 and not second["failed"]
