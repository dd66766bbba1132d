"""Bidirectional attention behind one function, so the model never knows which kernel runs.

Packed sequences carry ``doc_ids``; a query sees only keys of its own document, which keeps packed
training equivalent to training on the documents one by one. Backends are looked up by name in
:data:`BACKENDS`:

- ``flash``: flash-attn's varlen kernel (CUDA, fp16/bf16, optional package): no mask tensor at all;
- ``sdpa``: PyTorch's scaled_dot_product_attention with a block-diagonal bool mask (on CUDA PyTorch picks
  the memory-efficient kernel; without documents, flash/cuDNN);
- ``flex``: FlexAttention with a document ``BlockMask`` (compiled on CUDA; forward-only on CPU);
- ``math``: softmax(q k^T) v in fp32, the reference the others are tested against.

``auto`` picks flash where it can run (CUDA tensors in fp16/bf16, flash-attn installed, no extra mask) and
SDPA everywhere else: SDPA is the fastest backend on CPU and the one every torch build has. Asking for a
backend that cannot run raises :class:`AttentionBackendError`, a config error naming what to install or
which backend to use; :func:`check_backend` raises it when the model is built, before any training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm.kernels.errors import AttentionBackendError
from dlm.kernels.flash import FLASH_DTYPES, MAX_HEAD_DIM, flash_attention, flash_installed
from dlm.kernels.flex import block_mask, flex_attention, flex_installed
from dlm.kernels.masks import AttentionMask, document_mask

__all__ = [
    "BACKENDS",
    "CHOICES",
    "AttentionBackendError",
    "AttentionMask",
    "attention",
    "check_backend",
    "compute_dtype",
    "document_mask",
    "resolve_backend",
]

AttentionFn = Callable[[Tensor, Tensor, Tensor, "AttentionMask | None"], Tensor]


def _repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    # Query head h reads kv head h // (H / Hkv), the grouping SDPA's enable_gqa uses.
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
    n_heads = q.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != n_heads)
    # A mask rules out the flash kernel; the memory-efficient one accepts it but not enable_gqa, so expand
    # k/v instead of letting SDPA fall back to its unfused math path.
    return F.scaled_dot_product_attention(
        q, _repeat_kv(k, n_heads), _repeat_kv(v, n_heads), attn_mask=mask.dense()
    )


def _math_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
    """Reference: softmax(q k^T / sqrt(hd)) v in fp32, the yardstick the fused backends are tested against."""
    n_heads = q.shape[1]
    qf = q.float()
    kf = _repeat_kv(k, n_heads).float()
    vf = _repeat_kv(v, n_heads).float()
    scores = qf @ kf.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask.dense(), float("-inf"))
    return (scores.softmax(dim=-1) @ vf).to(q.dtype)


def _runs_anywhere(device: torch.device) -> str | None:
    return None


def _flash_missing(device: torch.device) -> str | None:
    if not flash_installed():
        return (
            "attention backend 'flash' needs the flash_attn package: pip install flash-attn (dlm's `gpu` extra) "
            "on a CUDA machine; or use model.attention=auto, which falls back to sdpa"
        )
    if device.type != "cuda":
        return f"attention backend 'flash' runs on CUDA only, not {device.type}; use model.attention=auto or sdpa"
    return None


def _flex_missing(device: torch.device) -> str | None:
    if not flex_installed():
        return (
            f"attention backend 'flex' needs torch >= 2.5 (torch.nn.attention.flex_attention), this is "
            f"{torch.__version__}; upgrade torch or use model.attention=sdpa"
        )
    if device.type not in ("cuda", "cpu"):
        return f"attention backend 'flex' runs on CUDA and CPU, not {device.type}; use model.attention=sdpa"
    return None


@dataclass(frozen=True)
class Backend:
    """One attention kernel: how to run it, where it cannot run, and the mask form it wants."""

    run: AttentionFn
    missing: Callable[[torch.device], str | None]
    """Why the backend cannot run on a device (package absent, wrong device type), or None."""
    any_mask: bool
    """Whether it takes an arbitrary allowed mask (annealing), not only documents."""
    prepare: Callable[[AttentionMask], object]
    """Builds the backend's form of a mask, once per forward pass, before the layers run."""


