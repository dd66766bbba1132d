"""flash-attn's kernels: packed documents become one ragged batch (``cu_seqlens``), so no mask exists at all.

Imported lazily: flash-attn is an optional CUDA-only dependency (the ``gpu`` extra), and importing it on a
machine without CUDA fails. Documents are maximal runs of equal ``doc_ids`` within a row, which is what
packing produces (see :func:`dlm.kernels.masks.varlen_layout`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from dlm.kernels.errors import AttentionBackendError
from dlm.kernels.masks import AttentionMask

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@lru_cache(maxsize=1)
def flash_installed() -> bool:
    """Whether the ``flash_attn`` package can be imported (checked once; nothing is imported here)."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_unsupported(q: Tensor) -> str | None:
    """Why flash-attn cannot take ``q`` (dtype, head size), or None when it can."""
    head_dim = q.shape[-1]
    if q.dtype not in FLASH_DTYPES:
        return (
            f"flash-attn computes in float16/bfloat16 only, got {q.dtype}; train under bf16 autocast (the engine "
            f"does on CUDA) or use model.attention=sdpa"
        )
    if head_dim > MAX_HEAD_DIM or head_dim % 8 != 0:
        return f"flash-attn needs a head_dim that is a multiple of 8 and at most {MAX_HEAD_DIM}, got {head_dim}"
    return None


def _kernels() -> tuple[Callable[..., Any], Callable[..., Any]]:
    # A function (not a module-level import) so that tests can substitute a reference implementation.
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func


def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
    """Non-causal attention through flash-attn; q ``[B, H, T, hd]``, k/v ``[B, Hkv, T, hd]`` (GQA native)."""
    reason = flash_unsupported(q)
    if reason is not None:
        raise AttentionBackendError(reason)
    if mask is not None and mask.allowed is not None:
        raise AttentionBackendError(
            "attention backend 'flash' takes document masks only; attention-mask annealing needs "
            "model.attention=sdpa, flex or math"
        )
    dense_fn, varlen_fn = _kernels()
    b, h, t, hd = q.shape
    # flash-attn wants [.., T, H, hd]; the model's q/k/v are views of exactly that layout.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is None:
        return dense_fn(qt, kt, vt, dropout_p=0.0, causal=False).transpose(1, 2)
    cu_seqlens, max_seqlen = mask.varlen()
    out = varlen_fn(
        qt.reshape(b * t, h, hd),
        kt.reshape(b * t, k.shape[1], hd),
        vt.reshape(b * t, v.shape[1], hd),
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p=0.0,
        causal=False,
    )
    return out.view(b, t, h, hd).transpose(1, 2)
