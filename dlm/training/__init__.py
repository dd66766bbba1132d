"""Objectives, the training loop, engines, schedules and metrics.

The exports are imported on first use (:mod:`dlm.lazy`), so that :mod:`dlm.config` can import this
package's sections (:mod:`dlm.training.config`) without importing the loop, which imports it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlm.lazy import lazy_exports

if TYPE_CHECKING:
    from dlm.training.loop import train
    from dlm.training.objective import NoisedBatch, diffusion_loss, forward_process, mask_generator

__all__ = ["NoisedBatch", "diffusion_loss", "forward_process", "mask_generator", "train"]
__getattr__ = lazy_exports(
    __name__,
    {
        "dlm.training.loop": ("train",),
        "dlm.training.objective": ("NoisedBatch", "diffusion_loss", "forward_process", "mask_generator"),
    },
)
