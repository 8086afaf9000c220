from __future__ import annotations

import multiprocessing
import time
from datetime import UTC, datetime

import duckdb
import pytest

from emc.runs import recorded_run
from emc.store import (
    ReadOnlyViolation,
    RunRecord,
    SchemaTooNewError,
    Store,
    StoreBusyError,
    StoreError,
    get_run,
    insert_run,
    latest_version,
    list_runs,
    read_only_query,
)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.in_data_dir(tmp_path / "data")


def _run(run_id: str) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        kind="cli",
        name="test",
        status="running",
        started_at=datetime.now(UTC),
        emc_version="0",
    )


def test_migrations_create_schema_once_and_record_version(store):
    store.ensure_schema()
    Store(store.path).ensure_schema()  # a second process/object re-applies nothing
    versions = read_only_query(store, "SELECT version FROM schema_version")["version"].tolist()
    assert versions == list(range(1, latest_version() + 1))


def _store_at_version(path, version: int, *rows: str) -> None:
    """A store file migrated only up to `version`, with `rows` (INSERT statements) written."""
    from emc.store.migrations import MIGRATIONS

    with duckdb.connect(str(path)) as conn:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for migration in MIGRATIONS:
            if migration.version > version:
                break
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, ?, now())",
                         [migration.version, migration.name])  # fmt: skip
        for row in rows:
            conn.execute(row)


def test_migration_13_keeps_rollouts_measured_before_it(tmp_path):
    # A store at version 12 with a feature rollout: the rebuilt table keeps it, as a feature
    # edit at the prompt's positions with no coherence yet.
    path = tmp_path / "old.duckdb"
    _store_at_version(
        path,
        12,
        "INSERT INTO intervention_rollouts VALUES ('p', 'b', 'a', 'r', 'j', 'restore', "
        "'top 20', 'adapted', 20, 20, 5, 1, 0.25, 0.1, 0.4, '[]', 1.0, 'fp32', now())",
    )
    Store(path).ensure_schema()
    rows = read_only_query(Store(path), "SELECT * FROM intervention_rollouts")
    assert rows[["family", "kind", "target", "positions", "n_harmful"]].values.tolist() == [
        ["features", "restore", "top 20", "prompt", 5]
    ]
    assert rows["mean_coherent"].isna().all()


def test_migration_14_reads_earlier_analysis_rows_as_ok_and_stores_failures(tmp_path):
    # A store at version 13 with an ablation and an activation delta: both read as ok after it,
    # and a prompt's failures can now be stored with no measurements beside their error.
    from emc.store.analysis import (
        AblationFailure,
        ablation_results,
        activation_delta_summary,
        analysis_failures,
        record_failed_ablations,
        record_failed_forward,
    )

    path = tmp_path / "old.duckdb"
    _store_at_version(
        path,
        13,
        "INSERT INTO ablations VALUES ('id1', 'r', 'p1', 'a', 'top', 'total_diff', '[]', 3, "
        "0.6, 0.2, 0.3, 0.5, NULL, NULL, NULL, NULL, 'fp32', now())",
        "INSERT INTO activation_deltas VALUES ('p1', 'b', 'a', 2, 7, 'r', 1.0, 3.0, 2.0, 1, 2)",
        "INSERT INTO forward_diffs VALUES ('p1', 'b', 'a', 0, 'r', 0.1, 0.2, false, true, "
        "1e-6, 'fp32', now())",
    )
    store = Store(path)
    store.ensure_schema()
    old = ablation_results(store)
    assert old[["prompt_id", "status", "evil_prob_change"]].values.tolist() == [
        ["p1", "ok", pytest.approx(-0.4)]
    ]
    assert old["error"].isna().all()
    deltas = read_only_query(store, "SELECT layer, feature, delta, status, error FROM "
                             "activation_deltas")  # fmt: skip
    assert deltas.values.tolist()[0][:4] == [2, 7, 2.0, "ok"]
    record_failed_forward(store, "p2", "b", "a", "r2", "RuntimeError: nan")
    failure = AblationFailure(run_id="r2", prompt_id="p2", model_id="a", kind="top",
                              metric="total_diff", features=[], dtype="fp32",
                              error="RuntimeError: boom")  # fmt: skip
    record_failed_ablations(store, [failure])
    failed = analysis_failures(store)
    assert failed[["step", "prompt_id", "error"]].values.tolist() == [
        ["ablation", "p2", "RuntimeError: boom"],
        ["forward", "p2", "RuntimeError: nan"],
    ]
    assert ablation_results(store)["prompt_id"].tolist() == ["p1"]  # the numbers: ok rows only
    assert len(ablation_results(store, include_failed=True)) == 2
    summary = activation_delta_summary(store, "b", "a")
    assert summary[["layer", "feature", "measured"]].values.tolist() == [[2, 7, 1]]


