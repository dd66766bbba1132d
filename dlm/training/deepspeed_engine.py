"""DeepSpeed ZeRO (stage 0-3, CPU offload, bf16) behind the same :class:`~dlm.training.engine.Engine` protocol
as the plain engine, so the one training loop runs both.

Three things differ from textbook DeepSpeed use, each for a reason:

* **Loss scaling.** The loop divides every micro-batch loss by the *global* normaliser of the optimizer step
  (all micro-batches on all ranks) before ``backward``: the gradient it wants is the plain sum over ranks
  and micro-batches. DeepSpeed instead divides the loss by ``gradient_accumulation_steps`` and *averages*
  gradients over ranks. So ``backward`` passes ``scale_wrt_gas=False`` and multiplies the loss by the world
  size, which turns DeepSpeed's average back into the sum; the parity tests compare against the plain engine.
* **The loss runs inside a module.** ZeRO-3 gathers a partitioned weight only inside the ``forward`` of a
  module; our masked-token loss projects through the (tied) LM-head weight *after* the transformer returns.
  :class:`_Objective` wraps transformer and loss in one ``forward``, so DeepSpeed sees the LM head used
  there and gathers it (forward and backward) like any other parameter.
* **Accumulation boundary.** The protocol is ``backward`` per micro-batch and one ``step``; DeepSpeed wants
  ``step`` after every ``backward`` and acts only at the boundary. ``backward`` therefore calls DeepSpeed's
  ``step`` for every micro-batch but the last, and our ``step`` the last one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dlm.config import RunConfig
from dlm.errors import ConfigError
from dlm.modeling import DiffusionTransformer, TransformerConfig, build_model, param_count
from dlm.training.distributed import backend_for
from dlm.training.precision import resolve_precision
from dlm.training.objective import LossParts, NoisedBatch, diffusion_loss
from dlm.training.param_groups import param_groups
from dlm.training.schedule import build_scheduler

CHECKPOINT_TAG = "ds"
"""Sub-directory DeepSpeed writes its files into inside the engine checkpoint directory."""

ZERO_INIT_THRESHOLD = 1_000_000_000
"""``engine.zero_init=auto`` builds models above this many parameters under ``deepspeed.zero.Init``; smaller
ones fit on every rank at build time, and building them normally keeps their init bit-identical to ``dlm
train`` (the parity tests rely on that)."""


def build_ds_config(cfg: RunConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config of this run: the JSON's tuning keys plus everything dlm decides.

    :meth:`dlm.training.config.EngineSection.check_batch` has already refused a JSON that contradicts the run
    config, so here ours simply replace its ``"auto"`` placeholders.
    """
    engine, run = cfg.engine, cfg.run
    ds = dict(engine.deepspeed_json())
    stage = int(engine.resolved_zero_stage())
    offload_opt, offload_par = engine.resolved_offload()
    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = stage
    for key, device_name in (("offload_optimizer", offload_opt), ("offload_param", offload_par)):
        if device_name == "none":
            zero.pop(key, None)
        else:
            zero[key] = {**(zero.get(key) or {}), "device": device_name}
    if stage != 3:
        zero = {k: v for k, v in zero.items() if not k.startswith("stage3_") and k != "offload_param"}
    bf16 = resolve_precision(engine.precision, device) == torch.bfloat16
    ds.update(
        {
            "train_micro_batch_size_per_gpu": run.micro_batch_size,
            "gradient_accumulation_steps": run.grad_accum_steps,
            "train_batch_size": run.micro_batch_size * run.grad_accum_steps * world_size,
            "gradient_clipping": cfg.optim.grad_clip,
            "bf16": {**(ds.get("bf16") or {}), "enabled": bf16},
            "zero_optimization": zero,
            # Our optimizer objects are built here (torch AdamW by default, no JIT build needed); DeepSpeed
            # must accept them with ZeRO and with offload.
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": ds.get("steps_per_print", 1 << 30),
            "wall_clock_breakdown": ds.get("wall_clock_breakdown", False),
        }
    )
    ds.pop("fp16", None)
    return ds


class _Objective(nn.Module):
    """Transformer and masked-token loss in one ``forward`` (see the module docstring for why).

    Returns a tuple of tensors, not :class:`LossParts`: ZeRO-3 attaches its pre-backward hooks to the tensors
    of a module's output and does not look inside dataclasses.
    """

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, noised: NoisedBatch) -> tuple[Tensor, ...]:
        parts = diffusion_loss(self.model, noised, self.chunk_size)
        out = (parts.loss_sum, parts.bucket_sums, parts.bucket_counts, torch.tensor(parts.num_masked))
        if parts.length_loss is not None and parts.length_stats is not None:
            out += (parts.length_loss, parts.length_stats)
        return out


