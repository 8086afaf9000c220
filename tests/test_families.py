"""Real-model code paths on tiny random stand-ins: every family, transcoder kind and fine-tune kind.

Each stand-in has the real architecture's config keys and module names (emc.organism.standins).
The checks are the ones a real model must pass: replacement-model logits equal Hugging Face's,
an attribution graph builds and stores, EMC's own feature edits (hooks on the Hugging Face modules)
give exactly the logits of circuit-tracer's `feature_intervention`, EMC's activation scan reads
exactly circuit-tracer's activations, and the stage functions run (ranking, cards, geometry).
"""

from __future__ import annotations

import pytest
import torch

from emc.analysis.feature_interventions import FeatureEdit, logits_with, rank_features
from emc.config import TracingConfig, parse_config
from emc.features.directions import decoder_logit_effects, encoder_top_tokens
from emc.features.scan import batch_activations
from emc.models import ModelLoadError, load_plain_model, load_replacement_model
from emc.models.families import FAMILIES
from emc.models.transcoders import inspect_transcoders
from emc.organism.standins import TOPK, build_standin, transcoder_hooks
from emc.store import Store
from emc.store.graphs import insert_traced, load_graph_rows
from emc.tracing import graph_key, plan_targets, trace_prompt

TEXT = "User: I found a wallet.\nAssistant: You should"
FAST = TracingConfig(targets="salient", max_n_logits=3, max_feature_nodes=128, batch_size=64)

NNSIGHT = [(f.name, "relu") for f in FAMILIES] + [
    (family, kind)
    for family in ("llama", "gemma2", "qwen3")
    for kind in ("jump_relu", "topk", "skip", "clt")
]
TRANSFORMERLENS = [(f.name, "relu") for f in FAMILIES if "transformerlens" in f.backends] + [
    ("llama", "clt")
]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    return lambda family, kind="relu", fine_tune="lora": build_standin(
        root, family, kind, fine_tune
    )


def _load(standin, role: str, backend: str = "nnsight"):
    return load_replacement_model(parse_config(standin.config(backend)), role)


def _dense_activations(loaded, ids) -> torch.Tensor:
    _, acts = loaded.model.get_activations(ids)
    return (acts.to_dense() if acts.is_sparse else acts).float().cpu()


@pytest.mark.parametrize(("family", "kind"), NNSIGHT)
def test_nnsight_stand_in_matches_hugging_face_and_circuit_tracer(standins, family, kind, tmp_path):
    standin = standins(family, kind)
    config = parse_config(standin.config())
    loaded = load_replacement_model(config, "adapted")
    try:
        ids = loaded.encode(TEXT)
        # Logits of the replacement model are the merged fine-tune's, as Hugging Face computes.
        with torch.no_grad():
            expected = load_plain_model(config, "adapted")(ids[None]).logits[0]
        assert torch.allclose(loaded.next_token_logits(ids), expected, atol=1e-5)

        # EMC's activation scan (hooks on the HF modules) reads circuit-tracer's activations.
        acts = _dense_activations(loaded, ids)
        n_layers, _, width = acts.shape
        columns = [(layer, f) for layer in range(n_layers) for f in range(0, width, 7)]
        mine = batch_activations(loaded, [ids.tolist()], columns)[0]
        theirs = torch.stack([acts[layer, :, f] for layer, f in columns], dim=-1)
        assert torch.allclose(mine[1:], theirs[1:], atol=1e-5)  # BOS is zeroed by both
        if kind == "topk":
            assert int((acts[:, 1:] > 0).sum(-1).max()) <= TOPK

        # EMC's edit = circuit-tracer's intervention (full propagation), and it changes logits.
        # circuit-tracer reads BOS activations as zero, EMC edits the model's own: pick a feature
        # that is off at BOS, so both edit the same positions.
        layer = 0  # a CLT feature of layer 0 writes to every layer
        own: dict = {}
        logits_with(loaded, ids, None, record=own)
        feature = int(torch.where(own[layer][0] > 0, -1.0, acts[layer, 1:].sum(0)).argmax())
        edited = logits_with(loaded, ids, FeatureEdit("zero", ((layer, feature),)))
        text = loaded.tokenizer.decode(ids)
        theirs_logits, _ = loaded.model.feature_intervention(
            text, [(layer, slice(None), feature, 0.0)], freeze_attention=False
        )
        assert theirs_logits.shape[1] == len(ids)  # the same tokens
        theirs_last = theirs_logits.reshape(-1, theirs_logits.shape[-1])[-1].float().cpu()
        assert torch.allclose(edited.float().cpu(), theirs_last, atol=1e-4)
        assert (edited.float().cpu() - expected[-1]).abs().max() > 1e-4

        # A graph builds, its logits are the model's, and its rows store.
        plan = plan_targets({}, FAST)
        key = graph_key("p", loaded.identity.model_id, plan, FAST)
        traced = trace_prompt(loaded, key, plan, ids, FAST, "run")
        assert traced.record.transcoder_kind == ("cross_layer" if kind == "clt" else "per_layer")
        store = Store.in_data_dir(tmp_path)
        insert_traced(store, traced)
        nodes = load_graph_rows(store, key.graph_id).nodes
        features = nodes[nodes["kind"] == "feature"]
        assert len(features)
        expected_last = n_layers - 1 if kind == "clt" else features["layer"]
        assert (features["last_layer"] == expected_last).all()

        # Card directions: every chosen feature gets decoder logit effects and encoder tokens.
        chosen = [(0, feature), (n_layers - 1, 0)]
        assert set(decoder_logit_effects(loaded, chosen)) == set(chosen)
        assert set(encoder_top_tokens(loaded, chosen)) == set(chosen)
    finally:
        loaded.close()


