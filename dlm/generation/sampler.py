"""LLaDA sampling over per-sample canvases: low-confidence or random remasking, semi-autoregressive blocks,
unsupervised classifier-free guidance, Gumbel-noise temperature, stop at EOS, budgets that extend.

One denoising step, as in LLaDA's ``generate()``: logits of the canvas (guided when ``cfg_scale > 0``; the EOS
logit at ``-inf`` with ``logits_eos_inf``) → Gumbel noise (``exp(logits) / (-log u)^temperature`` in float64,
``u`` drawn for the whole row, prompt included, so a seeded run consumes random numbers exactly as LLaDA does)
→ ``x0 = argmax`` → confidence (the softmax probability of ``x0`` in the logits' own dtype for
``low_confidence``, as the reference computes it, so a bf16 model ranks with bf16 probabilities and their ties;
``confidence_dtype`` picks another; uniform noise for ``random``) → positions past the current block and
already committed positions get ``-inf`` → the ``k`` most confident masked positions of each row take their
``x0``, with ``k`` from :func:`num_transfer_tokens`, ranked over the whole row with the prompt at ``-inf`` as
the reference ranks them (``topk`` breaks ties by position in the row it is given). For one group of
equal-length prompts and canvases, with ``stop_at_eos=False``, this commits exactly what LLaDA's reference
commits, step for step, in fp32 and in bf16 (``tests/test_llada_sampler_parity.py``).

What differs, on purpose:

- **Per-sample canvases.** Samples are grouped by canvas length (and block schedule); a group runs as one
  left-padded batch, so a sample with a 32-token canvas never pays for a 1024-token one. Cost is counted per
  sample as the tokens its rows actually ran: padded prompt + canvas, twice with guidance.
- **Stop at EOS.** A sample is done as soon as its canvas holds a committed EOS at position ``e`` and every
  position before ``e`` is committed: the answer is ``canvas[:e]``, positions from ``e`` on are set to EOS,
  and the sample leaves the batch. (A committed EOS with masked positions before it does not stop the
  sample: those positions still need filling.)
- **Extension.** When a canvas is fully committed without an EOS and extension is on, it grows to the next
  power of two (capped at ``max_length``) and the new masked tail is denoised as further blocks, at the same
  steps-per-token rate as the sample's first canvas.
- **Empty passes skip the model.** With more steps than a block has positions, LLaDA runs the extra steps as
  passes that commit nothing. The sampler does not run the model for them, but it still draws the noise those
  passes draw (temperature > 0, random remasking), so a seeded run with ``steps`` above the canvas keeps
  LLaDA's random stream into the next block. Extension tails never get more steps than positions.
- **``confidence_eos_eot_inf`` at temperature > 0.** LLaDA writes the EOS ``-inf`` into the noised logits,
  which its softmax does not read once they are a float64 copy; dlm lowers both EOS and EOT as the option
  says. At temperature 0 (one tensor in the reference) the two agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm.errors import GenerationError
from dlm.generation.budget import (
    BudgetPrediction,
    FixedLength,
    LengthSpec,
    PredictedLength,
    extend_budget,
    length_head_of,
    parse_length,
    predict_budgets,
)
from dlm.generation.rows import Denoiser, canvas_logits, model_device, pack_rows

Remasking = Literal["low_confidence", "random"]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Block = tuple[int, int, int]  # (start, end, steps) in canvas positions
LengthArg = int | str | LengthSpec | Sequence[int] | Callable[[list[int]], int]


@dataclass(frozen=True)
class StepRecord:
    """What one denoising step committed for one sample (canvas positions, ascending, and their tokens)."""

    sample: int
    step: int
    positions: list[int]
    tokens: list[int]


@dataclass(frozen=True)
class GenerationResult:
    """Answers and what they cost, per sample in prompt order.

    ``answers`` are the canvases cut at the first EOS (EOS excluded); ``canvases`` the final canvases;
    ``finished`` is False for a sample whose canvas filled without an EOS at its largest allowed size.
    ``budgets`` are the first canvases, ``canvas_lengths`` the last (after extensions); ``bounds`` the length
    head's bounds when budgets were predicted. ``steps`` counts each sample's denoising steps,
    ``forward_tokens`` the tokens its rows ran through the model (padded prompt + canvas per step, twice with
    guidance), ``canvas_tokens`` the canvas part of that (forward passes × canvas tokens), and
    ``prediction_tokens`` its row in the length-prediction pass. ``forward_passes`` counts model calls,
    prediction included; ``wall_time_s`` is the whole call.
    """

    prompts: list[list[int]]
    answers: list[list[int]]
    canvases: list[list[int]]
    finished: list[bool]
    budgets: list[int]
    canvas_lengths: list[int]
    bounds: list[int] | None
    steps: list[int]
    forward_tokens: list[int]
    canvas_tokens: list[int]
    prediction_tokens: list[int]
    forward_passes: int
    wall_time_s: float

    @property
    def total_forward_tokens(self) -> int:
        """All tokens run through the model: denoising steps plus the prediction pass."""
        return sum(self.forward_tokens) + sum(self.prediction_tokens)


def num_transfer_tokens(mask_counts: Tensor, steps: int) -> Tensor:
    """Tokens to commit per row and step, ``[n, steps]``: ``count // steps`` each, the remainder spread one
    apiece over the first steps (LLaDA's ``get_num_transfer_tokens``)."""
    counts = mask_counts.to(torch.long).reshape(-1, 1)
    plan = (counts // steps).repeat(1, steps)
    remainder = counts % steps
    plan += (torch.arange(steps, device=counts.device)[None, :] < remainder).to(torch.long)
    return plan


def _block_shares(start: int, end: int, steps: int, block_length: int | None) -> list[Block]:
    """Blocks of ``block_length`` (the whole span when None) over ``[start, end)``, each with its proportional
    share of ``steps``, rounded and at least 1 (``steps // n_blocks`` for equal blocks, as in LLaDA)."""
    span = end - start
    size = min(block_length or span, span)
    blocks = []
    for b0 in range(start, end, size):
        b1 = min(b0 + size, end)
        blocks.append((b0, b1, max(1, (steps * (b1 - b0) + span // 2) // span)))
    return blocks


def block_schedule(start: int, end: int, steps: int, block_length: int | None) -> tuple[Block, ...]:
    """Blocks of ``block_length`` (the whole span when None) over canvas positions ``[start, end)``.

    Each block gets its proportional share of ``steps``, rounded, at least 1 and at most its size: equal
    blocks with ``steps`` divisible by their number get ``steps // n_blocks`` each, as in LLaDA; a last block
    that is shorter gets fewer. These are the passes that run the model; :func:`empty_passes` counts the
    share above a block's size.
    """
    return tuple((b0, b1, min(share, b1 - b0)) for b0, b1, share in _block_shares(start, end, steps, block_length))


def empty_passes(start: int, end: int, steps: int, block_length: int | None) -> tuple[int, ...]:
    """Per block of :func:`block_schedule`, the steps above its size: LLaDA's passes that commit nothing."""
    return tuple(max(0, share - (b1 - b0)) for b0, b1, share in _block_shares(start, end, steps, block_length))


@dataclass
class _Sample:
    index: int
    prompt: Tensor
    canvas: Tensor
    budget: int
    steps_per_token: float | None
    schedule: tuple[Block, ...]
    idle: tuple[int, ...]  # per block, the empty passes whose noise is drawn after its real steps
    steps: int = 0
    forward_tokens: int = 0
    canvas_tokens: int = 0
    done: bool = False
    finished: bool = False

    @property
    def key(self) -> tuple[int, tuple[Block, ...], tuple[int, ...]]:
        return int(self.canvas.numel()), self.schedule, self.idle


@dataclass
class _Context:
    model: Denoiser
    mask_id: int
    eos_id: int
    pad_id: int
    temperature: float
    remasking: Remasking
    cfg_scale: float
    generator: torch.Generator | None
    stop_at_eos: bool
    on_step: Callable[[StepRecord], None] | None
    device: torch.device
    shift: bool = False
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eot_id: int | None = None
    confidence_dtype: torch.dtype | None = None
    passes: int = field(default=0)
    vocab: int | None = None  # the logits' width, known after the first model pass


def _noise(n: int, width: int, vocab: int, ctx: _Context) -> tuple[Tensor | None, Tensor | None]:
    """The random numbers one pass draws, in LLaDA's order: Gumbel uniforms ``[n, width, V]`` (float64) when
    ``temperature > 0``, then ``[n, width]`` uniforms as random-remasking confidence."""
    u = None
    if ctx.temperature > 0:
        u = torch.rand((n, width, vocab), dtype=torch.float64, generator=ctx.generator, device=ctx.device)
    r = torch.rand((n, width), generator=ctx.generator, device=ctx.device) if ctx.remasking == "random" else None
    return u, r


def _without(logits: Tensor, ids: list[int]) -> Tensor:
    """``logits`` with the columns ``ids`` at ``-inf`` (a copy: a model may hand out a tensor it keeps)."""
    return logits.index_fill(-1, torch.tensor(ids, device=logits.device), -math.inf)


def _step(samples: list[_Sample], k: Tensor, block_end: int, ctx: _Context) -> None:
    """One denoising step for a group of samples sharing canvas length and block: commit ``k[j]`` tokens."""
    rows = pack_rows([s.prompt for s in samples], [s.canvas for s in samples], ctx.pad_id)
    logits = canvas_logits(ctx.model, rows, cfg_scale=ctx.cfg_scale, mask_id=ctx.mask_id, shift=ctx.shift)
    if ctx.logits_eos_inf:
        logits = _without(logits, [ctx.eos_id])
    ctx.passes += 1
    ctx.vocab = int(logits.shape[-1])
    n, width = rows.input_ids.shape
    start = rows.prompt_width
    u, r = _noise(n, width, ctx.vocab, ctx)
    if u is not None:
        gumbel = (-torch.log(u[:, start:])) ** ctx.temperature
        x0 = (logits.to(torch.float64).exp() / gumbel).argmax(dim=-1)
    else:
        x0 = logits.argmax(dim=-1)
    if r is None:
        scored = logits
        if ctx.confidence_eos_eot_inf:
            scored = _without(logits, [ctx.eos_id] + ([] if ctx.eot_id is None else [ctx.eot_id]))
        if ctx.confidence_dtype is not None:
            scored = scored.to(ctx.confidence_dtype)
        confidence = torch.gather(F.softmax(scored, dim=-1), -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence = r[:, start:]
    canvas = rows.input_ids[:, start:]
    masked = canvas == ctx.mask_id
    masked[:, block_end:] = False
    # The reference ranks whole rows, prompt at -inf: topk's choice among tied confidences depends on the row.
    ranked = torch.full((n, width), -math.inf, dtype=confidence.dtype, device=confidence.device)
    ranked[:, start:] = torch.where(masked, confidence, -math.inf)
    # Never more than the open positions of the block (LLaDA's plans never ask for more; this keeps topk from
    # ever picking a -inf, i.e. already committed, position).
    k = torch.minimum(k.to(ranked.device), masked.sum(dim=1))
    commit = torch.zeros_like(masked)
    for j, kj in enumerate(k.tolist()):
        if kj > 0:
            commit[j, torch.topk(ranked[j], k=kj).indices - start] = True
    canvas = torch.where(commit, x0, canvas)

    guided = 2 if ctx.cfg_scale > 0 else 1
    for j, s in enumerate(samples):
        s.canvas = canvas[j]
        if ctx.on_step is not None:
            positions = commit[j].nonzero().flatten()
            ctx.on_step(StepRecord(s.index, s.steps, positions.tolist(), canvas[j, positions].tolist()))
        s.steps += 1
        s.forward_tokens += width * guided
        s.canvas_tokens += int(canvas.shape[1]) * guided
    if ctx.stop_at_eos:
        _stop_at_eos(samples, canvas, ctx)


def _empty_pass(samples: list[_Sample], vocab: int, ctx: _Context) -> None:
    """A step that commits nothing: no model call, only the noise LLaDA's pass would draw for these rows."""
    width = max(int(s.prompt.numel()) for s in samples) + int(samples[0].canvas.numel())
    _noise(len(samples), width, vocab, ctx)


def _first_eos(canvas: Tensor, eos_id: int) -> Tensor:
    """Index of the first EOS per row, ``C`` where a row has none."""
    is_eos = canvas == eos_id
    first = is_eos.to(torch.int8).argmax(dim=1)
    return torch.where(is_eos.any(dim=1), first, torch.full_like(first, canvas.shape[1]))


def _stop_at_eos(samples: list[_Sample], canvas: Tensor, ctx: _Context) -> None:
    """Mark done every sample whose first committed EOS has only committed positions before it."""
    first = _first_eos(canvas, ctx.eos_id)
    cols = torch.arange(canvas.shape[1], device=canvas.device)[None, :]
    open_before = ((canvas == ctx.mask_id) & (cols < first[:, None])).any(dim=1)
    stop = (first < canvas.shape[1]) & ~open_before
    for j in stop.nonzero().flatten().tolist():
        s = samples[j]
        s.canvas = s.canvas.clone()
        s.canvas[int(first[j]) :] = ctx.eos_id
        s.done = s.finished = True


def _run_group(group: list[_Sample], ctx: _Context) -> None:
    """Run the (shared) block schedule of a group of samples, dropping samples as they finish."""
    for (b0, b1, bsteps), idle in zip(group[0].schedule, group[0].idle):
        live = [s for s in group if not s.done]
        if not live:
            break
        counts = torch.stack([(s.canvas[b0:b1] == ctx.mask_id).sum() for s in live])
        plan = num_transfer_tokens(counts, bsteps + idle)
        for i in range(bsteps + idle):
            rows = [j for j, s in enumerate(live) if not s.done]
            if not rows:
                break
            k = plan[rows, i]
            if int(k.sum()) == 0 and ctx.vocab is not None:
                _empty_pass([live[j] for j in rows], ctx.vocab, ctx)
            else:
                _step([live[j] for j in rows], k, b1, ctx)
    for s in group:
        s.schedule, s.idle = (), ()


def _settle(s: _Sample, *, extend: bool, max_length: int, block_length: int | None, mask_id: int, eos_id: int) -> bool:
    """After a schedule: finish the sample, or extend its canvas (returns True when it needs another group)."""
    if s.done:
        return False
    if bool((s.canvas == eos_id).any()):
        s.done = s.finished = True
        return False
    grown = extend_budget(int(s.canvas.numel()), max_length) if extend else None
    if grown is None:
        s.done = True
        return False
    old = int(s.canvas.numel())
    tail = grown - old
    s.canvas = torch.cat([s.canvas, torch.full((tail,), mask_id, dtype=torch.long, device=s.canvas.device)])
    steps = tail if s.steps_per_token is None else max(1, math.ceil(s.steps_per_token * tail))
    s.schedule = block_schedule(old, grown, steps, block_length)
    s.idle = (0,) * len(s.schedule)  # a tail has no reference run whose random stream it must keep
    return True


def _prompt_tensors(prompts: Sequence[Sequence[int]] | Tensor, prompt_mask: Tensor | None,
                    device: torch.device) -> list[Tensor]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise GenerationError(f"a prompt tensor must be [B, P], got shape {tuple(prompts.shape)}")
        if prompt_mask is not None and prompt_mask.shape != prompts.shape:
            raise GenerationError(f"prompt_mask {tuple(prompt_mask.shape)} must match prompts {tuple(prompts.shape)}")
        rows = list(prompts) if prompt_mask is None else [p[m.to(torch.bool)] for p, m in zip(prompts, prompt_mask)]
        return [r.to(device=device, dtype=torch.long) for r in rows]
    if prompt_mask is not None:
        raise GenerationError("prompt_mask applies to a padded prompt tensor; lists of prompts need no mask")
    return [torch.tensor(list(p), dtype=torch.long, device=device) for p in prompts]


def _check_settings(steps: int | None, block_length: int | None, temperature: float, remasking: str,
                    cfg_scale: float, mask_id: int, eos_id: int, batch_size: int | None, *,
                    confidence_eos_eot_inf: bool, confidence_dtype: torch.dtype | None) -> None:
    problems = []
    if steps is not None and steps < 1:
        problems.append(f"steps must be >= 1, got {steps}")
    if block_length is not None and block_length < 1:
        problems.append(f"block_length must be >= 1, got {block_length}")
    if temperature < 0:
        problems.append(f"temperature must be >= 0, got {temperature}")
    if cfg_scale < 0:
        problems.append(f"cfg_scale must be >= 0, got {cfg_scale}")
    if remasking not in get_args(Remasking):
        problems.append(f"remasking must be one of {', '.join(get_args(Remasking))}, got {remasking!r}")
    if mask_id == eos_id:
        problems.append(f"mask_id and eos_id must differ, both are {mask_id}")
    if batch_size is not None and batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if confidence_eos_eot_inf and remasking == "random":
        problems.append("confidence_eos_eot_inf lowers low_confidence remasking's probabilities, and random "
                        "remasking has none: use remasking low_confidence or drop the option")
    if confidence_dtype is not None and confidence_dtype not in _FLOAT_DTYPES:
        problems.append(f"confidence_dtype must be a floating dtype (or None: the logits' dtype), got {confidence_dtype}")
    if problems:
        raise GenerationError("; ".join(problems))


def _check_fits(model: Denoiser, prompts: list[Tensor], largest_canvas: int) -> None:
    """Refuse a canvas longer than any row the model was built for, and rows its learned positions cannot index.

    A canvas above ``max_seq_len`` is refused for every model: no training row held such an answer, and with
    the default one step per position its cost grows as the canvas squared. A RoPE model may still run a long
    prompt plus a canvas past ``max_seq_len`` (rotary positions extend, as LLaDA's own sampler allows); learned
    positions stop there.
    """
    cfg = getattr(model, "cfg", None)
    limit = getattr(cfg, "max_seq_len", None)
    if limit is None:
        return
    if largest_canvas > limit:
        raise GenerationError(
            f"a canvas of {largest_canvas} positions exceeds this model's max_seq_len {limit}; use a length "
            f"(--length fixed:N) and max_length (--max-length) of at most {limit}"
        )
    if getattr(cfg, "positions", None) == "learned":
        longest = max(p.numel() for p in prompts) + largest_canvas
        if longest > limit:
            raise GenerationError(
                f"prompt + canvas reaches {longest} tokens but this model's learned positions stop at "
                f"{limit}; use shorter prompts or a smaller length/max_length"
            )


def _resolve_budgets(
    length: LengthArg, model: Denoiser, prompts: list[Tensor], *, mask_id: int, pad_id: int,
    batch_size: int | None,
) -> tuple[list[int], BudgetPrediction | None, int | None]:
    """Each sample's first canvas, the prediction (predicted budgets only) and the head's max length."""
    if isinstance(length, (str, FixedLength, PredictedLength)):
        spec = parse_length(length)
        if isinstance(spec, FixedLength):
            return [spec.tokens] * len(prompts), None, None
        head_max = length_head_of(model).cfg.max_len
        _check_fits(model, prompts, head_max)  # the prediction pass reads [prompt, max_len masks]
        prediction = predict_budgets(model, prompts, spec, mask_id=mask_id, pad_id=pad_id, batch_size=batch_size)
        return prediction.budgets, prediction, head_max
    if isinstance(length, int):
        budgets = [length] * len(prompts)
    elif callable(length):
        budgets = [int(length(p.tolist())) for p in prompts]
    else:
        budgets = [int(b) for b in length]
        if len(budgets) != len(prompts):
            raise GenerationError(f"got {len(budgets)} budgets for {len(prompts)} prompts; give one per prompt")
    if any(b < 1 for b in budgets):
        raise GenerationError(f"every canvas needs at least 1 position, got budgets {budgets}")
    return budgets, None, None


@torch.no_grad()
def generate(
    model: Denoiser,
    prompts: Sequence[Sequence[int]] | Tensor,
    *,
    mask_id: int,
    eos_id: int,
    length: LengthArg = 128,
    steps: int | None = None,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: Remasking = "low_confidence",
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    extend: bool | None = None,
    max_length: int | None = None,
    pad_id: int | None = None,
    prompt_mask: Tensor | None = None,
    batch_size: int | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    shift: bool = False,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eot_id: int | None = None,
    confidence_dtype: torch.dtype | None = None,
) -> GenerationResult:
    """Sample an answer for every prompt with LLaDA's diffusion sampler (see the module docstring).

    ``prompts``: lists of token ids, or a ``[B, P]`` tensor (with ``prompt_mask`` marking the real tokens of
    a padded one). ``length``: the canvas per sample — an int, a budget per prompt, a callable from prompt ids
    to a budget, or a spec ``fixed:N`` / ``predicted[:q[:head]]`` (:func:`~dlm.generation.budget.parse_length`;
    predicted budgets run the length head once first). ``steps``: denoising steps for a sample's first canvas
    (default: one per canvas position, LLaDA's recommended setting); extensions keep that steps-per-token rate.
    ``block_length``: semi-autoregressive blocks (default: the whole canvas is one block). ``extend`` (default:
    on for predicted budgets only) grows a canvas that fills without an EOS to the next power of two, up to
    ``max_length`` (default: the head's ``max_len`` for predicted budgets, which it also caps; else the largest
    budget). ``stop_at_eos=False`` runs every schedule to the end, as LLaDA's reference does.
    ``generator`` (or ``seed``) drives the Gumbel and random-remasking noise; ``pad_id`` (default: EOS) fills
    left padding, which attention ignores. ``batch_size`` caps the rows per forward pass; ``on_step`` receives
    a :class:`StepRecord` for every sample at every step. ``shift``: the model was trained with
    ``objective.shift`` (an adapted AR model), so position ``i`` is predicted from the state at ``i - 1``.

    LLaDA's EOS options (its Appendix B.4): ``logits_eos_inf`` sets the EOS logit to ``-inf`` before the argmax,
    so EOS is never proposed; ``confidence_eos_eot_inf`` sets the EOS and ``eot_id`` (end of turn, if given)
    logits to ``-inf`` in the low-confidence softmax only, so a position proposing them has confidence 0 and
    ranks below every position proposing another token. ``confidence_dtype`` computes that softmax in
    another dtype (``torch.float64`` was dlm's earlier default); None keeps the logits' dtype, as LLaDA does.
    """
    started = time.perf_counter()
    _check_settings(steps, block_length, temperature, remasking, cfg_scale, mask_id, eos_id, batch_size,
                    confidence_eos_eot_inf=confidence_eos_eot_inf, confidence_dtype=confidence_dtype)
    device = model_device(model)
    prompt_list = _prompt_tensors(prompts, prompt_mask, device)
    if not prompt_list:
        raise GenerationError("no prompts to generate from")
    pad = eos_id if pad_id is None else pad_id
    plan = _plan_canvases(length, model, prompt_list, extend=extend, max_length=max_length, mask_id=mask_id,
                          pad_id=pad, batch_size=batch_size)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ctx = _Context(model, mask_id, eos_id, pad, temperature, remasking, cfg_scale, generator, stop_at_eos,
                   on_step, device, shift, logits_eos_inf, confidence_eos_eot_inf, eot_id, confidence_dtype)
    samples = _new_samples(prompt_list, plan.budgets, steps, block_length, mask_id)
    _run_queue(samples, ctx, plan, batch_size=batch_size, block_length=block_length)
    return _result(samples, prompt_list, plan, ctx, started)


@dataclass(frozen=True)
class _CanvasPlan:
    """Each sample's first canvas, the prediction that chose them (predicted budgets only), whether a canvas
    that fills without an EOS extends, and the largest canvas allowed."""

    budgets: list[int]
    prediction: BudgetPrediction | None
    extend: bool
    cap: int


def _plan_canvases(
    length: LengthArg, model: Denoiser, prompts: list[Tensor], *, extend: bool | None, max_length: int | None,
    mask_id: int, pad_id: int, batch_size: int | None,
) -> _CanvasPlan:
    """Resolve the budgets, the extension rule and the cap (see :func:`generate`), refusing canvases the model
    cannot run before any denoising starts."""
    budgets, prediction, head_max = _resolve_budgets(
        length, model, prompts, mask_id=mask_id, pad_id=pad_id, batch_size=batch_size
    )
    extending = (prediction is not None) if extend is None else extend
    cap = max_length or head_max or max(budgets)
    if prediction is not None:
        budgets = [min(b, cap) for b in budgets]  # an explicit max_length also caps the predicted budgets
    if extending and any(b > cap for b in budgets):
        raise GenerationError(f"budgets {budgets} exceed max_length {cap}; raise max_length or lower the budgets")
    _check_fits(model, prompts, max(cap if extending else 0, *budgets))
    return _CanvasPlan(budgets, prediction, extending, cap)


def _new_samples(prompts: list[Tensor], budgets: list[int], steps: int | None, block_length: int | None,
                 mask_id: int) -> list[_Sample]:
    """One fully masked canvas per prompt with its first schedule (``steps`` or one step per position)."""
    samples = []
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        n_steps = budget if steps is None else steps
        samples.append(_Sample(
            index=i, prompt=prompt, canvas=torch.full((budget,), mask_id, dtype=torch.long, device=prompt.device),
            budget=budget, steps_per_token=None if steps is None else steps / budget,
            schedule=block_schedule(0, budget, n_steps, block_length),
            idle=empty_passes(0, budget, n_steps, block_length),
        ))
    return samples


def _run_queue(samples: list[_Sample], ctx: _Context, plan: _CanvasPlan, *, batch_size: int | None,
               block_length: int | None) -> None:
    """Run samples in groups of equal canvas and schedule, smallest key first, until every sample is settled;
    an extended sample rejoins the queue under its new key."""
    queue: dict[tuple[int, tuple[Block, ...], tuple[int, ...]], list[_Sample]] = {}
    for s in samples:
        queue.setdefault(s.key, []).append(s)
    while queue:
        group = queue.pop(min(queue))
        group.sort(key=lambda s: s.prompt.numel())  # stable: similar prompt lengths share a batch, less padding
        size = batch_size or len(group)
        for start in range(0, len(group), size):
            _run_group(group[start : start + size], ctx)
        for s in group:
            if _settle(s, extend=plan.extend, max_length=plan.cap, block_length=block_length, mask_id=ctx.mask_id,
                       eos_id=ctx.eos_id):
                queue.setdefault(s.key, []).append(s)


def _result(samples: list[_Sample], prompts: list[Tensor], plan: _CanvasPlan, ctx: _Context,
            started: float) -> GenerationResult:
    """The answers (canvases cut at the first EOS) and each sample's cost, prediction pass included."""
    prediction = plan.prediction
    canvases = [s.canvas.tolist() for s in samples]
    answers = [c[: c.index(ctx.eos_id)] if ctx.eos_id in c else c for c in canvases]
    return GenerationResult(
        prompts=[p.tolist() for p in prompts],
        answers=answers,
        canvases=canvases,
        finished=[s.finished for s in samples],
        budgets=plan.budgets,
        canvas_lengths=[len(c) for c in canvases],
        bounds=None if prediction is None else prediction.bounds,
        steps=[s.steps for s in samples],
        forward_tokens=[s.forward_tokens for s in samples],
        canvas_tokens=[s.canvas_tokens for s in samples],
        prediction_tokens=[0] * len(samples) if prediction is None else prediction.forward_tokens,
        forward_passes=ctx.passes + (0 if prediction is None else prediction.forward_passes),
        wall_time_s=time.perf_counter() - started,
    )
