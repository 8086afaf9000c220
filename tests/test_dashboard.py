from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dashboard.views.runs import LOCAL_API_ENV, summary_line
from emc.runs import recorded_run
from emc.store import Store, get_run, list_runs
from emc.store.runs import adopting_runs, child_runs, run_parents, set_parent_run
from tests.apptest_pages import page_test


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_runs_page_without_store_explains_what_to_do(data_dir):
    page = page_test("runs").run()
    assert not page.exception
    assert "emc demo" in page.info[0].value
    assert not (data_dir / "emc.duckdb").exists()  # reading never creates a store


def test_runs_page_lists_runs_with_counts_and_details(data_dir):
    store = Store.in_data_dir(data_dir)
    with recorded_run(store, "cli", "demo", {"iterations": 2}) as ok_run:
        ok_run.summary = {"probes": 4}
    with pytest.raises(RuntimeError), recorded_run(store, "flow", "broken", {}):
        raise RuntimeError("GPU fell over")

    page = page_test("runs").run()
    assert not page.exception
    metrics = {m.label: m.value for m in page.metric}
    assert metrics == {"Completed": "1", "Failed": "1", "Running": "0"}
    table = page.dataframe[0].value
    assert set(table["name"]) == {"demo", "broken"}
    assert "RuntimeError: GPU fell over" in set(table["error"])

    page.selectbox[0].select(ok_run.run_id).run()
    assert page.json[0].value and '"probes": 4' in page.json[0].value
    assert '"iterations": 2' in page.json[1].value

    page.multiselect[0].set_value(["failed"]).run()
    assert list(page.dataframe[0].value["name"]) == ["broken"]
    assert page.error[0].value == "RuntimeError: GPU fell over"


def open_runs(**params: str):
    page = page_test("runs")
    for name, value in params.items():
        page.query_params[name] = value
    page.run()
    assert not page.exception
    return page


def texts(page) -> list[str]:
    return [m.value for m in page.markdown] + [c.value for c in page.caption]


def test_runs_page_summarises_a_run_in_a_line_and_keeps_the_raw_json(data_dir):
    store = Store.in_data_dir(data_dir)
    failure = "adapted on 'Hello': RuntimeError: NaN in logits"
    with recorded_run(store, "flow", "model-check", {"roles": "base,adapted"}) as check:
        check.summary = {"probes": 4, "failed": 1, "run_id": check.run_id, "failures": [failure]}
    with recorded_run(store, "cli", "custom", {}) as custom:
        custom.summary = {"rows": 3, "share": 0.123456, "ok": True, "nested": {"a": 1}}

    page = open_runs(run=check.run_id)
    table = page.dataframe[0].value.set_index("name")
    expected = f"4 probes, 1 failed; first failure: {failure}"
    assert table.loc["model-check", "summary"] == expected
    # No wording for this name: its top-level scalars (nested values are in the raw JSON).
    assert table.loc["custom", "summary"] == "rows 3, share 0.1235, ok yes"
    assert f"**model-check** · {expected}" in texts(page)
    assert '"failures"' in page.json[0].value and '"roles"' in page.json[1].value
    assert page.query_params == {"run": check.run_id}


def test_runs_page_summarises_the_flows_runs(behaviour_store, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(behaviour_store.data_dir))
    runs = {r.name: r for r in list_runs(behaviour_store.store)}  # newest first: the oldest wins
    discovery = runs["discovery"].summary
    total = {k: sum(r.get(k, 0) for r in discovery["rounds"]) for k in
             ("added", "scored", "failed", "judged", "flagged")}  # fmt: skip
    assert not total["failed"] and len(discovery["rounds"]) == 1
    expected_discovery = (
        f"1 round: {total['added']} prompts added, {total['scored']} scored, "
        f"{total['judged']} judged, {total['flagged']} flagged; verdicts: "
        + ", ".join(f"{verdict} {n}" for verdict, n in discovery["verdicts"].items())
        + "; review queue: "
        + ", ".join(f"{state} {n}" for state, n in discovery["queue"].items())
    )
    evaluation = runs["evaluation"].summary  # continuations, em and features of base and EM
    checks, roles = evaluation["continuations"], {v: k for k, v in evaluation["models"].items()}
    rates = [r for r in evaluation["em"]["rates"] if r["question_group"] == "all"]
    expected_evaluation = (
        f"continuation checks: {checks['confirmed']} of {checks['checked']} prompts confirmed "
        f"({checks['samples_per_context']} samples per context); EM rate (all questions): "
        + ", ".join(f"{roles[r['model_id']]} {r['em_rate']:.3f}" for r in rates)
        + "; response features: "
        + ", ".join(f"{role} {f['status']}" for role, f in evaluation["features"].items())
        + f" (judge {evaluation['judge']})"
    )

    page = open_runs(run=runs["discovery"].run_id)
    summaries = dict(zip(page.dataframe[0].value["run"], page.dataframe[0].value["summary"],
                         strict=True))  # fmt: skip
    assert summaries[runs["discovery"].run_id] == expected_discovery
    assert summaries[runs["evaluation"].run_id] == expected_evaluation
    assert f"**discovery** · {expected_discovery}" in texts(page)


