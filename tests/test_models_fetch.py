"""`emc models fetch` against a fake hub (tests/hub_server.py), and the offline messages.

The CLI runs as a subprocess: huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when
it is imported, and this test session imported it offline (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emc.config import load_config
from emc.models.plan import human
from tests.hub_server import FakeHub

ROOT = Path(__file__).resolve().parent.parent
EMC = [sys.executable, "-m", "emc"]
BASE, ADAPTER, TRANSCODERS = (
    "emc-test/tiny-llama",
    "emc-test/tiny-lora",
    "emc-test/tiny-transcoders",
)


@pytest.fixture(scope="module")
def hub(tiny):
    """The tiny model, its LoRA and its transcoders served as hub repos; transcoders in
    circuit-tracer's hub layout (config.yaml listing hf:// URIs)."""
    with FakeHub() as server:
        server.add_directory(BASE, tiny["base"])
        server.add_directory(ADAPTER, tiny["adapter"])
        # Files a fetch must skip: other formats and duplicates.
        server.add_file(BASE, "pytorch_model.bin", b"duplicate weights")
        server.add_file(BASE, "original/consolidated.pth", b"original format")
        server.add_file(BASE, "README.md", b"# tiny")
        layers = sorted(tiny["transcoders"].glob("layer_*.safetensors"))
        for path in layers:
            server.add_file(TRANSCODERS, path.name, path.read_bytes())
        config = yaml.safe_load((tiny["transcoders"] / "config.yaml").read_text())
        config["transcoders"] = [f"hf://{TRANSCODERS}/{p.name}" for p in layers]
        server.add_file(TRANSCODERS, "config.yaml", yaml.safe_dump(config).encode())
        yield server


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fetch")
    config = root / "experiment.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "hub-tiny",
                "models": {
                    "base": {"ref": BASE},
                    "adapter": {"ref": ADAPTER},
                    "transcoders": {"ref": TRANSCODERS},
                },
                "runtime": {"device": "cpu"},
            }
        )
    )
    return {
        "root": root,
        "config": config,
        "hf_home": root / "hf",
        "ct": root / "circuit-tracer",
        "data": root / "data",
    }


def emc(args: list[str], hub: FakeHub, ws: dict, offline: bool = False, **paths: Path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_HOME")
        and not k.startswith("PREFECT_")
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(paths.get("hf_home", ws["hf_home"])),
        CIRCUIT_TRACER_CACHE_DIR=str(paths.get("ct", ws["ct"])),
        EMC_DATA_DIR=str(paths.get("data", ws["data"])),
        HF_HUB_DISABLE_TELEMETRY="1",
        COLUMNS="200",
        PYTHONPATH=str(ROOT),
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [*EMC, *args], env=env, cwd=ws["root"], capture_output=True, text=True, timeout=120
    )


def served_model_files(hub: FakeHub) -> dict[tuple[str, str], str]:
    """(repo, path) -> sha256 of every file a fetch should bring."""
    wanted = {}
    for repo_id in (BASE, ADAPTER, TRANSCODERS):
        for path, f in hub.repos[repo_id].files.items():
            if path.endswith((".bin", ".pth", ".md")):
                continue
            wanted[(repo_id, path)] = f.sha256
    return wanted


@pytest.fixture(scope="module")
def fetched(hub, workspace):
    """Dry run, fetch, fetch again: outputs and the requests each made."""
    runs = {}
    for name, extra in [("dry", ["--dry-run"]), ("first", []), ("second", [])]:
        before = len(hub.requests)
        result = emc(["models", "fetch", str(workspace["config"]), *extra], hub, workspace)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = (result, hub.requests[before:])
    return runs


def snapshot(ws: dict, hub: FakeHub, repo_id: str) -> Path:
    folder = "models--" + repo_id.replace("/", "--")
    return ws["hf_home"] / "hub" / folder / "snapshots" / hub.repos[repo_id].commit


def test_dry_run_lists_each_file_with_its_size_and_downloads_nothing(fetched, hub, workspace):
    result, requests = fetched["dry"]
    out = result.stdout
    for (repo_id, path), _ in served_model_files(hub).items():
        size = human(len(hub.file(repo_id, path).content))
        line = next(line for line in out.splitlines() if f" {path} " in line and repo_id in line)
        assert size in line, line
    assert "pytorch_model.bin" not in out and "original/" not in out and "README" not in out
    assert "to download" in out and "dry run: nothing downloaded" in out
    total = sum(len(hub.file(*key).content) for key in served_model_files(hub))
    assert f"total: {human(total)}" in out
    # Only the transcoders' config.yaml (it names the layer files) was read.
    downloads = [p for m, p in requests if m == "GET" and ("/resolve/" in p or "/cdn/" in p)]
    assert downloads == [f"/{TRANSCODERS}/resolve/main/config.yaml"]


