"""`emc doctor`'s checks of the install and the environment, each a typed record.

Nothing here prints or exits: `emc.cli.doctor` shows the records. Nothing is left behind either:
the write test removes its file, and the store is opened read-only, never created or migrated.

The heavy stack (torch, transformers) is what a doctor may have to diagnose, so it is imported
only inside the checks that need it, and every check runs under a guard that turns a crash into
a failed record: one broken package never hides the other results.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import metadata, util
from pathlib import Path

from emc.provenance import TRACKED_PACKAGES

MIN_FREE_BYTES = 2 * 10**9
HEALTH_TIMEOUT_S = 3.0
STORE_LOCK_WAIT_S = 5.0
INSTALL_FIX = "pip install -e . in the EMC checkout (or scripts/install.sh)"
DEMO_FIX = "run `emc demo` (or `emc organism build`) to create it"
# Where scripts/install_browser.sh puts Debian's chromium; the browser tests drive this binary.
CHROMIUM = Path("/usr/bin/chromium")
# The organism's layout, from emc.organism.experiment.organism_dir and manifest.MANIFEST_NAME:
# importing those loads transformers, which a doctor must not depend on.
ORGANISM_SUBDIR = "organism"
ORGANISM_MANIFEST = "manifest.json"


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""  # what to do about a warn or fail; empty when there is nothing to do


def run_checks(data_dir: Path, environ: Mapping[str, str] | None = None) -> list[Check]:
    """Every check, in the order a person fixes things: install, data, services, hardware."""
    env = os.environ if environ is None else environ
    checks: list[Check] = [_guarded("python", check_python)]
    checks += [_guarded(name, check_package, name) for name in TRACKED_PACKAGES]
    checks += [
        _guarded("data directory", check_data_dir, data_dir),
        _guarded("disk space", check_disk_space, data_dir),
        _guarded("store", check_store, data_dir),
        _guarded("organism", check_organism, data_dir),
        _guarded("prefect api", check_prefect, env),
        _guarded("gpu slots", check_gpu_slots, data_dir, env),
        _guarded("browser", check_browser),
        _guarded("gpu", check_gpu),
    ]
    return checks


def counts(checks: list[Check]) -> dict[Status, int]:
    return {status: sum(c.status is status for c in checks) for status in Status}


def any_failed(checks: list[Check]) -> bool:
    return any(c.status is Status.FAIL for c in checks)


def _guarded(name: str, check: Callable[..., Check], *args: object) -> Check:
    try:
        return check(*args)
    except Exception as exc:  # a doctor reports a crash as a finding instead of dying of it
        return Check(name, Status.FAIL, f"the check itself crashed: {_one_line(exc)}", INSTALL_FIX)


# --- install -------------------------------------------------------------------------------


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    wanted = _emc_python_spec()
    if wanted is not None and not wanted.contains(version):
        return Check(
            "python",
            Status.FAIL,
            f"{version} ({sys.executable}); EMC needs {wanted}",
            f"a virtual environment with Python {wanted}, then {INSTALL_FIX}",
        )
    return Check("python", Status.OK, f"{version} ({sys.executable})")


def check_package(name: str) -> Check:
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return Check(name, Status.FAIL, "not installed", INSTALL_FIX)
    detail = version
    if name == "torch":
        detail = f"{version}, {torch_build()}"
    pinned = _emc_pins().get(name)
    if pinned is not None and not pinned.contains(version, prereleases=True):
        return Check(
            name,
            Status.WARN,
            f"{detail}; EMC is tested with {pinned}",
            f"pip install '{name}{pinned}' (other versions may break tracing)",
        )
    return Check(name, Status.OK, detail)


def torch_build() -> str:
    """CPU or CUDA (ROCm) build: a CPU wheel never sees a GPU, whatever the machine has."""
    import torch

    if torch.version.cuda:
        return f"CUDA {torch.version.cuda} build"
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip} build"
    return "CPU build"


@cache
def _emc_pins() -> dict:
    """Package name -> the SpecifierSet EMC's own metadata pins (empty when not installed)."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.utils import canonicalize_name

        requirements = metadata.requires("emc") or []
    except (ImportError, metadata.PackageNotFoundError):
        return {}  # running from a bare checkout, or without packaging: nothing to compare with
    pins = {}
    for line in requirements:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker is None and requirement.specifier:  # extras ("dev") are optional
            pins[canonicalize_name(requirement.name)] = requirement.specifier
    return {name: pins[canonicalize_name(name)] for name in TRACKED_PACKAGES if name in pins}


def _emc_python_spec():
    try:
        from packaging.specifiers import SpecifierSet

        wanted = metadata.metadata("emc").get("Requires-Python")
    except (ImportError, metadata.PackageNotFoundError):
        return None
    return SpecifierSet(wanted) if wanted else None