def test_migration_16_adds_feature_cards_whose_rewrites_replace(tmp_path):
    # A store at version 15 gains the two card tables; a card written twice (a re-run) is one
    # card with its examples once, and reads back as it was written.
    from emc.features.records import ActivationStats, FeatureCard, FeatureExample, TokenValue
    from emc.store.feature_cards import carded_features, load_card, replace_feature_cards

    path = tmp_path / "old.duckdb"
    _store_at_version(path, 15)
    store = Store(path)
    store.ensure_schema()
    token = TokenValue(token_id=5, token=" hide", value=0.25)
    example = FeatureExample(rank=1, source="train.jsonl:3", text=" hide it", token_ids=[5, 6],
                             tokens=[" hide", " it"], activations=[1.5, 0.0], max_position=0,
                             max_activation=1.5, start=4)  # fmt: skip
    stats = ActivationStats(texts=2, positions=10, active=1, frequency=0.1, max=1.5,
                            mean_active=1.5, quantile_levels=[0.5, 1.0],
                            quantile_values=[1.5, 1.5], hist_edges=[0.0, 0.75, 1.5],
                            hist_counts=[0, 1])  # fmt: skip
    card = FeatureCard(layer=1, feature=397, model_id="m", corpus_id="c:1", corpus_name="c",
                       stats=stats, examples=[example], top_logits=[token], bottom_logits=[token],
                       encoder_tokens=[token], logit_basis="unembedding", dtype="fp32")  # fmt: skip
    replace_feature_cards(store, [card], "r1")
    replace_feature_cards(store, [card], "r2")
    counts = read_only_query(store, "SELECT (SELECT count(*) FROM feature_cards) AS c, "
                             "(SELECT count(*) FROM feature_examples) AS e")  # fmt: skip
    assert counts.iloc[0].tolist() == [1, 1]
    assert carded_features(store, "m", "c:1") == {(1, 397)}
    loaded = load_card(store, 1, 397, "m")
    assert loaded.run_id == "r2"
    assert loaded.model_dump(exclude={"run_id", "created_at"}) == card.model_dump(
        exclude={"run_id", "created_at"}
    )
    assert load_card(store, 1, 397, "other model") is None


def test_store_newer_than_code_is_refused(store):
    store.ensure_schema()
    conn = duckdb.connect(str(store.path))
    conn.execute("INSERT INTO schema_version (version, name) VALUES (999, 'future')")
    conn.close()
    with pytest.raises(SchemaTooNewError, match="999"):
        Store(store.path).ensure_schema()


def test_recorded_run_stores_code_version_params_and_outcome(store):
    with recorded_run(store, "cli", "demo", {"iterations": 3}) as run:
        run.summary = {"made": 2}
    stored = get_run(store, run.run_id)
    assert stored.status == "completed" and stored.finished_at is not None
    assert stored.params == {"iterations": 3} and stored.summary == {"made": 2}
    assert stored.emc_version and "torch" in stored.package_versions
    assert stored.code_revision is None or len(stored.code_revision) == 40


def test_recorded_run_marks_failure_with_the_error(store):
    with pytest.raises(ValueError), recorded_run(store, "flow", "broken", {}) as run:
        raise ValueError("boom")
    stored = get_run(store, run.run_id)
    assert stored.status == "failed" and stored.error == "ValueError: boom"


