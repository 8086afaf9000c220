"""What the flows' artifacts and logs share: rounded numbers and links to the dashboard.

Pure helpers (no store, no Prefect calls) except `run_logger`:

- `rounded` / `rounded_rows`: floats rounded for reading (3 decimals, or 3 significant digits
  below 1), NaN as None; ints, strings, booleans and None untouched.
- `dashboard_url` / `page_url`: the dashboard's pages by URL (base from `EMC_DASHBOARD_URL`).
- `prompt_links` / `feature_link`: markdown links to the pages that show a prompt or a feature,
  with the query parameters those pages read (`dashboard/views`): Graphs and Review take
  `prompt` (Graphs also `pair`, `BASE_GRAPH_ID/ADAPTED_GRAPH_ID`), Features takes
  `feature` (`LAYER/FEATURE`).
- `with_prompt_links`: a table's rows with a `dashboard` column of those links.
- `id_list`: ids for a log line, the first few and a count of the rest.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

DASHBOARD_ENV = "EMC_DASHBOARD_URL"
DEFAULT_DASHBOARD_URL = "http://localhost:8501"
DIGITS = 3
SHOWN_IDS = 10


def rounded(value: Any, digits: int = DIGITS) -> Any:
    """`value` for reading: a float to `digits` decimals, or `digits` significant digits when
    below 1 in size (0.000123456 -> 0.000123); NaN as None and infinities as text (JSON has
    neither). Numpy scalars become Python ones; lists, tuples and dicts are rounded inside;
    anything else (int, bool, str, None) is returned as it is."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()  # np.float32, np.int64, np.bool_ -> float, int, bool
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return 0.0
        magnitude = math.floor(math.log10(abs(value)))
        return round(value, max(digits, digits - 1 - magnitude))
    if isinstance(value, Mapping):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def rounded_rows(rows: Any, digits: int = DIGITS) -> list[dict]:
    """Table rows (mappings, or a DataFrame) with every float `rounded`."""
    if hasattr(rows, "to_dict"):
        rows = rows.to_dict("records")
    return [{k: rounded(v, digits) for k, v in row.items()} for row in rows]


def dashboard_url() -> str:
    """The dashboard's base URL: `EMC_DASHBOARD_URL`, else http://localhost:8501."""
    return (os.environ.get(DASHBOARD_ENV) or DEFAULT_DASHBOARD_URL).strip().rstrip("/")


def page_url(page: str, **params: Any) -> str:
    """The absolute URL of a dashboard page with query parameters (None values left out)."""
    query = urlencode({k: str(v) for k, v in params.items() if v is not None}, safe="/")
    return f"{dashboard_url()}/{page}" + (f"?{query}" if query else "")


def prompt_links(prompt_id: str, pair: str | None = None) -> str:
    """Markdown links to the prompt's Graphs page (its `pair` when given) and Review page."""
    graphs = page_url("graphs", prompt=prompt_id, pair=pair)
    return f"[graphs]({graphs}) · [review]({page_url('review', prompt=prompt_id)})"


def feature_link(layer: int, feature: int, label: str | None = None) -> str:
    """A markdown link to a feature's card on the Features page (`?feature=LAYER/FEATURE`)."""
    url = page_url("features", feature=f"{int(layer)}/{int(feature)}")
    return f"[{label or f'L{int(layer)}/{int(feature)}'}]({url})"


def with_prompt_links(
    rows: Iterable[Mapping[str, Any]], column: str = "prompt_id", name: str = "dashboard"
) -> list[dict]:
    """`rows` with a `name` column of `prompt_links` for each row's `column` (None without)."""
    return [{**row, name: prompt_links(row[column]) if row.get(column) else None} for row in rows]


def id_list(ids: Sequence[Any], shown: int = SHOWN_IDS) -> str:
    """Ids for a log line: all of them when few, else the first `shown` and how many more."""
    ids = [str(i) for i in ids]
    if len(ids) <= shown:
        return ", ".join(ids) or "none"
    return ", ".join(ids[:shown]) + f" and {len(ids) - shown} more"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger, or a plain one outside a run (a helper called directly)."""
    from prefect.logging import get_logger, get_run_logger

    try:
        return get_run_logger()
    except Exception:  # outside a flow or task run: MissingContextError
        return get_logger("emc.flows")
