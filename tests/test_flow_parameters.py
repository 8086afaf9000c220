"""Every deployable flow's parameters, as the Prefect UI shows them: typed, described, bounded,
with their choices; prefect.yaml's values fit them; a deployment run without a data directory
stops at once; EMC's events name their store."""

from __future__ import annotations

import importlib

import pytest
import yaml
from prefect.utilities.callables import parameter_schema
from pydantic import BaseModel, Field

from emc.config import ConfigError
from emc.events import REVIEW_SAVED, emit, listening_server, store_resource
from flows.parameters import takes
from flows.runtime import deployment_data_dir
from tests.browser import ROOT


def _deployments() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


SHARDS = {"flows/tracing.py:trace_shard_flow", "flows/evaluation.py:behaviour_shard_flow"}
DEPLOYABLE = sorted({d["entrypoint"] for d in _deployments()} - SHARDS)


@pytest.mark.parametrize("entrypoint", DEPLOYABLE)
def test_every_parameter_is_described_in_the_ui_schema(entrypoint):
    flow = _flow(entrypoint)
    properties = parameter_schema(flow).model_dump_for_openapi()["properties"]
    undescribed = [name for name, p in properties.items() if not p.get("description")]
    assert not undescribed, f"{entrypoint}: {undescribed}"
    assert "EMC_DATA_DIR" in properties["data_dir"]["description"]


def test_choices_and_bounds_reach_the_form():
    from flows.analysis import analysis_flow
    from flows.tracing import tracing_flow

    tracing = parameter_schema(tracing_flow).model_dump_for_openapi()["properties"]
    assert tracing["select"]["anyOf"][0]["enum"] == ["flagged", "reviewed"]
    assert tracing["limit"]["anyOf"][0]["minimum"] == 1
    metric = parameter_schema(analysis_flow).model_dump_for_openapi()["properties"]["metric"]
    assert "total_cohens_d" in metric["enum"] and len(metric["enum"]) == 8


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_prefect_yaml_parameters_fit_the_flows_model(deployment):
    flow = _flow(deployment["entrypoint"])
    model = getattr(flow.fn, "parameter_model", None)
    if model is None:  # a shard flow: its parameters come from the run that starts it
        assert deployment["entrypoint"] in SHARDS
        properties = parameter_schema(flow).model_dump_for_openapi()["properties"]
        assert all(p.get("description") for p in properties.values()), deployment["name"]
        return
    model.model_validate(deployment.get("parameters") or {})
    for trigger in deployment.get("triggers") or []:
        assert set(trigger["parameters"]) <= set(model.model_fields)


def test_a_wrong_choice_fails_before_any_work_naming_the_field():
    from prefect.exceptions import ParameterTypeError

    from flows.tracing import tracing_flow

    with pytest.raises(ParameterTypeError, match="select"):
        tracing_flow.validate_parameters({"select": "everything"})


def test_takes_refuses_a_function_that_drifted_from_its_model():
    class Two(BaseModel):
        a: int = Field(1, description="a")
        b: int = Field(2, description="b")

    with pytest.raises(TypeError, match="describes"):
        takes(Two)(lambda a=1: None)
    with pytest.raises(TypeError, match="defaults to 3"):

        @takes(Two)
        def wrong_default(a: int = 1, b: int = 3) -> None: ...


def test_a_deployment_run_without_a_data_dir_stops(monkeypatch):
    monkeypatch.delenv("EMC_DATA_DIR", raising=False)
    assert deployment_data_dir(None) is None  # not a deployment run: the commands' default
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "7a2c1171-15e5-4879-aa2c-000000000000")
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "trace-after-reviews")
    with pytest.raises(ConfigError, match="emc prefect setup --data-dir"):
        deployment_data_dir(None)
    assert deployment_data_dir("/data/study") == "/data/study"
    monkeypatch.setenv("EMC_DATA_DIR", "/data/pool")
    assert deployment_data_dir(None) is None  # the pool's, resolved by load_experiment


def test_events_name_their_store_and_go_nowhere_without_a_server(tmp_path, monkeypatch):
    resource = store_resource(tmp_path / "study", chain=False)
    assert resource["prefect.resource.id"] == f"emc.store.{(tmp_path / 'study').resolve()}"
    assert resource["emc.chain"] == "off"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("EMC_LOCAL_PREFECT_API", "http://127.0.0.1:9/api")
    assert listening_server() is None  # the commands' own temporary server: nobody listens
    assert emit(REVIEW_SAVED, tmp_path, {"prompt_id": "p"}) is None
    with pytest.raises(ValueError, match="unknown EMC event"):
        emit("emc.review.lost", tmp_path, {})
