"""Compute kernels the model and the loss call through: attention backends and the fused masked LM loss."""

from dlm.kernels.attention import (
    BACKENDS,
    CHOICES,
    AttentionBackendError,
    attention,
    check_backend,
    compute_dtype,
    resolve_backend,
)
from dlm.kernels.loss import masked_lm_loss, masked_lm_loss_rows
from dlm.kernels.masks import AttentionMask, anneal_ratio, annealed_mask, document_mask

__all__ = [
    "BACKENDS",
    "CHOICES",
    "AttentionBackendError",
    "AttentionMask",
    "anneal_ratio",
    "annealed_mask",
    "attention",
    "check_backend",
    "compute_dtype",
    "document_mask",
    "masked_lm_loss",
    "masked_lm_loss_rows",
    "resolve_backend",
]
