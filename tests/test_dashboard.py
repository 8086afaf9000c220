from __future__ import annotations

import pytest

from emc.runs import recorded_run
from emc.store import Store
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
