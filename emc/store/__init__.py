"""The DuckDB results store: the only package in EMC that writes SQL."""

from emc.store.connection import (
    STORE_FILE_NAME,
    Store,
    StoreBusyError,
    StoreError,
    StoreMissingError,
)
from emc.store.llm_calls import LLMCallRow, insert_llm_calls, list_llm_calls
from emc.store.migrations import SchemaTooNewError, latest_version
from emc.store.model_checks import ModelCheckRecord, insert_model_checks, list_model_checks
from emc.store.models import ModelRow, list_models, upsert_model
from emc.store.organism import OrganismBuildRow, list_organism_builds, upsert_organism_build
from emc.store.query import ReadOnlyViolation, read_only_query, write_parquet
from emc.store.runs import RunRecord, finish_run, get_run, insert_run, list_runs

__all__ = [
    "STORE_FILE_NAME",
    "LLMCallRow",
    "ModelCheckRecord",
    "ModelRow",
    "OrganismBuildRow",
    "ReadOnlyViolation",
    "RunRecord",
    "SchemaTooNewError",
    "Store",
    "StoreBusyError",
    "StoreError",
    "StoreMissingError",
    "finish_run",
    "get_run",
    "insert_llm_calls",
    "insert_model_checks",
    "insert_run",
    "latest_version",
    "list_llm_calls",
    "list_model_checks",
    "list_models",
    "list_organism_builds",
    "list_runs",
    "read_only_query",
    "upsert_model",
    "upsert_organism_build",
    "write_parquet",
]
