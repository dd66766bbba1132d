"""The engine interface: what the one training loop needs from whoever owns backward and the optimizer.

The plain-torch engine lives here; the DeepSpeed engine implements the same protocol, so the loop never
branches on which engine runs it. Which class serves ``engine.kind`` is :mod:`dlm.training.engines`' registry.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager, Protocol

import numpy as np
import safetensors
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from dlm.config import RunConfig
from dlm.modeling import TransformerConfig
from dlm.training.engines import engine_spec
from dlm.training.objective import LossParts, NoisedBatch, diffusion_loss
from dlm.training.param_groups import param_groups
from dlm.training.precision import resolve_device, resolve_precision
from dlm.training.schedule import build_scheduler

__all__ = ["Engine", "PlainEngine", "build_engine", "build_training_model", "resolve_device", "resolve_precision"]


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

    def save_checkpoint(self, path: Path) -> None:
        """Write model, optimizer and LR-schedule state into the (temporary) directory ``path``."""

    def load_checkpoint(self, path: Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote, exactly."""

    def loss(self, noised: NoisedBatch, chunk_size: int) -> LossParts:
        """Forward and masked-token loss of one micro-batch (un-normalised).

        Through the engine rather than ``diffusion_loss(engine.model, ...)`` because ZeRO-3 can gather the
        partitioned LM-head weight only inside a module's forward.
        """

    def gathered_model(self) -> ContextManager[nn.Module]:
        """The model with whole parameters (to save final weights); under ZeRO-3 a collective on every rank."""

    @classmethod
    def build_model(
        cls, cfg: RunConfig, arch: TransformerConfig, device: torch.device, world_size: int
    ) -> tuple[nn.Module, bool]:
        """The freshly initialised model this engine will own, and whether it is already partitioned
        (ZeRO-3 ``zero.Init``), which changes how initial weights are filled in."""


class PlainEngine:
    """Plain torch: AdamW, warmup + cosine, global-norm clipping, optional bf16 autocast.

    On several ranks (``dlm launch --workers N`` with ``engine.kind=plain``) it is plain data parallelism:
    rank 0's weights are broadcast once, and each step sums the gradients over ranks in one flat all-reduce
    before clipping (the loss is already divided by the global normaliser, so the sum is the gradient).
    DeepSpeed overlaps that reduction with backward and shards the states; use it for real multi-GPU runs.
    """

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.data_parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.data_parallel:
            for param in model.parameters():
                dist.broadcast(param.data, src=0)
        self.amp_dtype = resolve_precision(cfg.engine.precision, device)
        self.grad_clip = cfg.optim.grad_clip
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            fused=device.type in ("cuda", "cpu"),  # one pass over each tensor: 6x faster than the loop on CPU
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=cfg.schedule.warmup_steps,
            total_steps=cfg.run.steps,
            kind=cfg.schedule.kind,
            min_lr_ratio=cfg.schedule.min_lr_ratio,
        )

    @classmethod
    def build_model(
        cls, cfg: RunConfig, arch: TransformerConfig, device: torch.device, world_size: int
    ) -> tuple[nn.Module, bool]:
        from dlm.modeling import build_model

        return build_model(arch, device), False

    def autocast(self) -> ContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> Tensor:
        if self.data_parallel:
            _sum_gradients_over_ranks(self.model)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def loss(self, noised: NoisedBatch, chunk_size: int) -> LossParts:
        return diffusion_loss(self.model, noised, chunk_size)

    def gathered_model(self) -> ContextManager[nn.Module]:
        return contextlib.nullcontext(self.model)

    def save_checkpoint(self, path: Path) -> None:
        """Weights as safetensors (``save_model`` handles tied weights); optimizer and schedule via torch.save.
        Data-parallel ranks hold identical state, so rank 0 alone writes it."""
        if self.data_parallel and dist.get_rank() != 0:
            return
        path.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(path / "model.safetensors"))
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, path / "optim.pt"
        )

    def load_checkpoint(self, path: Path) -> None:
        from dlm.training.checkpoint import CheckpointError, load_state

        try:
            missing, unexpected = load_model(self.model, str(path / "model.safetensors"), strict=False)
        except (OSError, RuntimeError, safetensors.SafetensorError) as exc:
            raise CheckpointError(f"cannot read the engine state in {path}: {exc}; resume from an older step") from None
        state = load_state(path / "optim.pt", map_location=self.device)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path} does not match the model: missing {sorted(missing)}, unexpected "
                f"{sorted(unexpected)}; resume with the config it was written with"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _sum_gradients_over_ranks(model: nn.Module) -> None:
    """One all-reduce of every gradient flattened together (a missing gradient counts as zeros, so every
    rank's buffer has the same layout)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([param.grad.reshape(-1) for param in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for param in params:
        count = param.grad.numel()
        param.grad.copy_(flat[offset : offset + count].view_as(param.grad))
        offset += count


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: keep only each block's input and recompute its inside during backward.

    Trades about a third more compute for activation memory that no longer grows with the block's width;
    non-reentrant checkpointing so that ZeRO-3's gather hooks run again in the recomputation. In eval
    (no grad) the block runs normally.
    """
    from torch.utils.checkpoint import checkpoint

    def wrap(forward: Any) -> Any:
        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return checkpointed

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks to checkpoint")
    for block in blocks:
        block.forward = wrap(block.forward)


