"""One interface over circuit-tracer's two kinds of feature dictionary.

A per-layer transcoder set has one transcoder per layer: a feature of layer L reads layer L's input
site and writes layer L's output site. A cross-layer transcoder (CLT) feature reads layer L's input
site and writes every output site from L to the last layer, with one decoder row per output layer.
Everything EMC does with features (interventions, activation scans, attribution patching, decoder
logit effects, LoRA geometry) goes through `FeatureDictionary`, so both kinds share one code path:
a feature's effect is the sum of its writes, and for a per-layer set that sum has one term.
"""

from __future__ import annotations

from typing import Literal

import torch

Kind = Literal["per_layer", "cross_layer"]


class FeatureDictionary:
    def __init__(self, transcoders) -> None:
        # nnsight wraps the module in an Envoy; the module itself has the weights.
        self.module = getattr(transcoders, "_module", transcoders)
        from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

        self.kind: Kind = (
            "cross_layer" if isinstance(self.module, CrossLayerTranscoder) else ("per_layer")
        )
        self.n_layers = int(self.module.n_layers)
        self.width = int(self.module.d_transcoder)
        self.input_hook = str(self.module.feature_input_hook)
        self.output_hook = str(self.module.feature_output_hook)

    @property
    def dtype(self) -> torch.dtype:
        return self.module.b_enc.dtype if self.kind == "cross_layer" else self.module[0].dtype

    def output_layers(self, layer: int) -> range:
        """The layers a feature of `layer` writes to."""
        return range(layer, self.n_layers if self.kind == "cross_layer" else layer + 1)

    def writers(self, out_layer: int) -> range:
        """The source layers whose features write to `out_layer`."""
        first = 0 if self.kind == "cross_layer" else out_layer
        return range(first, out_layer + 1)

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Feature activations of `layer` (..., width) from its read-site value `x`."""
        x = x.to(self.dtype)
        if self.kind == "cross_layer":
            return self.module.encode_layer(x, layer)
        return self.module[layer].encode(x)

    def decoder(self, layer: int, features: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder rows (n, n_output_layers, d_model) of `layer`'s features (all when None),
        read row by row when the decoder stays on disk."""
        index = None if features is None else features.cpu()
        if self.kind == "cross_layer":
            return self.module._get_decoder_vectors(layer, index)
        return self.module[layer]._get_decoder_vectors(index)[:, None]

    def encoder(self, layer: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder rows (n, d_model) and biases (n,) of `layer`'s features."""
        if self.kind == "cross_layer":
            weights = self.module._get_encoder_weights(layer)
            bias = self.module.b_enc[layer]
        else:
            weights, bias = self.module[layer].W_enc, self.module[layer].b_enc
        index = features.to(bias.device)
        return weights[index], bias[index]


def dictionary_of(loaded) -> FeatureDictionary:
    """The feature dictionary of a loaded replacement model."""
    return FeatureDictionary(loaded.model.transcoders)
