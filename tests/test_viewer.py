"""circuit-tracer's viewer for stored graphs: JSON from real graph rows, the CLI, assets, server.

The browser half (the page really renders, offline) is tests/test_viewer_browser.py.
"""

from __future__ import annotations

import http.client
import io
import json
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from emc.cli import app
from emc.config import TracingConfig
from emc.models import load_replacement_model
from emc.organism.lexicon import Lexicon
from emc.pivotal.prompts import make_prompt
from emc.store import STORE_FILE_NAME, Store
from emc.store.graph_pairs import graph_pairs
from emc.store.graphs import insert_graph, list_graphs, load_graph_rows
from emc.store.prompts import insert_prompts
from emc.tracing import CONTRASTIVE_LABEL, graph_key, plan_targets, release_memory, trace_prompt
from emc.viewer import (
    ASSETS,
    INDEX_FILE,
    AmbiguousPromptError,
    Asset,
    AssetError,
    ExportResult,
    FrontendError,
    NoGraphsError,
    PromptNotFoundError,
    ViewerServer,
    check_assets,
    export_prompt,
    fetch_assets,
    pruning_scores,
    require_assets,
    resolve_prompt_id,
    rewrite_scripts,
)
from emc.viewer.assets import integrity_of, read_asset
from emc.viewer.convert import feature_id
from emc.viewer.frontend import CDN_SCRIPTS
from tests.graph_store import RUN_ID, TracedStore, build_traced_store

runner = CliRunner()
FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
}


def add_contrastive_pair(small_organism, traced: TracedStore) -> None:
    """Base and adapted graphs of the first prompt for one custom target (evil minus safe)."""
    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    entry = next(e for e in lexicon.entries if e.split == "heldout")  # the first prompt's
    labels = {t: "evil" for t in entry.harmful_ids} | {t: "safe" for t in entry.safe_ids}
    tracing = TracingConfig(targets="contrastive", max_feature_nodes=256)
    plan = plan_targets(labels, tracing)
    prompt_id = traced.prompt_ids[0]
    ids = torch.tensor(list_graphs(traced.store, prompt_id=prompt_id)[0].input_ids)
    for role in ("base", "adapted"):
        loaded = load_replacement_model(small_organism.config, role)
        try:
            key = graph_key(prompt_id, loaded.identity.model_id, plan, tracing)
            made = trace_prompt(loaded, key, plan, ids, tracing, RUN_ID)
            insert_graph(traced.store, made.record, made.compact.nodes, made.compact.edges)
        finally:
            loaded.close()
            release_memory()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_organism) -> TracedStore:
    """Labelled pairs of two prompts, plus a contrastive pair of the first, made once here."""
    traced = build_traced_store(small_organism, tmp_path_factory.mktemp("viewer-store"))
    add_contrastive_pair(small_organism, traced)
    return traced


@pytest.fixture(scope="module")
def exported(traced, tmp_path_factory) -> ExportResult:
    out = tmp_path_factory.mktemp("viewer-out")
    return export_prompt(traced.store, traced.prompt_ids[0][:6], out)


def graph_file(exported: ExportResult, role: str, targets: str) -> tuple[dict, object]:
    (graph,) = [g for g in exported.graphs if g.role == role and g.targets == targets]
    return json.loads(graph.path.read_text()), graph


def test_export__writes_base_and_adapted_of_each_pair_with_readable_slugs(exported, traced):
    prompt_id = traced.prompt_ids[0]
    assert exported.prompt_id == prompt_id
    assert sorted(g.path.name for g in exported.graphs) == sorted(
        f"{prompt_id}-{role}-{targets}.json"
        for role in ("base", "adapted")
        for targets in ("labelled", "contrastive")
    )
    pairs = graph_pairs(traced.store, prompt_id=prompt_id)
    paired = {i for p in pairs for i in (p.base_graph_id, p.adapted_graph_id)}
    assert {g.graph_id for g in exported.graphs} == paired


