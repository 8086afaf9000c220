"""Model loading: plain HF, PEFT adapters, merged models, and circuit-tracer replacement models."""

from emc.models.errors import (
    AdapterMismatchError,
    ItemMemoryError,
    ModelLoadError,
    NonFiniteActivationError,
    PromptTooLongError,
    TranscoderMismatchError,
)
from emc.models.factory import (
    LoadedModel,
    describe_model,
    encode_with_bos,
    load_plain_model,
    load_replacement_model,
    load_tokenizer_and_context,
)
from emc.models.guard import finite_guard, hf_checkpoints
from emc.models.identity import ModelIdentity
from emc.models.precision import Precision, resolve_precision

__all__ = [
    "AdapterMismatchError",
    "ItemMemoryError",
    "LoadedModel",
    "ModelIdentity",
    "ModelLoadError",
    "NonFiniteActivationError",
    "Precision",
    "PromptTooLongError",
    "TranscoderMismatchError",
    "describe_model",
    "encode_with_bos",
    "finite_guard",
    "hf_checkpoints",
    "load_plain_model",
    "load_replacement_model",
    "load_tokenizer_and_context",
    "resolve_precision",
]
