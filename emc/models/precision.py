"""The precision policy: bf16 on GPU, fp32 on CPU, one rule for every model EMC loads.

fp16 was tried by the original research and produced activations of 400+ and NaNs, so it is not
offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emc.config import RuntimeConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}[self.dtype]


def resolve_precision(runtime: RuntimeConfig) -> Precision:
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config asks for device 'cuda' but no CUDA device is available")
    if runtime.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(runtime.device)
    if runtime.precision == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[runtime.precision]
    return Precision(device, dtype)