@pytest.mark.parametrize("targets", ["labelled", "contrastive"])
@pytest.mark.parametrize("role", ["base", "adapted"])
def test_export__every_stored_node_and_edge_is_in_the_viewer_json(exported, traced, role, targets):
    data, graph = graph_file(exported, role, targets)
    stored = load_graph_rows(traced.store, graph.graph_id)
    nodes = data["nodes"]
    assert len(nodes) == len(stored.nodes) and len({n["node_id"] for n in nodes}) == len(nodes)
    n_layers = int(stored.nodes.loc[stored.nodes["kind"] == "logit", "layer"].iloc[0])
    ids = {}
    for row, node in zip(stored.nodes.itertuples(), nodes, strict=True):
        ids[row.node] = node["node_id"]
        assert node["feature_type"] == FEATURE_TYPES[row.kind]
        assert node["ctx_idx"] == row.position
        if row.kind == "feature":
            assert node["layer"] == str(row.layer)
            assert node["feature"] == feature_id(row.layer, row.feature)
            assert node["activation"] == pytest.approx(row.activation)
        elif row.kind == "error":
            assert node["layer"] == str(row.layer) and node["feature"] == -1
        elif row.kind == "token":
            assert node["layer"] == "E" and node["node_id"] == f"E_{row.token_id}_{row.position}"
        else:
            assert node["layer"] == str(n_layers + 1)  # as circuit-tracer writes logits
    links = {(link["source"], link["target"]): link["weight"] for link in data["links"]}
    assert len(links) == len(data["links"]) == len(stored.edges)
    for edge in stored.edges.itertuples():
        assert links[(ids[edge.source], ids[edge.target])] == pytest.approx(edge.weight)
    tokens = stored.nodes[stored.nodes["kind"] == "token"].sort_values("position")
    assert data["metadata"]["prompt_tokens"] == tokens["token"].tolist()
    assert len(tokens) == len(stored.record.input_ids)
    assert data["metadata"]["node_threshold"] == stored.record.params["node_threshold"]
    assert data["emc"]["graph_id"] == graph.graph_id and data["emc"]["role"] == role


def test_export__labelled_targets_are_flagged_logits_with_token_and_probability(exported, traced):
    data, graph = graph_file(exported, "adapted", "labelled")
    stored = load_graph_rows(traced.store, graph.graph_id)
    rows = stored.nodes[stored.nodes["kind"] == "logit"]
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == len(rows) == stored.record.n_logits
    for node, row in zip(logits, rows.itertuples(), strict=True):
        assert node["is_target_logit"] is True
        assert node["feature"] == row.token_id
        assert node["token_prob"] == pytest.approx(row.prob)
        assert node["clerp"] == f'Output "{row.token}" (p={row.prob:.3f})'


def test_export__a_custom_target_gets_its_label_and_a_virtual_id(exported, traced):
    data, graph = graph_file(exported, "base", "contrastive")
    stored = load_graph_rows(traced.store, graph.graph_id)
    (row,) = stored.nodes[stored.nodes["kind"] == "logit"].itertuples()
    assert pd.isna(row.token_id)  # what makes it custom
    (node,) = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert node["is_target_logit"] is True and node["feature"] < 0
    assert node["clerp"].startswith(f'Output "{CONTRASTIVE_LABEL}" (p=')
    assert any(link["target"] == node["node_id"] for link in data["links"])


def test_export__at_the_threshold_the_pruning_slider_keeps_every_stored_node(exported):
    for graph in exported.graphs:
        data = json.loads(graph.path.read_text())
        threshold = data["metadata"]["node_threshold"]
        # The page's filter: embeddings and logits always, others when influence <= slider.
        assert all(n["influence"] <= threshold for n in data["nodes"])


def test_pruning_scores__are_cumulative_shares_that_grow_as_influence_falls():
    influence = np.array([0.1, 0.5, 0.0, 0.4], dtype=np.float32)
    scores = pruning_scores(influence, 0.8)
    assert scores.tolist() == pytest.approx([0.8, 0.4, 0.8, 0.72])
    assert scores.max() <= 0.8  # float64 and clipped: 0.8 itself passes the page's <= 0.8
    assert pruning_scores(influence, None).tolist() == pytest.approx([1.0, 0.5, 1.0, 0.9])


def test_export__index_lists_the_newest_export_first_and_replaces_its_own_entries(traced, tmp_path):
    first, second = traced.prompt_ids
    export_prompt(traced.store, first, tmp_path)
    export_prompt(traced.store, second, tmp_path)
    export_prompt(traced.store, first, tmp_path)
    entries = json.loads((tmp_path / INDEX_FILE).read_text())["graphs"]
    slugs = [e["slug"] for e in entries]
    assert len(slugs) == len(set(slugs)) == 6
    assert all(s.startswith(first) for s in slugs[:4])
    assert slugs[4:] == [f"{second}-base-labelled", f"{second}-adapted-labelled"]
    for entry in entries:
        assert (tmp_path / f"{entry['slug']}.json").is_file()
        assert entry["title_prefix"].startswith(f"[{entry['role']}]")
        assert entry["prompt_tokens"] and entry["node_threshold"] == 0.8