def test_fetch_lists_sizes_first_then_fills_the_caches(fetched, hub, workspace):
    result, _ = fetched["first"]
    out = result.stdout
    assert out.index("files this config needs from the hub") < out.index("fetched into")
    for repo_id in (BASE, ADAPTER):
        folder = snapshot(workspace, hub, repo_id)
        for path, f in hub.repos[repo_id].files.items():
            local = folder / path
            if path.endswith((".bin", ".pth", ".md")):
                assert not local.exists(), path
            else:
                assert local.read_bytes() == f.content, path
    cached = workspace["ct"] / TRANSCODERS
    assert (cached / "config.yaml").is_file()
    assert sorted(p.name for p in cached.glob("layer_*.safetensors")) == [
        "layer_0.safetensors",
        "layer_1.safetensors",
    ]


def test_manifest_records_commits_and_the_served_files_sha256(fetched, hub, workspace):
    import hashlib

    manifest = json.loads((workspace["data"] / "models" / "fetched.json").read_text())
    assert manifest["version"] == 1
    entries = {e["role"]: e for e in manifest["entries"]}
    assert set(entries) == {"base", "adapter", "transcoders"}
    recorded = {
        (f["repo"], f["path"]): f["sha256"] for e in manifest["entries"] for f in e["files"]
    }
    assert recorded == served_model_files(hub)
    for role, repo_id in [("base", BASE), ("adapter", ADAPTER), ("transcoders", TRANSCODERS)]:
        assert entries[role]["commit"] == hub.repos[repo_id].commit
        assert all(f["commit"] == hub.repos[repo_id].commit for f in entries[role]["files"])
    for f in entries["base"]["files"]:
        assert f["size"] == len(hub.file(BASE, f["path"]).content)
        assert f["checked"] == "downloaded"
    cached = workspace["ct"] / TRANSCODERS
    assert entries["transcoders"]["cache_dtype"] == "F32"  # the served layers are fp32
    assert {f["path"]: f["sha256"] for f in entries["transcoders"]["cached_files"]} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in cached.iterdir()
    }


def test_second_fetch_downloads_nothing(fetched):
    result, requests = fetched["second"]
    assert [p for m, p in requests if m == "GET" and ("/resolve/" in p or "/cdn/" in p)] == []
    assert result.stdout.count("already in the cache, nothing downloaded") == 3
    assert "to download: 0 B in 0 file(s)" in result.stdout


