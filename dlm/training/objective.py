"""The masked-diffusion objectives of LLaDA: the forward (masking) process and the weighted denoising loss.

Pretraining: draw ``t ~ U(0, 1)`` per sequence, mask each token independently with
``p_mask = (1 - eps) t + eps`` and score the masked tokens by cross-entropy divided by ``p_mask``; the sum over a
batch divided by ``B * L`` is an upper bound on the negative log-likelihood per token (the NELBO).
SFT: the prompt is never masked, the answer (including its EOS padding) is, and each sequence's loss is
normalised by its answer length so short and long answers weigh the same.

The loss is split in two phases so the training loop can normalise by the *global* token count of a whole
optimizer step (all micro-batches, later all ranks) before any backward runs: :func:`forward_process` draws
the noise and knows the normaliser; :func:`diffusion_loss` runs the model and returns the un-normalised sum.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlm.kernels import annealed_mask, masked_lm_loss_rows
from dlm.modeling.length_head import length_head_terms
from dlm.training.config import ObjectiveSection
from dlm.training.noise import NoiseSchedule

T_BUCKETS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
"""Upper edges of the noise-level buckets the loss is reported by (low t = easy, almost nothing masked)."""


def mask_generator(seed: int, step: int, rank: int = 0, micro_step: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, rank, micro_step).

    A resumed run therefore draws exactly the masks the uninterrupted run drew, whatever happened to the
    global RNG state in between.
    """
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro_step}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


@dataclass
class LengthTargets:
    """What the length head is trained on in one micro-batch: the rows seen in the generation-start state.

    ``rows`` [B] bool selects them; for each, the answer starts at ``answer_start`` and is ``answer_length``
    tokens long; ``prompt_mask`` [B, L] marks the context the bucket head pools. ``eos_norm`` and
    ``bucket_norm`` are the *global* numbers of scored positions and rows of the whole optimizer step (all
    micro-batches, all ranks), set by the loop before any forward runs, so the head's loss is one mean over the
    step however it is split, like the diffusion loss.
    """

    rows: Tensor
    answer_start: Tensor
    answer_length: Tensor
    prompt_mask: Tensor
    weight: float
    eos_norm: float | Tensor = 1.0
    bucket_norm: float | Tensor = 1.0

    @property
    def num_rows(self) -> int:
        return int(self.rows.sum().item())

    def num_positions(self, seq_len: int) -> int:
        """EOS-head positions scored: every position from the answer start to the row's end."""
        return int((seq_len - self.answer_start[self.rows]).clamp(min=0).sum().item())


