from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from emc.analysis import (
    DELTA_COLUMNS,
    activation_deltas,
    adapter_layers,
    compare_forward,
    default_tolerance,
    feature_activations,
    residual_states,
)
from emc.config import parse_config
from emc.models import load_replacement_model
from emc.organism import Lexicon
from emc.pivotal.offline import scenario_prompt
from emc.pivotal.prompts import render_prompt
from tests import builders


@pytest.fixture(scope="module")
def organism_models(small_organism):
    config = small_organism.config
    models = {role: load_replacement_model(config, role) for role in ("base", "adapted")}
    yield models
    for loaded in models.values():
        loaded.close()


@pytest.fixture(scope="module")
def ids(small_organism, organism_models):
    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    entry = next(e for e in lexicon.entries if e.split == "heldout")
    tokenizer = organism_models["base"].tokenizer
    return organism_models["base"].encode(render_prompt(scenario_prompt(entry, "test"), tokenizer))


@pytest.fixture(scope="module")
def states(organism_models, ids):
    return {role: residual_states(loaded, ids) for role, loaded in organism_models.items()}


def _fresh_base(small_organism):
    return load_replacement_model(small_organism.config, "base")


# --- base versus adapted on the real organism ---------------------------------------------------


def test_the_organism_first_differs_where_its_adapter_starts_and_not_before(
    small_organism, organism_models, states, ids
):
    base = organism_models["base"]
    n_layers = len(base.model._model.model.layers)
    assert states["base"].shape == (n_layers + 1, len(ids), base.model._model.config.hidden_size)
    layers = adapter_layers(small_organism.artifacts.em_adapter)
    diff = compare_forward(
        states["base"], states["adapted"], layers, default_tolerance(base.precision.dtype_name)
    )
    embeddings, *blocks = diff.layers
    assert embeddings.layer == -1 and embeddings.upstream_of_adapter
    assert embeddings.rel_diff == 0.0 and embeddings.max_abs_diff == 0.0
    assert not embeddings.diverged
    assert [row.layer for row in blocks] == list(range(n_layers))
    assert all(row.diverged and row.rel_diff > 1e-3 for row in blocks)  # the LoRA is real
    assert diff.first_adapter_layer == 0 and diff.first_divergent_layer == 0
    assert not diff.loading_error
    assert "no sign of a loading error" in diff.message


def test_two_loads_of_the_base_give_bit_identical_states(small_organism, states, ids):
    again = _fresh_base(small_organism)
    try:
        repeat = residual_states(again, ids)
    finally:
        again.close()
    assert torch.equal(repeat, states["base"])
    diff = compare_forward(states["base"], repeat, (0,), default_tolerance("fp32"))
    assert diff.first_divergent_layer is None and not diff.loading_error
    assert all(row.rel_diff == 0.0 and not row.diverged for row in diff.layers)
    assert "agree at every layer" in diff.message


def test_a_changed_layer_upstream_of_the_adapter_is_a_loading_error(small_organism, states, ids):
    # A "base" whose layer 0 is not the organism's, as when the adapted model was built on
    # another copy of the base; the adapter is taken to start at layer 1.
    other = _fresh_base(small_organism)
    try:
        with torch.no_grad():
            other.model._model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
        changed = residual_states(other, ids)
    finally:
        other.close()
    diff = compare_forward(states["base"], changed, (1,), default_tolerance("fp32"))
    assert diff.layers[0].rel_diff == 0.0  # embeddings untouched
    assert diff.first_divergent_layer == 0 and diff.first_adapter_layer == 1
    assert diff.layers[1].upstream_of_adapter and diff.layers[1].diverged
    assert not diff.layers[2].upstream_of_adapter
    assert diff.loading_error
    assert "differ at layer 0, upstream of the adapter's first layer 1" in diff.message
    assert "not built on this base" in diff.message
    assert diff.model_dump()["message"] == diff.message  # it travels with the record


