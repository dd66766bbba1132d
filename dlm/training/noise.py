"""The noise schedule of masked diffusion: how noise levels are drawn, how likely a level masks a token, and
how much a masked token's loss weighs. Training (:func:`~dlm.training.objective.forward_process`) and the
held-out NELBO (:func:`~dlm.training.evaluate.evaluate_nelbo`) read the same object, so the bound evaluated
is the bound trained.

LLaDA's schedule is linear: ``p_mask(t) = (1 - eps) t + eps`` (``eps`` keeps every level able to mask a
token) and a masked token weighs ``1 / p_mask``, which makes the summed loss an upper bound on the negative
log-likelihood. SFT divides the weight further by the answer's length, so each answer counts once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Sampling = Literal["uniform", "stratified"]


@dataclass(frozen=True)
class NoiseSchedule:
    """``t`` sampler, ``p_mask(t)`` and loss weights of the linear (LLaDA) schedule."""

    eps: float = 1e-3
    sampling: Sampling = "uniform"
    """``uniform``: independent ``t ~ U(0, 1)``; ``stratified``: ``(i + u) / B`` with one shared ``u`` (the
    low-discrepancy sampler of MDLM): each t is still uniform, so the loss stays unbiased, but a batch always
    spans the whole noise range, which lowers the variance the ``1 / p_mask`` weights put on the gradient."""

    @classmethod
    def from_objective(cls, objective: Any) -> NoiseSchedule:
        """The schedule an ``objective`` config section (``eps``, ``t_sampling``) describes."""
        return cls(eps=objective.eps, sampling=objective.t_sampling)

    def sample_t(self, batch: int, generator: torch.Generator) -> Tensor:
        """``batch`` noise levels on the CPU, from ``generator`` alone (the same draw on every device)."""
        if self.sampling == "stratified":
            return (torch.arange(batch, dtype=torch.float32) + torch.rand((), generator=generator)) / batch
        return torch.rand(batch, generator=generator)

    def p_mask(self, t: Tensor) -> Tensor:
        """Probability that level ``t`` masks a token."""
        return (1.0 - self.eps) * t + self.eps

    @staticmethod
    def weight(p_mask: Tensor, answer_length: Tensor | None = None) -> Tensor:
        """Per-token loss weight of each row: ``1 / p_mask``, or ``1 / (p_mask * answer_length)`` for SFT."""
        if answer_length is None:
            return 1.0 / p_mask
        return 1.0 / (p_mask * answer_length)
