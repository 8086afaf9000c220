"""What a person sees when a command fails for a reason no command foresaw: one message naming
the cause, and where the full traceback went.

Commands turn the failures they expect (a bad config, a missing store) into `fail(...)`
messages themselves. Anything else used to arrive as a rich traceback of hundreds of lines, the
cause at the bottom. The `emc` entry point now catches it, prints the exception and its causes in
a few lines, writes the traceback to a log file, and exits 1; `--debug` (anywhere on the command
line) or `EMC_DEBUG=1` shows the traceback instead, as before.

Prefect logs every failed task and flow run with its traceback, once per retry, so one missing
file used to arrive inside hundreds of lines. Its console lines keep their one-line message
(the exception's type and text); the tracebacks still reach the Prefect API (the UI shows them),
the final one reaches the log file, and `--debug` prints them all as Prefect does.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from emc.console import err_console, inline

DEBUG_FLAG = "--debug"
DEBUG_ENV = "EMC_DEBUG"
EXIT_ERROR = 1


def main(argv: list[str] | None = None) -> None:
    """The `emc` console script and `python -m emc`."""
    from emc.cli import app

    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV) == "1"
    args = [a for a in args if a != DEBUG_FLAG]
    if debug:
        os.environ[DEBUG_ENV] = "1"  # for quiet_prefect_tracebacks, and the flows' processes
        app(args=args, prog_name="emc")
        return
    try:
        app(args=args, prog_name="emc")
    except Exception as exc:  # the last stop: every foreseen failure was a clean exit already
        log = write_traceback(exc, args)
        for line in describe(exc):
            err_console.print(line, highlight=False)
        where = f"the full traceback is in {log}" if log else "no log could be written"
        err_console.print(f"{where}; run again with --debug to see it here", highlight=False)
        sys.exit(EXIT_ERROR)


def describe(exc: BaseException) -> list[str]:
    """The exception and what caused it, one line each, outermost first."""
    lines = [f"[bold red]error:[/] {inline(_one_line(exc))}"]
    seen = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        lines.append(f"  caused by: {inline(_one_line(cause))}")
        cause = cause.__cause__ or cause.__context__
    return lines


def write_traceback(exc: BaseException, args: list[str]) -> Path | None:
    """The traceback in EMC_LOG_DIR (default: the system's temporary directory, emc-logs/);
    None when it cannot be written (the failure may be the file system itself)."""
    folder = Path(os.environ.get("EMC_LOG_DIR") or Path(tempfile.gettempdir()) / "emc-logs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"emc-{stamp}-{os.getpid()}.log"
    text = "emc " + " ".join(args) + "\n\n" + "".join(traceback.format_exception(exc))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return None
    return path


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class _WithoutTraceback(logging.Formatter):
    """Another formatter's lines, without the traceback a record carries (for other handlers,
    the record is left as it was)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def quiet_prefect_tracebacks() -> None:
    """Keep Prefect's tracebacks off the terminal (see the module's docstring); unless debugging.

    Prefect sets its logging up when it is imported, so this imports it; idempotent."""
    if os.environ.get(DEBUG_ENV) == "1":
        return
    import prefect.main  # noqa: F401  (configures Prefect's logging)
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            formatter = handler.formatter
            wrapped = isinstance(formatter, _WithoutTraceback)
            if isinstance(handler, PrefectConsoleHandler) and formatter and not wrapped:
                handler.setFormatter(_WithoutTraceback(formatter))