def _make_optimizer(kind: str, model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer DeepSpeed wraps: the plain engine's hyper-parameters and groups (:mod:`.param_groups`)."""
    groups = param_groups(model, cfg.optim)
    common = {"lr": cfg.optim.lr, "betas": cfg.optim.betas, "eps": cfg.optim.eps}
    if kind == "torch-adamw":
        return torch.optim.AdamW(groups, **common)
    if kind == "cpu-adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **common)
    if device.type != "cuda":
        raise ConfigError("config error: engine.optimizer = 'fused-adam': needs CUDA; use torch-adamw or cpu-adam on CPU")
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, adam_w_mode=True, **common)


def _join_deepspeed_comm(device: torch.device) -> None:
    """Let DeepSpeed's communication layer wrap the existing process group (it never creates its own here:
    MPI discovery would be tried otherwise); ``zero.Init`` reads the world size from it."""
    import deepspeed

    if not dist.is_initialized():
        raise RuntimeError("DeepSpeed needs a process group; create it with dlm.training.distributed first")
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it even when the group already exists
    deepspeed.init_distributed(dist_backend=backend_for(device), auto_mpi_discovery=False, dist_init_required=False)


def uses_zero_init(cfg: RunConfig, arch: TransformerConfig) -> bool:
    """Whether the model is built already partitioned (``deepspeed.zero.Init``)."""
    if cfg.engine.kind != "deepspeed" or int(cfg.engine.resolved_zero_stage()) != 3:
        return False
    if cfg.engine.zero_init == "auto":
        return param_count(arch) > ZERO_INIT_THRESHOLD
    return bool(cfg.engine.zero_init)


def build_partitioned_model(cfg: RunConfig, arch: TransformerConfig, device: torch.device, world_size: int) -> nn.Module:
    """Build the model under ``deepspeed.zero.Init``: each parameter is partitioned as soon as it exists, so
    no rank ever holds the whole model (an 8B model in fp32 is 32 GB).

    The constructor's own ``init_weights`` sees only empty partitions, so the weights are initialised again
    with every parameter gathered and rank 0's values kept (``modifier_rank=0``). That gather holds the
    whole model once, briefly, before any optimizer state exists; rank 0 draws from the same RNG state the
    plain build would, so the weights equal a plain build with the same seed.
    """
    import deepspeed

    from dlm.kernels import check_backend

    check_backend(arch.attention, device)
    _join_deepspeed_comm(device)
    ds_config = build_ds_config(cfg, world_size, device)
    offload = ds_config["zero_optimization"].get("offload_param", {}).get("device")
    # No ``dtype=``: DeepSpeed 0.19 ignores it on accelerators without fp16 and picks bf16 (an operator
    # precedence slip); without it the dtype follows the config's bf16 switch. No memory-efficient linear:
    # it replaces torch.nn.functional.linear process-wide, which our loss and evaluation also call.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=offload, mem_efficient_linear=False):
        model = DiffusionTransformer(arch)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if dist.get_rank() == 0:
            model.init_weights()
    return model