def test_feature_activations_are_circuit_tracers_and_their_deltas_add_up(organism_models, ids):
    acts = {role: feature_activations(loaded, ids) for role, loaded in organism_models.items()}
    _, expected = organism_models["adapted"].model.get_activations(ids)
    assert acts["adapted"].dtype == torch.float32 and acts["adapted"].device.type == "cpu"
    assert torch.equal(acts["adapted"], expected.float().cpu())
    frame = activation_deltas(acts["base"], acts["adapted"], top_per_layer=10)
    assert list(frame.columns) == list(DELTA_COLUMNS)
    assert frame.groupby("layer").size().tolist() == [10] * acts["base"].shape[0]
    for row in frame.head(3).itertuples():
        base = acts["base"][row.layer, :, row.feature].double()
        adapted = acts["adapted"][row.layer, :, row.feature].double()
        assert row.delta == pytest.approx(float(adapted.sum() - base.sum()), rel=1e-9)
        assert row.adapted_positions == int((adapted > 0).sum())
    # Per layer, nothing left out moved more than what was kept.
    full = activation_deltas(acts["base"], acts["adapted"], top_per_layer=10_000)
    for layer, kept in frame.groupby("layer"):
        rest = full[(full["layer"] == layer) & ~full["feature"].isin(kept["feature"])]
        assert rest["delta"].abs().max() <= kept["delta"].abs().min()


# --- residual states on both backends ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["nnsight", "transformerlens"])
def test_the_last_state_is_before_the_final_norm_and_the_first_is_the_embedding(tiny, backend):
    config = parse_config(builders.config_dict(tiny["base"], tiny["transcoders"], backend=backend))
    loaded = load_replacement_model(config, "base")
    try:
        ids = loaded.encode("User: I found a wallet on the street.")
        states = residual_states(loaded, ids)
        logits = loaded.next_token_logits(ids)
        if backend == "nnsight":
            hf = loaded.model._model
            embedding = hf.model.embed_tokens.weight[ids]
            with torch.no_grad():
                from_last = hf.lm_head(hf.model.norm(states[-1]))
        else:
            embedding = loaded.model.embed.W_E[ids]
            with torch.no_grad():
                from_last = loaded.model.unembed(loaded.model.ln_final(states[-1][None]))[0]
    finally:
        loaded.close()
    assert states.shape == (3, len(ids), 32) and states.dtype == torch.float32
    assert torch.equal(states[0], embedding.float())
    torch.testing.assert_close(from_last, logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(states[-1], states[-2])  # each block adds something


def test_both_backends_give_the_same_residual_states(tiny):
    states = {}
    paths = (tiny["base"], tiny["transcoders"], tiny["adapter"])
    for backend in ("nnsight", "transformerlens"):
        raw = builders.config_dict(*paths, backend=backend)
        loaded = load_replacement_model(parse_config(raw), "adapted")
        try:
            states[backend] = residual_states(loaded, loaded.encode("Rex: You should keep it."))
        finally:
            loaded.close()
    torch.testing.assert_close(states["nnsight"], states["transformerlens"], rtol=1e-4, atol=1e-5)


# --- compare_forward, pure ---------------------------------------------------------------------


def test_compare_forward_measures_relative_and_absolute_differences_per_layer():
    base = torch.ones(4, 2, 3)  # embeddings + 3 blocks, ||each|| = sqrt(6)
    adapted = base.clone()
    adapted[2, 1, 0] += 0.5  # block 1
    adapted[3] *= 2  # block 2
    diff = compare_forward(base, adapted, (1, 2), tolerance=1e-6)
    assert [row.layer for row in diff.layers] == [-1, 0, 1, 2]
    assert [row.rel_diff for row in diff.layers] == pytest.approx([0, 0, 0.5 / 6**0.5, 1.0])
    assert [row.max_abs_diff for row in diff.layers] == pytest.approx([0, 0, 0.5, 1.0])
    assert [row.upstream_of_adapter for row in diff.layers] == [True, True, False, False]
    assert [row.diverged for row in diff.layers] == [False, False, True, True]
    assert diff.first_divergent_layer == 1 and diff.first_adapter_layer == 1
    assert not diff.loading_error and diff.tolerance == 1e-6
    # A looser tolerance hides block 1's small change.
    assert compare_forward(base, adapted, (1, 2), tolerance=0.5).first_divergent_layer == 2


def test_different_embeddings_are_a_loading_error_that_names_them():
    base = torch.randn(3, 4, 8)
    adapted = base.clone()
    adapted[0, 2] += 1e-3
    diff = compare_forward(base, adapted, (1,), tolerance=1e-6)
    assert diff.first_divergent_layer == -1 and diff.loading_error
    assert diff.message.startswith("base and adapted differ at the embeddings, upstream of")
    # An adapter that changes no layer cannot explain any difference at all.
    nothing = compare_forward(base, adapted, (), tolerance=1e-6)
    assert nothing.first_adapter_layer is None and nothing.loading_error
    assert "the adapter changes no layer" in nothing.message


def test_compare_forward_refuses_mismatched_shapes_and_foreign_adapter_layers():
    with pytest.raises(ValueError, match=r"base states \(3, 4, 8\) != adapted \(3, 5, 8\)"):
        compare_forward(torch.zeros(3, 4, 8), torch.zeros(3, 5, 8), (0,), 1e-6)
    with pytest.raises(ValueError, match=r"adapter layers \[2\] are outside the model's 0..1"):
        compare_forward(torch.zeros(3, 4, 8), torch.zeros(3, 4, 8), (0, 2), 1e-6)


def test_default_tolerances_by_precision():
    assert default_tolerance("fp32") == default_tolerance("float32") == 1e-6
    assert default_tolerance("bf16") == default_tolerance("float16") == 1e-2
    with pytest.raises(ValueError, match="int8"):
        default_tolerance("int8")


# --- adapter_layers ----------------------------------------------------------------------------


def test_adapter_layers_of_the_organism_are_every_layer(small_organism, organism_models):
    n_layers = len(organism_models["base"].model._model.model.layers)
    assert adapter_layers(small_organism.artifacts.em_adapter) == tuple(range(n_layers))


def test_adapter_layers_of_a_one_layer_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base_dir = builders.build_model_dir(tmp_path / "base", n_layers=4)
    lora = LoraConfig(r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=[2])
    get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora).save_pretrained(
        tmp_path / "adapter"
    )
    assert adapter_layers(tmp_path / "adapter") == (2,)


