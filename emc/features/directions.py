"""What a feature's weights say, without any text: the tokens its decoder promotes and suppresses,
and the tokens whose embeddings most excite its encoder.

**Decoder logit effects.** A feature active at a position adds `activation * W_dec[f]` to the
residual stream (a cross-layer transcoder's feature adds one decoder row per layer it writes to,
and their sum is its direct write). The logits read the stream through the final norm and the
unembedding: `W_U @ (g * x / rms(x))`, with `g` the norm's weight (Llama, Qwen) or one plus it
(Gemma). The per-position scale `1 / rms(x)` is the same for every token, so the direct effect of
the feature on the logits is proportional to `W_U @ (g * W_dec[f])`: the decoder row, times the
final norm's gain when the model has one (`logit_basis` says which), through the unembedding.
These are the values reported, per unit of activation and before the per-position scale (and
before Gemma 2's final logit soft-capping, which only squashes large logits).

**Encoder input tokens.** The encoder reads its read site: the stream after the block's pre-MLP
norm (`mlp.hook_in`), the normalised stream before the norm's weight (`ln2.hook_normalized`), or
the raw stream (`hook_resid_mid`). For each vocabulary token, as if its embedding `e` were the
whole stream: the pre-activation `W_enc[f] . read(e) + b_enc[f]`, with `read(e)` = `g2 * e /
rms(e)`, `e / rms(e)` or `e`. For layer 0 this is close to what the feature reads at a token's
own position; for later layers it is the direct path only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emc.features.records import Feature, TokenValue
from emc.models import LoadedModel
from emc.models.dictionary import dictionary_of
from emc.models.families import family_of
from emc.models.sites import norm_gain, site_for

TOP_TOKENS = 10


def unembedding(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(vocab, d_model) unembedding and the final norm's gain (None without one), where the
    model keeps them."""
    if loaded.identity.backend == "nnsight":
        hf = loaded.model._model
        norm = getattr(getattr(hf, "model", hf), "norm", None)
        weight, gain = hf.get_output_embeddings().weight, norm_gain(family_of(hf.config), norm)
    else:
        weight = loaded.model.W_U.T
        gain = getattr(getattr(loaded.model, "ln_final", None), "w", None)
    return weight.detach(), None if gain is None else gain.detach()


def embedding(loaded: LoadedModel) -> torch.Tensor:
    """(vocab, d_model) token embeddings, where the model keeps them."""
    if loaded.identity.backend == "nnsight":
        return loaded.model._model.get_input_embeddings().weight.detach()
    return loaded.model.W_E.detach()


def read_transform(loaded: LoadedModel, layer: int):
    """What the layer's read site does to a stream vector `e` (see the module docstring)."""
    if loaded.identity.backend == "nnsight":
        hf = loaded.model._model
        family = family_of(hf.config)
        site = site_for(family, dictionary_of(loaded).input_hook)
        norm = site.at(hf, layer)  # every read site is at a norm
        normalise = site.unit_rms or site.side == "output"
        gain = norm_gain(family, norm) if site.side == "output" else None
    else:
        norm = getattr(loaded.model.blocks[layer], "ln2", None)
        hook = dictionary_of(loaded).input_hook
        normalise = hook != "hook_resid_mid"
        gain = getattr(norm, "w", None) if hook == "mlp.hook_in" else None
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)) or 0.0)

    def read(e: torch.Tensor) -> torch.Tensor:
        if not normalise:
            return e
        out = e / e.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
        return out if gain is None else out * gain.detach().to(e.device).float()

    return read


def logit_basis(loaded: LoadedModel) -> str:
    """What `decoder_logit_effects` multiplies the decoder row by, in words."""
    _, gain = unembedding(loaded)
    basis = "final_norm_weight*unembedding" if gain is not None else "unembedding"
    if dictionary_of(loaded).kind == "cross_layer":
        return f"decoder rows summed over the layers written, {basis}"
    return basis


def decoder_logit_effects(
    loaded: LoadedModel, features: Sequence[Feature], k: int = TOP_TOKENS
) -> dict[Feature, tuple[list[TokenValue], list[TokenValue]]]:
    """Per feature, the `k` tokens its decoder direction raises most and lowers most."""
    unembed, gain = unembedding(loaded)
    unembed = unembed.float()  # once for all features, on the model's device
    dictionary = dictionary_of(loaded)
    decode = token_decoder(loaded.tokenizer)
    result = {}
    for layer, chosen in _by_layer(features).items():
        # Only the chosen rows: a lazily loaded decoder is read row by row, not whole. A CLT
        # feature's direct write is the sum of its rows over the layers it writes to.
        rows = dictionary.decoder(layer, torch.tensor(chosen)).sum(1)
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
    """Per feature, the `k` tokens whose embedding, as the layer's read site sees it, gives the
    largest pre-activation."""
    embed = embedding(loaded).float()
    dictionary = dictionary_of(loaded)
    decode = token_decoder(loaded.tokenizer)
    result = {}
    for layer, chosen in _by_layer(features).items():
        read = read_transform(loaded, layer)(embed)
        directions, bias = dictionary.encoder(layer, torch.tensor(chosen))
        directions = directions.detach().to(embed.device).float()
        values = (read @ directions.T + bias.detach().to(embed.device).float()).T.cpu()
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
