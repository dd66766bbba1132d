"""The length/EOS head: predicts, from the state generation starts in, how long the answer will be.

Two small classifiers read the backbone's final hidden states:

- **EOS head** (per position): the logit that position ``i`` of the row is *past the end* of the answer, i.e.
  in the EOS/pad region. Relative to the answer start, position ``i`` is past the end iff the answer length
  ``L <= i``, so ``sigmoid(logit_i)`` estimates the CDF ``P(L <= i)`` along the canvas; a quantile of that CDF
  is an upper bound on the length (:func:`predict_eos_bound`).
- **Bucket head** (per row): a classifier over powers of two ``min_bucket … max_len`` from the *pooled prompt*
  states; bucket ``k`` holds lengths in ``(edge[k-1], edge[k]]`` (bucket 0 also holds 0). The smallest bucket
  whose cumulative probability reaches ``q`` is its bound (:func:`predict_bucket_bound`).

Pooling defaults to attention pooling: a learned score per prompt position, softmaxed over the prompt.
Length is usually decided by a few prompt tokens (the ``37`` in "count to 37", "list five …"); a mean dilutes
them more the longer the prompt gets, attention pooling can pick them out. Its score projection is
zero-initialised, so at initialisation it *is* mean pooling and only moves away from it when that helps; it
costs ``d_model`` parameters. ``pooling: mean`` is there for comparison.

The head is an optional submodule of :class:`~dlm.modeling.transformer.DiffusionTransformer`
(``model.length_head``, built when ``TransformerConfig.length_head`` is set and enabled), so it is saved,
loaded, sharded and exported with the backbone under ``length_head.*`` names, while the transformer's forward
still returns hidden states; callers apply ``model.length_head(hidden, prompt_mask)`` themselves.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

# Cumulative probabilities are sums of rounded floats; a bucket whose cumulative mass is q up to rounding
# counts as reaching q (otherwise 0.5 + 0.4 >= 0.9 could fail in float32 and pick the next bucket).
_CUM_TOLERANCE = 1e-6


PredictionPass = Literal["canvas", "prompt"]


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class LengthHeadConfig(BaseModel):
    """Shape of the length head; part of :class:`~dlm.modeling.config.TransformerConfig` (``length_head``).

    ``min_bucket`` and ``max_len`` are powers of two: the buckets are ``min_bucket, 2·min_bucket, … max_len``,
    and ``max_len`` is also the longest canvas a predicted budget may grow to. ``hidden = 0`` makes both
    classifiers linear probes; ``hidden > 0`` gives each one hidden SiLU layer of that width.

    ``prediction_pass`` is the pass inference reads the head from, so it must be the one the head was trained
    or fitted on: ``canvas`` (``[prompt, max_len masks]``, the state generation starts in; both heads) or
    ``prompt`` (the prompt alone: the bucket head only, since the EOS head has no canvas to read). ``dlm
    fit-head --pass prompt`` writes the second: its backbone states cost the prompt's tokens instead of
    prompt + ``max_len`` (measured on SmolLM2-135M with a 512 canvas: 7x faster, an 8x smaller cache).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    min_bucket: int = Field(default=16, gt=0)
    max_len: int = Field(default=1024, gt=0)
    pooling: Literal["attention", "mean"] = "attention"
    hidden: int = Field(default=0, ge=0)
    prediction_pass: PredictionPass = "canvas"

    @model_validator(mode="after")
    def _check_buckets(self) -> LengthHeadConfig:
        for name in ("min_bucket", "max_len"):
            value = getattr(self, name)
            if not _is_power_of_two(value):
                raise ValueError(f"length_head.{name} must be a power of two (16, 32, …), got {value}")
        if self.max_len < self.min_bucket:
            raise ValueError(
                f"length_head.max_len ({self.max_len}) must be >= length_head.min_bucket ({self.min_bucket})"
            )
        return self

    @property
    def edges(self) -> list[int]:
        """The bucket upper edges in tokens: ``[min_bucket, 2·min_bucket, …, max_len]``."""
        return bucket_edges(self.min_bucket, self.max_len)

    @property
    def num_buckets(self) -> int:
        """How many buckets the bucket head classifies into."""
        return len(self.edges)

    @property
    def prediction_width(self) -> int:
        """Masked positions after the prompt in the pass the head is read from: ``max_len`` or 0."""
        return self.max_len if self.prediction_pass == "canvas" else 0