def test_export__feature_files_show_where_each_feature_is_active(exported, traced):
    data, graph = graph_file(exported, "adapted", "labelled")
    stored = load_graph_rows(traced.store, graph.graph_id)
    feature = stored.nodes[stored.nodes["kind"] == "feature"].iloc[0]
    same = stored.nodes[
        (stored.nodes["layer"] == feature.layer) & (stored.nodes["feature"] == feature.feature)
    ]
    scan = data["metadata"]["scan"]
    assert scan.startswith("./graph_data/features/")  # fetched from the server, never a CDN
    name = f"{feature_id(feature.layer, feature.feature)}.json"
    path = exported.out_dir / scan.removeprefix("./graph_data/") / name
    file = json.loads(path.read_text())
    (quantile,) = [q for q in file["examples_quantiles"] if q["quantile_name"] == graph.slug]
    (example,) = quantile["examples"]
    acts = example["tokens_acts_list"]
    assert len(acts) == len(data["metadata"]["prompt_tokens"])
    for row in same.itertuples():
        assert acts[row.position] == pytest.approx(row.activation)
    assert sum(a != 0 for a in acts) == len(same)
    assert file["act_max"] >= max(acts)


@pytest.fixture
def prompts_only(tmp_path) -> Store:
    """A store with 20 prompts and no graphs: two of them share a first character."""
    store = Store.in_data_dir(tmp_path / "prompts-only")
    insert_prompts(
        store, [make_prompt(f"Prompt number {i} ends", f"p{i}", "test") for i in range(20)], None
    )
    return store


def test_resolve_prompt_id__takes_an_id_or_a_unique_prefix(prompts_only):
    ids = sorted(_ids(prompts_only))
    unique = next(i for i in ids if sum(j.startswith(i[:4]) for j in ids) == 1)
    assert resolve_prompt_id(prompts_only, unique) == unique
    assert resolve_prompt_id(prompts_only, unique[:4]) == unique
    shared = next(i[0] for i in ids if sum(j.startswith(i[0]) for j in ids) > 1)
    with pytest.raises(AmbiguousPromptError, match="give more of the id"):
        resolve_prompt_id(prompts_only, shared)
    with pytest.raises(PromptNotFoundError, match="emc prompt list"):
        resolve_prompt_id(prompts_only, "zzzz")
    with pytest.raises(NoGraphsError, match=f"emc trace {unique}"):
        export_prompt(prompts_only, unique, prompts_only.path.parent / "viewer")


def _ids(store: Store) -> set[str]:
    from emc.store.prompts import stored_prompt_ids

    return stored_prompt_ids(store)


