"""Liger's fused linear cross-entropy (Triton, CUDA) as an implementation of :func:`dlm.kernels.masked_lm_loss`.

Imported lazily: liger-kernel is an optional CUDA dependency (dlm's ``gpu`` extra). Per-token weights
(LLaDA's ``1 / p_mask``) go through ``reduction="none"``, whose backward folds the per-token gradient into
the logits before the weight gradient is summed; releases before that fix (linkedin/Liger-Kernel#1298)
silently scaled every row by the first row's gradient, so they are used for unweighted losses only.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor


@lru_cache(maxsize=1)
def liger_installed() -> bool:
    """Whether the ``liger_kernel`` package can be imported (checked once; nothing is imported here)."""
    return importlib.util.find_spec("liger_kernel") is not None


def _function() -> Callable[..., Any]:
    # A function (not a module-level import) so that tests can substitute a reference implementation.
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


@lru_cache(maxsize=1)
def per_token_backward_is_correct() -> bool:
    """Whether the installed release weights each row's gradient by its own upstream gradient under
    ``reduction="none"`` (it recomputes the logits in backward; the parameter below marks that code)."""
    from liger_kernel.ops import fused_linear_cross_entropy as ops

    return "token_grad_output" in inspect.signature(ops.fused_linear_cross_entropy_forward).parameters


def liger_unsupported(hidden: Tensor, token_weights: Tensor | None) -> str | None:
    """Why Liger cannot compute this loss here, or None when it can."""
    if not liger_installed():
        return "liger-kernel is not installed: pip install liger-kernel (dlm's `gpu` extra), or use impl='chunked'"
    if hidden.device.type != "cuda":
        return f"liger-kernel runs on CUDA only, not {hidden.device.type}; use impl='chunked'"
    if hidden.shape[0] == 0:
        return "no masked rows"
    if token_weights is not None and not per_token_backward_is_correct():
        return (
            "this liger-kernel release computes wrong gradients for per-token weights (reduction='none', fixed by "
            "linkedin/Liger-Kernel#1298); upgrade liger-kernel or use impl='chunked'"
        )
    return None


def liger_masked_lm_loss(
    hidden: Tensor, weight: Tensor, targets: Tensor, token_weights: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``sum_i token_weights[i] * CE(hidden[i] @ weight.T + bias, targets[i])`` through Liger, as fp32 scalar,
    and each row's unweighted CE ``[N]`` (fp32, detached).

    Always ``reduction="none"``: the per-row losses are needed for the loss by group. Unweighted, the upstream
    gradient of every row is 1, so releases with the per-token bug above compute it correctly too.
    Gradient accumulation runs in fp32 where the release allows it (``accum_dtype``), as in the chunked kernel.
    """
    fn = _function()
    extra: dict[str, Any] = {}
    if "accum_dtype" in inspect.signature(fn).parameters:
        extra["accum_dtype"] = torch.float32
    per_row = fn(hidden, weight, targets, bias=bias, reduction="none", **extra).float()
    loss = per_row.sum() if token_weights is None else (per_row * token_weights.float()).sum()
    return loss, per_row.detach()