def bucket_edges(min_bucket: int = 16, max_len: int = 1024) -> list[int]:
    """Upper edges of the length buckets, the powers of two from ``min_bucket`` to ``max_len`` inclusive."""
    if not (_is_power_of_two(min_bucket) and _is_power_of_two(max_len)) or max_len < min_bucket:
        raise ValueError(f"bucket range must be powers of two with min <= max, got {min_bucket} … {max_len}")
    edges = [min_bucket]
    while edges[-1] < max_len:
        edges.append(edges[-1] * 2)
    return edges


@overload
def bucket_of(length: int, min_bucket: int = ..., max_len: int = ...) -> int: ...
@overload
def bucket_of(length: Tensor, min_bucket: int = ..., max_len: int = ...) -> Tensor: ...
def bucket_of(length: int | Tensor, min_bucket: int = 16, max_len: int = 1024) -> int | Tensor:
    """Index of the bucket of ``length``: the smallest power of two >= length, clipped to the bucket range.

    ``1 → 0 (16)``, ``16 → 0``, ``17 → 1 (32)``, anything above ``max_len`` → the last bucket; works on an int
    or elementwise on an integer tensor.
    """
    edges = bucket_edges(min_bucket, max_len)
    if isinstance(length, Tensor):
        table = torch.tensor(edges, dtype=length.dtype, device=length.device)
        return torch.searchsorted(table, length.contiguous(), right=False).clamp_(max=len(edges) - 1)
    return min(bisect.bisect_left(edges, length), len(edges) - 1)


def length_head_param_count(d_model: int, cfg: LengthHeadConfig | None) -> int:
    """Parameters of a :class:`LengthHead` on width ``d_model`` (0 when absent or disabled), from the config."""
    if cfg is None or not cfg.enabled:
        return 0

    def classifier(out: int) -> int:
        if cfg.hidden == 0:
            return d_model * out + out
        return d_model * cfg.hidden + cfg.hidden + cfg.hidden * out + out

    pool = d_model if cfg.pooling == "attention" else 0
    return classifier(1) + classifier(cfg.num_buckets) + pool


@dataclass(frozen=True)
class LengthHeadOutput:
    """Logits of both heads, in float32: ``eos_logits [B, T]`` per position, ``bucket_logits [B, K]`` per row,
    with the bucket upper ``edges`` (tokens) they classify into."""

    eos_logits: Tensor
    bucket_logits: Tensor
    edges: tuple[int, ...]

    def eos_probs(self) -> Tensor:
        """``P(position is past the end of the answer)`` per position, ``[B, T]``."""
        return torch.sigmoid(self.eos_logits)

    def bucket_probs(self) -> Tensor:
        """The bucket distribution per row, ``[B, K]``."""
        return torch.softmax(self.bucket_logits, dim=-1)


