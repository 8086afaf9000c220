"""What patching and intervening on a model share: the Hugging Face modules behind a loaded
replacement model, and the evil-minus-safe logit gap they are measured by."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from emc.models import LoadedModel
from emc.models.dictionary import FeatureDictionary, dictionary_of
from emc.models.families import Family, family_of
from emc.models.sites import Site, read_value, site_for


def hf_module(loaded: LoadedModel, purpose: str) -> torch.nn.Module:
    """The Hugging Face model the nnsight backend wraps (same weights, same forward)."""
    if loaded.identity.backend != "nnsight":
        raise ValueError(
            f"{purpose} hooks the Hugging Face modules the nnsight backend wraps; "
            f"{loaded.identity.model_id} runs on {loaded.identity.backend} (set runtime.backend: "
            "nnsight)"
        )
    return loaded.model._model


def split_targets(targets: Mapping[int, str], purpose: str) -> tuple[list[int], list[int]]:
    """Sorted evil and safe token ids; both kinds are needed for a gap."""
    evil = sorted(t for t, label in targets.items() if label == "evil")
    safe = sorted(t for t, label in targets.items() if label == "safe")
    if not evil or not safe:
        raise ValueError(f"{purpose} needs at least one evil and one safe token")
    return evil, safe


def logit_gap(logits: torch.Tensor, evil: list[int], safe: list[int]) -> float:
    """Mean logit of the evil tokens minus mean logit of the safe ones (float64)."""
    logits = logits.double()
    return float(logits[evil].mean() - logits[safe].mean())


def decoder_layers(hf: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks, in order (`model.layers` of a causal LM)."""
    return list(getattr(hf, "model", hf).layers)


@contextmanager
def removing(handles: list) -> Iterator[None]:
    """Remove hook handles however the block ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class FeatureHooks:
    """The Hugging Face modules where a loaded model's transcoders read and write."""

    hf: torch.nn.Module
    family: Family
    dictionary: FeatureDictionary
    read: Site
    write: Site

    def on_read(self, layer: int, fn: Callable[[torch.Tensor], None]):
        """Call `fn` with the value layer `layer`'s features read, on every forward pass."""
        site = self.read

        def hook(module, args, output):
            fn(read_value(site, module, args, output))

        return site.at(self.hf, layer).register_forward_hook(hook)

    def on_write(self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        """Replace what layer `layer`'s write site outputs by `fn(output)` (None: unchanged)."""

        def hook(_module, _args, output):
            if isinstance(output, tuple):
                new = fn(output[0])
                return None if new is None else (new, *output[1:])
            return fn(output)

        return self.write.at(self.hf, layer).register_forward_hook(hook)


def feature_hooks(loaded: LoadedModel, purpose: str) -> FeatureHooks:
    hf = hf_module(loaded, purpose)
    family = family_of(hf.config)
    dictionary = dictionary_of(loaded)
    return FeatureHooks(
        hf,
        family,
        dictionary,
        site_for(family, dictionary.input_hook),
        site_for(family, dictionary.output_hook),
    )
