"""Reading the data behind a page's charts in Streamlit's AppTest (charts are Vega-Lite specs
whose datasets travel as Arrow bytes)."""

from __future__ import annotations

import pandas as pd
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest


def chart_data(page: AppTest, column: str) -> list[pd.DataFrame]:
    """The datasets of the page's charts that have this column."""
    frames = []
    for chart in page.get("vega_lite_chart"):
        for dataset in chart.proto.datasets:
            frame = convert_arrow_bytes_to_pandas_df(dataset.data.data)
            if column in frame.columns:
                frames.append(frame)
    return frames