@dataclass
class NoisedBatch:
    """One micro-batch after the forward process, plus what its loss will be divided by."""

    input_ids: Tensor  # [B, L] clean tokens (possibly cut to a random length)
    noisy_ids: Tensor  # [B, L] with masked positions replaced by the mask id
    masked: Tensor  # [B, L] bool
    p_mask: Tensor  # [B] masking probability of each sequence
    t: Tensor  # [B] the drawn noise level
    weights: Tensor  # [B] per-token loss weight of each sequence (1/p_mask, or 1/(p_mask * answer_len))
    normalizer: float  # B * L for pretraining, B for SFT: the micro-batch's share of the global denominator
    doc_ids: Tensor | None = None
    shift: bool = False  # position i predicts token i + 1 (AR-adapted models, DiffuGPT / DiffuLLaMA)
    attn_mask: Tensor | None = None  # bool [L, L] allowed keys (attention-mask annealing), None = full
    length: LengthTargets | None = None
    scored: Tensor | None = None  # [B, L] bool: the masked positions the LM head scores (None: all of them)
    score_scale: Tensor | None = None  # [B] masked / scored per row, so the subsampled sum stays unbiased

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def forward_process(
    input_ids: Tensor,
    mask_id: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    prompt_mask: Tensor | None = None,
    doc_ids: Tensor | None = None,
    random_length_prob: float = 0.0,
    t: Tensor | None = None,
    stratified: bool = False,
    *,
    keep: Tensor | None = None,
    full_rows: Tensor | None = None,
    pad_region: Tensor | None = None,
    pad_share: float = 1.0,
    mask_fraction: Tensor | None = None,
    schedule: NoiseSchedule | None = None,
) -> NoisedBatch:
    """Mask a clean batch. With ``prompt_mask`` (SFT) prompt tokens are never masked.

    All random numbers come from ``generator`` on the CPU, so the draw is identical on every device.
    ``schedule`` (:class:`~dlm.training.noise.NoiseSchedule`) draws ``t``, maps it to ``p_mask`` and weights
    the masked tokens; without it ``eps`` and ``stratified`` describe the linear schedule to use.
    ``t`` fixes the noise levels instead of drawing them (stratified evaluation).
    ``random_length_prob`` is LLaDA's trick of training on a random-length prefix for a small share of
    pretraining batches, so the model also sees sequences shorter than the packing length.

    ``keep`` [B, L] marks positions that are never masked without changing the pretraining normalisation
    (a document prefix given as context; position 0 under ``shift``). ``full_rows`` [B] puts those rows at
    t = 1, the state generation starts from. ``pad_region`` [B, L] marks the EOS padding after a row's first
    EOS: each of its tokens is maskable only with probability ``pad_share`` (pad-share annealing; otherwise
    a short document's row is mostly the trivial job of predicting EOS).

    ``mask_fraction`` [B] in (0, 1] masks *exactly* ``l = ceil(fraction * n)`` of a row's ``n`` maskable
    tokens, drawn uniformly, and weights them by ``n / l``: LLaDA's count form of the same bound (its
    likelihood evaluation, l ~ U{1..n}). Its largest weight is ``n`` where the ``1 / p_mask`` form reaches
    ``1 / eps``, so a held-out estimate no longer hangs on the few tokens a low-t draw happens to mask.
    """
    schedule = schedule or NoiseSchedule(eps, "stratified" if stratified else "uniform")
    batch, length = input_ids.shape
    device = input_ids.device
    # rows with a structure (prompt, answer, padding) keep their full length: a cut would break it
    structured = prompt_mask is not None or full_rows is not None or pad_region is not None
    if not structured and random_length_prob > 0.0:
        if torch.rand((), generator=generator).item() < random_length_prob:
            length = int(torch.randint(1, length + 1, (), generator=generator).item())
            input_ids = input_ids[:, :length]
            doc_ids = doc_ids[:, :length] if doc_ids is not None else None
            keep = keep[:, :length] if keep is not None else None
    if mask_fraction is not None:
        if t is not None or stratified or full_rows is not None or pad_region is not None:
            raise ValueError("mask_fraction fixes the masked count: it takes no t, stratified, full_rows, pad_region")
        masked, p_mask = _exact_count_mask(mask_fraction, generator, prompt_mask, keep, batch, length)
        t, masked = p_mask.clone(), masked.to(device)
    else:
        t = t.detach().float().cpu() if t is not None else schedule.sample_t(batch, generator)
        if full_rows is not None:
            t = torch.where(full_rows.cpu(), torch.ones_like(t), t)
        p_mask = schedule.p_mask(t)
        if full_rows is not None:
            p_mask = torch.where(full_rows.cpu(), torch.ones_like(p_mask), p_mask)
        draws = torch.rand(batch, length, generator=generator)
        masked = (draws < p_mask[:, None]).to(device)
        if pad_region is not None and pad_share < 1.0:
            pad_draws = torch.rand(batch, length, generator=generator).to(device)
            masked &= ~pad_region.bool() | (pad_draws < pad_share)
    if keep is not None:
        masked &= ~keep.bool()
    p_mask, t = p_mask.to(device), t.to(device)
    if prompt_mask is not None:
        masked &= ~prompt_mask.bool()
        answer_len = (~prompt_mask.bool()).sum(dim=1).clamp(min=1).to(p_mask.dtype)
        weights = schedule.weight(p_mask, answer_len)
        normalizer = float(batch)
    else:
        weights = schedule.weight(p_mask)
        normalizer = float(batch * length)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return NoisedBatch(input_ids, noisy, masked, p_mask, t, weights, normalizer, doc_ids)


