"""Terminal presentation for the CLI: tables and progress bars (rich), and raw machine output."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

# For people, a table fitted to the terminal; for machines, exact data written raw, never wrapped
# or escaped: CSV keeps stored text byte for byte, JSON gives it back exactly once parsed (it
# spells control and non-ASCII characters as \uXXXX, so it is also safe to show on a terminal).
MACHINE_FORMATS = ("csv", "json", "parquet")
OUTPUT_FORMATS = ("table", *MACHINE_FORMATS)

# Stored text (prompts from generators, imports and people, LLM output) must not drive the
# terminal: C0 controls but newline and tab, DEL, C1 controls, and the bidirectional embeddings,
# overrides and isolates, which can make a table show text in an order other than stored.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escape_control(text: str) -> str:
    """Text with terminal controls and bidi overrides shown as escapes (ESC as \\x1b)."""
    return _UNSAFE.sub(_escape_char, text)


def plain(text: str) -> Text:
    """Stored text for a rich table or line: escaped, and never read as markup ("[/INST]")."""
    return Text(escape_control(text))


def inline(text: str) -> str:
    """Stored text to put inside a line that uses rich markup: escaped both ways."""
    return escape_markup(escape_control(text))


def dataframe_table(frame: pd.DataFrame, title: str | None = None, max_rows: int = 200) -> Table:
    table = Table(title=title, show_lines=False)
    for column in frame.columns:
        justify = "right" if pd.api.types.is_numeric_dtype(frame[column]) else "left"
        table.add_column(plain(str(column)), justify=justify, overflow="fold")
    for row in frame.head(max_rows).itertuples(index=False):
        table.add_row(*(_cell(value) for value in row))
    if len(frame) > max_rows:
        table.caption = f"{max_rows} of {len(frame)} rows shown"
    return table


def print_frame(frame: pd.DataFrame, output_format: str = "table", title: str | None = None):
    """A table on stdout, or a machine format written raw to stdout."""
    if output_format == "table":
        console.print(dataframe_table(frame, title))
    else:
        write_frame(frame, output_format)


def write_frame(frame: pd.DataFrame, output_format: str, path: Path | None = None) -> None:
    """csv, json or parquet, exact and unwrapped, to `path` or stdout; rich is bypassed, since it
    would wrap lines at the terminal's width and read brackets as markup."""
    if output_format not in MACHINE_FORMATS:
        raise ValueError(f"unknown format {output_format!r}: choose {', '.join(MACHINE_FORMATS)}")
    from emc.store import write_parquet

    sys.stdout.flush()
    if output_format == "parquet":
        if path is not None:
            write_parquet(frame, path)
        else:
            write_parquet(frame, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        return
    if output_format == "csv":
        text = frame.to_csv(index=False)
    else:
        text = frame.to_json(orient="records", date_format="iso") + "\n"
    if path is not None:
        path.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def _cell(value: object) -> Text:
    if value is None:
        return Text("")
    if isinstance(value, float):
        return Text("" if math.isnan(value) else f"{value:.4g}")
    return plain(str(value))


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


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
