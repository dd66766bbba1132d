"""Learning-rate schedules as multipliers of the base LR, so any optimizer and engine can use them."""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float) -> float:
    """Linear warmup from ~0 to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio`` at ``total_steps``.

    ``step`` counts optimizer steps already taken, so the first update uses ``1 / warmup_steps`` of the LR
    rather than zero (a zero-LR first step wastes a batch).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: Optimizer, *, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float
) -> LambdaLR:
    """A ``LambdaLR`` over :func:`lr_multiplier`; its ``state_dict`` is all a resume needs."""
    fn = partial(
        lr_multiplier, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind, min_lr_ratio=min_lr_ratio
    )
    return LambdaLR(optimizer, fn)
