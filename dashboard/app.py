"""EMC dashboard entry point: `streamlit run dashboard/app.py` (or `emc dashboard`)."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run` puts only this folder on sys.path; the project root holds `emc` in a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

st.set_page_config(page_title="EMC", page_icon="🔬", layout="wide")

pages = [
    st.Page("views/runs.py", title="Runs", icon="🏃", default=True),
    st.Page("views/review.py", title="Review", icon="🧐"),
    st.Page("views/graphs.py", title="Graphs", icon="🕸️"),
    st.Page("views/features.py", title="Features", icon="🧬"),
    st.Page("views/interventions.py", title="Interventions", icon="💉"),
    st.Page("views/behaviour.py", title="Behaviour", icon="🗣️"),
]
st.navigation(pages).run()
