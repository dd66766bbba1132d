"""Canvas budgets: ``length: fixed:N | predicted[:q[:head]]``, power-of-two rounding, the head's prediction
and extension.

A fixed canvas is LLaDA's setting: every sample gets ``N`` positions. A predicted budget is dlm's: one
forward pass over ``[prompt, max_len masks]`` (the state generation starts from; over the prompt alone for a
head fitted on that pass, ``length_head.prediction_pass: prompt``) reads the length head, takes its
``q``-quantile upper bound on the answer length and allocates the smallest power of two at or above it,
clipped to ``[min_bucket, max_len]``. A canvas that fills without an EOS is extended to the next power of two,
up to ``max_len``, so an under-predicted budget costs extra steps, never a truncated answer.

Which head: ``bucket`` (default) — its distribution is over exactly the budgets generation allocates, so ``q``
reads directly as "P(answer fits) >= q"; ``eos`` — the per-position past-the-end probabilities
(:func:`~dlm.modeling.length_head.predict_eos_bound`); ``max`` — the larger of the two bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from dlm.errors import GenerationError
from dlm.generation.rows import Denoiser, pack_rows, run_model
from dlm.modeling.length_head import LengthHead, predict_bucket_bound, predict_eos_bound

HeadChoice = Literal["bucket", "eos", "max"]
DEFAULT_Q = 0.9
_FORMS = (
    "fixed:N (N a positive integer), predicted, predicted:Q or predicted:Q:HEAD (0 < Q <= 1, HEAD = bucket|eos|max)"
)


@dataclass(frozen=True)
class FixedLength:
    """Every sample gets a canvas of ``tokens`` positions."""

    tokens: int

    def __str__(self) -> str:
        return f"fixed:{self.tokens}"


@dataclass(frozen=True)
class PredictedLength:
    """The smallest power of two at or above the length head's ``q``-quantile bound (``head`` picks the head)."""

    q: float = DEFAULT_Q
    head: HeadChoice = "bucket"

    def __str__(self) -> str:
        return f"predicted:{self.q:g}:{self.head}"


LengthSpec = FixedLength | PredictedLength


def parse_length(spec: str | LengthSpec) -> LengthSpec:
    """Parse ``fixed:N``, ``predicted``, ``predicted:Q`` or ``predicted:Q:HEAD``; anything else is a
    :class:`~dlm.errors.GenerationError` naming the allowed forms."""
    if isinstance(spec, (FixedLength, PredictedLength)):
        return spec
    text = spec.strip()
    kind, _, rest = text.partition(":")
    if kind == "fixed":
        if rest.isdigit() and int(rest) > 0:
            return FixedLength(int(rest))
        raise GenerationError(f"length {spec!r}: fixed needs a positive integer canvas; allowed: {_FORMS}")
    if kind == "predicted":
        if not rest:
            return PredictedLength()
        q_text, _, head = rest.partition(":")
        try:
            q = float(q_text)
        except ValueError:
            q = math.nan
        if not 0.0 < q <= 1.0:
            raise GenerationError(f"length {spec!r}: the quantile must be a number in (0, 1]; allowed: {_FORMS}")
        if not head:
            return PredictedLength(q)
        if head not in get_args(HeadChoice):
            raise GenerationError(f"length {spec!r}: unknown head {head!r}; allowed: {_FORMS}")
        return PredictedLength(q, head)  # type: ignore[arg-type]
    raise GenerationError(f"length {spec!r} is not a length spec; allowed: {_FORMS}")


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n`` = 0 or 1); a negative ``n`` is a ValueError."""
    if n < 0:
        raise ValueError(f"next_power_of_two needs n >= 0, got {n}")
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def budget_from_bound(bound: int, min_budget: int, max_budget: int) -> int:
    """The canvas for a length bound: the next power of two of ``bound``, clipped to ``[min_budget, max_budget]``."""
    return max(min_budget, min(next_power_of_two(max(bound, 1)), max_budget))


def extend_budget(current: int, max_length: int) -> int | None:
    """The next power of two above ``current``, capped at ``max_length``; None when ``current`` is already there."""
    if current >= max_length:
        return None
    return min(next_power_of_two(current + 1), max_length)


@dataclass(frozen=True)
class BudgetPrediction:
    """The length head's reading for each prompt and what it cost.

    ``bounds`` are the chosen head's q-quantile bounds in tokens (``eos_bounds``/``bucket_bounds`` both heads';
    ``eos_bounds`` is empty after a prompt-only pass, which gives the EOS head nothing to read),
    ``budgets`` the canvases they give; ``forward_tokens`` is each prompt's row length in the prediction pass
    (its share of the compute), ``forward_passes`` the number of model calls.
    """

    bounds: list[int]
    budgets: list[int]
    eos_bounds: list[int]
    bucket_bounds: list[int]
    forward_tokens: list[int]
    forward_passes: int


def length_head_of(model: Denoiser) -> LengthHead:
    """The model's length head, or a :class:`~dlm.errors.GenerationError` saying how to do without one."""
    head = getattr(model, "length_head", None)
    if head is None:
        raise GenerationError(
            "predicted budgets need a model trained with a length head (model.length_head in its config); "
            "this model has none, so use length fixed:N"
        )
    return head  # type: ignore[no-any-return]


@torch.no_grad()
def predict_budgets(
    model: Denoiser,
    prompts: Sequence[Tensor],
    spec: PredictedLength,
    *,
    mask_id: int,
    pad_id: int,
    canvas: int | None = None,
    batch_size: int | None = None,
) -> BudgetPrediction:
    """Run the prediction pass over ``[prompt, canvas × mask]`` rows and turn the head's output into budgets.

    ``canvas`` (default: the head's ``prediction_width``, i.e. ``max_len``, or 0 for a head fitted on the
    prompt alone) is the masked tail appended to each prompt: the EOS head can only place the end inside it,
    and the prompt states the bucket head pools must be those of the pass the head learned from. Prompts run
    in batches of ``batch_size`` (default: all), left-padded.
    """
    head = length_head_of(model)
    cfg = head.cfg
    width = cfg.prediction_width if canvas is None else canvas
    if width == 0 and spec.head != "bucket":
        raise GenerationError(
            f"length {spec}: this model's length head is read from the prompt alone (length_head.prediction_pass: "
            f"prompt), which gives the EOS head no canvas to read; use predicted:{spec.q:g}:bucket"
        )
    edges = cfg.edges
    size = batch_size or len(prompts)
    eos_bounds: list[int] = []
    bucket_bounds: list[int] = []
    tokens: list[int] = []
    passes = 0
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        device = chunk[0].device
        rows = pack_rows(chunk, [torch.full((width,), mask_id, dtype=torch.long, device=device)] * len(chunk), pad_id)
        out = head(run_model(model, rows), rows.prompt_mask)
        passes += 1
        answer_start = torch.full((len(chunk),), rows.prompt_width, device=device)
        if width:
            eos_bounds += predict_eos_bound(out.eos_probs(), answer_start, spec.q).tolist()
        bucket_bounds += [edges[k] for k in predict_bucket_bound(out.bucket_probs(), spec.q).tolist()]
        tokens += [rows.width] * len(chunk)
    if spec.head == "eos":
        bounds = eos_bounds
    elif spec.head == "bucket":
        bounds = bucket_bounds
    else:
        bounds = [max(e, b) for e, b in zip(eos_bounds, bucket_bounds)]
    budgets = [budget_from_bound(b, cfg.min_bucket, cfg.max_len) for b in bounds]
    return BudgetPrediction(bounds, budgets, eos_bounds, bucket_bounds, tokens, passes)
