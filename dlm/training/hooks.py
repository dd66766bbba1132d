"""Hooks: how code outside the loop (the Ray launcher, tests) observes a run without the loop knowing it.

The loop calls every hook on every rank at the same points, so a hook may run collectives (Ray's
``report`` is a barrier across workers). The loop never imports Ray: the Ray launcher passes a hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn


@dataclass
class StepInfo:
    """What one optimizer step did on this rank."""

    step: int
    rank: int
    world_size: int
    loss: Tensor  # the step's global loss (all ranks, all micro-batches), a detached scalar; float() syncs
    batches: list[dict[str, Tensor]] = field(default_factory=list)  # this rank's micro-batches, as trained on
    record: dict[str, Any] | None = None  # the metrics record when this step was logged (rank 0)
    model: nn.Module | None = None  # the engine's model (under ZeRO-3 its parameters are partitions)


class TrainHook:
    """Base class: every method is a no-op; override what you need."""

    def on_step_end(self, info: StepInfo) -> None:
        """After the optimizer step of ``info.step`` (before any checkpoint of that step)."""

    def on_checkpoint(self, step: int, path: Path, is_main: bool) -> None:
        """After the checkpoint of ``step`` is complete at ``path`` on every rank."""

    def on_train_end(self, summary: dict[str, Any]) -> None:
        """After the run finished and rank 0 wrote ``summary.json``; every rank gets the same summary."""