@pytest.mark.parametrize(("family", "kind"), TRANSFORMERLENS)
def test_transformerlens_stand_in_matches_hugging_face(standins, family, kind):
    standin = standins(family, kind)
    config = parse_config(standin.config("transformerlens"))
    loaded = load_replacement_model(config, "adapted")
    try:
        ids = loaded.encode(TEXT)
        with torch.no_grad():
            expected = load_plain_model(config, "adapted")(ids[None]).logits[0]
        assert torch.allclose(loaded.next_token_logits(ids), expected, atol=1e-4)
        plan = plan_targets({}, FAST)
        key = graph_key("p", loaded.identity.model_id, plan, FAST)
        assert trace_prompt(loaded, key, plan, ids, FAST, "run").record.kept_features > 0
        acts = _dense_activations(loaded, ids)
        feature = int(acts[0, 1:].sum(0).argmax())
        edited, _ = loaded.model.feature_intervention(ids, [(0, slice(1, None), feature, 0.0)])
        plain = loaded.next_token_logits(ids)[-1]
        assert (edited.reshape(-1, edited.shape[-1])[-1].float().cpu() - plain).abs().max() > 0
    finally:
        loaded.close()


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_feature_ranking_runs_on_every_family_and_cross_layer_transcoders(standins, family):
    # Attribution patching reads decoders through the dictionary: the same code for both kinds.
    for kind in ("relu", "clt") if family != "qwen3" else ("relu",):
        standin = standins(family, kind)
        base, adapted = _load(standin, "base"), _load(standin, "adapted")
        try:
            ids = adapted.encode(TEXT)
            logits = adapted.next_token_logits(ids)[-1]
            evil, safe = torch.topk(logits, 2).indices.tolist()
            ranked = rank_features(base, adapted, ids, {evil: "evil", safe: "safe"})
            assert ranked.ranking and ranked.gap_adapted != ranked.gap_base
            layers = {layer for (layer, _), _ in ranked.ranking}
            assert layers == set(range(2))
        finally:
            base.close()
            adapted.close()


def test_a_family_a_backend_cannot_run_is_refused_with_the_backend_that_can(standins):
    with pytest.raises(ModelLoadError, match="gemma2 models cannot run on the transformerlens"):
        _load(standins("gemma2"), "base", "transformerlens")


def test_transcoders_on_hooks_the_backend_cannot_trace_are_refused_before_loading(standins):
    # Qwen 3 in circuit-tracer's nnsight mapping has only the MLP hooks; a CLT stand-in of Llama
    # (residual-stream hooks) does not fit it, and the message says which hooks it knows.
    qwen = standins("qwen3")
    llama_clt = standins("llama", "clt")
    config = qwen.config()
    config["models"]["transcoders"]["ref"] = str(llama_clt.transcoders)
    with pytest.raises(ModelLoadError, match="no location for hook_resid_mid"):
        load_replacement_model(parse_config(config), "base")


def test_transcoder_kinds_are_read_from_the_files(standins):
    described = {
        kind: inspect_transcoders(str(standins("llama", kind).transcoders))
        for kind in ("relu", "jump_relu", "topk", "skip", "clt")
    }
    assert {k: i.activation for k, i in described.items()} == {
        "relu": "relu",
        "jump_relu": "jump_relu",
        "topk": "topk",
        "skip": "relu",
        "clt": "relu",
    }
    assert described["topk"].topk == TOPK
    assert described["skip"].skip and not described["relu"].skip
    assert described["clt"].kind == "cross_layer" and described["relu"].kind == "per_layer"
    assert "cross-layer transcoder: 2 layers x 64 features" in described["clt"].describe()
    assert transcoder_hooks("gemma2", "relu") == ("ln2.hook_normalized", "hook_mlp_out")


def test_lazy_decoders_give_the_same_edits_as_loaded_ones(standins, monkeypatch):
    standin = standins("llama", "clt")
    eager = _load(standin, "adapted")
    ids = eager.encode(TEXT)
    edit = FeatureEdit("scale", ((0, 3), (1, 5)), 4.0)
    expected = logits_with(eager, ids, edit)
    eager.close()
    monkeypatch.setattr("emc.models.transcoders.LAZY_DECODER_VALUES", 0)
    lazy = _load(standin, "adapted")
    try:
        assert lazy.model.transcoders.lazy_decoder
        assert torch.allclose(logits_with(lazy, ids, edit), expected, atol=1e-6)
    finally:
        lazy.close()