def _exact_count_mask(
    fraction: Tensor,
    generator: torch.Generator,
    prompt_mask: Tensor | None,
    keep: Tensor | None,
    batch: int,
    length: int,
) -> tuple[Tensor, Tensor]:
    """The count form's draw: ``ceil(fraction * n)`` of each row's ``n`` maskable tokens, uniformly, as a CPU
    ``[B, L]`` mask, and the share ``l / n`` it masked (the ``p_mask`` whose inverse is the ``n / l`` weight)."""
    fixed = torch.zeros(batch, length, dtype=torch.bool)
    for never in (prompt_mask, keep):
        if never is not None:
            fixed |= never.bool().cpu()
    maskable = (~fixed).sum(dim=1)
    count = torch.ceil(fraction.detach().float().cpu().clamp(0.0, 1.0) * maskable).clamp(min=1)
    count = torch.minimum(count, maskable).long()
    keys = torch.rand(batch, length, generator=generator).masked_fill(fixed, 2.0)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return (ranks < count[:, None]) & ~fixed, count.float() / maskable.clamp(min=1).float()


LENGTH_STATS: tuple[str, ...] = ("eos_bce_sum", "eos_correct", "eos_count", "bucket_ce_sum", "bucket_correct",
                                  "bucket_count")
"""The length head's logged sums, in the order of :attr:`LossParts.length_stats`."""


def subsample_scored(noised: NoisedBatch, max_per_row: int, generator: torch.Generator) -> None:
    """Score at most ``max_per_row`` of each row's masked positions, drawn uniformly, each weighted by
    ``masked / scored``: an unbiased estimate of the same loss at a fraction of the LM-head cost.

    Every masked position still enters the model as a mask token; only the head's work shrinks. Rows at low t
    (few masks, the most informative about context) keep every position; heavily masked rows, whose tokens
    are mostly predictable from frequencies alone, are the ones subsampled. On a CPU, where the head over a
    50k vocabulary is most of a small model's step, this buys several times more steps per second.
    """
    masked = noised.masked
    keys = torch.rand(masked.shape, generator=generator).to(masked.device).masked_fill(~masked, 2.0)
    k = min(max_per_row, masked.shape[1])
    threshold = keys.kthvalue(k, dim=1, keepdim=True).values
    noised.scored = masked & (keys <= threshold)
    counts = masked.sum(dim=1).float()
    noised.score_scale = counts / noised.scored.sum(dim=1).float().clamp(min=1.0)


def generation_canvas(answer_start: Tensor, answer_length: Tensor, seq_len: int, share: float,
                      generator: torch.Generator, *, exclude: Tensor | None = None) -> Tensor:
    """Positions outside the canvas generation would give each row: ``[B, L]`` bool, True past the canvas.

    Training rows are padded to the full ``seq_len``, but generation gives an answer a canvas of a power of
    two at or above its length plus its EOS, doubled when it fills without one. A model that only ever saw
    full rows learns where the row ends, and on a tight canvas it misplaces the EOS. So a share ``share`` of
    the rows (never those in ``exclude``, e.g. the length head's rows, which are read over the full canvas)
    gets a canvas of ``next_pow2(answer_length + 1)`` times 1, 2 or 4 (uniformly), when that is shorter than
    the room the row has; its later positions become a separate document and are never masked or scored.
    """
    b = answer_length.shape[0]
    device = answer_length.device
    need = (answer_length + 1).clamp(min=1).float()
    tight = torch.exp2(torch.ceil(torch.log2(need))).long()
    factor = torch.exp2(torch.randint(0, 3, (b,), generator=generator).float()).long().to(device)
    chosen = (torch.rand(b, generator=generator) < share).to(device)
    if exclude is not None:
        chosen &= ~exclude.to(device)
    end = answer_start + tight * factor
    end = torch.where(chosen & (end < seq_len), end, torch.full_like(end, seq_len))
    return torch.arange(seq_len, device=device)[None, :] >= end[:, None]


