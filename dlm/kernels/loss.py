"""Fused LM-head projection + weighted cross-entropy over the masked positions only.

With a 126k vocabulary the logits of a whole batch (``[B·T, V]`` in fp32, plus their softmax and gradient)
would dwarf the activations of an 8B model. Callers gather the masked rows first; this kernel then walks
them in chunks, and for each chunk computes logits, loss and all gradients at once, so at most one chunk of
logits is alive at any time (the idea of Liger's fused linear cross-entropy). The backward pass only scales
the gradients computed in the forward pass.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_off(device_type: str) -> AbstractContextManager[object]:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        token_weights: Tensor,
        chunk_size: int,
    ) -> Tensor:
        n_rows = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_tw = ctx.needs_input_grad[4]
        need_grads = need_h or need_w or need_b

        # Under autocast the matmuls run in the autocast dtype, as nn.Linear would; otherwise in the inputs'.
        device_type = hidden.device.type
        compute_dtype = _autocast_dtype(device_type) or torch.promote_types(hidden.dtype, weight.dtype)
        with _autocast_off(device_type):
            w = weight.to(compute_dtype)
            bias32 = bias.float() if bias is not None else None
            # fp32 accumulators: summing many bf16 chunk contributions would lose the small ones. For a bf16
            # head this costs one fp32 [V, d] buffer during the forward pass; the saved gradient is cast back.
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_h else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            row_losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device) if need_tw else None

            for start in range(0, n_rows, chunk_size):
                end = min(start + chunk_size, n_rows)
                h = hidden[start:end].to(compute_dtype)
                tgt = targets[start:end]
                tw = token_weights[start:end].float()
                logits = (h @ w.T).float()
                if bias32 is not None:
                    logits += bias32
                lse = torch.logsumexp(logits, dim=-1)
                ce = lse - logits.gather(1, tgt[:, None]).squeeze(1)
                loss += (ce * tw).sum()
                if row_losses is not None:
                    row_losses[start:end] = ce
                if not need_grads:
                    continue
                # d(ce)/d(logits) = softmax - one_hot, built in place over the logits buffer.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(end - start, device=tgt.device), tgt] -= 1.0
                grad_logits *= tw[:, None]
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(dim=0)
                g = grad_logits.to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = g @ w
                if grad_weight is not None:
                    grad_weight += g.T @ h

        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            row_losses,
        )
        ctx.token_weights_dtype = token_weights.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias, row_losses = ctx.saved_tensors
        scale = grad_output.detach()
        return (
            grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
            grad_weight * scale.to(grad_weight.dtype) if grad_weight is not None else None,
            grad_bias * scale.to(grad_bias.dtype) if grad_bias is not None else None,
            None,
            (row_losses * scale).to(ctx.token_weights_dtype) if row_losses is not None else None,
            None,
        )


def masked_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_weights: Tensor | None = None,
    bias: Tensor | None = None,
    chunk_size: int = 4096,
) -> Tensor:
    """Sum over rows of ``token_weights[i] * cross_entropy(hidden[i] @ weight.T + bias, targets[i])``.

    ``hidden`` ``[N, d]`` holds only the masked positions (the caller gathered them); ``weight`` is the LM
    head ``[V, d]``; ``token_weights`` defaults to ones (LLaDA passes ``1 / p_mask``). Logits exist one
    chunk of ``chunk_size`` rows at a time, in fp32 for the softmax. Returns an fp32 scalar; gradients come
    back in the dtypes of the inputs. ``N == 0`` gives 0 with zero gradients, still attached to the graph.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if targets.shape != (n_rows,):
        raise ValueError(f"targets must have shape [N] = [{n_rows}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if token_weights is None:
        token_weights = torch.ones(n_rows, dtype=torch.float32, device=hidden.device)
    elif token_weights.shape != (n_rows,):
        raise ValueError(f"token_weights must have shape [N] = [{n_rows}], got {tuple(token_weights.shape)}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape [V] = [{vocab}], got {tuple(bias.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if not torch.is_grad_enabled():
        # Function.apply still reports needs_input_grad under no_grad; detaching skips the gradient work (eval).
        hidden, weight, token_weights = hidden.detach(), weight.detach(), token_weights.detach()
        bias = bias.detach() if bias is not None else None
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets.long(), token_weights, chunk_size)
