"""Held-out evaluation: the diffusion NELBO in nats per token.

For every held-out row the loss is averaged over ``samples`` noise levels stratified over (0, 1) —
``t_k = (k + u) / samples`` with one uniform ``u`` per row — which estimates the integral over t with far
less variance than independent draws, so evals at different steps are comparable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from dlm.training.objective import LossParts, NoisedBatch, diffusion_loss, forward_process, mask_generator


@torch.no_grad()
def evaluate_nelbo(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    mask_id: int,
    *,
    eps: float,
    samples: int,
    seed: int,
    device: torch.device,
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    chunk_size: int = 4096,
    loss_fn: Callable[[NoisedBatch, int], LossParts] | None = None,
    sft: bool = False,
    shift: bool = False,
) -> float:
    """NELBO (nats/token) of the batches: sum of 1/p_mask-weighted masked CE over the tokens that can be masked.

    With ``sft`` the prompt is context and only answer tokens (EOS padding included) are scored, so the figure
    is nats per answer token, comparable with the unigram baseline of the same tokens; under ``shift``
    position 0 has no predictor and is context too.

    ``loss_fn`` (default: :func:`diffusion_loss` on ``model``) lets an engine run the loss itself: ZeRO-3 can
    gather the partitioned LM head only inside its module's forward (``Engine.loss``).
    """
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
            noised = forward_process(
                input_ids, mask_id, gen, eps=eps, doc_ids=doc_ids, t=(k + u) / samples, keep=keep
            )
            noised.shift = shift
            with autocast():
                parts = loss_fn(noised, chunk_size) if loss_fn else diffusion_loss(model, noised, chunk_size)
            total += float(parts.loss_sum)
            tokens += int((~keep).sum())
    model.train(was_training)
    return total / max(tokens, 1)
