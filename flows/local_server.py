"""The per-process Prefect API that `emc` starts for a data directory, and that dies with it.

Without `PREFECT_API_URL`, Prefect starts a temporary server itself (`SubprocessASGIServer` in
`prefect/server/api/server.py`): a `python -m uvicorn ... prefect.server.api.server:create_app`
child, stopped only by an `atexit` hook. A `kill -9` of `emc` skips that hook and leaves the
server running, orphaned, for good. Prefect's spawn offers no hook (no `preexec_fn`, no extra
arguments, a fixed command), and patching its private `_run_uvicorn_command` would break
silently on upgrade. So EMC starts the same app itself, before Prefect is imported, and points
`PREFECT_API_URL` at it:

- the child runs `python -m flows.local_server PORT PARENT_PID`: a watchdog thread checks every
  half second that its parent is still `PARENT_PID` (a dead parent's children are re-parented)
  and otherwise stops uvicorn with SIGTERM (and exits hard 10 s later). Polling `getppid` is
  used rather than Linux's `PR_SET_PDEATHSIG`, which fires when the *thread* that forked the
  child ends, not the process, and does not exist on macOS;
- it runs in its own session, so a Ctrl-C at the terminal reaches `emc` only: `emc` reports
  its runs as interrupted to a server that is still up, then stops it on exit (`atexit`);
- settings are those of Prefect's own temporary server (UI off, ephemeral: no background
  services), and its output goes to `$PREFECT_HOME/local-server.log`, whose tail an error quotes.

This module must not import Prefect: `configure_prefect` runs it before Prefect reads settings.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

WATCH_SECONDS = 0.5
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}


class LocalServerError(RuntimeError):
    """The data directory's Prefect API did not start; the message quotes its log."""


def start_local_server(prefect_home: Path, timeout: float = 90.0) -> str:
    """Start the API on a free port, wait until it answers, return its URL (…/api)."""
    log_path = Path(prefect_home) / "local-server.log"
    for _ in range(3):  # a port found free may be taken by someone else before uvicorn binds it
        port = _free_port()
        with log_path.open("a") as log:
            log.write(f"--- emc pid {os.getpid()} starts the Prefect API on port {port}\n")
            log.flush()
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.local_server", str(port), str(os.getpid())],
                env={**os.environ, **SERVER_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(_stop, process)
        url = f"http://127.0.0.1:{port}/api"
        if _wait_healthy(url, process, timeout):
            return url
        _stop(process)
        if "address already in use" not in _tail(log_path).lower():
            break
    raise LocalServerError(
        f"the Prefect API for {prefect_home} did not start within {timeout:.0f} s "
        f"(PREFECT_HOME={prefect_home}; is the directory writable?). Its log, "
        f"{log_path}, ends with:\n{_tail(log_path)}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def exit_with_parent(parent: int) -> None:
    """Stop this process (gracefully, then hard) once `parent` is no longer its parent."""
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)


def main(argv: list[str]) -> None:
    port, parent = int(argv[0]), int(argv[1])
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
