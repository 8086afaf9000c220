"""`emc graph export --format neuronpedia`: real graphs of the small organism written in
Neuronpedia's attribution-graph format and checked against EMC's schema of it
(emc/viewer/neuronpedia_schema.json)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from emc.cli import app
from emc.features.records import ActivationStats, FeatureCard, TokenValue
from emc.store import list_models
from emc.store.feature_cards import replace_feature_cards
from emc.store.graphs import load_graph_rows
from emc.viewer import (
    INDEX_FILE,
    GraphSchemaError,
    export_neuronpedia,
    neuronpedia_graph,
    neuronpedia_problems,
    neuronpedia_schema,
    validate_neuronpedia,
)
from emc.viewer.convert import feature_id
from tests.graph_store import RUN_ID, TracedStore, build_traced_store, copy_store
from tests.processes import clean_env

EMC = Path(sys.executable).with_name("emc")  # the console script, as a user types it
runner = CliRunner()
SAFE = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_organism) -> TracedStore:
    """Base and adapted labelled graphs of one held-out prompt (tests/graph_store.py)."""
    return build_traced_store(
        small_organism, tmp_path_factory.mktemp("neuronpedia-store"), n_prompts=1
    )


@pytest.fixture(scope="module")
def exported(traced, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The exact command a researcher types, in a child process."""
    out = tmp_path_factory.mktemp("neuronpedia-out") / "np"
    args = [traced.prompt_ids[0], "--format", "neuronpedia", "--out", str(out)]
    done = subprocess.run(
        [str(EMC), "graph", "export", *args, "-d", str(traced.data_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done


def files_by_role(out: Path) -> dict[str, dict]:
    graphs = {}
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        graphs[data["metadata"]["info"]["emc"]["role"]] = data
    return graphs


def test_schema_is_a_valid_draft_2020_12_schema_naming_its_neuronpedia_source():
    schema = neuronpedia_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "graph-schema.json" in schema["description"]
    assert "version 1.0.0" in schema["description"]


def test_cli__writes_one_schema_valid_file_per_graph_and_nothing_else(exported, traced):
    out, done = exported
    prompt_id = traced.prompt_ids[0]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{prompt_id}-{role}-labelled.json" for role in ("base", "adapted"))
    validator = jsonschema.Draft202012Validator(neuronpedia_schema())
    for name in names:
        data = json.loads((out / name).read_text(encoding="utf-8"))
        validator.validate(data)  # raises on the first mismatch
        assert neuronpedia_problems(data) == []
        assert data["metadata"]["slug"] == name.removesuffix(".json")
        assert str(out / name) in done.stdout
    assert "matches Neuronpedia's graph schema" in done.stdout


@pytest.mark.parametrize("role", ["base", "adapted"])
def test_nodes_and_links_are_the_stored_pruned_graphs(exported, traced, role):
    data = files_by_role(exported[0])[role]
    stored = load_graph_rows(traced.store, data["metadata"]["info"]["emc"]["graph_id"])
    nodes, links = data["nodes"], data["links"]
    assert len(nodes) == len(stored.nodes) > 0
    assert len(links) == len(stored.edges) > 0
    ids = [node["node_id"] for node in nodes]
    assert len(set(ids)) == len(ids)
    assert all(link["source"] in ids and link["target"] in ids for link in links)
    by_row = dict(zip(stored.nodes["node"], ids, strict=True))
    weights = {(link["source"], link["target"]): link["weight"] for link in links}
    for edge in stored.edges.itertuples():
        assert weights[(by_row[edge.source], by_row[edge.target])] == pytest.approx(edge.weight)
    for row, node in zip(stored.nodes.itertuples(), nodes, strict=True):
        if row.kind == "feature":
            # schema_version 1: Neuronpedia decodes layer and index from the Cantor pair.
            assert node["feature"] == feature_id(row.layer, row.feature)
            assert node["layer"] == str(row.layer) and node["ctx_idx"] == row.position
            assert node["clerp"] == f"L{row.layer} feature {row.feature}"  # no label, no card


def test_target_logits_are_marked_with_their_probability(exported, traced):
    data = files_by_role(exported[0])["adapted"]
    stored = load_graph_rows(traced.store, data["metadata"]["info"]["emc"]["graph_id"])
    rows = stored.nodes[stored.nodes["kind"] == "logit"]
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == len(rows) == stored.record.n_logits > 0
    for node, row in zip(logits, rows.itertuples(), strict=True):
        assert node["is_target_logit"] is True and node["feature"] == row.token_id
        assert node["token_prob"] == pytest.approx(row.prob)
        # Neuronpedia's page reads the probability back out of the clerp.
        shown = float(node["clerp"].split("(p=")[1].split(")")[0])
        assert shown == pytest.approx(row.prob, abs=5e-4)
    others = [n for n in data["nodes"] if n["feature_type"] != "logit"]
    assert others and not any(n["is_target_logit"] for n in others)


def test_metadata_records_emc_provenance(exported, traced):
    graphs = files_by_role(exported[0])
    models = {m.model_id: m for m in list_models(traced.store)}
    scans = set()
    for role, data in graphs.items():
        metadata = data["metadata"]
        emc = metadata["info"]["emc"]
        model = models[emc["model_id"]]
        assert model.role == role
        own = {"base": traced.base_model_id, "adapted": traced.adapted_model_id}
        assert emc["model_id"] == own[role]
        assert emc["run_id"] == RUN_ID and emc["precision"] == model.dtype
        assert emc["prompt_id"] == traced.prompt_ids[0] and emc["targets"] == "labelled"
        assert f"the {role} model {model.model_id}" in metadata["info"]["description"]
        # Local paths (the organism's folders) show only their last part: uploads are public.
        assert emc["base_ref"] == Path(model.base_ref).name and emc["adapter_ref"] == (
            Path(model.adapter_ref).name if model.adapter_ref else None
        )
        assert str(traced.data_dir.parent) not in json.dumps(data)
        assert metadata["schema_version"] == 1 and SAFE.match(metadata["scan"])
        assert metadata["node_threshold"] == emc["params"]["node_threshold"]
        assert metadata["pruning_settings"]["edge_threshold"] == emc["params"]["edge_threshold"]
        assert len(metadata["prompt_tokens"]) == len(
            load_graph_rows(traced.store, emc["graph_id"]).record.input_ids
        )
        scans.add(metadata["scan"])
    assert len(scans) == 1  # base and adapted are filed under the same model


def _card(layer: int, feature: int, model_id: str, tokens: list[str]) -> FeatureCard:
    stats = ActivationStats(
        texts=1,
        positions=4,
        active=1,
        frequency=0.25,
        max=2.0,
        mean_active=2.0,
        quantile_levels=[0.5],
        quantile_values=[2.0],
        hist_edges=[0.0, 2.0],
        hist_counts=[1],
    )
    return FeatureCard(
        layer=layer,
        feature=feature,
        model_id=model_id,
        corpus_id="test-corpus",
        corpus_name="test corpus",
        stats=stats,
        examples=[],
        top_logits=[TokenValue(token_id=i, token=t, value=1.0 - i) for i, t in enumerate(tokens)],
        bottom_logits=[],
        encoder_tokens=[],
        logit_basis="unembed",
        dtype="float32",
    )


def _features(stored) -> list[tuple[int, int]]:
    rows = stored.nodes[stored.nodes["kind"] == "feature"]
    return sorted({(int(a), int(b)) for a, b in zip(rows["layer"], rows["feature"], strict=True)})


def test_labels_and_cards_become_the_clerp_of_their_feature_nodes(traced):
    (graph_id,) = [
        g.graph_id
        for g in _graphs(traced)
        if g.model_id == traced.adapted_model_id and g.targets == "labelled"
    ]
    stored = load_graph_rows(traced.store, graph_id)
    model = next(m for m in list_models(traced.store) if m.model_id == stored.record.model_id)
    labelled, carded, both = _features(stored)[:3]
    labels = {labelled: "  refuses to help  ", both: "talks about poison"}
    cards = {
        carded: _card(*carded, model.model_id, [" kill", "\n", " harm", " extra"]),
        both: _card(*both, model.model_id, [" ignored"]),
    }
    data = neuronpedia_graph(stored, model, "my-slug", scan="my-scan", labels=labels, cards=cards)
    validate_neuronpedia(data)
    expected = {
        labelled: "refuses to help",
        both: "talks about poison",  # a label wins over a card
        carded: f'L{carded[0]} feature {carded[1]} (top logits: " kill", "⏎", " harm")',
    }
    seen = set()
    for row, node in zip(stored.nodes.itertuples(), data["nodes"], strict=True):
        if row.kind != "feature":
            continue
        key = (row.layer, row.feature)
        assert node["clerp"] == expected.get(key, f"L{row.layer} feature {row.feature}")
        seen.add(key)
    assert set(expected) <= seen
    assert data["metadata"]["scan"] == "my-scan" and data["metadata"]["slug"] == "my-slug"


def _graphs(traced):
    from emc.store.graphs import list_graphs

    return list_graphs(traced.store, prompt_id=traced.prompt_ids[0])


def test_cli__describes_features_by_their_stored_cards(traced, tmp_path):
    store = copy_store(traced.data_dir, tmp_path / "data")
    graph = next(g for g in _graphs(traced) if g.model_id == traced.adapted_model_id)
    feature = _features(load_graph_rows(traced.store, graph.graph_id))[0]
    card = _card(*feature, traced.adapted_model_id, [" poison"])
    replace_feature_cards(store, [card], "test-cards")
    out = tmp_path / "np"
    args = ["graph", "export", traced.prompt_ids[0], "-f", "neuronpedia", "-o", str(out)]
    result = runner.invoke(app, [*args, "-d", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    data = files_by_role(out)["adapted"]
    clerps = {
        n["clerp"]
        for n in data["nodes"]
        if n["feature_type"] == "cross layer transcoder" and n["feature"] == feature_id(*feature)
    }
    assert clerps == {f'L{feature[0]} feature {feature[1]} (top logits: " poison")'}


# --- the schema refuses what Neuronpedia would not load ---


def _broken(data: dict, how: str) -> tuple[dict, str]:
    """A copy of a valid graph broken one way, and the path the complaint must name."""
    graph = copy.deepcopy(data)
    feature = next(i for i, n in enumerate(graph["nodes"]) if n["feature_type"] != "logit")
    logit = next(i for i, n in enumerate(graph["nodes"]) if n["feature_type"] == "logit")
    if how == "no scan":
        del graph["metadata"]["scan"]
        return graph, "$.metadata"
    if how == "dotted slug":
        graph["metadata"]["slug"] = "a.b"
        return graph, "$.metadata.slug"
    if how == "old schema version":
        graph["metadata"]["schema_version"] = 0
        return graph, "$.metadata.schema_version"
    if how == "no role":
        del graph["metadata"]["info"]["emc"]["role"]
        return graph, "$.metadata.info.emc"
    if how == "numeric clerp":
        graph["nodes"][feature]["clerp"] = 5
        return graph, f"$.nodes[{feature}].clerp"
    if how == "logit without probability":
        graph["nodes"][logit]["clerp"] = "Output"
        return graph, f"$.nodes[{logit}].clerp"
    if how == "string ctx_idx":
        graph["nodes"][feature]["ctx_idx"] = "3"
        return graph, f"$.nodes[{feature}].ctx_idx"
    if how == "link to nowhere":
        graph["links"][0]["target"] = "no-such-node"
        return graph, "$.links[0].target"
    if how == "nan weight":
        graph["links"][0]["weight"] = float("nan")
        return graph, "$.links[0].weight"
    if how == "duplicate node":
        graph["nodes"].append(copy.deepcopy(graph["nodes"][0]))
        return graph, "$.nodes"
    if how == "no links key":
        del graph["links"]
        return graph, "$"
    raise AssertionError(how)


BROKEN = [
    "no scan",
    "dotted slug",
    "old schema version",
    "no role",
    "numeric clerp",
    "logit without probability",
    "string ctx_idx",
    "link to nowhere",
    "nan weight",
    "duplicate node",
    "no links key",
]


@pytest.mark.parametrize("how", BROKEN)
def test_a_broken_graph_fails_validation_naming_where(exported, how):
    valid = files_by_role(exported[0])["base"]
    assert neuronpedia_problems(valid) == []
    graph, where = _broken(valid, how)
    problems = neuronpedia_problems(graph)
    assert problems and any(p.startswith(where) for p in problems), problems
    with pytest.raises(GraphSchemaError, match="does not match Neuronpedia's graph schema"):
        validate_neuronpedia(graph)


def test_export_writes_nothing_when_a_graph_fails_validation(traced, tmp_path, monkeypatch):
    import emc.viewer.neuronpedia as module

    made = module.neuronpedia_graph

    def broken_adapted(stored, model, slug, *args, **kwargs):
        graph = made(stored, model, slug, *args, **kwargs)
        if model.role == "adapted":  # the second graph: the base one passed already
            graph["nodes"][0]["ctx_idx"] = -1
        return graph

    monkeypatch.setattr(module, "neuronpedia_graph", broken_adapted)
    out = tmp_path / "np"
    with pytest.raises(GraphSchemaError, match=r"ctx_idx.*Nothing was written"):
        export_neuronpedia(traced.store, traced.prompt_ids[0], out)
    assert not out.exists()


# --- the command's options and errors ---


def test_help_teaches_the_format_option():
    result = runner.invoke(app, ["graph", "export", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--format" in text and "viewer|neuronpedia" in text
    assert "Neuronpedia's attribution-graph format" in text and "--scan" in text


def test_default_out_is_neuronpedia_in_the_data_dir(traced, tmp_path):
    copy_store(traced.data_dir, tmp_path / "data")
    args = ["graph", "export", traced.prompt_ids[0], "--format", "neuronpedia", "--scan", "m-1"]
    result = runner.invoke(app, [*args, "-d", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    graphs = files_by_role(tmp_path / "data" / "neuronpedia")
    assert {g["metadata"]["scan"] for g in graphs.values()} == {"m-1"}
    assert not (tmp_path / "data" / "viewer").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scan", "gemma.2"], "is not a Neuronpedia model id"),
        (["--format", "viewer", "--scan", "x"], "--scan is for --format neuronpedia only"),
        (["--format", "pdf"], "Invalid value for '--format'"),
    ],
)
def test_bad_options_are_refused_and_write_nothing(traced, tmp_path, extra, message):
    args = ["graph", "export", traced.prompt_ids[0], "-o", str(tmp_path / "np")]
    if "--format" not in extra:
        args += ["--format", "neuronpedia"]
    result = runner.invoke(app, [*args, *extra, "-d", str(traced.data_dir)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "np").exists()


def test_a_viewer_directory_is_not_overwritten(traced, tmp_path):
    out = tmp_path / "viewer"
    out.mkdir()
    (out / INDEX_FILE).write_text('{"graphs": []}')
    args = ["graph", "export", traced.prompt_ids[0], "--format", "neuronpedia", "-o", str(out)]
    result = runner.invoke(app, [*args, "-d", str(traced.data_dir)])
    assert result.exit_code == 2 and "choose another --out" in " ".join(result.output.split())
    assert sorted(p.name for p in out.iterdir()) == [INDEX_FILE]


def test_unknown_prompt_is_an_error(traced, tmp_path):
    args = ["graph", "export", "ffffffff", "--format", "neuronpedia", "-o", str(tmp_path / "np")]
    result = runner.invoke(app, [*args, "-d", str(traced.data_dir)])
    assert result.exit_code == 2 and "no prompt id starts with 'ffffffff'" in result.output
    assert not (tmp_path / "np").exists()
