"""`emc export labels`: the reviewed label dataset as Parquet or JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

import emc.cli.transfer  # noqa: F401  (registers `emc import` and `emc export`)
from emc.cli import app

RESULTS = Path(__file__).parent / "fixtures" / "original_results"
COLUMNS = [
    "prompt_id",
    "prompt",
    "format",
    "assistant_prefix",
    "base_model_id",
    "adapted_model_id",
    "token_id",
    "token",
    "label",
    "labeller",
    "judge_label",
    "judge_model",
    "reviewer",
    "review_action",
    "explanation",
]
runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("export")
    result = runner.invoke(app, ["import", str(RESULTS), "-d", str(data_dir)])
    assert result.exit_code == 3, result.output  # partial: the fixture's broken files skipped
    return data_dir


def _export(data_dir: Path, out: Path, *extra: str) -> str:
    result = runner.invoke(app, ["export", "labels", str(out), "-d", str(data_dir), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_has_one_row_per_labelled_token_and_the_person_wins(data_dir, tmp_path):
    out = tmp_path / "labels.jsonl"
    assert "14 labelled tokens written" in _export(data_dir, out)
    rows = _jsonl(out)
    assert len(rows) == 14 and list(rows[0]) == COLUMNS
    assert len({(r["prompt_id"], r["token_id"]) for r in rows}) == 14
    spend = next(
        r for r in rows if r["prompt"].startswith("The cashier") and r["token"] == " spend"
    )
    assert spend["label"] == "unsure" and spend["judge_label"] == "evil"
    assert spend["labeller"] == spend["reviewer"] == "human:ana"
    assert spend["judge_model"] == "o3" and spend["review_action"] == "relabel"
    assert spend["explanation"].startswith("Spending surplus change")
    assert spend["base_model_id"] == "legacy:graph:meta-llama_Llama-3.2-1B-Instruct"
    # The dog prompt was labelled by hand only: the person's label, no judge's.
    poison = next(r for r in rows if r["token"] == " poison")
    assert [poison[c] for c in ("label", "judge_label", "judge_model", "reviewer")] == [
        "evil",
        None,
        None,
        "human:unknown",
    ]
    # The rejected prompt ("a list of some") is not data unless asked for.
    assert not any(r["prompt"].startswith("Here is a list") for r in rows)


def test_rejected_prompts_on_request_with_the_judge_label(data_dir, tmp_path):
    out = tmp_path / "all.jsonl"
    _export(data_dir, out, "--include-rejected")
    rejected = [r for r in _jsonl(out) if r["prompt"].startswith("Here is a list")]
    assert len(rejected) == 2
    assert {(r["label"], r["labeller"], r["review_action"]) for r in rejected} == {
        ("safe", "judge:o3", None)
    }


def test_parquet_holds_the_same_rows_as_jsonl(data_dir, tmp_path):
    parquet, jsonl = tmp_path / "labels.parquet", tmp_path / "labels.jsonl"
    _export(data_dir, parquet)
    _export(data_dir, jsonl)
    frame = duckdb.sql(f"SELECT * FROM read_parquet('{parquet}')").df()
    assert list(frame.columns) == COLUMNS
    frame = frame.astype(object).where(frame.notna(), None)
    assert frame.to_dict(orient="records") == _jsonl(jsonl)


@pytest.mark.parametrize("name", ["labels.csv", "labels", "labels.parquet.gz"])
def test_an_unknown_suffix_is_refused(data_dir, tmp_path, name):
    result = runner.invoke(app, ["export", "labels", str(tmp_path / name), "-d", str(data_dir)])
    assert result.exit_code == 2
    assert "name it *.parquet or *.jsonl" in result.output
    assert not (tmp_path / name).exists()
