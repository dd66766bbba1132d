"""Held-out evaluation: the diffusion NELBO in nats per token.

For every held-out row the loss is averaged over ``samples`` noise levels stratified over (0, 1) —
``s_k = (k + u) / samples`` with one uniform ``u`` per row — which estimates the integral with far less
variance than independent draws, so evals at different steps are comparable.

Two estimators of the same bound (LLaDA, eqs. 3 and 6): ``t`` masks each token with ``p_mask(t)`` and weights
the masked ones by ``1 / p_mask``, as training does; ``count`` masks exactly ``l = ceil(s * n)`` of a row's
``n`` tokens and weights them by ``n / l``. Both have the same expectation, but under ``t`` a draw at
``t ~ eps`` puts a weight near ``1 / eps`` on the one or two tokens it masks, so a 128-row estimate moves by a
tenth of a nat with which model is confidently wrong on them; ``count`` weights a token by at most ``n``
(one masked token is scored as itself), which is why LLaDA evaluates likelihoods with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, ContextManager, Literal

import torch
from torch import Tensor, nn

from dlm.training.noise import NoiseSchedule
from dlm.training.objective import (
    LossParts,
    NoisedBatch,
    diffusion_loss,
    forward_process,
    mask_generator,
    subsample_scored,
)


@torch.no_grad()
def evaluate_nelbo(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    mask_id: int,
    *,
    eps: float = 1e-3,
    schedule: NoiseSchedule | None = None,
    samples: int,
    seed: int,
    device: torch.device,
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    chunk_size: int = 4096,
    loss_fn: Callable[[NoisedBatch, int], LossParts] | None = None,
    sft: bool = False,
    shift: bool = False,
    estimator: Literal["count", "t"] = "count",
    max_scored_per_row: int | None = None,
) -> float:
    """NELBO (nats/token) of the batches: sum of 1/p_mask-weighted masked CE over the tokens that can be masked.

    With ``sft`` the prompt is context and only answer tokens (EOS padding included) are scored, so the figure
    is nats per answer token, comparable with the unigram baseline of the same tokens; under ``shift``
    position 0 has no predictor and is context too.

    ``loss_fn`` (default: :func:`diffusion_loss` on ``model``) lets an engine run the loss itself: ZeRO-3 can
    gather the partitioned LM head only inside its module's forward (``Engine.loss``).
    ``schedule`` is training's :class:`~dlm.training.noise.NoiseSchedule` (its ``p_mask`` and weights; the levels
    are the stratified grid above); without it, the linear schedule with ``eps``.
    ``estimator``: ``count`` (default) or ``t``, see the module docstring. ``max_scored_per_row`` scores a
    uniform sample of at most that many masked positions per row, reweighted (:func:`subsample_scored`): the
    same expectation for a fraction of the LM head's cost on heavily masked rows.
    """
    if estimator not in ("count", "t"):
        raise ValueError(f"estimator must be 'count' or 't', got {estimator!r}")
    schedule = schedule or NoiseSchedule(eps)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for index, batch in enumerate(batches):
        gen = mask_generator(seed, -1, 0, index)  # step -1: never collides with a training draw
        input_ids = batch["input_ids"].to(device)
        doc_ids = batch.get("doc_ids")
        doc_ids = doc_ids.to(device) if doc_ids is not None else None
        keep = batch["prompt_mask"].to(device).bool() if sft else torch.zeros_like(input_ids, dtype=torch.bool)
        if shift:
            keep[:, 0] = True
        u = torch.rand(input_ids.shape[0], generator=gen)
        for k in range(samples):
            level = (k + u) / samples
            noised = forward_process(
                input_ids, mask_id, gen, schedule=schedule, doc_ids=doc_ids, keep=keep,
                t=level if estimator == "t" else None, mask_fraction=level if estimator == "count" else None,
            )
            noised.shift = shift
            if max_scored_per_row is not None:
                subsample_scored(noised, max_scored_per_row, gen)
            with autocast():
                parts = loss_fn(noised, chunk_size) if loss_fn else diffusion_loss(model, noised, chunk_size)
            total += float(parts.loss_sum)
            tokens += int((~keep).sum())
    model.train(was_training)
    return total / max(tokens, 1)
