"""Result bundles: what a worker that cannot reach the store writes, and the one ingest that
loads them. Real organism graphs, real Parquet files, a real DuckDB store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from emc.config import TracingConfig
from emc.models import load_replacement_model
from emc.organism.lexicon import Lexicon
from emc.pivotal.logits import score_prompts
from emc.pivotal.offline import scenario_prompt
from emc.store import Store, read_only_query
from emc.store.bundles import (
    SUFFIX,
    ingest_bundles,
    pending_bundles,
    write_failed_bundle,
    write_traced_bundle,
)
from emc.store.graphs import GRAPH_TABLES, insert_traced
from emc.tracing import graph_key, plan_targets, release_memory, trace_prompt
from emc.tracing.record import GraphKey, GraphRecord

RUN_ID = "test-bundles"


@pytest.fixture(scope="module")
def traced(small_organism):
    """Two real graphs of the adapted organism, with the model row that made them."""
    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    entries = [e for e in lexicon.entries if e.split == "heldout"][:2]
    prompts = [scenario_prompt(e, "test") for e in entries]
    tracing = TracingConfig(targets="labelled", max_feature_nodes=128)
    loaded = load_replacement_model(small_organism.config, "adapted")
    base = load_replacement_model(small_organism.config, "base")
    try:
        scores = score_prompts(base, loaded, prompts, k=small_organism.config.top_k)
        graphs = []
        for entry, prompt, score in zip(entries, prompts, scores, strict=True):
            labels = {t: "evil" for t in entry.harmful_ids} | {t: "safe" for t in entry.safe_ids}
            plan = plan_targets(labels, tracing)
            key = graph_key(prompt.prompt_id, loaded.identity.model_id, plan, tracing)
            ids = torch.tensor(score.base.input_ids)
            graphs.append(trace_prompt(loaded, key, plan, ids, tracing, RUN_ID, score.adapted))
            release_memory()
        return graphs, loaded.identity.to_row(first_run_id=RUN_ID)
    finally:
        loaded.close()
        base.close()


def _rows(store: Store) -> dict[str, pd.DataFrame]:
    frames = {}
    for table in GRAPH_TABLES:
        # Storage time and creation time differ by nature between two writes of one graph.
        skip = " EXCLUDE (storage_seconds, created_at)" if table == "graphs" else ""
        frame = read_only_query(store, f"SELECT *{skip} FROM {table}")
        keys = [c for c in frame.columns if c not in ("input_ids", "params")]  # lists: unsortable
        frames[table] = frame.sort_values(keys).reset_index(drop=True)
    return frames


def test_ingested_bundles_equal_graphs_written_directly(traced, tmp_path):
    graphs, model = traced
    direct = Store.in_data_dir(tmp_path / "direct")
    for graph in graphs:
        insert_traced(direct, graph)
    spool = tmp_path / "spool"
    for graph in graphs:
        write_traced_bundle(spool, graph, model)
    assert len(pending_bundles(spool)) == 2
    store = Store.in_data_dir(tmp_path / "ingested")
    report = ingest_bundles(store, spool)
    assert sorted(report.ingested) == sorted(g.record.graph_id for g in graphs)
    assert not report.rejected and not pending_bundles(spool)
    assert len(list((spool / "ingested").iterdir())) == 2
    ingested, expected = _rows(store), _rows(direct)
    for table in GRAPH_TABLES:
        assert len(ingested[table]) > 0, table
        pd.testing.assert_frame_equal(ingested[table], expected[table], check_dtype=False)
    models = read_only_query(store, "SELECT model_id, role FROM models")
    assert models.to_dict("records") == [{"model_id": model.model_id, "role": "adapted"}]


def test_ingesting_again_adds_nothing_and_a_failure_is_recorded(traced, tmp_path):
    graphs, model = traced
    spool, store = tmp_path / "spool", Store.in_data_dir(tmp_path / "data")
    write_traced_bundle(spool, graphs[0], model)
    ingest_bundles(store, spool)
    before = {t: len(f) for t, f in _rows(store).items()}
    # The same graph arriving twice (a retried shard) replaces itself.
    write_traced_bundle(spool, graphs[0], model)
    assert ingest_bundles(store, spool).ingested == [graphs[0].record.graph_id]
    assert {t: len(f) for t, f in _rows(store).items()} == before

    key = graphs[1].record
    failed_key = graph_key_of(key)
    write_failed_bundle(spool, failed_key, key.input_ids, RUN_ID, "RuntimeError: boom", model)
    ingest_bundles(store, spool)
    statuses = read_only_query(store, "SELECT graph_id, status, error FROM graphs ORDER BY status")
    assert statuses["status"].tolist() == ["failed", "ok"]
    assert statuses.loc[0, "error"] == "RuntimeError: boom"


def graph_key_of(record: GraphRecord) -> GraphKey:
    return GraphKey(**record.model_dump(include=set(GraphKey.model_fields)))


def test_an_altered_or_foreign_bundle_is_rejected_and_the_rest_still_load(traced, tmp_path):
    graphs, model = traced
    spool, store = tmp_path / "spool", Store.in_data_dir(tmp_path / "data")
    altered = write_traced_bundle(spool, graphs[0], model)
    edges = altered / "edges.parquet"
    edges.write_bytes(edges.read_bytes()[:-10] + b"0123456789")
    foreign = write_traced_bundle(spool, graphs[1], model)
    manifest = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps(manifest | {"version": 99}))
    good = write_traced_bundle(spool, graphs[1], model)
    # A bundle still being written (temporary name) is not touched.
    unfinished = spool / f".{graphs[0].record.graph_id}-x.tmp"
    shutil.copytree(good, unfinished)

    report = ingest_bundles(store, spool)
    assert report.ingested == [graphs[1].record.graph_id]
    reasons = dict(report.rejected)
    assert "edges.parquet is missing or altered" in reasons[altered.name]
    assert "bundle version 99" in reasons[foreign.name]
    assert (spool / "rejected" / f"{altered.name}.reason.txt").is_file()
    assert unfinished.is_dir() and not unfinished.name.endswith(SUFFIX)
    assert read_only_query(store, "SELECT count(*) AS n FROM graphs")["n"][0] == 1


def test_an_empty_or_missing_spool_ingests_nothing(tmp_path):
    store = Store.in_data_dir(tmp_path / "data")
    assert ingest_bundles(store, tmp_path / "nowhere").ingested == []
    assert pending_bundles(Path(tmp_path / "nowhere")) == []
