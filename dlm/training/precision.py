"""Which device and which autocast dtype a run uses: decided once from the config, read by every engine.

Its own module because both engines need it and neither should import the other (the DeepSpeed engine is
slow to import and optional at run time).
"""

from __future__ import annotations

import torch

from dlm.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config error: run.device = 'cuda': no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on devices that support it when ``auto``; None means plain fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
