"""Model construction that never allocates what it cannot afford: big models start on the meta device."""

from __future__ import annotations

import torch

from dlm.kernels import check_backend
from dlm.modeling.accounting import param_count
from dlm.modeling.config import TransformerConfig
from dlm.modeling.transformer import DiffusionTransformer


def build_model(
    cfg: TransformerConfig, device: str | torch.device = "cpu", meta_threshold: int = 1_000_000_000
) -> DiffusionTransformer:
    """Build a :class:`DiffusionTransformer` for ``cfg``.

    Models with more than ``meta_threshold`` parameters (counted analytically), or ``device == "meta"``,
    are built on the meta device: no memory is touched, and the engine materialises them later (sharded by
    DeepSpeed, or ``to_empty(device=...)`` followed by ``init_weights()``). Smaller models are built and
    initialised directly on ``device``. An attention backend that cannot run on ``device`` (flash-attn not
    installed, say) raises :class:`dlm.kernels.AttentionBackendError` here, before any memory is touched.
    """
    target = torch.device(device)
    check_backend(cfg.attention, target)
    if target.type == "meta" or param_count(cfg) > meta_threshold:
        with torch.device("meta"):
            return DiffusionTransformer(cfg)
    with target:
        return DiffusionTransformer(cfg)
