"""The engine interface: what the one training loop needs from whoever owns backward and the optimizer.

The plain-torch engine lives here; the DeepSpeed engine implements the same protocol, so the loop never
branches on which engine runs it.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Protocol

import torch
from torch import Tensor, nn

from dlm.config import RunConfig
from dlm.training.schedule import build_scheduler


class Engine(Protocol):
    """Owns the model's parameters, precision, backward, clipping, the optimizer step and the LR schedule."""

    model: nn.Module
    device: torch.device

    def autocast(self) -> ContextManager[Any]:
        """Context for the forward pass (mixed precision where configured)."""

    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of ``loss`` (already divided by the step's global normaliser)."""

    def step(self) -> Tensor:
        """Clip, update, advance the schedule, zero the gradients; return the pre-clip global grad norm."""

    def lr(self) -> float:
        """The learning rate the next step will use."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; asking for CUDA without one is a clear error."""
    from dlm.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config error: run.device = 'cuda': no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on devices that support it when ``auto``; None means plain fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (projections, embeddings); never norms' gains or biases, whose scale is meaningful."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PlainEngine:
    """Single-process torch: AdamW, warmup + cosine, global-norm clipping, optional bf16 autocast."""

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.amp_dtype = resolve_precision(cfg.engine.precision, device)
        self.grad_clip = cfg.optim.grad_clip
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            fused=device.type == "cuda",
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=cfg.schedule.warmup_steps,
            total_steps=cfg.run.steps,
            kind=cfg.schedule.kind,
            min_lr_ratio=cfg.schedule.min_lr_ratio,
        )

    def autocast(self) -> ContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_engine(cfg: RunConfig, model: nn.Module, device: torch.device) -> Engine:
    """The engine named by ``engine.kind``."""
    engines = {"plain": PlainEngine}
    return engines[cfg.engine.kind](model, cfg, device)
