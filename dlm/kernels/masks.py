"""Which keys a query may see, described once per forward pass and shared by every layer.

A packed row holds several documents; a query sees only keys of its own document (``doc_ids``). An
AR-adapted model may additionally restrict attention with an *allowed* mask (attention-mask annealing,
DiffuLLaMA: causal OR Bernoulli(ratio), the ratio rising to 1). Each backend wants this information in its
own form (a dense bool mask, flash-attn's ``cu_seqlens``, a FlexAttention ``BlockMask``); building that form
costs a host sync or a mask evaluation, so :class:`AttentionMask` builds each form once and every layer
reuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

_T = TypeVar("_T")


def document_mask(doc_ids: Tensor) -> Tensor:
    """Bool ``[B, 1, T, T]`` mask, True where query and key belong to the same document of the same row."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :]).unsqueeze(1)


def varlen_layout(doc_ids: Tensor) -> tuple[Tensor, int]:
    """``cu_seqlens`` (int32 ``[n_docs + 1]``) and the longest document of the flattened ``[B * T]`` batch.

    A document is a maximal run of equal ids inside one row (what packing produces); a row boundary always
    starts a new document, even when the next row begins with the same id. Costs one host sync (the
    maximum length must be a Python int for flash-attn), which is why it is computed once per forward.
    """
    b, t = doc_ids.shape
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::t] = True
    begin = starts.nonzero().squeeze(1)
    cu_seqlens = torch.cat([begin, begin.new_tensor([b * t])]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Fraction of the non-causal entries switched on at ``step``: rises linearly from 0 to 1 over
    ``anneal_steps`` (0 means no annealing: full bidirectional attention from the start)."""
    if anneal_steps < 0 or step < 0:
        raise ValueError(f"step ({step}) and anneal_steps ({anneal_steps}) must be >= 0")
    return 1.0 if anneal_steps == 0 else min(1.0, step / anneal_steps)


def annealed_mask(
    seq_len: int,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """DiffuLLaMA's attention-mask annealing: bool ``[T, T]``, causal OR Bernoulli(``ratio``), True = may attend.

    An AR model adapted to diffusion starts from the causal mask it was trained with and sees a growing
    random share of the future until attention is fully bidirectional. The causal part keeps the diagonal,
    so no query is left without keys. At ``ratio >= 1`` the mask would be all True; None is returned
    instead, so callers drop the mask and the document-only kernels (flash-attn) apply again. The draw
    comes from ``generator`` (on ``device``), so a run can make it a pure function of its step.
    """
    if ratio < 0.0:
        raise ValueError(f"the annealing ratio must be >= 0, got {ratio}")
    if ratio >= 1.0:
        return None
    positions = torch.arange(seq_len, device=device)
    causal = positions[:, None] >= positions[None, :]
    random = torch.rand(seq_len, seq_len, generator=generator, device=device) < ratio
    return causal | random


class AttentionMask:
    """The documents (``doc_ids [B, T]``) and an optional ``allowed`` mask (bool ``[T, T]`` or ``[B, T, T]``).

    A query attends to a key iff both are in the same document of the same row *and* ``allowed`` is True
    there. Backend-specific forms are built on first request and cached: one instance per forward pass,
    created before the layers run, so compiled blocks receive ready-made tensors.
    """

    def __init__(self, doc_ids: Tensor | None = None, allowed: Tensor | None = None) -> None:
        if doc_ids is None and allowed is None:
            raise ValueError("an AttentionMask needs doc_ids, an allowed mask, or both")
        if doc_ids is not None and doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must have shape [B, T], got {tuple(doc_ids.shape)}")
        if allowed is not None:
            if allowed.dtype != torch.bool or allowed.dim() not in (2, 3) or allowed.shape[-1] != allowed.shape[-2]:
                raise ValueError(
                    f"the allowed mask must be a bool [T, T] or [B, T, T] tensor, got {allowed.dtype} "
                    f"{tuple(allowed.shape)}"
                )
            if doc_ids is not None and allowed.shape[-1] != doc_ids.shape[1]:
                raise ValueError(f"allowed mask {tuple(allowed.shape)} does not fit doc_ids {tuple(doc_ids.shape)}")
            if doc_ids is not None and allowed.dim() == 3 and allowed.shape[0] not in (1, doc_ids.shape[0]):
                raise ValueError(f"allowed mask batch {allowed.shape[0]} does not match doc_ids {tuple(doc_ids.shape)}")
        self.doc_ids = doc_ids
        self.allowed = allowed
        self._cache: dict[str, Any] = {}

    @classmethod
    def build(cls, doc_ids: Tensor | None, allowed: Tensor | None) -> AttentionMask | None:
        """An instance, or None when there is nothing to mask (full attention, the fastest path)."""
        return None if doc_ids is None and allowed is None else cls(doc_ids, allowed)

    @property
    def seq_len(self) -> int:
        """T, the length of the rows this mask describes."""
        return self.doc_ids.shape[1] if self.doc_ids is not None else self.allowed.shape[-1]  # type: ignore[union-attr]

    @property
    def batch(self) -> int | None:
        """B, or None when the mask is the same for every row (an ``[T, T]`` allowed mask alone)."""
        if self.doc_ids is not None:
            return self.doc_ids.shape[0]
        assert self.allowed is not None
        return self.allowed.shape[0] if self.allowed.dim() == 3 and self.allowed.shape[0] > 1 else None

    @property
    def device(self) -> torch.device:
        """Where the mask tensors live."""
        return self.doc_ids.device if self.doc_ids is not None else self.allowed.device  # type: ignore[union-attr]

    def cached(self, key: str, build: Callable[[AttentionMask], _T]) -> _T:
        """``build(self)`` on first call for ``key``, the same object afterwards."""
        if key not in self._cache:
            self._cache[key] = build(self)
        return self._cache[key]

    def dense(self) -> Tensor:
        """Bool ``[B or 1, 1, T, T]``: the whole mask, for backends that take an explicit mask (SDPA, math)."""
        return self.cached("dense", _dense)

    def varlen(self) -> tuple[Tensor, int]:
        """flash-attn's ``(cu_seqlens, max_seqlen)``; only for a mask made of documents alone."""
        if self.doc_ids is None or self.allowed is not None:
            raise ValueError("a varlen layout describes documents only; this mask has an allowed mask or no doc_ids")
        doc_ids = self.doc_ids
        return self.cached("varlen", lambda _: varlen_layout(doc_ids))


def _dense(mask: AttentionMask) -> Tensor:
    dense = document_mask(mask.doc_ids) if mask.doc_ids is not None else None
    if mask.allowed is not None:
        allowed = (mask.allowed if mask.allowed.dim() == 3 else mask.allowed[None])[:, None]
        dense = allowed if dense is None else dense & allowed
    assert dense is not None
    return dense