def noise_batch(
    batch: dict[str, Tensor],
    objective: ObjectiveSection,
    mask_id: int,
    generator: torch.Generator,
    *,
    train_length_head: bool = False,
    pad_share: float = 1.0,
    attention_ratio: float = 1.0,
) -> NoisedBatch:
    """The training forward process of one micro-batch as ``objective`` configures it.

    On top of :func:`forward_process`: SFT reads the batch's ``prompt_mask``; ``shift`` never masks position
    0 (nothing predicts it); with ``train_length_head`` a share ``objective.length_rows`` of the rows is put in
    the state generation starts from (answer region fully masked, t = 1) and becomes the length head's
    targets. SFT rows have their prompt as context; ``[text, EOS, pad …]`` rows get a random prefix of their
    document as context, so the head learns to bound the rest of a document from its start. Pad-share
    annealing and attention-mask annealing take their step-dependent values from the caller. Every random
    number comes from ``generator``, so the draw stays a pure function of (seed, step, micro-batch slot).
    """
    input_ids = batch["input_ids"]
    b, seq_len = input_ids.shape
    device = input_ids.device
    positions = torch.arange(seq_len, device=device)[None, :]
    prompt_mask = batch["prompt_mask"].bool() if objective.kind == "sft" else None
    answer_length = batch.get("answer_length")
    keep: Tensor | None = None
    if objective.shift:
        keep = (positions == 0).expand(b, seq_len)
    full_rows: Tensor | None = None
    length: LengthTargets | None = None
    if train_length_head:
        if answer_length is None:
            raise ValueError("the length head needs rows with answer lengths: data.format rows or sft")
        chosen = torch.randperm(b, generator=generator)[: max(1, round(objective.length_rows * b))]
        full_rows = torch.zeros(b, dtype=torch.bool)
        full_rows[chosen] = True
        full_rows = full_rows.to(device)
        if prompt_mask is not None:
            context, start, target_length = prompt_mask, prompt_mask.sum(dim=1), answer_length
        else:
            room = answer_length.clamp(max=seq_len - 1).float()
            cut = (torch.rand(b, generator=generator).to(device) * room).long()
            start = torch.where(full_rows, cut, torch.zeros_like(cut))
            context = positions < start[:, None]
            keep = context if keep is None else keep | context
            target_length = answer_length - start
        length = LengthTargets(full_rows, start, target_length, context, objective.length_loss_weight)
    pad_region: Tensor | None = None
    answer_start: Tensor | None = None
    if answer_length is not None:
        answer_start = prompt_mask.sum(dim=1) if prompt_mask is not None else torch.zeros_like(answer_length)
    if answer_start is not None and pad_share < 1.0:
        pad_region = positions > (answer_start + answer_length)[:, None]  # the first EOS itself is a target
    doc_ids = batch.get("doc_ids")
    if objective.canvas_share > 0.0:
        if answer_start is None:
            raise ValueError("objective.canvas_share needs rows with answer lengths: data.format rows or sft")
        outside = generation_canvas(answer_start, answer_length, seq_len, objective.canvas_share, generator,
                                    exclude=full_rows)
        doc_ids = outside.long() if doc_ids is None else doc_ids + outside.long()
        if prompt_mask is not None:
            prompt_mask = prompt_mask | outside  # never masked, and out of the row's answer-length normaliser
        else:
            keep = outside if keep is None else keep | outside
    noised = forward_process(
        input_ids, mask_id, generator, prompt_mask=prompt_mask, doc_ids=doc_ids,
        random_length_prob=objective.random_length_prob, keep=keep, full_rows=full_rows, pad_region=pad_region,
        pad_share=pad_share, schedule=NoiseSchedule.from_objective(objective),
    )
    noised.shift, noised.length = objective.shift, length
    if objective.max_scored_per_row is not None:
        subsample_scored(noised, objective.max_scored_per_row, generator)
    if attention_ratio < 1.0:
        noised.attn_mask = annealed_mask(noised.input_ids.shape[1], attention_ratio, generator=generator).to(device)
    return noised


