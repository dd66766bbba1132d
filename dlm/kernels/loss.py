"""Fused LM-head projection + weighted cross-entropy over the masked positions only.

With a 126k vocabulary the logits of a whole batch (``[B·T, V]`` in fp32, plus their softmax and gradient)
would dwarf the activations of an 8B model. Callers gather the masked rows first; this kernel then walks
them in chunks, and for each chunk computes logits, loss and all gradients at once, so at most one chunk of
logits is alive at any time (the idea of Liger's fused linear cross-entropy). The backward pass only scales
the gradients computed in the forward pass.

On CUDA with liger-kernel installed, ``impl="auto"`` hands the work to Liger's Triton kernel instead
(:mod:`dlm.kernels.liger`), which computes the same sum.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor

from dlm.kernels.liger import liger_masked_lm_loss, liger_unsupported

LossImpl = Literal["auto", "chunked", "liger"]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_off(device_type: str) -> AbstractContextManager[object]:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


_cpu_scratch: list[Tensor] = []  # at most one buffer, grown as needed


def _logits_scratch(numel: int, device: torch.device) -> Tensor:
    """A flat fp32 buffer of at least ``numel`` elements for one chunk of (transposed) logits.

    On CPU a fresh ``[V, chunk]`` allocation is served by new pages whose first-touch faults cost as much as
    the matmul that fills them, and every training step calls this kernel again, so the CPU buffer lives
    across calls. On CUDA the caching allocator already reuses memory and a permanent buffer would only pin it.
    """
    if device.type != "cpu":
        return torch.empty(numel, dtype=torch.float32, device=device)
    if not _cpu_scratch or _cpu_scratch[0].numel() < numel:
        _cpu_scratch[:] = [torch.empty(numel, dtype=torch.float32)]
    return _cpu_scratch[0]


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
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_tw = ctx.needs_input_grad[4]
        need_grads = need_h or need_w or need_b

        # Under autocast the matmuls run in the autocast dtype, as nn.Linear would; otherwise in the inputs'.
        device = hidden.device
        compute_dtype = _autocast_dtype(device.type) or torch.promote_types(hidden.dtype, weight.dtype)
        # Logits are laid out transposed, [V, chunk]: the product W @ h.T with a few hundred rows runs about
        # twice as fast on CPU BLAS as h @ W.T, and the reductions over the vocabulary become column sums.
        # In fp32 every product lands straight in a preallocated buffer (mm out=, addmm_).
        fp32 = compute_dtype == torch.float32
        with _autocast_off(device.type):
            w = weight.to(compute_dtype)
            bias32 = bias.float()[:, None] if bias is not None else None
            # fp32 accumulators: summing many bf16 chunk contributions would lose the small ones. For a bf16
            # head this costs one fp32 [V, d] buffer during the forward pass; the saved gradient is cast back.
            loss = torch.zeros((), dtype=torch.float32, device=device)
            grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_h else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            row_losses = torch.empty(n_rows, dtype=torch.float32, device=device)
            scratch = _logits_scratch(vocab * min(chunk_size, n_rows), device)

            for start in range(0, n_rows, chunk_size):
                end = min(start + chunk_size, n_rows)
                rows = end - start
                h = hidden[start:end].to(compute_dtype)
                tgt = targets[start:end]
                tw = token_weights[start:end].float()
                logits = scratch[: vocab * rows].view(vocab, rows)
                if fp32:
                    torch.mm(w, h.T, out=logits)
                else:
                    logits.copy_(w @ h.T)
                if bias32 is not None:
                    logits += bias32
                cols = torch.arange(rows, device=device)
                # ce = logsumexp - target logit, with the exponentials left in the buffer for the gradient.
                target_logit = logits[tgt, cols]
                col_max = logits.amax(dim=0)
                probs = logits.sub_(col_max).exp_()
                total = probs.sum(dim=0)
                ce = col_max + total.log() - target_logit
                loss += (ce * tw).sum()
                row_losses[start:end] = ce
                if not need_grads:
                    continue
                # d(ce)/d(logits) = softmax - one_hot, weighted per row, built in place over the buffer.
                grad_logits = probs.mul_(tw / total)
                grad_logits[tgt, cols] -= tw
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(dim=1)
                g = grad_logits if fp32 else grad_logits.to(compute_dtype)
                if grad_hidden is not None:
                    if fp32 and grad_hidden.dtype == torch.float32:
                        torch.mm(g.T, w, out=grad_hidden[start:end])
                    else:
                        grad_hidden[start:end] = g.T @ w
                if grad_weight is not None:
                    if fp32:
                        grad_weight.addmm_(g, h)
                    else:
                        grad_weight += g @ h
            del scratch

        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            row_losses,
        )
        ctx.token_weights_dtype = token_weights.dtype
        ctx.need_tw = need_tw
        ctx.mark_non_differentiable(row_losses)
        return loss, row_losses

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, _grad_rows: Tensor | None = None) -> tuple[Tensor | None, ...]:
        # Scaled in place: a [V, d] copy would double the memory the head's gradient needs. Autograd's
        # version check turns a second backward through the same graph (retain_graph) into an error, never
        # into doubly scaled gradients.
        grad_hidden, grad_weight, grad_bias, row_losses = ctx.saved_tensors
        scale = grad_output.detach()
        return (
            grad_hidden.mul_(scale.to(grad_hidden.dtype)) if grad_hidden is not None else None,
            grad_weight.mul_(scale.to(grad_weight.dtype)) if grad_weight is not None else None,
            grad_bias.mul_(scale.to(grad_bias.dtype)) if grad_bias is not None else None,
            None,
            (row_losses * scale).to(ctx.token_weights_dtype) if ctx.need_tw else None,
            None,
        )


def masked_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_weights: Tensor | None = None,
    bias: Tensor | None = None,
    chunk_size: int = 4096,
    *,
    impl: LossImpl = "auto",
) -> Tensor:
    """Sum over rows of ``token_weights[i] * cross_entropy(hidden[i] @ weight.T + bias, targets[i])``.

    See :func:`masked_lm_loss_rows` for the arguments; this is its first result.
    """
    return masked_lm_loss_rows(hidden, weight, targets, token_weights, bias, chunk_size, impl=impl)[0]


def masked_lm_loss_rows(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_weights: Tensor | None = None,
    bias: Tensor | None = None,
    chunk_size: int = 4096,
    *,
    impl: LossImpl = "auto",
) -> tuple[Tensor, Tensor]:
    """The weighted sum of :func:`masked_lm_loss` and each row's unweighted cross-entropy ``[N]`` (fp32, no
    gradient), both from one pass: a caller that reports the loss by group (the training loop's loss by noise
    level) scores all its rows in one call instead of one call per group, each of which would build and add
    up its own ``[V, d]`` weight gradient.

    ``hidden`` ``[N, d]`` holds only the masked positions (the caller gathered them); ``weight`` is the LM
    head ``[V, d]``; ``token_weights`` defaults to ones (LLaDA passes ``1 / p_mask``). Logits exist one
    chunk of ``chunk_size`` rows at a time, in fp32 for the softmax. Returns an fp32 scalar; gradients come
    back in the dtypes of the inputs. ``N == 0`` gives 0 with zero gradients, still attached to the graph.

    ``impl``: ``chunked`` is the kernel above; ``liger`` is Liger's fused linear cross-entropy (CUDA,
    liger-kernel installed; it picks its own chunking); ``auto`` takes Liger where it can run and the
    chunked kernel everywhere else.
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
    if token_weights is not None and token_weights.shape != (n_rows,):
        raise ValueError(f"token_weights must have shape [N] = [{n_rows}], got {tuple(token_weights.shape)}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape [V] = [{vocab}], got {tuple(bias.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if impl not in ("auto", "chunked", "liger"):
        raise ValueError(f"unknown loss impl {impl!r}; allowed: auto, chunked, liger")
    if impl != "chunked":
        reason = liger_unsupported(hidden, token_weights)
        if reason is None:
            return liger_masked_lm_loss(hidden, weight, targets.long(), token_weights, bias)
        if impl == "liger":
            raise ValueError(f"impl='liger' cannot run: {reason}")
    if token_weights is None:
        token_weights = torch.ones(n_rows, dtype=torch.float32, device=hidden.device)
    if not torch.is_grad_enabled():
        # Function.apply still reports needs_input_grad under no_grad; detaching skips the gradient work (eval).
        hidden, weight, token_weights = hidden.detach(), weight.detach(), token_weights.detach()
        bias = bias.detach() if bias is not None else None
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets.long(), token_weights, chunk_size)