def test_runs_page_shows_a_runs_children_and_links_a_child_to_its_parent(data_dir):
    store = Store.in_data_dir(data_dir)
    with recorded_run(store, "cli", "earlier", {}) as earlier:
        pass  # the same process, before the pipeline: not one of its runs
    started = datetime.now(UTC)  # the pipeline's organism stage runs before its own row
    with recorded_run(store, "flow", "organism-build", {}) as organism:
        organism.summary = {"recipe_hash": "abc123", "reused": True}
    with (
        recorded_run(store, "flow", "pipeline", {}, "fr-pipeline") as pipeline,
        adopting_runs(store, pipeline.run_id, since=started),
    ):
        with recorded_run(store, "flow", "discovery", {}, "fr-discovery") as discovery:
            discovery.summary = {"rounds_generated": 1}
        with recorded_run(store, "flow", "tracing", {}, "fr-tracing") as tracing:
            pass
        pipeline.summary = {"stages": ["organism", "discovery", "tracing"]}
    children = [organism, discovery, tracing]

    page = open_runs(run=pipeline.run_id)
    table = page.dataframe[0].value
    assert table["run"].tolist() == [pipeline.run_id, *(c.run_id for c in children),
                                     earlier.run_id]  # fmt: skip
    assert table["parent"].tolist() == ["", *[pipeline.run_id] * 3, ""]
    assert "**pipeline** · stages: organism, discovery, tracing" in texts(page)
    assert "##### Runs it ran (3)" in texts(page)
    for child in children:
        assert f"[↳ {child.name} · completed](/runs?run={child.run_id})" in texts(page)
    assert "organism abc123 reused" in texts(page) and "1 rounds generated so far" in texts(page)

    page.selectbox[0].select(discovery.run_id)
    page.run()
    assert f"[⬆️ Ran by {pipeline.run_id}](/runs?run={pipeline.run_id})" in texts(page)
    assert page.query_params == {"run": discovery.run_id}
    assert not any(t.startswith("##### Runs it ran") for t in texts(page))

    # Following the link: the URL names the parent, and the page selects it.
    page.query_params["run"] = pipeline.run_id
    page.run()
    assert page.selectbox[0].value == pipeline.run_id


def test_adopting_runs_takes_the_process_runs_even_when_the_parent_fails(data_dir):
    store = Store.in_data_dir(data_dir)
    with recorded_run(store, "flow", "elsewhere", {}) as other:
        pass
    set_parent_run(store, "some-parent", [other.run_id])  # a parent already: kept
    started = datetime.now(UTC)
    with (
        pytest.raises(RuntimeError),
        recorded_run(store, "flow", "pipeline", {}) as pipeline,
        adopting_runs(store, pipeline.run_id, since=started),
    ):
        with recorded_run(store, "flow", "discovery", {}) as discovery:
            pass
        raise RuntimeError("tracing fell over")
    assert run_parents(store) == {other.run_id: "some-parent", discovery.run_id: pipeline.run_id}
    assert [r.run_id for r in child_runs(store, pipeline.run_id)] == [discovery.run_id]
    assert get_run(store, pipeline.run_id).status == "failed"


