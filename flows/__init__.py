"""Prefect flows: orchestration only. The work itself lives in the `emc` library."""
