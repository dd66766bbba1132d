"""Objectives, the training loop, engines, schedules and metrics."""

from dlm.training.loop import train
from dlm.training.objective import NoisedBatch, diffusion_loss, forward_process, mask_generator

__all__ = ["NoisedBatch", "diffusion_loss", "forward_process", "mask_generator", "train"]