def test_read_only_query_refuses_writes_and_changes_nothing(store):
    insert_run(store, _run("r1"))
    for sql in [
        "DELETE FROM runs",
        "SELECT 1; UPDATE runs SET status = 'x'",
        "DROP TABLE runs",
        "COPY runs TO 'out.csv'",
        "CREATE TABLE t (a INT)",
        "ATTACH 'other.duckdb'",
    ]:
        with pytest.raises(ReadOnlyViolation, match="read-only"):
            read_only_query(store, sql)
    assert [r.run_id for r in list_runs(store)] == ["r1"]
    assert read_only_query(store, "SELECT status FROM runs")["status"].tolist() == ["running"]


def test_read_only_query_reports_bad_sql(store):
    with pytest.raises(StoreError, match="does not parse"):
        read_only_query(store, "SELEKT 1")
    with pytest.raises(StoreError, match="query failed"):
        read_only_query(store, "SELECT * FROM no_such_table")


def test_writer_waits_out_a_lock_then_gives_up_with_clear_error(store, tmp_path):
    store.ensure_schema()
    ctx = multiprocessing.get_context("spawn")
    locked = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(store.path), 1.0, locked))
    holder.start()
    assert locked.wait(timeout=60)
    impatient = Store(store.path, lock_timeout_s=0.05)
    impatient._migrated = True
    with pytest.raises(StoreBusyError, match="stayed locked"):
        insert_run(impatient, _run("too-early"))
    insert_run(store, _run("after-wait"))  # the default store waits for the holder to finish
    holder.join()
    assert get_run(store, "after-wait") is not None


def test_two_processes_write_and_read_concurrently_without_loss(store):
    store.ensure_schema()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_write_and_read, args=(str(store.path), name, WRITES, results))
        for name in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert all(error is None for _, _, error in outcomes), outcomes
    written = {run_id for _, ids, _ in outcomes for run_id in ids}
    stored = set(read_only_query(store, "SELECT run_id FROM runs")["run_id"])
    assert written and written == stored
    assert sorted(len(ids) for _, ids, _ in outcomes) == [WRITES, WRITES]


def _hold_lock(path: str, seconds: float, locked) -> None:
    conn = duckdb.connect(path)
    locked.set()
    time.sleep(seconds)
    conn.close()


# A count, not a duration: on a loaded machine a few seconds may hold only a few writes.
WRITES = 20


def _write_and_read(path: str, name: str, count: int, results) -> None:
    store = Store(path)
    written, error = [], None
    try:
        for i in range(count):
            run_id = f"{name}-{i}"
            insert_run(store, _run(run_id))
            written.append(run_id)
            seen = {r.run_id for r in list_runs(store, limit=100_000)}
            missing = set(written) - seen
            if missing:
                raise AssertionError(f"lost writes: {sorted(missing)[:5]}")
    except Exception as exc:  # reported to the parent, which asserts
        error = f"{type(exc).__name__}: {exc}"
    results.put((name, written, error))


def test_migration_18_adds_saved_queries_and_parent_runs_to_a_store_with_runs(tmp_path):
    # A store at version 17 with a run: after it, the run reads back as it was, with no parent;
    # queries can be saved, and a run can be made another's child.
    from emc.store.runs import run_parents, set_parent_run
    from emc.store.saved_queries import save_query, saved_queries

    path = tmp_path / "old.duckdb"
    _store_at_version(
        path,
        17,
        "INSERT INTO runs (run_id, kind, name, status, started_at, params, emc_version, summary) "
        "VALUES ('r1', 'flow', 'tracing', 'completed', now(), '{\"limit\": 2}', '0', "
        "'{\"made\": 2}')",
    )
    store = Store(path)
    store.ensure_schema()
    (run,) = list_runs(store)
    assert (run.run_id, run.params, run.summary) == ("r1", {"limit": 2}, {"made": 2})
    assert run_parents(store) == {} and saved_queries(store) == []
    save_query(store, "runs", "SELECT * FROM runs", "human:ana")
    assert [q.name for q in saved_queries(store)] == ["runs"]
    insert_run(store, _run("r2"))
    set_parent_run(store, "r2", ["r1"])
    assert run_parents(store) == {"r1": "r2"}