# --- data directory ------------------------------------------------------------------------


def check_data_dir(data_dir: Path) -> Check:
    name = "data directory"
    if data_dir.is_dir():
        problem = write_probe(data_dir)
        if problem:
            return Check(name, Status.FAIL, f"cannot write in {data_dir}: {problem}", _DIR_FIX)
        return Check(name, Status.OK, f"{data_dir} (writable)")
    if data_dir.exists():
        return Check(name, Status.FAIL, f"{data_dir} is a file, not a directory", _DIR_FIX)
    # Not created here: the first command that writes creates it; a doctor only checks it could.
    ancestor = nearest_existing(data_dir)
    if not ancestor.is_dir():
        return Check(
            name, Status.FAIL, f"{data_dir} cannot be created: {ancestor} is a file", _DIR_FIX
        )
    problem = write_probe(ancestor)  # tried, not os.access: root passes that even on /proc
    if problem:
        return Check(
            name,
            Status.FAIL,
            f"{data_dir} cannot be created: cannot write in {ancestor}: {problem}",
            _DIR_FIX,
        )
    return Check(name, Status.OK, f"{data_dir} (not there yet; the first run creates it)")


_DIR_FIX = "pass -d (or set EMC_DATA_DIR) to a directory you can write to"


def write_probe(directory: Path) -> str | None:
    """Why a file cannot be created and removed in `directory`, or None when it can.

    Tried for real: permission bits say nothing about read-only mounts, full disks or quotas.
    """
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".emc-doctor-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists (a file or a directory)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_disk_space(data_dir: Path) -> Check:
    where = nearest_existing(data_dir)
    if not where.is_dir():
        where = where.parent
    return disk_space_check(where, shutil.disk_usage(where).free)


def disk_space_check(where: Path, free_bytes: int, minimum: int = MIN_FREE_BYTES) -> Check:
    detail = f"{free_bytes / 10**9:.1f} GB free on {where}"
    if free_bytes < minimum:
        return Check(
            "disk space",
            Status.WARN,
            f"{detail}; under {minimum / 10**9:.0f} GB, builds and graphs may not fit",
            "free some space, or pass -d to a directory on a larger disk",
        )
    return Check("disk space", Status.OK, detail)


# --- store and organism --------------------------------------------------------------------


def check_store(data_dir: Path) -> Check:
    import duckdb

    from emc.store import STORE_FILE_NAME, Store, StoreBusyError, StoreError
    from emc.store.migrations import latest_version, stored_version

    if data_dir.exists() and not data_dir.is_dir():
        # No fix here: the data directory's own row says what to do.
        return Check("store", Status.WARN, f"not checked: {data_dir} is not a directory")
    store = Store.in_data_dir(data_dir, lock_timeout_s=STORE_LOCK_WAIT_S)
    if not store.exists():
        return Check(
            "store", Status.WARN, f"no store yet ({STORE_FILE_NAME} in {data_dir})", DEMO_FIX
        )
    try:
        # Not Store.read(): it would migrate an older store, and a doctor changes nothing.
        with store._connect(read_only=True) as conn:
            version = stored_version(conn)
    except StoreBusyError:
        return Check(
            "store",
            Status.WARN,
            f"{store.path} stayed locked for {STORE_LOCK_WAIT_S:.0f} s by another process",
            "run `emc doctor` again once the running flow or command is done",
        )
    except (StoreError, duckdb.Error, OSError) as exc:  # a damaged or unreadable file
        reason = exc.__cause__ if isinstance(exc, StoreError) and exc.__cause__ else exc
        return Check(
            "store",
            Status.FAIL,
            f"cannot read {store.path}: {_one_line(str(reason))}",
            f"move {store.path} aside (keep it if its results matter); the next run starts a "
            "new store",
        )
    return schema_check(store.path, version, latest_version())


def schema_check(path: Path, stored: int, latest: int) -> Check:
    if stored > latest:
        return Check(
            "store",
            Status.FAIL,
            f"{path}: schema version {stored} is newer than this EMC's ({latest})",
            "upgrade EMC to the version that wrote this store (git pull; pip install -e .)",
        )
    if stored < latest:
        return Check(
            "store",
            Status.WARN,
            f"{path}: schema version {stored}, this EMC's is {latest}",
            "nothing to do: the next command that writes migrates it (keep a copy to go back)",
        )
    return Check("store", Status.OK, f"{path}: schema version {stored} (current)")