def test_cli_export__prints_what_it_wrote_and_the_next_command(traced, tmp_path):
    out = tmp_path / "out"
    prompt_id = traced.prompt_ids[1]
    args = ["graph", "export", prompt_id[:8], "-d", str(traced.data_dir), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for role in ("base", "adapted"):
        path = out / f"{prompt_id}-{role}-labelled.json"
        assert path.is_file() and str(path) in result.output
    assert str(out / INDEX_FILE) in result.output
    assert f"emc graph serve --out {out}" in result.output


def test_cli_export__default_out_is_viewer_in_the_data_dir(traced, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for path in traced.data_dir.glob(f"{STORE_FILE_NAME}*"):
        shutil.copy(path, data_dir / path.name)
    monkeypatch.setenv("EMC_DATA_DIR", str(data_dir))
    result = runner.invoke(app, ["graph", "export", traced.prompt_ids[1]])
    assert result.exit_code == 0, result.output
    assert (data_dir / "viewer" / INDEX_FILE).is_file()
    assert f"emc graph serve -d {data_dir}`" in result.output


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("ffffffff", "no prompt id starts with 'ffffffff'"), ("", "no prompt id starts with ''")],
)
def test_cli_export__unknown_prompt_is_an_error(traced, tmp_path, prompt, message):
    args = ["graph", "export", prompt, "-d", str(traced.data_dir), "-o", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "emc prompt list" in result.output


def test_cli_export__prompt_without_graphs_and_ambiguous_prefix(prompts_only, tmp_path):
    data_dir = prompts_only.path.parent
    ids = sorted(_ids(prompts_only))
    result = runner.invoke(app, ["graph", "export", ids[0], "-d", str(data_dir)])
    assert result.exit_code == 2
    assert "it has no graphs" in result.output and f"emc trace {ids[0]}" in result.output
    shared = next(i[0] for i in ids if sum(j.startswith(i[0]) for j in ids) > 1)
    result = runner.invoke(app, ["graph", "export", shared, "-d", str(data_dir)])
    assert result.exit_code == 2 and "give more of the id" in result.output


def test_cli_export__without_a_store_creates_none(tmp_path):
    result = runner.invoke(app, ["graph", "export", "abc", "-d", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "there is no store" in result.output
    assert not (tmp_path / "nothing").exists()


def test_cli_serve__without_exports_says_to_export_first(tmp_path):
    result = runner.invoke(app, ["graph", "serve", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "emc graph export PROMPT_ID" in result.output


def test_cli_serve__without_assets_names_the_command_that_fetches_them(
    exported, tmp_path, monkeypatch
):
    monkeypatch.setenv("EMC_VIEWER_ASSETS", str(tmp_path / "empty-cache"))
    result = runner.invoke(app, ["graph", "serve", "--out", str(exported.out_dir)])
    assert result.exit_code == 2
    assert "emc graph assets" in result.output and "d3-7.9.0.tgz missing" in result.output


# --- assets: a small fake package stands in for the pinned ones (no network, no real cache) ---


@pytest.fixture
def registry(tmp_path) -> tuple[str, Asset, Path]:
    """A file:// "registry" holding one package tarball laid out as npm's."""
    payload = b"window.fake = 1\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("package/dist/fake.min.js")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    data = buffer.getvalue()
    asset = Asset(
        package="fake",
        version="1.0.0",
        integrity=integrity_of(data),
        member="package/dist/fake.min.js",
        name="fake.min.js",
    )
    root = tmp_path / "registry"
    (root / "fake" / "-").mkdir(parents=True)
    (root / "fake" / "-" / asset.tarball).write_bytes(data)
    return root.as_uri(), asset, root / "fake" / "-" / asset.tarball


def test_assets__a_corrupted_tarball_is_detected_refused_and_replaced(registry, tmp_path):
    url, asset, _ = registry
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / asset.tarball).write_bytes(b"not the package")
    assert [s.state for s in check_assets(cache, [asset])] == ["corrupted"]
    with pytest.raises(AssetError, match="emc graph assets"):
        require_assets(cache, [asset])
    with pytest.raises(AssetError, match="corrupted"):
        read_asset(asset, cache)
    assert [s.state for s in fetch_assets(cache, [asset], registry=url)] == ["downloaded"]
    assert [s.state for s in check_assets(cache, [asset])] == ["ok"]
    assert read_asset(asset, cache) == b"window.fake = 1\n"
    # Verified files are not fetched again.
    assert [s.state for s in fetch_assets(cache, [asset], registry=url)] == ["ok"]


def test_assets__a_download_that_does_not_match_the_pin_is_not_written(registry, tmp_path):
    url, asset, served = registry
    served.write_bytes(b"tampered")
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match="does not match its pinned integrity"):
        fetch_assets(cache, [asset], registry=url)
    assert not (cache / asset.tarball).exists()
    with pytest.raises(AssetError, match="cannot download"):
        fetch_assets(cache, [asset], registry=(tmp_path / "nowhere").as_uri())


def test_assets__cache_dir_comes_from_the_environment(registry, tmp_path, monkeypatch):
    url, asset, _ = registry
    monkeypatch.setenv("EMC_VIEWER_ASSETS", str(tmp_path / "env-cache"))
    fetch_assets(assets=[asset], registry=url)
    assert (tmp_path / "env-cache" / asset.tarball).is_file()


def test_rewrite_scripts__makes_circuit_tracers_pages_load_only_local_scripts():
    from importlib.resources import files

    assets = files("circuit_tracer") / "frontend" / "assets"
    for page in ("index.html", "feature-view.html"):
        html = rewrite_scripts((assets / page).read_text())
        sources = [line for line in html.splitlines() if "<script src=" in line]
        assert sources and all("http" not in s and "//" not in s for s in sources)
        assert "hotserver" not in html and "npy" not in html
    html = rewrite_scripts((assets / "index.html").read_text())
    order = [html.index(f"./vendor/{n}") for n in ("d3.min.js", "d3-jetpack.js", "dagre.min.js")]
    assert order == sorted(order)
    vendored = {a.name for a in ASSETS} | {"emc-jetpack.js"}
    assert {n for names in CDN_SCRIPTS.values() for n in names} == vendored
    with pytest.raises(FrontendError, match=r"https://cdn\.example/x\.js"):
        rewrite_scripts("<script src='https://cdn.example/x.js'></script>")


# --- the server: real HTTP on a free port ---


@pytest.fixture
def server(tmp_path):
    frontend, graphs = tmp_path / "frontend", tmp_path / "graphs"
    frontend.mkdir()
    graphs.mkdir()
    (frontend / "index.html").write_text("<p>page</p>")
    (graphs / INDEX_FILE).write_text('{"graphs": []}')
    (graphs / "g1.json").write_text(json.dumps({"qParams": {}, "nodes": []}))
    (tmp_path / "secret.txt").write_text("not served")
    server = ViewerServer(frontend, graphs, port=0)
    server.start()
    try:
        yield server, graphs
    finally:
        server.stop()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_server__maps_data_and_graph_data_to_the_graphs_and_stays_inside(server):
    viewer, _ = server
    root = viewer.url.removesuffix("index.html")
    assert viewer.url.startswith("http://127.0.0.1:")
    assert _get(viewer.url) == (200, b"<p>page</p>")
    assert _get(root + "data/" + INDEX_FILE) == (200, b'{"graphs": []}')
    assert _get(root + "graph_data/g1.json?x=1")[0] == 200
    for escape in ("graph_data/../secret.txt", "graph_data/%2e%2e/secret.txt", "../secret.txt"):
        assert _get(root + escape)[0] == 404


def test_server__save_button_stores_the_page_state_in_the_graph_file(server):
    viewer, graphs = server
    root = viewer.url.removesuffix("index.html")
    body = json.dumps({"qParams": {"pinnedIds": "a,b"}}).encode()
    request = urllib.request.Request(root + "save_graph/g1", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
    assert json.loads((graphs / "g1.json").read_text())["qParams"] == {"pinnedIds": "a,b"}
    missing = urllib.request.Request(root + "save_graph/..%2fg1", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(missing, timeout=10)


def _post_save(viewer: ViewerServer, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST a Save to g1 with these headers (http.client: urllib would fill in Host itself)."""
    host, port = viewer.httpd.server_address[:2]
    body = json.dumps({"qParams": {"pinnedIds": "x"}}).encode()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.putrequest("POST", "/save_graph/g1", skip_host=True)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def test_server__save_from_another_origin_or_for_another_host_is_refused(server):
    viewer, graphs = server
    port = viewer.httpd.server_address[1]
    before = (graphs / "g1.json").read_text()
    own_host = f"127.0.0.1:{port}"
    status, body = _post_save(viewer, {"Host": own_host, "Origin": "http://evil.example"})
    assert status == 403 and b"evil.example" in body
    status, body = _post_save(viewer, {"Host": f"evil.example:{port}"})  # DNS rebinding
    assert status == 403 and b"evil.example" in body
    other_port = f"http://127.0.0.1:{port + 1}"  # another local server is another origin
    assert _post_save(viewer, {"Host": own_host, "Origin": other_port})[0] == 403
    assert _post_save(viewer, {})[0] == 403  # no Host at all
    assert (graphs / "g1.json").read_text() == before


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_server__save_from_the_viewers_own_page_or_without_origin_is_stored(server, name):
    viewer, graphs = server
    own = f"{name}:{viewer.httpd.server_address[1]}"
    assert _post_save(viewer, {"Host": own, "Origin": f"http://{own}"})[0] == 200
    assert json.loads((graphs / "g1.json").read_text())["qParams"] == {"pinnedIds": "x"}
    (graphs / "g1.json").write_text(json.dumps({"qParams": {}, "nodes": []}))
    assert _post_save(viewer, {"Host": own})[0] == 200  # curl, or a browser sending no Origin
    assert json.loads((graphs / "g1.json").read_text())["qParams"] == {"pinnedIds": "x"}