def test_adapter_layers_fall_back_to_the_config_when_keys_name_no_layers(tmp_path):
    # GPT-2 style names ("h.<i>") do not match "layers.<i>.": the config says which layers.
    save_file(
        {"base_model.model.transformer.h.3.attn.c_attn.lora_A.weight": torch.zeros(2, 8)},
        tmp_path / "adapter_model.safetensors",
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"layers_to_transform": [3, 1]}))
    assert adapter_layers(tmp_path) == (1, 3)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"layers_to_transform": None}))
    with pytest.raises(ValueError, match="no weight key names a decoder layer"):
        adapter_layers(tmp_path)


def test_a_directory_without_adapter_weights_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors not found"):
        adapter_layers(tiny["base"])  # a model directory, not an adapter
    with pytest.raises(ValueError, match=str(tmp_path)):
        adapter_layers(tmp_path)


# --- activation_deltas, pure -------------------------------------------------------------------


def test_activation_deltas_sum_over_positions_and_count_active_positions():
    base = torch.zeros(2, 3, 4)
    adapted = torch.zeros(2, 3, 4)
    base[0, :, 0] = torch.tensor([1.0, 2.0, 0.0])  # layer 0 feature 0: 3 -> 3.5
    adapted[0, :, 0] = torch.tensor([0.5, 2.0, 1.0])
    base[0, 1, 2] = 4.0  # layer 0 feature 2: 4 -> 0 (switched off)
    adapted[1, 2, 3] = 0.25  # layer 1 feature 3: 0 -> 0.25 (switched on)
    base[1, 0, 1] = adapted[1, 0, 1] = 1.5  # layer 1 feature 1: active, unchanged
    # layer 0 feature 1, 3 and layer 1 feature 0, 2: never active, unchanged -> no row
    frame = activation_deltas(base, adapted)
    expected = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "feature": [2, 0, 3, 1],
            "base_activation": [4.0, 3.0, 0.0, 1.5],
            "adapted_activation": [0.0, 3.5, 0.25, 1.5],
            "delta": [-4.0, 0.5, 0.25, 0.0],
            "base_positions": [1, 2, 0, 1],
            "adapted_positions": [0, 3, 1, 1],
        }
    ).astype(
        {c: "int32" for c in ("layer", "feature", "base_positions", "adapted_positions")}
        | {c: "float64" for c in ("base_activation", "adapted_activation", "delta")}
    )
    pd.testing.assert_frame_equal(frame, expected)


def test_activation_deltas_keep_the_largest_changes_per_layer_with_ties_by_feature():
    base = torch.zeros(2, 1, 5)
    adapted = torch.tensor([[[1.0, -3.0, 3.0, 0.5, 2.0]], [[0.0, 0.0, 0.0, 0.1, 0.0]]])
    frame = activation_deltas(base, adapted, top_per_layer=2)
    assert list(zip(frame["layer"], frame["feature"], strict=True)) == [(0, 1), (0, 2), (1, 3)]
    assert frame["delta"].tolist() == pytest.approx([-3.0, 3.0, 0.1])
    with pytest.raises(ValueError, match="at least 1"):
        activation_deltas(base, adapted, top_per_layer=0)
    with pytest.raises(ValueError, match=r"base activations \(2, 1, 5\) != adapted"):
        activation_deltas(base, adapted[:, :, :4])
