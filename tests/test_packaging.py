"""What `pip install .` packages: EMC's code, never a data directory beside it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_namespace_packages

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_list_takes_code_and_leaves_data_directories_out(tmp_path):
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for folder in ("emc/behaviour", "flows", "emc-data/organism", "emc_data", "emcx"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    found = set(find_namespace_packages(where=str(tmp_path), include=include))
    assert {"emc", "emc.behaviour", "flows"} <= found
    assert not {p for p in found if p.startswith(("emc-data", "emc_data", "emcx"))}
    # Every package of this checkout is still found.
    code = set(find_namespace_packages(where=str(ROOT), include=include))
    assert {"emc.behaviour", "emc.store", "emc.cli", "flows"} <= code