class _Classifier(nn.Module):
    """``out(x)`` or ``out(silu(hidden_proj(x)))``: a linear probe or a one-hidden-layer MLP."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.hidden_proj = nn.Linear(d_in, hidden) if hidden > 0 else None
        self.out = nn.Linear(hidden if hidden > 0 else d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.hidden_proj is not None:
            x = F.silu(self.hidden_proj(x))
        return self.out(x)


class LengthHead(nn.Module):
    """The EOS head and the bucket head on top of final hidden states ``[B, T, d]``."""

    def __init__(self, d_model: int, cfg: LengthHeadConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.cfg = cfg
        self.init_std = init_std
        self.eos = _Classifier(d_model, cfg.hidden, 1)
        self.bucket = _Classifier(d_model, cfg.hidden, cfg.num_buckets)
        self.pool_score = nn.Linear(d_model, 1, bias=False) if cfg.pooling == "attention" else None
        if not self.eos.out.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Hidden layers normal(0, std) (default: ``init_std``); output layers and the pooling score zero.

        Zero outputs start the EOS head at p = 0.5 and the bucket head uniform (losses ln 2 and ln K), so the
        joint objective is not hit by large random length losses at step 0; a zero pooling score makes
        attention pooling start as exact mean pooling.
        """
        std = self.init_std if std is None else std
        for classifier in (self.eos, self.bucket):
            if classifier.hidden_proj is not None:
                nn.init.normal_(classifier.hidden_proj.weight, mean=0.0, std=std)
                nn.init.zeros_(classifier.hidden_proj.bias)
            nn.init.zeros_(classifier.out.weight)
            nn.init.zeros_(classifier.out.bias)
        if self.pool_score is not None:
            nn.init.zeros_(self.pool_score.weight)

    def pool(self, hidden: Tensor, prompt_mask: Tensor) -> Tensor:
        """Pooled prompt states ``[B, d]``; a row without prompt positions pools to zeros."""
        mask = prompt_mask.to(torch.bool)
        has_prompt = mask.any(dim=1, keepdim=True)
        if self.pool_score is None:
            weights = mask.to(hidden.dtype)
            weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        else:
            scores = self.pool_score(hidden).squeeze(-1).float().masked_fill(~mask, float("-inf"))
            # A row with no prompt has only -inf scores; give it zeros instead of softmax's NaNs.
            weights = torch.softmax(scores.masked_fill(~has_prompt, 0.0), dim=1)
            weights = (weights * has_prompt).to(hidden.dtype)
        return torch.einsum("bt,btd->bd", weights, hidden)

    def forward(self, hidden: Tensor, prompt_mask: Tensor) -> LengthHeadOutput:
        """Both heads' logits for ``hidden [B, T, d]``; ``prompt_mask [B, T]`` marks the prompt tokens to pool."""
        if hidden.dim() != 3 or tuple(prompt_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"length head expects hidden [B, T, d] and prompt_mask [B, T], got {tuple(hidden.shape)} "
                f"and {tuple(prompt_mask.shape)}"
            )
        return self.read(hidden, prompt_mask, hidden)

    def read(self, prompt_hidden: Tensor, prompt_mask: Tensor, canvas_hidden: Tensor) -> LengthHeadOutput:
        """Both heads from separate states: the bucket head pools ``prompt_hidden [B, P, d]`` over
        ``prompt_mask [B, P]``, the EOS head reads every position of ``canvas_hidden [B, W, d]``.

        :meth:`forward` passes one row's states as both; a caller that holds the prompt's and the canvas's
        states apart (``dlm fit-head``'s cache) skips the positions each head would ignore.
        """
        eos_logits = self.eos(canvas_hidden).squeeze(-1).float()
        bucket_logits = self.bucket(self.pool(prompt_hidden, prompt_mask)).float()
        return LengthHeadOutput(eos_logits=eos_logits, bucket_logits=bucket_logits, edges=tuple(self.cfg.edges))


@dataclass
class LengthHeadTerms:
    """Both heads' losses as *sums* (differentiable) with the counts and hits that normalise and score them.

    Sums rather than means so that a training step split over micro-batches and ranks can divide by the
    step's global counts and get the same mean however it is split.
    """

    eos_bce_sum: Tensor
    eos_correct: Tensor
    eos_count: Tensor
    bucket_ce_sum: Tensor
    bucket_correct: Tensor
    bucket_count: Tensor

    def stats(self) -> Tensor:
        """Detached ``[eos_bce_sum, eos_correct, eos_count, bucket_ce_sum, bucket_correct, bucket_count]``."""
        return torch.stack([self.eos_bce_sum.detach(), self.eos_correct, self.eos_count,
                            self.bucket_ce_sum.detach(), self.bucket_correct, self.bucket_count]).float()


