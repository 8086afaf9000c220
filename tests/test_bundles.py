"""Result bundles: what a worker that cannot reach the store writes, and the one ingest that
loads them. Real organism graphs, real Parquet files, a real DuckDB store."""

from __future__ import annotations

import json
import os
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
from emc.store import Store, StoreError, read_only_query
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
from tests.bundle_edits import edit_manifest, replace_file, replace_frame

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
    assert "edges.parquet is altered" in reasons[altered.name]
    assert "bundle version 99" in reasons[foreign.name]
    assert (spool / "rejected" / f"{altered.name}.reason.txt").is_file()
    assert unfinished.is_dir() and not unfinished.name.endswith(SUFFIX)
    assert read_only_query(store, "SELECT count(*) AS n FROM graphs")["n"][0] == 1


def test_an_empty_or_missing_spool_ingests_nothing(tmp_path):
    store = Store.in_data_dir(tmp_path / "data")
    assert ingest_bundles(store, tmp_path / "nowhere").ingested == []
    assert pending_bundles(Path(tmp_path / "nowhere")) == []


# --- Malformed bundles: each goes to rejected/ with a reason naming the file, and the rest load.


def _no_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").unlink()


def _garbage_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00 not json")


def _empty_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").write_bytes(b"")


def _list_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").write_text(json.dumps(["nodes", "edges"]))


def _manifest_without_fields(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: [m.pop("files"), m.pop("model")])


def _record_of_wrong_types(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m["record"].update(status="maybe", input_ids="1 2 3"))


def _model_of_wrong_types(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: [m["model"].pop("role"), m["model"].update(merged=[1])])


def _file_outside_the_bundle(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m["files"].update({"../../outside": m["files"]["nodes"]}))


def _record_of_another_model(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m["record"].update(model_id="other-model"))


def _successful_graph_without_effects(bundle: Path) -> None:
    (bundle / "effects.parquet").unlink()
    edit_manifest(bundle, lambda m: m["files"].pop("effects"))


def _missing_frame(bundle: Path) -> None:
    (bundle / "nodes.parquet").unlink()


def _altered_frame(bundle: Path) -> None:
    edges = bundle / "edges.parquet"
    edges.write_bytes(edges.read_bytes()[:-10] + b"0123456789")


def _frame_not_parquet(bundle: Path) -> None:
    replace_file(bundle, "stats", b"layer,feature\n1,2\n")


def _empty_frame_file(bundle: Path) -> None:
    replace_file(bundle, "effects", b"")


def _frame_of_wrong_columns(bundle: Path) -> None:
    replace_frame(bundle, "layers", lambda f: f.rename(columns={"feature_influence": "influence"}))


