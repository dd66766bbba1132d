"""Bidirectional attention behind one function, so the model never knows which kernel runs.

Packed sequences carry ``doc_ids``; a query sees only keys of its own document, which keeps packed
training equivalent to training on the documents one by one. Backends are looked up by name in
:data:`BACKENDS`, so faster kernels (flash-attn varlen, FlexAttention) slot in without touching the model.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def document_mask(doc_ids: Tensor) -> Tensor:
    """Bool ``[B, 1, T, T]`` mask, True where query and key belong to the same document of the same row."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :]).unsqueeze(1)


def _repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    # Query head h reads kv head h // (H / Hkv), the grouping SDPA's enable_gqa uses.
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None) -> Tensor:
    n_heads = q.shape[1]
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != n_heads)
    # A mask rules out the flash kernel; the memory-efficient one accepts it but not enable_gqa, so expand
    # k/v instead of letting SDPA fall back to its unfused math path.
    return F.scaled_dot_product_attention(
        q, _repeat_kv(k, n_heads), _repeat_kv(v, n_heads), attn_mask=document_mask(doc_ids)
    )


def _math_attention(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None) -> Tensor:
    """Reference: softmax(q k^T / sqrt(hd)) v in fp32, the yardstick the fused backends are tested against."""
    n_heads = q.shape[1]
    qf = q.float()
    kf = _repeat_kv(k, n_heads).float()
    vf = _repeat_kv(v, n_heads).float()
    scores = qf @ kf.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if doc_ids is not None:
        scores = scores.masked_fill(~document_mask(doc_ids), float("-inf"))
    return (scores.softmax(dim=-1) @ vf).to(q.dtype)


BACKENDS: dict[str, AttentionFn] = {
    "sdpa": _sdpa_attention,
    "math": _math_attention,
}


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None) -> None:
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


def attention(q: Tensor, k: Tensor, v: Tensor, *, doc_ids: Tensor | None = None, backend: str = "sdpa") -> Tensor:
    """Non-causal multi-head attention; q ``[B, H, T, hd]``, k/v ``[B, Hkv, T, hd]`` → ``[B, H, T, hd]``.

    With ``doc_ids [B, T]`` a query attends only to keys with the same id in the same row (block-diagonal
    over packed documents). ``Hkv`` must divide ``H`` (grouped-query attention).
    """
    fn = BACKENDS.get(backend)
    if fn is None:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(sorted(BACKENDS))}")
    _check_shapes(q, k, v, doc_ids)
    return fn(q, k, v, doc_ids)
