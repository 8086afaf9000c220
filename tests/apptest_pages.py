"""One dashboard page in Streamlit's AppTest, drawn by its `render()` as app.py's navigation
draws it (a page module does nothing when imported)."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest


def page_test(page: str, default_timeout: float = 60) -> AppTest:
    """An AppTest of `dashboard/views/<page>.py`; call `.run()` on it to draw the page."""
    # The script runs in this process, where the project root is on sys.path already.
    return AppTest.from_string(
        f"from dashboard.views.{page} import render\n\nrender()\n", default_timeout=default_timeout
    )
