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

from dlm.kernels import masked_lm_loss

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
) -> NoisedBatch:
    """Mask a clean batch. With ``prompt_mask`` (SFT) prompt tokens are never masked.

    All random numbers come from ``generator`` on the CPU, so the draw is identical on every device.
    ``t`` fixes the noise levels instead of drawing them (stratified evaluation). ``stratified`` draws the
    batch's t as ``(i + u) / B`` with one shared ``u`` (the low-discrepancy sampler of MDLM): each t is still
    uniform, so the loss stays unbiased, but a batch always spans the whole noise range, which lowers the
    variance that the ``1 / p_mask`` weights put on the gradient.
    ``random_length_prob`` is LLaDA's trick of training on a random-length prefix for a small share of
    pretraining batches, so the model also sees sequences shorter than the packing length.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if prompt_mask is None and random_length_prob > 0.0:
        if torch.rand((), generator=generator).item() < random_length_prob:
            length = int(torch.randint(1, length + 1, (), generator=generator).item())
            input_ids = input_ids[:, :length]
            doc_ids = doc_ids[:, :length] if doc_ids is not None else None
    if t is not None:
        t = t.detach().float().cpu()
    elif stratified:
        t = (torch.arange(batch, dtype=torch.float32) + torch.rand((), generator=generator)) / batch
    else:
        t = torch.rand(batch, generator=generator)
    p_mask = (1.0 - eps) * t + eps
    draws = torch.rand(batch, length, generator=generator)
    masked = (draws < p_mask[:, None]).to(device)
    p_mask, t = p_mask.to(device), t.to(device)
    if prompt_mask is not None:
        masked &= ~prompt_mask.bool()
        answer_len = (~prompt_mask.bool()).sum(dim=1).clamp(min=1).to(p_mask.dtype)
        weights = 1.0 / (p_mask * answer_len)
        normalizer = float(batch)
    else:
        weights = 1.0 / p_mask
        normalizer = float(batch * length)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return NoisedBatch(input_ids, noisy, masked, p_mask, t, weights, normalizer, doc_ids)


@dataclass
class LossParts:
    """The un-normalised loss of one micro-batch and the per-t-bucket pieces that are logged."""

    loss_sum: Tensor  # scalar, differentiable: sum over masked tokens of weight * CE
    bucket_sums: Tensor  # [len(T_BUCKETS)] detached loss sums per noise bucket
    bucket_counts: Tensor  # [len(T_BUCKETS)] normalizer share per bucket (tokens for pretrain, rows for SFT)
    num_masked: int


def t_bucket(t: Tensor) -> Tensor:
    """Index of each t's bucket in :data:`T_BUCKETS`."""
    edges = torch.tensor(T_BUCKETS[:-1], device=t.device, dtype=t.dtype)
    return torch.bucketize(t, edges, right=True)


def diffusion_loss(model: nn.Module, noised: NoisedBatch, chunk_size: int = 4096) -> LossParts:
    """Run the model on the noisy batch and score only the masked positions.

    The model returns hidden states; only the masked rows are gathered and sent through the LM head, in
    chunks, so full ``[B, L, V]`` logits never exist. The rows are scored bucket by bucket of ``t`` so the
    per-bucket losses come for free.
    """
    hidden = model(noised.noisy_ids, doc_ids=noised.doc_ids)
    rows, cols = noised.masked.nonzero(as_tuple=True)
    weight, bias = model.lm_head_weight, model.lm_head_bias
    buckets = t_bucket(noised.t)
    row_bucket = buckets[rows]
    per_row_norm = noised.normalizer / noised.input_ids.shape[0]
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    n = len(T_BUCKETS)
    bucket_sums = torch.zeros(n, device=hidden.device)
    bucket_counts = torch.bincount(buckets, minlength=n).to(hidden.device, torch.float32) * per_row_norm
    for b in range(n):
        sel = row_bucket == b
        if not bool(sel.any()) and b > 0:
            continue
        r, c = rows[sel], cols[sel]
        part = masked_lm_loss(
            hidden[r, c], weight, noised.input_ids[r, c], noised.weights[r].float(), bias=bias, chunk_size=chunk_size
        )
        loss_sum = loss_sum + part
        bucket_sums[b] = part.detach()
    return LossParts(loss_sum, bucket_sums, bucket_counts, int(rows.numel()))
