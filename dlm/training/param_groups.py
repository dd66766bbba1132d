"""The optimizer's parameter groups, one rule for every engine.

Two choices live here. Weight decay applies to matrices (projections, embeddings), never to norms' gains or
biases, whose scale is meaningful. And the length head may get its own peak learning rate
(``optim.length_head_lr``): when it is trained on top of a pretrained backbone, the head starts from zero
while the backbone is already where it should be, so the rate that fine-tunes one barely moves the other
(measured on SmolLM2-135M: at 2e-4 the bucket head was still near uniform after 30 steps). Each group's rate
is its peak; the LR schedule scales every group by the same multiplier.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dlm.modeling import LengthHead
from dlm.training.config import OptimSection

__all__ = ["param_groups"]


def param_groups(model: nn.Module, optim: OptimSection) -> list[dict[str, Any]]:
    """AdamW groups for ``model``'s trainable parameters, empty groups left out.

    Without ``optim.length_head_lr`` there are two groups (decay, no decay), as a checkpoint written before
    that setting existed expects; with it, the length head's parameters form two more at that rate. A
    parameter partitioned by ZeRO-3 is flat; its true rank is read from ``ds_shape``. The head is found by its
    module type, so a wrapper around the model (DeepSpeed's objective) changes nothing.
    """
    head_lr = optim.length_head_lr
    head_params = set() if head_lr is None else {
        id(p) for module in model.modules() if isinstance(module, LengthHead) for p in module.parameters()
    }
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (head, decay): [] for head in (False, True) for decay in (True, False)
    }
    for param in model.parameters():
        if not param.requires_grad:
            continue
        head = id(param) in head_params
        decay = len(getattr(param, "ds_shape", param.shape)) >= 2
        groups[(head, decay)].append(param)
    out = []
    for (head, decay), params in groups.items():
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "weight_decay": optim.weight_decay if decay else 0.0}
        if head:
            group["lr"] = head_lr
        out.append(group)
    return out
