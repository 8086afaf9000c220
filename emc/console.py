"""Terminal presentation for the CLI: tables and progress bars (rich)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def dataframe_table(frame: pd.DataFrame, title: str | None = None, max_rows: int = 200) -> Table:
    table = Table(title=title, show_lines=False)
    for column in frame.columns:
        justify = "right" if pd.api.types.is_numeric_dtype(frame[column]) else "left"
        table.add_column(str(column), justify=justify, overflow="fold")
    for row in frame.head(max_rows).itertuples(index=False):
        table.add_row(*(_cell(value) for value in row))
    if len(frame) > max_rows:
        table.caption = f"{max_rows} of {len(frame)} rows shown"
    return table


def print_frame(frame: pd.DataFrame, output_format: str = "table", title: str | None = None):
    if output_format == "csv":
        console.print(frame.to_csv(index=False), end="", markup=False, highlight=False)
    elif output_format == "json":
        rows = json.loads(frame.to_json(orient="records", date_format="iso"))
        console.print_json(json.dumps(rows))
    else:
        console.print(dataframe_table(frame, title))


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@contextmanager
def phase_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback (phase, step, total) that draws one bar per phase."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        # Redirection would wrap sys.stdout/stderr in proxies that Prefect's log handler then
        # captures and writes back into: endless recursion once the bar has closed.
        redirect_stdout=False,
        redirect_stderr=False,
    )
    bars: dict[str, TaskID] = {}

    def update(phase: str, step: int, total: int) -> None:
        if phase not in bars:
            bars[phase] = progress.add_task(phase, total=total)
        progress.update(bars[phase], completed=step, total=total)

    with progress:
        yield update


def plain_table(rows: list[tuple]) -> list[str]:
    """Rows as aligned plain-text lines (first column left, the rest right): for logs and files."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            str(v).ljust(w) if i == 0 else str(v).rjust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
