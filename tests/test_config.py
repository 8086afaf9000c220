from __future__ import annotations

import pytest

from emc.config import ConfigError, dump_config, load_config, parse_config, resolve_data_dir

MINIMAL = """
name: study
models:
  base: {ref: ./models/base}
  adapter: {ref: ./models/em}
  transcoders: {ref: ./transcoders}
runtime: {backend: transformerlens}
"""


def test_minimal_config_validates_with_defaults(tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    path = tmp_path / "experiment.yaml"
    path.write_text(MINIMAL)
    config = load_config(path)
    assert config.runtime.backend == "transformerlens"
    assert config.runtime.precision == "auto"
    assert config.judge.backend == "offline"
    # Relative local paths resolve against the config file's folder.
    assert config.models.base.ref == str((tmp_path / "models" / "base").resolve())


def test_dump_and_parse_round_trip():
    config = parse_config(
        {"models": {"base": {"ref": "org/model"}, "transcoders": {"ref": "llama"}}}
    )
    import yaml

    assert parse_config(yaml.safe_load(dump_config(config))) == config


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"models": {"bsae": {"ref": "x"}, "transcoders": {"ref": "t"}}},
            r"models\.bsae: unknown field \(did you mean 'base'\?\)",
        ),
        (
            {
                "models": {"base": {"ref": "x"}, "transcoders": {"ref": "t"}},
                "runtime": {"precison": "fp32"},
            },
            r"runtime\.precison: unknown field \(did you mean 'precision'\?\)",
        ),
        (
            {
                "models": {"base": {"ref": "x"}, "transcoders": {"ref": "t"}},
                "runtime": {"backend": "jax"},
            },
            r"runtime\.backend: .*'nnsight' or 'transformerlens'",
        ),
        ({"models": {"transcoders": {"ref": "t"}}}, r"models\.base: required field is missing"),
        (
            {"models": {"base": {"ref": " "}, "transcoders": {"ref": "t"}}},
            r"models\.base\.ref: .*must not be empty",
        ),
        (
            {
                "models": {"base": {"ref": "x"}, "transcoders": {"ref": "t"}},
                "judge": {"concurrency": 0},
            },
            r"judge\.concurrency",
        ),
    ],
)
def test_bad_fields_are_named_in_the_error(raw, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(raw)


def test_not_yaml_and_not_mapping_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_data_dir_precedence(tmp_path, monkeypatch):
    config = parse_config(
        {
            "data_dir": str(tmp_path / "from-config"),
            "models": {"base": {"ref": "x"}, "transcoders": {"ref": "t"}},
        }
    )
    monkeypatch.delenv("EMC_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir(None) == tmp_path / "emc-data"
    assert resolve_data_dir(None, config) == tmp_path / "from-config"
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "from-env"))
    assert resolve_data_dir(None, config) == tmp_path / "from-env"
    assert resolve_data_dir(tmp_path / "from-flag", config) == tmp_path / "from-flag"