def test_an_incomplete_transcoder_cache_is_fetched_again(fetched, hub, workspace, tmp_path):
    ct = shutil.copytree(workspace["ct"], tmp_path / "ct")
    (ct / TRANSCODERS / "layer_1.safetensors").unlink()
    before = len(hub.requests)
    result = emc(
        ["models", "fetch", str(workspace["config"])], hub, workspace, ct=ct, data=tmp_path / "d"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"transcoders {TRANSCODERS}: fetched into" in result.stdout
    assert result.stdout.count("already in the cache, nothing downloaded") == 2
    assert (ct / TRANSCODERS / "layer_1.safetensors").is_file()
    downloads = [p for m, p in hub.requests[before:] if m == "GET" and "/cdn/" in p]
    layers = {hub.file(TRANSCODERS, f"layer_{i}.safetensors").sha256 for i in (0, 1)}
    assert {p.rsplit("/", 1)[1] for p in downloads} == layers  # the layers, nothing else


def test_offline_fetch_finds_everything_once_fetched(fetched, hub, workspace):
    result = emc(["models", "fetch", str(workspace["config"])], hub, workspace, offline=True)
    assert result.returncode == 0, result.stderr
    assert "every hub file this config needs is in the caches" in result.stdout


def test_plan_reads_the_fetched_caches(fetched, tiny, workspace, monkeypatch):
    import huggingface_hub.constants
    from safetensors import safe_open

    from emc.models.plan import build_plan

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(workspace["hf_home"] / "hub")
    )
    monkeypatch.setenv("CIRCUIT_TRACER_CACHE_DIR", str(workspace["ct"]))
    plan = build_plan(load_config(workspace["config"]))
    with safe_open(str(tiny["base"] / "model.safetensors"), framework="pt") as handle:
        keys = handle.keys()
        params = sum(_numel(handle.get_slice(key).get_shape()) for key in keys)
    assert plan.base.params == params and plan.base.source.startswith("safetensors headers")
    assert plan.transcoders is not None and plan.transcoders.n_layers == 2
    assert plan.device("cpu").base == params * 4 and plan.device("cuda").base == params * 2


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def test_offline_check_names_each_missing_ref_and_the_fetch_command(hub, workspace, tmp_path):
    before = len(hub.requests)
    result = emc(
        ["check", "-c", str(workspace["config"])],
        hub,
        workspace,
        offline=True,
        hf_home=tmp_path / "empty-hf",
        ct=tmp_path / "empty-ct",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    err = " ".join(result.stderr.split())
    for ref in (BASE, ADAPTER, TRANSCODERS):
        assert f"'{ref}'" in err
    assert "3 model file set(s)" in err
    assert f"emc models fetch {workspace['config']}" in err
    assert len(hub.requests) == before  # offline: the hub was never asked


def test_missing_files_names_exactly_the_missing_files(fetched, hub, workspace, tmp_path):
    from emc.models.fetch import missing_files, missing_message

    hf_cache = shutil.copytree(workspace["hf_home"] / "hub", tmp_path / "hub", symlinks=True)
    ct = shutil.copytree(workspace["ct"], tmp_path / "ct")
    (snapshot({"hf_home": tmp_path}, hub, BASE) / "model.safetensors").unlink()
    (ct / TRANSCODERS / "layer_1.safetensors").unlink()
    config = load_config(workspace["config"])
    with pytest.MonkeyPatch.context() as mp:
        import huggingface_hub.constants

        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
        mp.setenv("CIRCUIT_TRACER_CACHE_DIR", str(ct))
        missing = missing_files(config, workspace["data"])
        unrecorded = missing_files(config)  # without the manifest: from the model layout
    assert [(m.role, m.files) for m in missing] == [
        ("base", ("model.safetensors",)),
        ("transcoders", ("layer_1.safetensors",)),
    ]
    assert [(m.role, m.files) for m in unrecorded] == [
        ("base", ("weights (*.safetensors)",)),
        ("transcoders", ("layer_1.safetensors",)),
    ]
    message = missing_message(missing, "exp.yaml")
    assert "model.safetensors missing from the Hugging Face cache" in message
    assert "`emc models fetch exp.yaml`" in message


def test_offline_model_load_error_names_the_ref_and_the_fetch_command():
    from emc.models import ModelLoadError
    from emc.models.refs import resolve_model_dir

    with pytest.raises(ModelLoadError) as caught:
        resolve_model_dir("no-such-org/no-such-model", "v2")
    message = str(caught.value)
    assert "'no-such-org/no-such-model' at revision v2" in message
    assert "HF_HUB_OFFLINE=1" in message and "`emc models fetch CONFIG`" in message


def test_local_directories_are_skipped(tiny, monkeypatch, tmp_path):
    from emc.config import parse_config
    from emc.models.fetch import list_files
    from tests import builders

    monkeypatch.delenv("HF_HUB_OFFLINE")  # no hub reference: nothing asks the network
    config = parse_config(builders.config_dict(tiny["base"], tiny["transcoders"], tiny["adapter"]))
    listings, skipped = list_files(config)
    assert listings == []
    assert [s.role for s in skipped] == ["base", "adapter", "transcoders"]
    assert all("local directory" in s.reason for s in skipped)


@pytest.mark.parametrize(
    ("names", "kind", "chosen"),
    [
        (
            ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "pytorch_model.bin", "original/consolidated.00.pth",
             "consolidated.safetensors", "tokenizer.json", "README.md", ".gitattributes"],
            "model",
            ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "tokenizer.json"],
        ),
        (["config.json", "pytorch_model.bin", "vocab.json"], "model",
         ["config.json", "pytorch_model.bin", "vocab.json"]),
        (["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"],
         "adapter", ["adapter_config.json", "adapter_model.safetensors"]),
    ],
)  # fmt: skip
def test_select_model_files(names, kind, chosen):
    from emc.models.fetch import select_model_files

    assert select_model_files(names, kind) == chosen


def test_ensure_fetched_raises_offline_only(workspace, tmp_path, monkeypatch):
    from emc.models import ModelLoadError
    from emc.models.fetch import ensure_fetched

    monkeypatch.setenv("CIRCUIT_TRACER_CACHE_DIR", str(tmp_path / "ct"))
    config = load_config(workspace["config"])
    with pytest.raises(ModelLoadError) as caught:
        ensure_fetched(config, config_path="exp.yaml")  # the session's hub cache is empty
    message = str(caught.value)
    assert all(f"'{ref}'" in message for ref in (BASE, ADAPTER, TRANSCODERS))
    assert "`emc models fetch exp.yaml`" in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    ensure_fetched(config)  # online: a load may download, nothing to say