def check_organism(data_dir: Path) -> Check:
    root = data_dir / ORGANISM_SUBDIR
    if data_dir.exists() and not data_dir.is_dir():
        return Check("organism", Status.WARN, f"not checked: {data_dir} is not a directory")
    # A build writes its manifest last, so one without it was interrupted.
    candidates = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    built = [p.name for p in candidates if (p / ORGANISM_MANIFEST).is_file()]
    if built:
        return Check(
            "organism",
            Status.OK,
            f"{', '.join(built)} in {root} (checksums are verified when a command uses it)",
        )
    fix = "`emc organism build` or `emc demo` (not needed when your config names your own models)"
    if candidates:
        return Check("organism", Status.WARN, f"only interrupted builds in {root}", fix)
    return Check("organism", Status.WARN, f"no organism built in {root}", fix)


# --- Prefect -------------------------------------------------------------------------------


def check_prefect(environ: Mapping[str, str]) -> Check:
    url = environ.get("PREFECT_API_URL")
    if not url:
        return Check(
            "prefect api",
            Status.OK,
            "local: each `emc` command that runs flows starts its own Prefect API for the data "
            "directory (PREFECT_API_URL is not set)",
        )
    problem = health_problem(url, environ.get("PREFECT_API_KEY"))
    if problem:
        return Check(
            "prefect api",
            Status.FAIL,
            f"the server at PREFECT_API_URL={url} does not answer /health: {problem}",
            "start it (`prefect server start`), or unset PREFECT_API_URL so that each `emc` "
            "command starts its own",
        )
    return Check("prefect api", Status.OK, f"the server at {url} answers /health")


def health_problem(api_url: str, api_key: str | None = None) -> str | None:
    """Why `<api_url>/health` did not answer 200 within HEALTH_TIMEOUT_S, or None if it did."""
    request = urllib.request.Request(api_url.rstrip("/") + "/health")
    if api_key:  # Prefect Cloud refuses anonymous requests
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return _one_line(getattr(exc, "reason", exc))
    return None if status == 200 else f"HTTP {status}"


def check_gpu_slots(data_dir: Path, environ: Mapping[str, str]) -> Check:
    """`gpu` slot records whose process is dead (flows/slots.py's records and liveness rule)."""
    from flows.runtime import GPU_LIMIT
    from flows.slots import LEASE_SECONDS, LOCAL_API_ENV, _alive, _read_records

    url = environ.get("PREFECT_API_URL")
    if url and url != environ.get(LOCAL_API_ENV):
        return Check(
            "gpu slots",
            Status.OK,
            f"not checked: the server at {url} frees a dead holder's slot when its "
            f"{LEASE_SECONDS} s lease expires",
        )
    # configure_prefect's default home; a PREFECT_HOME in the environment wins there too.
    home = Path(environ.get("PREFECT_HOME") or data_dir / "prefect").expanduser()
    directory = home / "emc-slots" / GPU_LIMIT
    # The same records and liveness rule as the waiter's, so doctor and reclaim agree on "dead".
    records = [record for _, record in _read_records(directory)]
    dead = [r for r in records if not _alive(r)]
    if dead:
        return Check(
            "gpu slots",
            Status.WARN,
            f"{len(dead)} `{GPU_LIMIT}` slot(s) recorded for dead processes: {_holders(dead)}",
            "nothing to do: the next run frees them before it waits (see README, Faults and "
            "recovery)",
        )
    if records:
        return Check("gpu slots", Status.OK, f"held by a live process: {_holders(records)}")
    return Check("gpu slots", Status.OK, f"no holder recorded in {directory}")


def _holders(records: list[dict]) -> str:
    return "; ".join(
        f"pid {r.get('pid', '?')} since {r.get('since', '?')} ({r.get('command', '?')})"
        for r in records
    )


# --- browser and GPU -----------------------------------------------------------------------


def check_browser() -> Check:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(str(CHROMIUM))
    if util.find_spec("playwright") is None:
        missing.append("the playwright package")
    if missing:
        return Check(
            "browser",
            Status.WARN,
            f"missing for the browser tests: {' and '.join(missing)}",
            "bash scripts/install_browser.sh (Debian chromium + PyPI playwright; only the "
            "browser tests need them)",
        )
    return Check(
        "browser", Status.OK, f"{CHROMIUM} and playwright {metadata.version('playwright')}"
    )


def check_gpu() -> Check:
    import torch

    if not torch.cuda.is_available():
        detail = "no GPU: runs on CPU, fp32"
        if torch.version.cuda:
            detail += " (this CUDA build sees no device: check the driver or CUDA_VISIBLE_DEVICES)"
        return Check("gpu", Status.OK, detail)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Check("gpu", Status.OK, f"{', '.join(names)}: runs on GPU, bf16")


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return f"{type(value).__name__}: {text}" if isinstance(value, BaseException) else text
