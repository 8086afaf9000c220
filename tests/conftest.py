from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import sys
import tempfile

# Set before anything imports huggingface_hub or prefect: both read these at import time.
# The hub cache is a fresh folder so tests can plant "hub" models in it and never see the user's.
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="emc-test-hf-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["COLUMNS"] = "200"  # rich wraps CLI output at 80 columns otherwise
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from pathlib import Path

import pytest
import torch

from tests import builders

torch.set_num_threads(2)
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_main_module():
    """Streamlit's AppTest leaves its script (the lines that draw a page) installed as
    `__main__`; a later test's spawned process would then re-run that script on start-up
    instead of pytest's own entry point."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama, a LoRA adapter for it, and random transcoders that fit it."""
    root = tmp_path_factory.mktemp("tiny")
    base = builders.build_model_dir(root / "base")
    return {
        "base": base,
        "adapter": builders.build_adapter_dir(root / "adapter", base),
        "transcoders": builders.build_transcoder_dir(root / "transcoders"),
        "root": root,
    }


@pytest.fixture(scope="session")
def tiny_config_dict(tiny) -> dict:
    return builders.config_dict(tiny["base"], tiny["transcoders"], tiny["adapter"])


@pytest.fixture(scope="module")
def tiny_replacement(tiny):
    """The tiny base model as a replacement model (nnsight, fp32), closed after the module."""
    from emc.config import parse_config
    from emc.models import load_replacement_model
    from tests import builders

    model = load_replacement_model(
        parse_config(builders.config_dict(tiny["base"], tiny["transcoders"])), "base"
    )
    yield model
    model.close()


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API for flow tests (its database starts with no concurrency limits)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # Heartbeats cost ~1 s per flow run.
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def small_organism(tmp_path_factory):
    """The organism's seconds-long test recipe, built once per session into its own data dir."""
    from emc.organism import OrganismRecipe
    from emc.organism.experiment import prepare_organism

    # One build for every pytest-xdist worker of the run: the first builds under a file lock, the
    # others wait and reuse it (verified by its checksums), instead of training it again each.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with (root / "organism-data.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare_organism(root / "organism-data", OrganismRecipe.small())


@pytest.fixture(scope="session")
def clean_demo(tmp_path_factory, small_organism):
    """`emc demo` on the small recipe, never killed: made once for every worker of the run
    (tests/demo_runs.py), with its row counts recorded right after it."""
    from tests.demo_runs import shared_clean_demo

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return shared_clean_demo(root, small_organism)


@pytest.fixture(scope="session")
def behaviour_store(tmp_path_factory, small_organism, prefect_harness):
    """Discovery, continuation checks and EM evaluations made by the flows, once per session."""
    from tests.behaviour_store import build_behaviour_store

    return build_behaviour_store(small_organism, tmp_path_factory.mktemp("behaviour-data"))


# The slowest test files, slowest first (from `--durations` of CI runs). xdist's loadfile mode
# hands files out in collection order once `--no-loadscope-reorder` stops it from putting the
# files with most tests first: the long files then start at once on both workers and the many
# short ones fill in behind them, instead of two long files running last side by side.
SLOW_FILES = (
    "test_readme_commands.py",
    "test_demo_killed.py",
    "test_deployments.py",
    "test_behaviour.py",
    "test_behaviour_shards.py",
    "test_study.py",
    "test_real_model_walk.py",
    "test_viewer.py",
    "test_feature_cards.py",
    "test_interventions.py",
    "test_dashboard_behaviour.py",
    "test_faults.py",
    "test_cli_pipeline.py",
    "test_exit_codes.py",
    "test_analysis_flow.py",
    "test_organism_core.py",
    "test_benchmarks.py",
    "test_bundles.py",
    "test_tracing_flow.py",
    "test_dashboard_interventions.py",
    "test_benchmark_tracing_gpu.py",
    "test_families.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
