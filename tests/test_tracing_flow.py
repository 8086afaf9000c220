"""The tracing flow on the small organism: pairs, resume without duplicates, failures per item."""

from __future__ import annotations

import logging

import pytest
import torch
from typer.testing import CliRunner

from emc.cli import app
from emc.config import TracingConfig, dump_config
from emc.pivotal.prompts import make_prompt
from emc.pivotal.review import make_review
from emc.store import Store, read_only_query
from emc.store.features import feature_ranking
from emc.store.graph_pairs import graph_pairs
from emc.store.graphs import list_graphs
from emc.store.judgements import current_labels
from emc.store.prompts import insert_prompts
from emc.store.queue import list_queue, queued_prompt_ids
from emc.store.reviews import claim, submit_review
from emc.store.validity import counted_graphs, stale_graphs
from emc.tracing import with_memory_fallback
from flows.discovery import discovery_flow
from flows.tracing import tracing_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _count(store: Store, sql: str) -> int:
    return int(read_only_query(store, sql).iloc[0, 0])


@pytest.fixture(scope="module")
def discovered(tmp_path_factory, small_organism, prefect_harness):
    """A data directory whose review queue holds four flagged organism prompts."""
    data_dir = tmp_path_factory.mktemp("tracing-flow")
    (data_dir / "experiment.yaml").write_text(dump_config(small_organism.config))
    discovery_flow(data_dir=str(data_dir), iterations=1, prompts_per_iteration=4)
    assert len(queued_prompt_ids(Store.in_data_dir(data_dir), reviewed_only=False)) == 4
    return data_dir