def _frame_with_rows_lost(bundle: Path) -> None:
    replace_frame(bundle, "edges", lambda f: f.iloc[: len(f) // 2])


def _foreign_version(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m.update(version=99))


def _plain_file(bundle: Path) -> None:
    shutil.rmtree(bundle)
    bundle.write_bytes(b"a bundle zipped, or copied as a file")


def _empty_directory(bundle: Path) -> None:
    shutil.rmtree(bundle)
    bundle.mkdir()


def _null_where_the_store_forbids_it(bundle: Path) -> None:
    # graph_layers is written after the nodes, edges, effects and stats of the same transaction.
    def spoil(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.assign(feature_influence=pd.array([None] * len(frame), dtype="Float64"))

    replace_frame(bundle, "layers", spoil)


def _text_where_the_store_wants_numbers(bundle: Path) -> None:
    replace_frame(bundle, "effects", lambda f: f.assign(layer="L" + f["layer"].astype(str)))


MALFORMED = [
    pytest.param(_no_manifest, ["no manifest.json"], id="manifest-missing"),
    pytest.param(_garbage_manifest, ["manifest.json is not JSON"], id="manifest-garbage"),
    pytest.param(_empty_manifest, ["manifest.json is empty"], id="manifest-empty"),
    pytest.param(
        _list_manifest, ["manifest.json holds a JSON list, not an object"], id="manifest-list"
    ),
    pytest.param(
        _manifest_without_fields,
        ["manifest.json does not match", "model: Field required", "files: Field required"],
        id="manifest-missing-fields",
    ),
    pytest.param(
        _record_of_wrong_types,
        ["manifest.json does not match", "record.input_ids", "record.status"],
        id="record-wrong-types",
    ),
    pytest.param(
        _model_of_wrong_types,
        ["manifest.json does not match", "model.role: Field required", "model.merged"],
        id="model-wrong-types",
    ),
    pytest.param(
        _file_outside_the_bundle, ["manifest.json", "files.../../outside"], id="file-outside"
    ),
    pytest.param(
        _record_of_another_model,
        ["manifest.json: the record's model other-model is not the bundle's model"],
        id="record-of-another-model",
    ),
    pytest.param(
        _successful_graph_without_effects, ["manifest.json lists no effects"], id="no-effects"
    ),
    pytest.param(_missing_frame, ["nodes.parquet is missing"], id="frame-missing"),
    pytest.param(_altered_frame, ["edges.parquet is altered"], id="frame-altered"),
    pytest.param(
        _frame_not_parquet, ["stats.parquet is not a readable Parquet file"], id="not-parquet"
    ),
    pytest.param(
        _empty_frame_file, ["effects.parquet is not a readable Parquet file"], id="empty-parquet"
    ),
    pytest.param(
        _frame_of_wrong_columns,
        [
            "layers.parquet has the wrong columns",
            "missing feature_influence",
            "unexpected influence",
        ],
        id="frame-wrong-columns",
    ),
    pytest.param(
        _frame_with_rows_lost, ["edges.parquet has", "the record's kept_edges"], id="rows-lost"
    ),
    pytest.param(_foreign_version, ["bundle version 99 is not 1"], id="foreign-version"),
    pytest.param(_plain_file, ["not a directory"], id="plain-file"),
    pytest.param(_empty_directory, ["empty directory, no manifest.json"], id="empty-directory"),
    pytest.param(
        _null_where_the_store_forbids_it,
        ["the store refused its rows", "graph_layers.feature_influence"],
        id="store-refuses-null",
    ),
    pytest.param(
        _text_where_the_store_wants_numbers,
        ["the store refused its rows", "Conversion Error", "to INT16"],
        id="store-refuses-text",
    ),
]


def _counts(store: Store, graph_id: str) -> dict[str, int]:
    return {
        table: read_only_query(
            store, f"SELECT count(*) AS n FROM {table} WHERE graph_id = '{graph_id}'"
        )["n"][0]
        for table in GRAPH_TABLES
    }


@pytest.mark.parametrize(("spoil", "reasons"), MALFORMED)
def test_a_malformed_bundle_is_rejected_with_its_reason_and_the_rest_load(
    traced, tmp_path, spoil, reasons
):
    graphs, model = traced
    spool, store = tmp_path / "spool", Store.in_data_dir(tmp_path / "data")
    bad = write_traced_bundle(spool, graphs[0], model)
    spoil(bad)
    os.utime(bad, (0, 0))  # oldest, so it is met first: a crash on it would stop the good one
    write_traced_bundle(spool, graphs[1], model)

    report = ingest_bundles(store, spool)
    assert report.ingested == [graphs[1].record.graph_id]
    assert [name for name, _ in report.rejected] == [bad.name]
    reason = (spool / "rejected" / f"{bad.name}.reason.txt").read_text()
    assert reason.strip() == report.rejected[0][1]
    assert reason.startswith(f"{bad.name}: ")
    for expected in reasons:
        assert expected in reason
    assert (spool / "rejected" / bad.name).exists()  # kept, for a person to look at
    assert not pending_bundles(spool)
    assert set(_counts(store, graphs[0].record.graph_id).values()) == {0}  # nothing of it
    assert all(n > 0 for n in _counts(store, graphs[1].record.graph_id).values())


def test_a_refused_bundle_leaves_the_stored_graph_as_it_was(traced, tmp_path):
    graphs, model = traced
    spool, store = tmp_path / "spool", Store.in_data_dir(tmp_path / "data")
    write_traced_bundle(spool, graphs[0], model)
    ingest_bundles(store, spool)
    before = _rows(store)
    # A later bundle of the same graph replaces it in one transaction; refused, nothing changes.
    _null_where_the_store_forbids_it(write_traced_bundle(spool, graphs[0], model))
    report = ingest_bundles(store, spool)
    assert report.ingested == [] and len(report.rejected) == 1
    after = _rows(store)
    for table in GRAPH_TABLES:
        pd.testing.assert_frame_equal(after[table], before[table], check_dtype=False)


def test_ingesting_again_retries_no_reject_and_a_same_named_bundle_overwrites_nothing(
    traced, tmp_path
):
    graphs, model = traced
    spool, store = tmp_path / "spool", Store.in_data_dir(tmp_path / "data")
    bad = write_traced_bundle(spool, graphs[0], model)
    original = shutil.copytree(bad, tmp_path / "copy" / bad.name)
    _foreign_version(bad)
    write_traced_bundle(spool, graphs[1], model)
    first = ingest_bundles(store, spool)
    assert len(first.ingested) == 1 and len(first.rejected) == 1
    rejected = spool / "rejected"
    listing = sorted(p.name for p in rejected.iterdir())
    counts = _counts(store, graphs[1].record.graph_id)

    again = ingest_bundles(store, spool)
    assert again.ingested == [] and again.rejected == []
    assert sorted(p.name for p in rejected.iterdir()) == listing
    assert _counts(store, graphs[1].record.graph_id) == counts

    # The same bundle copied into the spool again, broken another way: both stay, both reasons.
    shutil.copytree(original, bad)
    _missing_frame(bad)
    third = ingest_bundles(store, spool)
    assert [name for name, _ in third.rejected] == [bad.name]
    assert "bundle version 99" in (rejected / f"{bad.name}.reason.txt").read_text()
    assert "nodes.parquet is missing" in (rejected / f"{bad.name}.2.reason.txt").read_text()
    assert (rejected / bad.name).is_dir() and (rejected / f"{bad.name}.2").is_dir()

    # Intact, it loads; copied in once more, it loads again (replacing itself) and both are kept.
    for _ in range(2):
        shutil.copytree(original, bad)
        assert ingest_bundles(store, spool).ingested == [graphs[0].record.graph_id]
    assert (spool / "ingested" / bad.name).is_dir()
    assert (spool / "ingested" / f"{bad.name}.2").is_dir()
    assert read_only_query(store, "SELECT count(*) AS n FROM graphs")["n"][0] == 2


def test_a_store_that_cannot_be_opened_blames_no_bundle(traced, tmp_path):
    graphs, model = traced
    spool = tmp_path / "spool"
    bundle = write_traced_bundle(spool, graphs[0], model)
    broken = Store(tmp_path / "a-directory", lock_timeout_s=1)
    broken.path.mkdir()  # a directory where the DuckDB file should be
    with pytest.raises(StoreError):
        ingest_bundles(broken, spool)
    assert pending_bundles(spool) == [bundle]
    assert not (spool / "rejected").exists()
