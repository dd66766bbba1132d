"""The local launcher: the training loop in this very process (smoke runs, CPU, one GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dlm.config import RunConfig
from dlm.training import train
from dlm.training.hooks import TrainHook


def run_local(cfg: RunConfig, hooks: Sequence[TrainHook] = ()) -> dict[str, Any]:
    """Run the loop here and return its summary."""
    return train(cfg, hooks=hooks)