BACKENDS: dict[str, Backend] = {
    "flash": Backend(flash_attention, _flash_missing, any_mask=False, prepare=AttentionMask.varlen),
    "sdpa": Backend(_sdpa_attention, _runs_anywhere, any_mask=True, prepare=AttentionMask.dense),
    "flex": Backend(flex_attention, _flex_missing, any_mask=True, prepare=lambda m: m.cached("flex", block_mask)),
    "math": Backend(_math_attention, _runs_anywhere, any_mask=True, prepare=AttentionMask.dense),
}
CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
"""The values of ``model.attention``."""


def _lookup(name: str) -> Backend:
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"unknown attention backend {name!r}; allowed: {', '.join(sorted(CHOICES))}")
    return backend


def resolve_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    head_dim: int | None = None,
    any_mask: bool = False,
) -> str:
    """The backend that runs for ``name`` on ``device``: ``auto`` becomes a concrete name; an explicit name is
    returned if it can run there and take the mask, else :class:`AttentionBackendError` says what to do.

    ``dtype`` and ``head_dim`` are those of q (flash takes fp16/bf16 and head_dim ≤ 256 only); ``any_mask``
    is True when an allowed mask (annealing) comes on top of the documents.
    """
    if name == "auto":
        flash_fits = dtype in FLASH_DTYPES and (head_dim is None or (head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0))
        if device.type == "cuda" and flash_installed() and flash_fits and not any_mask:
            return "flash"
        return "sdpa"
    backend = _lookup(name)
    reason = backend.missing(device)
    if reason is not None:
        raise AttentionBackendError(reason)
    if any_mask and not backend.any_mask:
        raise AttentionBackendError(
            f"attention backend {name!r} takes document masks only; attention-mask annealing needs "
            f"model.attention=sdpa, flex or math"
        )
    return name


def check_backend(name: str, device: torch.device | str) -> None:
    """Fail now, not at the first step, if backend ``name`` cannot run on ``device`` (skipped for ``meta``,
    where the real device is not known yet)."""
    device = torch.device(device)
    if name != "auto":
        _lookup(name)
    if device.type != "meta":
        resolve_backend(name, device)


def compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a linear layer produces on ``device``: autocast's when it is on, else the parameters'."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, mask: AttentionMask | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q [B, H, T, hd] and k, v [B, Hkv, T, hd]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, h, t, hd = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, t, hd):
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, length or head_dim")
    if h % k.shape[1] != 0:
        raise ValueError(f"the number of kv heads ({k.shape[1]}) must divide the number of query heads ({h})")
    if doc_ids is not None and tuple(doc_ids.shape) != (b, t):
        raise ValueError(f"doc_ids must have shape [B, T] = {(b, t)}, got {tuple(doc_ids.shape)}")
    if mask is not None and (mask.seq_len != t or mask.batch not in (None, b)):
        raise ValueError(
            f"the attention mask (batch {mask.batch}, length {mask.seq_len}) does not fit q {tuple(q.shape)}"
        )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    doc_ids: Tensor | None = None,
    backend: str = "sdpa",
    mask: AttentionMask | None = None,
) -> Tensor:
    """Non-causal multi-head attention; q ``[B, H, T, hd]``, k/v ``[B, Hkv, T, hd]`` → ``[B, H, T, hd]``.

    With ``doc_ids [B, T]`` a query attends only to keys with the same id in the same row (block-diagonal
    over packed documents). ``mask`` replaces ``doc_ids`` when the caller built an :class:`AttentionMask`
    once for many layers, or adds an allowed mask (annealing). ``Hkv`` must divide ``H`` (grouped-query
    attention). ``backend`` is one of :data:`CHOICES`.
    """
    if doc_ids is not None and mask is not None:
        raise ValueError("pass doc_ids or an AttentionMask, not both")
    _check_shapes(q, k, v, doc_ids, mask)
    if doc_ids is not None:
        mask = AttentionMask(doc_ids)
    any_mask = mask is not None and mask.allowed is not None
    name = resolve_backend(backend, q.device, q.dtype, head_dim=q.shape[-1], any_mask=any_mask)
    return BACKENDS[name].run(q, k, v, mask)