@dataclass
class LossParts:
    """The un-normalised loss of one micro-batch and the per-t-bucket pieces that are logged."""

    loss_sum: Tensor  # scalar, differentiable: sum over masked tokens of weight * CE
    bucket_sums: Tensor  # [len(T_BUCKETS)] detached loss sums per noise bucket
    bucket_counts: Tensor  # [len(T_BUCKETS)] normalizer share per bucket (tokens for pretrain, rows for SFT)
    num_masked: int
    # differentiable, already weighted and divided by the step's global counts (0 without length targets)
    length_loss: Tensor | None = None
    length_stats: Tensor | None = None  # [len(LENGTH_STATS)] detached sums

    def objective(self, denominator: float | Tensor) -> Tensor:
        """What backward runs on: the diffusion loss over the step's normaliser plus the length loss."""
        total = self.loss_sum / denominator
        return total if self.length_loss is None else total + self.length_loss


def t_bucket(t: Tensor) -> Tensor:
    """Index of each t's bucket in :data:`T_BUCKETS`."""
    edges = torch.tensor(T_BUCKETS[:-1], device=t.device, dtype=t.dtype)
    return torch.bucketize(t, edges, right=True)


def diffusion_loss(model: nn.Module, noised: NoisedBatch, chunk_size: int = 4096) -> LossParts:
    """Run the model on the noisy batch and score only the masked positions (plus the length head, if asked).

    The model returns hidden states; only the masked rows are gathered and sent through the LM head, in
    chunks, so full ``[B, L, V]`` logits never exist. The rows are scored bucket by bucket of ``t`` so the
    per-bucket losses come for free. Under ``shift`` the token at position ``c`` is predicted from the hidden
    state at ``c - 1``, as the AR model being adapted was trained to. The length head reads the same hidden
    states, so its joint training costs no extra forward pass.
    """
    hidden = model(noised.noisy_ids, doc_ids=noised.doc_ids, attn_mask=noised.attn_mask)
    rows, cols = (noised.masked if noised.scored is None else noised.scored).nonzero(as_tuple=True)
    token_weights = noised.weights if noised.score_scale is None else noised.weights * noised.score_scale
    source_cols = cols - 1 if noised.shift else cols
    weight, bias = model.lm_head_weight, model.lm_head_bias
    buckets = t_bucket(noised.t)
    row_bucket = buckets[rows]
    per_row_norm = noised.normalizer / noised.input_ids.shape[0]
    n = len(T_BUCKETS)
    bucket_counts = torch.bincount(buckets, minlength=n).to(hidden.device, torch.float32) * per_row_norm
    row_weights = token_weights[rows].float()
    loss_sum, row_ce = masked_lm_loss_rows(
        hidden[rows, source_cols], weight, noised.input_ids[rows, cols], row_weights, bias=bias,
        chunk_size=chunk_size,
    )
    bucket_sums = torch.zeros(n, device=hidden.device).index_add_(0, row_bucket, row_ce * row_weights.detach())
    parts = LossParts(loss_sum, bucket_sums, bucket_counts, int(rows.numel()))
    if noised.length is not None:
        parts.length_loss, parts.length_stats = _length_loss(model, hidden, noised.length)
    return parts


def _length_loss(model: nn.Module, hidden: Tensor, targets: LengthTargets) -> tuple[Tensor, Tensor]:
    """The length head's joint loss on the generation-start rows, as this micro-batch's share of the step."""
    head = getattr(model, "length_head", None)
    if head is None:
        raise ValueError("length targets were drawn but the model has no length head (model.length_head)")
    rows = targets.rows
    if not bool(rows.any()):
        # keep the head in the graph so that every rank's backward reaches the same parameters
        return sum(p.sum() for p in head.parameters()) * 0.0, torch.zeros(len(LENGTH_STATS), device=hidden.device)
    out = head(hidden[rows], targets.prompt_mask[rows])
    terms = length_head_terms(out, targets.answer_start[rows], targets.answer_length[rows])
    loss = targets.weight * (terms.eos_bce_sum / targets.eos_norm + terms.bucket_ce_sum / targets.bucket_norm)
    return loss, terms.stats()
