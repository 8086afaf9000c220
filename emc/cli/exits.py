"""Exit codes: a command that did nothing it was asked to do never exits 0.

0: everything asked was done (or there was nothing to do).
1: an unexpected error (a traceback).
2: nothing was done: bad input, or every item failed; the reason is printed.
3: partial: some items were done, the ones that failed are listed.
"""

from __future__ import annotations

from collections.abc import Sequence

import typer

from emc.console import err_console, inline

DONE = 0
NOTHING_DONE = 2
PARTIAL = 3


def exit_for(done: int, failures: Sequence[str], what: str) -> None:
    """Print the failures, then exit 2 if none of `what` was done, 3 if some were; else return."""
    if not failures:
        return
    shown = 20
    for failure in failures[:shown]:
        err_console.print(f"[red]failed[/] {inline(failure)}", highlight=False)
    if len(failures) > shown:
        err_console.print(f"... and {len(failures) - shown} more", highlight=False)
    if done == 0:
        err_console.print(
            f"[bold red]error:[/] every {what} failed ({len(failures)})", highlight=False
        )
        raise typer.Exit(code=NOTHING_DONE)
    exit_partial(f"{done} {what}(s) done, {len(failures)} failed")


def exit_partial(message: str) -> None:
    """Say what was done and what was not, then exit 3."""
    err_console.print(f"[yellow]partial:[/] {message}", highlight=False)
    raise typer.Exit(code=PARTIAL)