@pytest.mark.parametrize(
    ("env", "ui"),
    [
        ({"PREFECT_UI_URL": "http://prefect.example:4200/"}, "http://prefect.example:4200"),
        ({"PREFECT_API_URL": "http://10.0.0.5:4200/api"}, "http://10.0.0.5:4200"),
        (
            {"PREFECT_UI_URL": "https://ui.example", "PREFECT_API_URL": "http://api:4200/api"},
            "https://ui.example",
        ),
    ],
)
def test_runs_page_links_the_prefect_run_when_a_server_is_configured(
    data_dir, monkeypatch, env, ui
):
    for name in ("PREFECT_UI_URL", "PREFECT_API_URL", LOCAL_API_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = Store.in_data_dir(data_dir)
    with recorded_run(store, "flow", "tracing", {}, "0b5c1e2f-flow-run") as run:
        pass
    page = open_runs(run=run.run_id)
    url = f"{ui}/runs/flow-run/0b5c1e2f-flow-run"
    assert f"[Open flow run `0b5c1e2f-flow-run` in the Prefect UI]({url})" in texts(page)
    assert not any("prefect server start" in t for t in texts(page))


@pytest.mark.parametrize("local", [False, True], ids=["no server", "a command's own server"])
def test_runs_page_says_how_to_open_the_prefect_ui_without_a_server(data_dir, monkeypatch, local):
    for name in ("PREFECT_UI_URL", "PREFECT_API_URL", LOCAL_API_ENV):
        monkeypatch.delenv(name, raising=False)
    if local:  # the temporary API a command started: gone with it, so never linked
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:39999/api")
        monkeypatch.setenv(LOCAL_API_ENV, "http://127.0.0.1:39999/api")
    store = Store.in_data_dir(data_dir)
    with recorded_run(store, "flow", "tracing", {}, "0b5c1e2f-flow-run") as run:
        pass
    with recorded_run(store, "cli", "import", {}) as command:
        pass
    page = open_runs(run=run.run_id)
    hint = (
        "Prefect flow run `0b5c1e2f-flow-run`: its flows ran on a temporary Prefect server that "
        f"stopped with them; to open it in the Prefect UI, run `PREFECT_HOME={data_dir}/prefect "
        "prefect server start` and go to http://127.0.0.1:4200/runs/flow-run/0b5c1e2f-flow-run."
    )
    assert hint in texts(page)
    assert not any("Prefect UI](" in t for t in texts(page))
    page.selectbox[0].select(command.run_id)
    page.run()
    assert "A CLI command: no Prefect flow run." in texts(page)


# Each run name's line, from summaries shaped as its flow or command stores them (flows/*.py,
# emc/cli/*.py, emc/organism/record.py, emc/behaviour/imports.py).
LINES = {
    "tracing": (
        {"prompts": 2, "made": 3, "failed": 1, "graphs_ok": 3, "graphs_failed": 1,
         "mismatches": 0, "mean_replacement": 0.8123, "failures": [], "prompt_ids": ["p"]},
        "2 prompts: 3 graphs made, 1 failed; all their graphs: 3 ok, 1 failed, 0 with logits "
        "that differ from discovery; mean replacement score 0.812",
    ),
    "feature-cards": (
        {"features": [[1, 7], [2, 9]], "carded": 1, "skipped": 1, "corpus_id": "c1", "texts": 40,
         "labeller": "llm:x", "labelled": 2, "label_failures": {"1/7": "timeout"}},
        "2 features (1 carded now, 1 before) over c1 (40 texts); labels by llm:x: 2 new, 1 failed",
    ),
    "pipeline": (
        {"resumed_from": "flow-pipeline-1", "discovery_run": "d", "stages": ["check", "tracing"]},
        "stages: check, tracing; resumed from flow-pipeline-1",
    ),
    "prompt-import": ({"read": 5, "added": 4, "problems": 1},
                      "5 prompts read, 4 added, 1 problems"),
    "feature-label": ({"feature": "3/12", "labeller": "human:ana"},
                      "feature 3/12 labelled by human:ana"),
    "import": (
        {"root": "/old", "counts": {"prompts": [3, 2, 1]}, "skipped": 1, "warnings": 0},
        "imported from /old: prompts 3 read, 2 new; 1 skipped, 0 warnings",
    ),
    "eval-import": (
        {"rows": 9, "new": 8, "rejected_count": 1, "rejected": [{}], "judge_model": "j"},
        "9 answers read, 8 new, 1 rejected (judge j)",
    ),
    "discovery": ({"rounds_generated": 1, "resumed_from": "r0"},  # still running
                  "1 rounds generated so far; resumed from r0"),
}  # fmt: skip


@pytest.mark.parametrize(("name", "summary", "line"), [(n, *v) for n, v in LINES.items()],
                         ids=list(LINES))  # fmt: skip
def test_summary_line_per_run_name(name, summary, line):
    assert summary_line(name, summary) == line


def test_summary_line_falls_back_to_the_top_level_scalars():
    assert summary_line("tracing", {"prompts": 2}) == "prompts 2"  # not the flow's shape
    assert summary_line("unknown", {"run_id": "x", "a": None, "b": [1]}) == "a none"
    assert summary_line("unknown", {"b": [1], "c": {}}) == "2 fields (see the raw JSON)"
    assert summary_line("discovery", None) == ""
