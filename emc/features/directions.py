"""What a feature's weights say, without any text: the tokens its decoder promotes and suppresses,
and the tokens whose embeddings most excite its encoder.

**Decoder logit effects.** A feature active at a position adds `activation * W_dec[f]` to the
residual stream. The logits read the stream through the final norm and the unembedding; for
Llama's RMSNorm that is `W_U @ (g * x / rms(x))`. The per-position scale `1 / rms(x)` is the same
for every token, so the direct effect of the feature on the logits is proportional to
`W_U @ (g * W_dec[f])`: the decoder row, times the final norm's weight `g` when the model has
one (`logit_basis` says which), through the unembedding. These are the values reported, per unit
of activation and before the per-position scale.

**Encoder input tokens.** The encoder reads the MLP's input, the stream after the block's pre-MLP
norm. For each vocabulary token, as if its embedding `e` were the whole stream: the
pre-activation `W_enc[f] . (g2 * e / rms(e)) + b_enc[f]` with the layer's pre-MLP norm weight
`g2` (plain `e`, unnormalised, where the block has no norm). For layer 0 this is close to what
the feature reads at a token's own position; for later layers it is the direct path only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emc.analysis.feature_interventions import transcoder_set
from emc.features.records import Feature, TokenValue
from emc.models import LoadedModel

TOP_TOKENS = 10


def unembedding(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(vocab, d_model) unembedding and the final norm's weight (None without one), where the
    model keeps them."""
    if loaded.identity.backend == "nnsight":
        hf = loaded.model._model
        norm = getattr(getattr(hf, "model", hf), "norm", None)
        weight, gain = hf.get_output_embeddings().weight, getattr(norm, "weight", None)
    else:
        weight = loaded.model.W_U.T
        gain = getattr(getattr(loaded.model, "ln_final", None), "w", None)
    return weight.detach(), None if gain is None else gain.detach()


def embedding(loaded: LoadedModel) -> torch.Tensor:
    """(vocab, d_model) token embeddings, where the model keeps them."""
    if loaded.identity.backend == "nnsight":
        return loaded.model._model.get_input_embeddings().weight.detach()
    return loaded.model.W_E.detach()


def pre_mlp_norm(loaded: LoadedModel, layer: int) -> tuple[torch.Tensor | None, float]:
    """The weight and epsilon of the norm in front of `layer`'s MLP (None: the block has none)."""
    if loaded.identity.backend == "nnsight":
        hf = loaded.model._model
        norm = getattr(getattr(hf, "model", hf).layers[layer], "post_attention_layernorm", None)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0))
        gain = getattr(norm, "weight", None)
    else:
        norm = getattr(loaded.model.blocks[layer], "ln2", None)
        gain, eps = getattr(norm, "w", None), getattr(norm, "eps", 0.0)
    return (None if gain is None else gain.detach()), float(eps or 0.0)


def logit_basis(loaded: LoadedModel) -> str:
    """What `decoder_logit_effects` multiplies the decoder row by, in words."""
    _, gain = unembedding(loaded)
    return "final_norm_weight*unembedding" if gain is not None else "unembedding"


def decoder_logit_effects(
    loaded: LoadedModel, features: Sequence[Feature], k: int = TOP_TOKENS
) -> dict[Feature, tuple[list[TokenValue], list[TokenValue]]]:
    """Per feature, the `k` tokens its decoder direction raises most and lowers most."""
    unembed, gain = unembedding(loaded)
    unembed = unembed.float()  # once for all features, on the model's device
    transcoders = transcoder_set(loaded)
    decode = token_decoder(loaded.tokenizer)
    result = {}
    for layer, chosen in _by_layer(features).items():
        # Only the chosen rows: a lazily loaded decoder is read row by row, not whole.
        rows = transcoders[layer]._get_decoder_vectors(torch.tensor(chosen))
        rows = rows.detach().to(unembed.device).float()
        if gain is not None:
            rows = rows * gain.to(unembed.device).float()
        effects = (rows @ unembed.T).cpu()  # (features, vocab)
        n = min(k, effects.shape[1])
        for feature, values in zip(chosen, effects, strict=True):
            top, bottom = torch.topk(values, n), torch.topk(-values, n)
            result[(layer, feature)] = (
                _tokens(top.indices, values, decode),
                _tokens(bottom.indices, values, decode),
            )
    return result


def encoder_top_tokens(
    loaded: LoadedModel, features: Sequence[Feature], k: int = TOP_TOKENS
) -> dict[Feature, list[TokenValue]]:
    """Per feature, the `k` tokens whose (normed) embedding gives the largest pre-activation."""
    embed = embedding(loaded).float()
    transcoders = transcoder_set(loaded)
    decode = token_decoder(loaded.tokenizer)
    result = {}
    for layer, chosen in _by_layer(features).items():
        gain, eps = pre_mlp_norm(loaded, layer)
        normed = embed
        if gain is not None:
            rms = embed.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
            normed = embed / rms * gain.to(embed.device).float()
        transcoder = transcoders[layer]
        index = torch.tensor(chosen, device=transcoder.b_enc.device)
        directions = transcoder.W_enc[index].detach().to(embed.device).float()
        bias = transcoder.b_enc[index].detach().to(embed.device).float()
        values = (normed @ directions.T + bias).T.cpu()  # (features, vocab)
        n = min(k, values.shape[1])
        for feature, row in zip(chosen, values, strict=True):
            result[(layer, feature)] = _tokens(torch.topk(row, n).indices, row, decode)
    return result


def _by_layer(features: Sequence[Feature]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for layer, feature in dict.fromkeys((int(a), int(b)) for a, b in features):
        layers.setdefault(layer, []).append(feature)
    return layers


def _tokens(indices: torch.Tensor, values: torch.Tensor, decode) -> list[TokenValue]:
    return [
        TokenValue(token_id=int(i), token=decode(int(i)), value=float(values[i]))
        for i in indices.tolist()
    ]


def token_decoder(tokenizer):
    """token id -> its text decoded alone, cached (examples decode the same ids often)."""
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return decode
