"""EMC dashboard entry point: `streamlit run dashboard/app.py` (or `emc dashboard`).

Each page is one module in views/ whose `render()` draws it; widgets.py holds what pages share.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run` puts only this folder on sys.path; the project root holds `emc` and the
# `dashboard` package in a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dashboard.views import behaviour, features, graphs, interventions, review, runs, sql
from dashboard.widgets import register_pages

st.set_page_config(page_title="EMC", page_icon="🔬", layout="wide")

# Every page's callable is named `render`, so each page names its own URL (/review, /graphs, ...).
pages = [
    st.Page(runs.render, title="Runs", icon="🏃", url_path="runs", default=True),
    st.Page(review.render, title="Review", icon="🧐", url_path="review"),
    st.Page(graphs.render, title="Graphs", icon="🕸️", url_path="graphs"),
    st.Page(features.render, title="Features", icon="🧬", url_path="features"),
    st.Page(interventions.render, title="Interventions", icon="💉", url_path="interventions"),
    st.Page(behaviour.render, title="Behaviour", icon="🗣️", url_path="behaviour"),
    st.Page(sql.render, title="SQL", icon="🧮", url_path="sql"),
]
register_pages({page.url_path or "runs": page for page in pages})
st.navigation(pages).run()
