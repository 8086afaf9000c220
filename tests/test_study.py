"""Several fine-tunes of one base in one study: the config, the organism's three fine-tunes, and
`emc demo --study` as the README types it, on the small organism."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
from safetensors import safe_open

from emc.config import ConfigError, config_refs, load_config, parse_config, study_config
from emc.models import describe_model
from emc.organism.experiment import organism_config
from emc.store import Store
from emc.store.study import compare_pairs
from tests.graph_store import seed_organism
from tests.processes import ROOT, clean_env

BASE = {"base": {"ref": "org/base"}, "transcoders": {"ref": "org/tc"}}
STUDY = [
    {"name": "em", "adapter": {"ref": "org/em"}},
    {"name": "full", "adapted": {"ref": "org/full"}},
]


def test_a_study_config_narrows_to_each_pair_and_defaults_to_its_first():
    config = parse_config({"name": "s", "models": BASE, "study": STUDY})
    assert config.models.adapter.ref == "org/em"  # the first fine-tune when models names none
    full = study_config(config, "full")
    assert (full.models.adapter, full.models.adapted.ref, full.study, full.name) == (
        None,
        "org/full",
        (),
        "s-full",
    )
    with pytest.raises(ConfigError, match=r"no fine-tune 'other'.*em, full"):
        study_config(config, "other")


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ([STUDY[0], STUDY[0]], "unique; repeated: em"),
        ([{"name": "both", "adapter": {"ref": "a"}, "adapted": {"ref": "b"}}], "exactly one"),
        ([{"name": "Bad Name", "adapter": {"ref": "a"}}], "study.0.name"),
    ],
)
def test_a_wrong_study_is_refused_naming_the_problem(study, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": BASE, "study": study})


def test_relative_study_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "adapters" / "em").mkdir(parents=True)
    path = tmp_path / "study.yaml"
    path.write_text(
        json.dumps({"models": BASE, "study": [{"name": "em", "adapter": {"ref": "./adapters/em"}}]})
    )
    assert load_config(path).study[0].adapter.ref == str(tmp_path / "adapters" / "em")


def readme_study_command() -> str:
    text = (ROOT / "README.md").read_text()
    (line,) = [
        line.split("  #")[0].strip()
        for line in text.splitlines()
        if line.startswith("emc demo --study")
    ]
    return line


def test_the_organism_study_runs_three_pairs_as_the_readme_types_it(small_organism, tmp_path):
    data = tmp_path / "data"
    root = seed_organism(small_organism, data)
    command = readme_study_command()
    result = subprocess.run(
        shlex.split(command), cwd=tmp_path, env=clean_env(EMC_DATA_DIR=str(data), COLUMNS="200",
        PATH=f"{ROOT / '.venv' / 'bin'}:{clean_env()['PATH']}"),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    print(output[-3000:])

    # The subtle fine-tune was trained on the organism's base: rank 1 on one down_proj.
    with safe_open(str(root / "adapters" / "subtle" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        assert all("down_proj" in k for k in keys) and len(keys) == 2
        assert all(min(f.get_slice(k).get_shape()) == 1 for k in keys)  # rank 1
    # One config per pair, each naming its own fine-tune, usable with -c.
    configs = {
        name: load_config(data / "study" / f"{name}.yaml") for name in ("em", "subtle", "control")
    }
    assert {c.models.adapter.ref.rsplit("/", 1)[-1] for c in configs.values()} == set(configs)
    pairs = {
        name: (describe_model(c, "base").model_id, describe_model(c, "adapted").model_id)
        for name, c in configs.items()
    }
    assert len({base for base, _ in pairs.values()}) == 1  # one base
    assert len({adapted for _, adapted in pairs.values()}) == 3  # three fine-tunes
    table = compare_pairs(Store.in_data_dir(data), pairs)
    assert list(table["fine_tune"]) == ["em", "subtle", "control"]
    # Every pair judged every prompt of the study (each pair's discovery scores the others').
    assert (table["shared_prompts"] == table["shared_prompts"].iloc[0]).all()
    assert table["shared_prompts"].iloc[0] == 6  # 3 pairs x 1 round x 2 prompts
    # The negative: the control fine-tune flags fewer of the very prompts the EM one flags.
    flagged = dict(zip(table["fine_tune"], table["flagged"], strict=True))
    assert flagged["control"] < flagged["em"], table.to_string()
    for name in ("em", "subtle", "control"):
        assert re.search(rf"^\W*{name}\W", output, re.M), f"{name} missing from the table"
    assert "the study's pairs" in output


def test_a_study_fetches_every_fine_tune_once():
    config = parse_config({"models": BASE, "study": STUDY})
    assert [(role, ref.ref) for role, ref in config_refs(config)] == [
        ("base", "org/base"),
        ("adapter", "org/em"),  # the default fine-tune is the study's first: listed once
        ("transcoders", "org/tc"),
        ("adapted", "org/full"),
    ]


def test_emc_study_runs_a_configs_fine_tunes_as_pairs(small_organism, tmp_path):
    # `emc study -c STUDY.yaml`: a person's study config, two of the organism's fine-tunes,
    # discovery only; both pairs judge the same prompts and the table compares them.
    data = tmp_path / "data"
    root = seed_organism(small_organism, data)
    raw = organism_config(root, root.name).model_dump(mode="json", exclude_none=True)
    del raw["models"]["adapter"]
    raw["study"] = [
        {"name": name, "adapter": {"ref": str(root / "adapters" / name)}}
        for name in ("em", "control")
    ]
    study_file = tmp_path / "study.yaml"
    study_file.write_text(json.dumps(raw))
    command = ["emc", "study", "-c", str(study_file), "--stages", "discovery", "--iterations",
               "1", "--per-iteration", "2"]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=clean_env(EMC_DATA_DIR=str(data), COLUMNS="200",
                      PATH=f"{ROOT / '.venv' / 'bin'}:{clean_env()['PATH']}"),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    configs = {name: load_config(data / "study" / f"{name}.yaml") for name in ("em", "control")}
    pairs = {
        name: (describe_model(c, "base").model_id, describe_model(c, "adapted").model_id)
        for name, c in configs.items()
    }
    table = compare_pairs(Store.in_data_dir(data), pairs)
    assert list(table["shared_prompts"]) == [4, 4]  # 2 pairs x 1 round x 2 prompts, both judged
    assert "the study's pairs" in output and "control" in output