def build_training_model(
    cfg: RunConfig, device: torch.device, world_size: int = 1, unigram_log_probs: np.ndarray | None = None
) -> nn.Module:
    """The model the engine will own: built already partitioned under ZeRO-3 ``zero.Init`` when configured,
    otherwise as :func:`dlm.modeling.build_model` builds it; its weights replaced by ``model.init_from``'s
    unless the run resumes from a checkpoint (whose weights win anyway); without ``init_from``, its
    ``output_bias`` set to ``unigram_log_probs`` under ``model.output_bias_init: unigram`` (the loop passes the
    train tokens' log frequencies); activation checkpointing applied if asked. Every engine gets its model here, so
    ``init_from`` and the bias initialisation work the same for all of them."""
    model, partitioned = engine_spec(cfg.engine.kind).load().build_model(cfg, cfg.model.resolve(), device, world_size)
    if cfg.model.init_from is not None and not _resumes(cfg):
        cfg.model.check_init_from()  # a source that did not exist at validation time is checked now
        load_initial_weights(model, cfg, partitioned)
    if cfg.model.output_bias_init == "unigram" and cfg.model.init_from is None:
        if unigram_log_probs is None:
            raise ValueError("model.output_bias_init = 'unigram' needs the train tokens' unigram_log_probs")
        init_output_bias(model, unigram_log_probs, partitioned)
    if cfg.engine.activation_checkpointing:
        checkpoint_blocks(model)
    return model


def _resumes(cfg: RunConfig) -> bool:
    """Whether this run will restore a checkpoint (``checkpoint.resume`` names one that exists)."""
    from dlm.training.checkpoint import Checkpointer

    resume = cfg.checkpoint.resume
    return bool(resume) and Checkpointer(Path(cfg.run.dir)).resolve(resume) is not None


def load_initial_weights(model: nn.Module, cfg: RunConfig, partitioned: bool) -> None:
    """Copy ``model.init_from``'s weights into ``model``, one tensor at a time.

    A model partitioned by ZeRO-3 ``zero.Init`` is filled parameter by parameter inside DeepSpeed's
    ``GatheredParameters(modifier_rank=0)``: only rank 0 reads the source, and DeepSpeed re-partitions each
    parameter from rank 0's values when the context closes, so no rank ever holds more than one whole
    parameter. Otherwise every rank reads the source (the engines broadcast rank 0's weights anyway).
    Length-head parameters the source lacks keep their fresh initialisation (checked at config validation).
    """
    from dlm.modeling.hf_init import locate, open_weights

    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    source = locate(cfg.model.init_from, cfg.model.init_from_format)  # type: ignore[arg-type]
    reader = open_weights(source) if main or not partitioned else None

    def whole(param: nn.Parameter) -> ContextManager[Any]:
        if not partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)

    with reader if reader is not None else contextlib.nullcontext(), torch.no_grad():
        for name, param in model.named_parameters():
            with whole(param):
                if reader is not None and name in reader.tensors:
                    param.copy_(reader.get(name).to(param.device))
    if main:
        print(f"initialised the model from {source.path} ({source.format})", flush=True)


def init_output_bias(model: nn.Module, log_probs: np.ndarray, partitioned: bool = False) -> None:
    """Set the LM head's output bias to ``log_probs`` ``[V]``: the logits then start as the unigram model.

    A tied head's logits start near zero (a uniform guess over V tokens, ln V nats); a small model spends its
    first hundreds of steps learning token frequencies into its embeddings before it learns anything about
    context. With the bias holding the frequencies from step 0, the loss starts at the unigram entropy and
    every step goes to context.
    """
    bias = model.lm_head_bias  # type: ignore[operator]
    if bias is None:
        raise ValueError("the model has no output bias to initialise; set model.output_bias=true")
    if partitioned:
        import deepspeed

        whole: ContextManager[Any] = deepspeed.zero.GatheredParameters([bias], modifier_rank=0)
    else:
        whole = contextlib.nullcontext()
    with whole, torch.no_grad():
        if bias.dim() != 1 or bias.shape[0] < len(log_probs):
            raise ValueError(f"output bias has shape {tuple(bias.shape)}, the unigram table {len(log_probs)} entries")
        # Rows past the tokenizer's vocabulary (a table padded to a multiple of 64) are never targets: they
        # get the probability of a token never seen in training.
        table = torch.full(bias.shape, float(log_probs.min()), dtype=torch.float64)
        table[: len(log_probs)] = torch.from_numpy(log_probs)
        bias.copy_(table.to(bias.device, bias.dtype))


def build_engine(cfg: RunConfig, model: nn.Module, device: torch.device) -> Engine:
    """The engine named by ``engine.kind`` (DeepSpeed is imported only when asked for: it is slow to import)."""
    return engine_spec(cfg.engine.kind).load()(model, cfg, device)  # type: ignore[no-any-return]
