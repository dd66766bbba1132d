"""Compute kernels the model and the loss call through: attention backends and the fused masked LM loss."""

from dlm.kernels.attention import attention
from dlm.kernels.loss import masked_lm_loss

__all__ = ["attention", "masked_lm_loss"]
