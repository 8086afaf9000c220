from __future__ import annotations

import pytest
import yaml
from prefect import flow, task

from emc.models import ModelLoadError
from emc.store import Store, get_run, list_model_checks, list_models, list_runs
from flows.model_check import model_check_flow
from flows.runtime import gpu_slot, retry_unless_permanent

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def experiment(tmp_path, tiny_config_dict):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "experiment.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict))
    return path, data_dir


def test_model_check_flow_records_run_models_and_probes(experiment):
    config_path, data_dir = experiment
    summary = model_check_flow(config_path=str(config_path), data_dir=str(data_dir))
    store = Store.in_data_dir(data_dir)
    run = get_run(store, summary["run_id"])
    assert run.status == "completed" and run.kind == "flow" and run.flow_run_id
    assert run.params["config"]["models"]["base"]["ref"]
    models = list_models(store)
    assert {m.role for m in models} == {"base", "adapted"}
    assert all(m.first_run_id == run.run_id and m.dtype == "fp32" for m in models)
    checks = list_model_checks(store, run.run_id)
    assert len(checks) == 2 and all(c.status == "ok" and len(c.top_tokens) == 10 for c in checks)
    base, adapted = sorted(checks, key=lambda c: c.model_id.count("+"))
    assert base.input_ids == adapted.input_ids  # same token ids for both models
    assert base.top_probs != adapted.top_probs


def test_default_config_comes_from_the_data_dir(experiment):
    _, data_dir = experiment
    summary = model_check_flow(data_dir=str(data_dir), roles="base")
    assert summary["probes"] == 1


def test_failed_flow_is_recorded_as_failed(tmp_path, tiny_config_dict):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    broken = dict(tiny_config_dict, models=dict(tiny_config_dict["models"]))
    broken["models"]["transcoders"] = {"ref": str(tmp_path / "missing")}
    (data_dir / "experiment.yaml").write_text(yaml.safe_dump(broken))
    state = model_check_flow(data_dir=str(data_dir), roles="base", return_state=True)
    assert state.is_failed()
    (run,) = list_runs(Store.in_data_dir(data_dir))
    assert run.status == "failed" and "transcoder directory not found" in run.error


def test_task_retries_transient_errors():
    attempts = []

    @task(retries=2, retry_delay_seconds=0)
    def flaky() -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("transient")
        return len(attempts)

    @flow
    def wrapper() -> int:
        return flaky()

    assert wrapper() == 3


def test_gpu_slot_creates_the_limit_and_is_strict():
    from prefect.client.orchestration import get_client

    with gpu_slot():
        pass
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("gpu")
    assert limit.limit == 1


@pytest.mark.parametrize(
    ("error", "attempts_expected"),
    [(ModelLoadError("adapter does not fit"), 1), (ConnectionError("network blip"), 3)],
)
def test_bad_input_is_not_retried_but_transient_errors_are(error, attempts_expected):
    attempts = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_permanent)
    def failing() -> None:
        attempts.append(1)
        raise error

    @flow
    def wrapper() -> None:
        failing()

    assert wrapper(return_state=True).is_failed()
    assert len(attempts) == attempts_expected


def test_the_pipeline_without_a_config_or_an_organism_is_a_clear_error(tmp_path):
    from flows.pipeline import pipeline_flow

    with pytest.raises(ValueError, match="no config: pass config_path, or organism=default"):
        pipeline_flow(data_dir=str(tmp_path / "empty"), organism=None)


def test_the_organism_flow_refuses_an_unknown_variant(tmp_path):
    from flows.organism import organism_flow

    with pytest.raises(ValueError, match="unknown organism variant 'huge'"):
        organism_flow(data_dir=str(tmp_path), variant="huge")
