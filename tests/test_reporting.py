"""flows/reporting.py: rounded artifact tables and links to the dashboard's pages."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest

from flows.reporting import (
    DEFAULT_DASHBOARD_URL,
    dashboard_url,
    feature_link,
    id_list,
    page_url,
    prompt_links,
    rounded,
    rounded_rows,
    run_logger,
    with_prompt_links,
)


@pytest.fixture(autouse=True)
def _no_dashboard_env(monkeypatch):
    monkeypatch.delenv("EMC_DASHBOARD_URL", raising=False)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.123456789, 0.123),
        (12.3456789, 12.346),
        (1234.56789, 1234.568),
        (-0.98765, -0.988),
        (0.000123456, 0.000123),
        (-4.56789e-7, -4.57e-7),
        (0.1 + 0.2, 0.3),
        (0.0, 0.0),
        (2.0, 2.0),
    ],
)
def test_floats_keep_three_decimals_or_three_significant_digits(value, expected):
    assert rounded(value) == expected


def test_nan_is_none_infinities_are_text_and_other_values_are_untouched():
    assert rounded(float("nan")) is None
    assert (rounded(math.inf), rounded(-math.inf)) == ("inf", "-inf")
    for value in (7, True, False, None, "0.123456", 10**20):
        assert rounded(value) is value or rounded(value) == value
        assert type(rounded(value)) is type(value)


def test_numpy_scalars_become_python_ones_and_containers_are_rounded_inside():
    assert rounded(np.float32(0.123456)) == 0.123 and type(rounded(np.float32(1.5))) is float
    assert rounded(np.int64(3)) == 3 and type(rounded(np.int64(3))) is int
    assert rounded(np.float64("nan")) is None
    assert rounded([0.123456, 2, {"a": 1.23456}]) == [0.123, 2, {"a": 1.235}]
    assert rounded(0.123456, digits=2) == 0.12


def test_rounded_rows_take_dicts_or_a_dataframe():
    rows = [{"prompt_id": "p1", "n": 3, "mean": 0.123456, "t": float("nan"), "label": None}]
    assert rounded_rows(rows) == [
        {"prompt_id": "p1", "n": 3, "mean": 0.123, "t": None, "label": None}
    ]
    frame = pd.DataFrame({"layer": [1, 2], "mean": [1.23456, np.nan]})
    assert rounded_rows(frame) == [{"layer": 1, "mean": 1.235}, {"layer": 2, "mean": None}]
    assert all(type(row["layer"]) is int for row in rounded_rows(frame))
    assert rounded_rows([]) == []


def test_links_use_the_pages_and_query_parameters_the_dashboard_reads():
    assert dashboard_url() == DEFAULT_DASHBOARD_URL == "http://localhost:8501"
    assert prompt_links("abc123") == (
        "[graphs](http://localhost:8501/graphs?prompt=abc123) · "
        "[review](http://localhost:8501/review?prompt=abc123)"
    )
    assert "graphs?prompt=abc&pair=g1/g2)" in prompt_links("abc", pair="g1/g2")
    assert feature_link(1, 125) == "[L1/125](http://localhost:8501/features?feature=1/125)"
    assert feature_link(np.int64(0), 7, "kill") == (
        "[kill](http://localhost:8501/features?feature=0/7)"
    )
    assert page_url("graphs", prompt="a b&c", pair=None) == (
        "http://localhost:8501/graphs?prompt=a+b%26c"
    )
    assert page_url("interventions") == "http://localhost:8501/interventions"


def test_the_dashboard_url_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("EMC_DASHBOARD_URL", "https://emc.lab.example/dash/ ")
    assert prompt_links("p").startswith("[graphs](https://emc.lab.example/dash/graphs?prompt=p)")
    monkeypatch.setenv("EMC_DASHBOARD_URL", "")
    assert dashboard_url() == DEFAULT_DASHBOARD_URL


def test_the_dashboard_reads_the_parameters_the_links_set():
    """The links name pages and parameters the dashboard's code parses, not guesses."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "dashboard"
    app = (root / "app.py").read_text()
    for page in ("graphs", "review", "features", "interventions"):
        assert f'url_path="{page}"' in app
    assert 'query_value("prompt")' in (root / "views" / "review.py").read_text()
    assert 'query_value("feature")' in (root / "views" / "features.py").read_text()
    widgets = (root / "widgets.py").read_text()
    assert 'follow_url(page, "prompt"' in widgets and 'follow_url(page, "pair"' in widgets
    from dashboard.views.features import parse_feature_key

    assert parse_feature_key("1/125") == (1, 125)


def test_with_prompt_links_adds_a_dashboard_column():
    rows = [{"prompt_id": "p1", "x": 1}, {"prompt_id": None, "x": 2}]
    linked = with_prompt_links(rows)
    assert linked[0]["dashboard"] == prompt_links("p1") and linked[1]["dashboard"] is None
    assert rows[0] == {"prompt_id": "p1", "x": 1}  # the input is left as it was


def test_id_list_shows_few_ids_and_counts_the_rest():
    assert id_list([]) == "none"
    assert id_list(["a", "b"]) == "a, b"
    assert id_list([f"p{i}" for i in range(12)]) == ", ".join(f"p{i}" for i in range(10)) + (
        " and 2 more"
    )


def test_run_logger_outside_a_run_is_a_plain_logger():
    assert isinstance(run_logger(), logging.Logger | logging.LoggerAdapter)
