"""The local launcher: the training loop in this very process (smoke runs, CPU, one GPU)."""

from __future__ import annotations

from typing import Any

from dlm.config import RunConfig
from dlm.training import train


def run_local(cfg: RunConfig) -> dict[str, Any]:
    """Run the loop here and return its summary."""
    return train(cfg)