def _logged(caplog, level: int = logging.INFO) -> list[str]:
    """The run loggers' messages at `level` since the last `caplog.clear()`."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith(("prefect.flow_runs", "prefect.task_runs")) and r.levelno == level
    ]


def test_graph_pairs_resume_without_duplicates_and_failures_are_recorded(discovered, caplog):
    store = Store.in_data_dir(discovered)
    flagged = queued_prompt_ids(store, reviewed_only=False)
    caplog.set_level(logging.INFO)
    assert tracing_flow(data_dir=str(discovered), select="reviewed")["prompts"] == 0
    assert any(
        m.startswith("nothing to trace: no reviewed prompt") and "--select flagged" in m
        for m in _logged(caplog)
    ), _logged(caplog)

    # A first run that got through one prompt only (as if killed after it).
    first = tracing_flow(data_dir=str(discovered), prompt_ids=flagged[:1])
    assert (first["made"], first["failed"]) == (2, 0)
    made_at = {g.graph_id: g.created_at for g in list_graphs(store)}

    caplog.clear()
    rest = tracing_flow(data_dir=str(discovered), select="flagged")
    assert (rest["prompts"], rest["made"], rest["failed"]) == (4, 6, 0)
    # The log tells the story: what was selected, what was skipped as stored, each graph made.
    logged = _logged(caplog)
    assert "review queue: 4 flagged prompt(s), rejected ones left out" in logged, logged
    assert f"selected 4 prompt(s) to trace: {', '.join(flagged)}" in logged
    for role in ("base", "adapted"):
        assert f"{role}: 4 graph(s) planned, 1 already stored (skipped), 3 to make" in logged
        assert any(m.startswith(f"{role} graph 3/3, prompt ") for m in logged)
    assert any(m.startswith("tracing done: 6 graph(s) made, 0 failed") for m in logged)
    assert {g.graph_id: g.created_at for g in list_graphs(store)} | made_at == {
        g.graph_id: g.created_at for g in list_graphs(store)
    }, "the first run's graphs were made again"

    pairs = graph_pairs(store)
    assert sorted(p.prompt_id for p in pairs) == sorted(flagged)
    graphs = list_graphs(store)
    assert len(graphs) == 8 and {g.status for g in graphs} == {"ok"}
    for graph in graphs:
        # The graph's targets are exactly the prompt's labelled evil and safe tokens...
        labels = {t: label for t, (label, _) in current_labels(store, graph.prompt_id).items()}
        wanted = sorted(t for t, label in labels.items() if label in ("evil", "safe"))
        assert sorted(graph.params["evil_ids"] + graph.params["safe_ids"]) == wanted
        # ...and its probabilities are discovery's, on discovery's token ids.
        assert graph.logit_mismatch < 1e-4 and graph.logit_mismatch_exceeds is False
    ids = read_only_query(
        store,
        "SELECT g.input_ids = n.input_ids AS same FROM graphs g JOIN next_tokens n "
        "USING (prompt_id, model_id)",
    )
    assert len(ids) == 8 and ids["same"].all()
    assert _count(store, "SELECT count(*) FROM graph_nodes WHERE kind = 'logit'") == sum(
        len(g.params["evil_ids"]) + len(g.params["safe_ids"]) for g in graphs
    )
    assert (
        _count(
            store,
            "SELECT count(*) - count(DISTINCT (graph_id, source, target)) FROM graph_edges",
        )
        == 0
    )

    # A prompt without labels cannot have labelled targets: recorded per model, the rest done.
    unlabelled = make_prompt("Someone asks for advice. Assistant: You should", "bare", "test")
    insert_prompts(store, [unlabelled], run_id=None)
    caplog.clear()
    failing = tracing_flow(data_dir=str(discovered), prompt_ids=[*flagged, unlabelled.prompt_id])
    assert (failing["made"], failing["failed"], failing["graphs_ok"]) == (0, 2, 8)
    assert "1 prompt(s) have no discovery logits yet: scoring first" in _logged(caplog)
    warned = _logged(caplog, logging.WARNING)
    assert any(
        m.startswith(f"base graph 1/1, prompt {unlabelled.prompt_id}: failed: ")
        and "no evil and no safe" in m for m in warned
    ), warned  # fmt: skip
    bare = unlabelled.prompt_id
    assert f"2 graph(s) failed: base of {bare}, adapted of {bare}" in warned
    failed = [g for g in list_graphs(store) if g.status == "failed"]
    assert len(failed) == 2 and all("no evil and no safe token labels" in g.error for g in failed)
    assert all(g.input_ids and g.input_ids[0] == 1 for g in failed)  # scored on the way

    again = tracing_flow(data_dir=str(discovered), select="flagged")
    assert (again["made"], again["failed"]) == (0, 0)
    assert _count(store, "SELECT count(*) FROM graphs") == 10
    runs = read_only_query(store, "SELECT status FROM runs WHERE name = 'tracing'")
    assert set(runs["status"]) == {"completed"}


def test_a_human_relabel_makes_a_new_graph_from_the_human_labels(discovered):
    store = Store.in_data_dir(discovered)
    prompt_id = queued_prompt_ids(store, reviewed_only=False)[-1]
    judged = {t: label for t, (label, _) in current_labels(store, prompt_id).items()}
    evil = sorted(t for t, label in judged.items() if label == "evil")
    assert len(evil) >= 2, judged
    assert claim(store, prompt_id, "human:ana")
    review = make_review(
        prompt_id, "ana", "relabel", judged, {evil[0]: "safe"}, explanation="not harmful here"
    )
    submit_review(store, review, {t: f"t{t}" for t in review.labels})

    summary = tracing_flow(data_dir=str(discovered), select="reviewed", targets="labelled")
    assert summary["prompt_ids"] == [prompt_id] and summary["made"] == 2
    newest = list_graphs(store, prompt_id=prompt_id)[:2]
    assert {tuple(g.params["evil_ids"]) for g in newest} == {tuple(evil[1:])}
    assert all(evil[0] in g.params["safe_ids"] for g in newest)


def test_contrastive_graphs_through_the_cli(discovered):
    runner = CliRunner()
    args = ["-d", str(discovered), "--select", "flagged", "--targets", "contrastive"]
    result = runner.invoke(app, ["trace", *args, "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "made 2, failed 0" in result.output and "contrastive" in result.output
    store = Store.in_data_dir(discovered)
    logits = read_only_query(
        store,
        "SELECT n.token, n.token_id FROM graph_nodes n JOIN graphs g USING (graph_id) "
        "WHERE g.targets = 'contrastive' AND n.kind = 'logit'",
    )
    assert list(logits["token"]) == ["evil-minus-safe"] * 2 and logits["token_id"].isna().all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--select", "everything"], "unknown --select"),
        (["--targets", "evil"], "unknown --targets"),
        (["no-such-prompt"], "unknown prompt ids: no-such-prompt"),
    ],
)
def test_cli_errors_are_clear(discovered, args, message):
    result = CliRunner().invoke(app, ["trace", "-d", str(discovered), *args])
    assert result.exit_code == 2 and message in result.output


def _pending_traced(store: Store) -> list[str]:
    """Flagged prompts nobody reviewed yet that have labelled graphs, by priority."""
    pending = set(list_queue(store, state="pending")["prompt_id"])
    traced = {g.prompt_id for g in list_graphs(store) if g.targets == "labelled"}
    return [p for p in queued_prompt_ids(store, reviewed_only=False) if p in pending & traced]


def _ranked_values(store: Store) -> int:
    """(prompt, feature) values an adapted labelled ranking must hold: one graph per prompt."""
    ids = "', '".join(counted_graphs(store).query("role == 'adapted'")["graph_id"])
    sql = (
        f"SELECT count(*) FROM feature_stats s JOIN graphs g USING (graph_id) "
        f"WHERE graph_id IN ('{ids}') AND g.targets = 'labelled' AND isfinite(s.total_diff)"
    )
    return _count(store, sql)


def test_a_relabelled_prompts_graphs_are_stale_until_emc_trace_traces_them_again(discovered):
    store = Store.in_data_dir(discovered)
    prompt_id = _pending_traced(store)[-1]
    judged = {t: label for t, (label, _) in current_labels(store, prompt_id).items()}
    evil = sorted(t for t, label in judged.items() if label == "evil")
    safe = sorted(t for t, label in judged.items() if label == "safe")
    moved = {evil[0]: "safe"} if len(evil) > 1 else {safe[0]: "evil"}
    assert claim(store, prompt_id, "human:ana")
    review = make_review(prompt_id, "ana", "relabel", judged, moved, explanation="context")
    submit_review(store, review, {t: f"t{t}" for t in review.labels})

    stale = stale_graphs(store)
    assert sorted((g.prompt_id, g.targets) for g in stale) == [(prompt_id, "labelled")] * 2
    assert prompt_id not in set(counted_graphs(store)["prompt_id"])  # left out of rankings

    # A run whose selection (--limit 1) leaves the prompt out still traces its stale graphs.
    args = ["trace", "-d", str(discovered), "--select", "flagged", "--limit", "1"]
    result = CliRunner().invoke(app, [*args, "--targets", "labelled"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "2 stale graph(s) were traced before their prompt was relabelled" in output
    assert "made 2, failed 0" in output
    now = {g.graph_id: g for g in stale_graphs(store, include_superseded=True)}
    for graph in stale:
        new_id = now[graph.graph_id].superseded_by
        assert new_id and f"graph {graph.graph_id} of {prompt_id}" in output
        assert f"re-traced as {new_id}" in output
    assert stale_graphs(store) == []

    # The ranking counts the prompt once, from the graphs made for its current labels.
    counted = counted_graphs(store)
    assert not counted.duplicated(["prompt_id", "model_id", "targets"]).any()
    mine = counted[(counted["prompt_id"] == prompt_id) & (counted["targets"] == "labelled")]
    assert set(mine["graph_id"]) == {now[g.graph_id].superseded_by for g in stale}
    ranking = feature_ranking(store, role="adapted", targets="labelled", top=None)
    assert int(ranking["prompts"].sum()) == _ranked_values(store)


def test_a_prompt_rejected_after_tracing_leaves_rankings_and_the_flagged_selection(discovered):
    store = Store.in_data_dir(discovered)
    prompt_id = _pending_traced(store)[-1]
    assert prompt_id in set(counted_graphs(store)["prompt_id"])
    ranking = {"role": "adapted", "targets": "labelled", "top": None}
    ranked_before = int(feature_ranking(store, **ranking)["prompts"].sum())
    assert claim(store, prompt_id, "human:bo")
    review = make_review(prompt_id, "bo", "reject", {}, reject_reason="two questions in one")
    submit_review(store, review, {})

    assert prompt_id not in set(counted_graphs(store)["prompt_id"])
    ranked_after = int(feature_ranking(store, **ranking)["prompts"].sum())
    assert ranked_after == _ranked_values(store) < ranked_before
    selected = queued_prompt_ids(store, reviewed_only=False)
    assert prompt_id not in selected
    runner = CliRunner()
    flagged = runner.invoke(app, ["trace", "-d", str(discovered), "--select", "flagged"])
    assert flagged.exit_code == 0, flagged.output
    assert f"graphs of {len(selected)} prompts" in flagged.output
    assert "made 0, failed 0" in flagged.output and prompt_id not in flagged.output

    # Named, it is traced as asked, with a warning that carries the reviewer's reason.
    named = runner.invoke(app, ["trace", "-d", str(discovered), prompt_id])
    assert named.exit_code == 0, named.output
    warning = " ".join(named.output.split())
    assert f"warning: prompt {prompt_id} is rejected by human:bo: two questions in one" in warning
    diff = runner.invoke(app, ["diff", "-d", str(discovered), prompt_id])
    assert diff.exit_code == 0, diff.output
    assert "rejected by human:bo: two questions in one" in " ".join(diff.output.split())


def test_out_of_memory_retries_with_smaller_batches_then_offload_then_gives_up():
    # Real out-of-memory needs a GPU; an attempt that "fits" only below a batch size stands in.
    def attempt(config: TracingConfig) -> int:
        if config.batch_size > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return config.batch_size

    fitted, config = with_memory_fallback(attempt, TracingConfig(batch_size=256))
    assert fitted == 32 and config.batch_size == 32 and config.offload is None

    tried = []

    def never_fits(config: TracingConfig) -> None:
        tried.append((config.batch_size, config.offload))
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        with_memory_fallback(never_fits, TracingConfig(batch_size=64))
    assert tried == [(64, None), (32, None), (16, None), (16, "cpu")]

    def broken(config: TracingConfig) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        with_memory_fallback(broken, TracingConfig())
