"""Real child processes for tests that run `emc` as a researcher does: output collected as it
comes, the process tree found through /proc, and waits that fail with the output's tail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a researcher's shell: no Prefect settings from this test session."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "EMC_LOCAL_PREFECT_API", "EMC_KILL_AT"))
    }
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


class Process:
    """A child process whose merged output is collected line by line as it comes."""

    def __init__(
        self, args: list[str], cwd: Path = ROOT, new_session: bool = False, **env: str
    ) -> None:
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            start_new_session=new_session,  # a shell's whole group can then be stopped
            env=clean_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def emc(cls, *args: str, **env: str) -> Process:
        return cls([sys.executable, "-m", "emc", *args], **env)

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> float:
        """Seconds until `text` appeared in the output; fails if the process ends first."""
        start = time.monotonic()
        while text not in self.output:
            assert self.popen.poll() is None, f"ended before {text!r}:\n{self.output[-3000:]}"
            assert time.monotonic() - start < timeout, f"no {text!r}:\n{self.output[-3000:]}"
            time.sleep(0.2)
        return time.monotonic() - start

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"still running after {timeout} s:\n{self.output[-3000:]}")

    def descendants(self) -> list[int]:
        return descendants_of(self.popen.pid)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def descendants_of(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    from emc.processes import process_alive

    return [pid for pid in pids if process_alive(pid)]


def wait_gone(pids: list[int], timeout: float) -> float:
    start = time.monotonic()
    while alive(pids) and time.monotonic() - start < timeout:
        time.sleep(0.1)
    return time.monotonic() - start


def kill_all(pids: list[int]) -> None:
    for pid in alive(pids):
        os.kill(pid, signal.SIGKILL)