class DeepSpeedEngine:
    """A DeepSpeed engine for one rank of a data-parallel group (the process group must exist already)."""

    @classmethod
    def build_model(
        cls, cfg: RunConfig, arch: TransformerConfig, device: torch.device, world_size: int
    ) -> tuple[nn.Module, bool]:
        """Partitioned under ``zero.Init`` when :func:`uses_zero_init` says so, else built as the plain engine
        builds it (bit-identical init, which the parity tests rely on)."""
        if uses_zero_init(cfg, arch):
            return build_partitioned_model(cfg, arch, device, world_size), True
        return build_model(arch, device), False

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
        import deepspeed

        _join_deepspeed_comm(device)
        self.model = model
        self.device = device
        self.world_size = dist.get_world_size()
        self.grad_accum_steps = cfg.run.grad_accum_steps
        self.ds_config = build_ds_config(cfg, self.world_size, device)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        kind = cfg.engine.resolved_optimizer()
        if kind == "cpu-adam" and device.type == "cuda" and "offload_optimizer" not in self.ds_config["zero_optimization"]:
            raise ConfigError(
                "config error: engine.optimizer = 'cpu-adam': on CUDA it needs engine.offload_optimizer=cpu"
            )
        self._wrapper = _Objective(model, cfg.objective.loss_chunk_size)
        optimizer = _make_optimizer(kind, self._wrapper, cfg, device)

        def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return build_scheduler(
                opt,
                warmup_steps=cfg.schedule.warmup_steps,
                total_steps=cfg.run.steps,
                kind=cfg.schedule.kind,
                min_lr_ratio=cfg.schedule.min_lr_ratio,
            )

        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self._wrapper,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self._micro = 0

    # -- the Engine protocol ------------------------------------------------------------------------------

    def autocast(self) -> ContextManager[Any]:
        """DeepSpeed's bf16 mode casts the module itself, so the forward needs no autocast."""
        return contextlib.nullcontext()

    def loss(self, noised: NoisedBatch, chunk_size: int) -> LossParts:
        """Forward and masked loss through the DeepSpeed module (ZeRO-3 gathers what they touch)."""
        self._wrapper.chunk_size = chunk_size
        loss_sum, bucket_sums, bucket_counts, num_masked, *length = self.ds(noised)
        parts = LossParts(loss_sum, bucket_sums, bucket_counts, int(num_masked))
        if length:
            parts.length_loss, parts.length_stats = length
        return parts

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of ``loss`` (already divided by the global normaliser) summed over ranks."""
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.grad_accum_steps:
            self.ds.step()  # not a boundary: DeepSpeed only advances its micro-step counter

    def step(self) -> Tensor:
        """Reduce, clip, update and advance the schedule; return the pre-clip global gradient norm."""
        if self._micro != self.grad_accum_steps or not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"step() after {self._micro} backward calls; the loop must run run.grad_accum_steps = "
                f"{self.grad_accum_steps} micro-batches per step"
            )
        manual = self._grad_norm() if self.stage == 0 and not self.ds_config["bf16"]["enabled"] else None
        self.ds.step()
        self._micro = 0
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = manual if manual is not None else float("nan")
        return torch.as_tensor(float(norm))

    def _grad_norm(self) -> float:
        """Stage 0 in fp32 clips with torch and keeps no norm; the reduced gradients are whole on every rank.
        Accumulated in fp64 like DeepSpeed's ZeRO norms, so every stage reports the same number."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_checkpoint(self, path: Path) -> None:
        """DeepSpeed's own (sharded) checkpoint: every rank must call this, each writes its partition."""
        path.mkdir(parents=True, exist_ok=True)
        self.ds.save_checkpoint(str(path), tag=CHECKPOINT_TAG, save_latest=False)

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer partitions and the LR schedule (every rank, same world size)."""
        from dlm.training.checkpoint import CheckpointError

        if not (path / CHECKPOINT_TAG).is_dir():
            raise CheckpointError(
                f"{path} holds no DeepSpeed checkpoint ({CHECKPOINT_TAG}/ is missing); it was written by another "
                f"engine: resume with the engine.kind it was written with"
            )
        try:
            loaded, _ = self.ds.load_checkpoint(
                str(path), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except (OSError, RuntimeError, ValueError, AssertionError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            raise CheckpointError(
                f"cannot restore the DeepSpeed state in {path} ({type(exc).__name__}: {_first_line(exc)}); resume with the same world size and ZeRO "
                f"stage it was written with, or from an older step"
            ) from None
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {path}; resume from an older step")
        self._micro = 0

    @contextlib.contextmanager
    def gathered_model(self) -> Iterator[nn.Module]:
        """On rank 0, a CPU copy of the model with whole fp32 parameters in their own storage; elsewhere the
        live model. Every rank must enter: gathering partitions is a collective.

        A copy because DeepSpeed keeps parameters as views into flat buffers (stages 1-2) or as empty
        partitions (stage 3), and safetensors refuses to save a tensor that does not own its storage. In bf16
        the weights are DeepSpeed's fp32 master copies (``safe_get_full_fp32_param``), not their bf16 casts,
        so the final weights are as precise as the plain engine's.
        """
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        main = dist.get_rank() == 0
        state: dict[str, Tensor] = {}
        for name, param in self.model.named_parameters():
            # None where DeepSpeed keeps no fp32 master for the parameter (bf16 at stage 0): its value is then
            # the parameter itself
            whole = safe_get_full_fp32_param(param) if self.ds_config["bf16"]["enabled"] else None
            if whole is None:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=self.stage == 3):
                    whole = param.detach().clone()
            if main:
                state[name] = whole.detach().to("cpu", dtype=torch.float32, copy=True)
        if not main:
            yield self.model
            return
        for name, buffer in self.model.state_dict().items():
            state.setdefault(name, buffer.detach().to("cpu", copy=True))
        copy = build_model(self.model.cfg, "meta")  # type: ignore[arg-type]
        copy.load_state_dict(state, assign=True)
        yield copy


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message, so the CLI's report stays one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
