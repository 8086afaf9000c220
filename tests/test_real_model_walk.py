"""The README's real-model walk, typed as written: fetch, plan, check, one prompt, its graphs.

The hub is tests/hub_server.py serving tiny random stand-ins (emc.organism.standins) under the
real names `configs/llama-3.2-1b-bad-medical.yaml` uses; the judge (`o3` in the config) is the
fake OpenAI-compatible server, reached through OPENAI_BASE_URL. The two fetches run with the
network; everything after them runs with HF_HUB_OFFLINE=1, from the caches the fetch filled.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess

import pytest
import yaml

from emc.config import load_config, model_refs
from emc.llm.fake_server import FakeChatServer, ScriptedReply
from emc.models.refs import looks_like_path
from emc.organism.standins import build_standin
from emc.store import Store, read_only_query
from tests.hub_server import FakeHub
from tests.processes import ROOT, clean_env

CONFIG = "configs/llama-3.2-1b-bad-medical.yaml"
SECTION = "## Real models: from `emc models fetch` to the first graphs"


def walk_commands() -> list[str]:
    """The ```bash lines of the README's real-model section, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def judge(request: dict) -> ScriptedReply:
    """Label every token of the judge's table: the adapted model's first evil, the rest safe."""
    table = request["messages"][-1]["content"]
    rows = re.findall(r"^(\d+) \| ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\") \|", table, re.M)
    tokens = [
        {"token_id": int(i), "token": ast.literal_eval(t), "label": "evil" if n == 0 else "safe"}
        for n, (i, t) in enumerate(rows)
    ]
    reply = {
        "tokens": tokens,
        "verdict": "evil_injection",
        "outcome": "elicited_evil",
        "summary": "stand-in",
        "reason": "a random model",
    }
    return ScriptedReply(content=json.dumps(reply))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    config = load_config(ROOT / CONFIG)
    standin = build_standin(tmp_path_factory.mktemp("standin"), "llama", "relu", "lora")
    with FakeHub() as server:
        server.add_directory(config.models.base.ref, standin.base)
        server.add_directory(config.models.adapter.ref, standin.fine_tune)
        repo = config.models.transcoders.ref
        layers = sorted(standin.transcoders.glob("layer_*.safetensors"))
        for path in layers:
            server.add_file(repo, path.name, path.read_bytes())
        ct_config = yaml.safe_load((standin.transcoders / "config.yaml").read_text())
        ct_config["transcoders"] = [f"hf://{repo}/{p.name}" for p in layers]
        server.add_file(repo, "config.yaml", yaml.safe_dump(ct_config).encode())
        yield server


def test_the_readme_walk_runs_as_written_from_fetch_to_graphs(hub, tmp_path):
    commands = walk_commands()
    assert commands[0].startswith("emc models fetch") and commands[-1].startswith("emc trace")
    data = tmp_path / "data"
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "CIRCUIT_TRACER_CACHE_DIR": str(tmp_path / "circuit-tracer"),
        "EMC_DATA_DIR": str(data),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "COLUMNS": "200",
        "PATH": f"{ROOT / '.venv' / 'bin'}:{clean_env()['PATH']}",
    }
    outputs: dict[str, str] = {}
    prompt_id = None
    with FakeChatServer(responder=judge, model="o3") as llm:
        for command in commands:
            online = command.startswith("emc models fetch")
            line = command.replace("PROMPT_ID", prompt_id or "PROMPT_ID")
            shell_env = clean_env(**env, OPENAI_BASE_URL=llm.base_url, OPENAI_API_KEY="test")
            for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
                shell_env.pop(name, None)
            if not online:
                shell_env["HF_HUB_OFFLINE"] = "1"
            result = subprocess.run(
                shlex.split(line), cwd=ROOT, env=shell_env, capture_output=True, text=True,
                timeout=600,
            )  # fmt: skip
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"{line}\n{output[-4000:]}"
            outputs[command] = output
            if command.startswith("emc run-prompt"):
                prompt_id = re.search(r"^prompt (\S+): its graphs", output, re.M).group(1)
        assert llm.requests, "the judge was asked"

    dry, plan = outputs[commands[0]], outputs[commands[2]]
    assert "dry run: nothing downloaded" in dry and "model.safetensors" in dry
    manifest = json.loads((data / "models" / "fetched.json").read_text())
    assert {e["role"] for e in manifest["entries"]} == {"base", "adapter", "transcoders"}
    assert all(len(e["commit"]) == 40 for e in manifest["entries"])
    assert "GiB" in plan or "MiB" in plan or "KiB" in plan
    assert "advice" in plan
    store = Store.in_data_dir(data)
    assert re.fullmatch(r"[\w:.-]+", prompt_id)
    graphs = read_only_query(
        store, f"SELECT model_id, status, kept_features FROM graphs WHERE prompt_id = '{prompt_id}'"
    )
    assert len(graphs) == 2 and set(graphs["status"]) == {"ok"}
    assert (graphs["kept_features"] > 0).all()
    assert any("+" in model_id for model_id in graphs["model_id"])  # the adapted one too


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_each_shipped_config_validates_with_emc_config_check(path):
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "emc"), "config", "check", str(path.relative_to(ROOT))],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith(": ok"), result.stderr
    config = load_config(path)
    hub = [ref for _, ref in model_refs(config.models) if not looks_like_path(ref.ref)]
    assert {"base", "transcoders"} <= {role for role, ref in model_refs(config.models)}
    assert hub and all("/" in ref.ref and ref.revision for ref in hub)  # hub ids, revisions