def length_head_terms(
    out: LengthHeadOutput,
    answer_start: Tensor,
    answer_length: Tensor,
    *,
    canvas_mask: Tensor | None = None,
) -> LengthHeadTerms:
    """Per-position BCE of the EOS head and per-row CE of the bucket head, summed.

    Row ``b``'s answer occupies positions ``answer_start[b] … answer_start[b] + answer_length[b] - 1``; every
    position from ``answer_start[b]`` on is scored by the EOS head, with target 1 from the first position past
    the answer (the first EOS) on and 0 before it. ``canvas_mask [B, T]`` (bool) restricts the scored positions
    further, e.g. to exclude a row's positions that are not part of its canvas. The bucket target is
    :func:`bucket_of` the answer length over ``out.edges``.
    """
    eos_logits, bucket_logits = out.eos_logits, out.bucket_logits
    b, t = eos_logits.shape
    if answer_start.shape != (b,) or answer_length.shape != (b,):
        raise ValueError(f"answer_start and answer_length must have shape [{b}], got "
                         f"{tuple(answer_start.shape)} and {tuple(answer_length.shape)}")
    rel = torch.arange(t, device=eos_logits.device)[None, :] - answer_start[:, None]
    scored = rel >= 0
    if canvas_mask is not None:
        scored = scored & canvas_mask.to(torch.bool)
    target = (rel >= answer_length[:, None]).to(eos_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(eos_logits, target, reduction="none")
    weight = scored.to(eos_logits.dtype)
    eos_correct = (((eos_logits > 0).to(target.dtype) == target).to(weight.dtype) * weight).sum()

    edges = out.edges
    bucket_target = bucket_of(answer_length.to(torch.long), edges[0], edges[-1])
    if bucket_logits.shape != (b, len(edges)):
        raise ValueError(f"bucket_logits must have shape [{b}, {len(edges)}], got {tuple(bucket_logits.shape)}")
    bucket_correct = (bucket_logits.argmax(dim=-1) == bucket_target).sum().to(bucket_logits.dtype)
    return LengthHeadTerms(
        eos_bce_sum=(bce * weight).sum(),
        eos_correct=eos_correct.detach(),
        eos_count=weight.sum().detach(),
        bucket_ce_sum=F.cross_entropy(bucket_logits, bucket_target, reduction="sum"),
        bucket_correct=bucket_correct.detach(),
        bucket_count=torch.tensor(float(b), device=bucket_logits.device),
    )


def length_head_loss(
    out: LengthHeadOutput,
    answer_start: Tensor,
    answer_length: Tensor,
    *,
    canvas_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Joint loss of both heads on one batch: mean per-position BCE of the EOS head plus mean per-row CE of
    the bucket head (targets as in :func:`length_head_terms`).

    Returns ``(loss, metrics)``; the metrics are detached tensors (no host sync here): ``eos_bce``,
    ``bucket_ce``, ``eos_acc``, ``bucket_acc`` and the sums/counts (``eos_bce_sum``, ``eos_count``,
    ``bucket_ce_sum``, ``bucket_count``).
    """
    terms = length_head_terms(out, answer_start, answer_length, canvas_mask=canvas_mask)
    eos_bce = terms.eos_bce_sum / terms.eos_count.clamp(min=1.0)
    bucket_ce = terms.bucket_ce_sum / terms.bucket_count.clamp(min=1.0)
    metrics = {
        "eos_bce": eos_bce.detach(),
        "bucket_ce": bucket_ce.detach(),
        "eos_acc": terms.eos_correct / terms.eos_count.clamp(min=1.0),
        "bucket_acc": terms.bucket_correct / terms.bucket_count.clamp(min=1.0),
        "eos_bce_sum": terms.eos_bce_sum.detach(),
        "eos_count": terms.eos_count,
        "bucket_ce_sum": terms.bucket_ce_sum.detach(),
        "bucket_count": terms.bucket_count,
    }
    return eos_bce + bucket_ce, metrics


def predict_eos_bound(
    eos_probs: Tensor, answer_start: Tensor, q: float, answer_end: Tensor | None = None
) -> Tensor:
    """The q-quantile upper bound on each row's answer length from per-position past-the-end probabilities.

    With ``p_i`` the probability that canvas position ``i`` (counted from ``answer_start``) is past the end,
    ``P(L <= i)`` is estimated by the monotone envelope ``F(i) = min_{j >= i} p_j``: the past-the-end CDF can
    only grow along the canvas, and taking the minimum over later positions (rather than the running maximum)
    errs towards longer bounds, which is the side an upper bound should err on. The bound is the smallest
    ``L`` with ``F(L) >= q``, i.e. one past the last canvas position whose probability is below ``q`` (0 when
    none is). Positions ``< answer_start`` and ``>= answer_end`` (default: the row's end) are ignored; when
    even the last canvas position is below ``q`` the bound is the whole canvas, ``answer_end - answer_start``.
    Returns long ``[B]``.
    """
    b, t = eos_probs.shape
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    pos = torch.arange(t, device=eos_probs.device)[None, :]
    end = answer_end if answer_end is not None else torch.full((b,), t, device=eos_probs.device)
    in_canvas = (pos >= answer_start[:, None]) & (pos < end[:, None])
    below = in_canvas & (eos_probs < q)
    # one past the last below-q position, as an absolute index; rows with none get answer_start
    last_below = torch.where(below, pos, torch.full_like(pos, -1)).amax(dim=1)
    bound = torch.where(last_below >= 0, last_below + 1 - answer_start, torch.zeros_like(last_below))
    return bound.to(torch.long)


def predict_bucket_bound(bucket_probs: Tensor, q: float) -> Tensor:
    """Index of the smallest bucket whose cumulative probability reaches ``q`` (within 1e-6), long ``[B]``.

    If rounding keeps every cumulative sum below ``q`` the last bucket is returned. Map indices to token
    lengths with :func:`bucket_edges`.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    cumulative = bucket_probs.double().cumsum(dim=-1)
    reached = cumulative >= q - _CUM_TOLERANCE
    reached[..., -1] = True
    return reached.to(torch.int8).argmax(dim=-1).to(torch.long)
