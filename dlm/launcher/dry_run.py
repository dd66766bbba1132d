"""``dlm launch CONFIG --dry-run --world-size W [--gpu-memory 80GB]``: will this job fit, before renting GPUs?

The config is validated at world size ``W`` (batch divisibility, the DeepSpeed JSON, the optimizer/offload
pair), then per-GPU memory is estimated from the architecture alone.

Model states per GPU follow the ZeRO paper (Rajbhandari et al. 2020, section 3): with Ψ parameters, bf16
mixed precision keeps 2Ψ bytes of bf16 weights, 2Ψ of gradients and Kψ = 12Ψ of optimizer state (fp32
master weights, Adam m and v); fp32 training keeps 4Ψ + 4Ψ + 8Ψ. Stage 1 divides the optimizer state by W,
stage 2 also the gradients, stage 3 also the weights; offloading moves the optimizer state (and, stage 3,
the weights) to CPU memory, listed separately.

Activations are stored per layer for backward, in bytes at 2 bytes per element (bf16; twice that in fp32),
with an attention kernel that keeps no T×T scores (flash / memory-efficient SDPA), b sequences of length s,
width h and MLP width f: norms' inputs 2·sbh each, the attention input, q, k, v and output 5·2sbh, the
SwiGLU gate, up, product and down-projection inputs 4·2sbf — so (16h + 8f)·s·b per layer. Activation
checkpointing keeps only each block's input (2sbh per layer) plus one block's activations while it is
recomputed. The loss projects masked rows through the LM head ``loss_chunk_size`` rows at a time, holding
fp32 logits and their gradient: 2 · chunk · V · 4 bytes.

Estimates, not measurements: 10% of the GPU is kept back for the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from dlm.config import RunConfig, apply_overrides, validate
from dlm.errors import ConfigError
from dlm.modeling import non_embedding_param_count, param_count

GB = 1e9
HEADROOM = 0.10


def parse_size(text: str) -> float:
    """``80GB``, ``80G``, ``141 GiB``, ``2.3T`` (tokens) or a plain number → a float (bytes or count)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgtp]?)(i?)(b?)\s*", text.lower())
    if not match:
        raise ConfigError(f"config error: {text!r} is not a size; write e.g. 80GB, 141GiB, 2.3T or 1e12")
    number, unit, binary, _ = match.groups()
    base = 1024 if binary else 1000
    return float(number) * base ** "_kmgtp".index(unit or "_")


@dataclass
class MemoryLine:
    name: str
    gpu_bytes: float
    cpu_bytes: float = 0.0
    note: str = ""


@dataclass
class DryRunReport:
    """Everything the dry run prints; also ``--json``."""

    world_size: int
    params: int
    zero_stage: int
    precision: str
    offload_optimizer: str
    offload_params: str
    activation_checkpointing: bool
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int
    tokens_per_step: int
    steps: int
    token_budget: float
    steps_for_budget: int
    gpu_memory: float
    build_peak: float = 0.0  # zero.Init: the whole model gathered once to initialise it, before any optimizer state
    lines: list[MemoryLine] = field(default_factory=list)

    @property
    def gpu_total(self) -> float:
        return sum(line.gpu_bytes for line in self.lines)

    @property
    def cpu_total(self) -> float:
        return sum(line.cpu_bytes for line in self.lines)

    @property
    def usable(self) -> float:
        return self.gpu_memory * (1.0 - HEADROOM)

    @property
    def fits(self) -> bool:
        return max(self.gpu_total, self.build_peak) <= self.usable

    def verdict(self) -> str:
        """One line: fits or not, and the reason (the largest item, and what would shrink it)."""
        largest = max(self.lines, key=lambda line: line.gpu_bytes)
        share = f"{self.gpu_total / GB:.1f} GB of {self.gpu_memory / GB:.0f} GB ({self.gpu_total / self.gpu_memory:.0%})"
        if self.build_peak > self.usable:
            return (
                f"DOES NOT FIT: building under zero.Init gathers the whole model once ({self.build_peak / GB:.1f} GB) "
                f"to initialise it, more than the {self.usable / GB:.0f} GB usable; use engine.precision=bf16"
            )
        if self.fits:
            return f"FITS: {share}, within the {self.usable / GB:.0f} GB left after 10% headroom; largest item: {largest.name}"
        hints = {
            "activations": "enable engine.activation_checkpointing or lower run.micro_batch_size",
            "optimizer states": "use a higher ZeRO stage, more workers or engine.offload_optimizer=cpu",
            "gradients": "use ZeRO stage 2 or 3, or more workers",
            "parameters": "use ZeRO stage 3, more workers or engine.offload_params=cpu",
            "LM-head loss chunk": "lower objective.loss_chunk_size",
        }
        hint = hints.get(largest.name, "use more workers")
        return (
            f"DOES NOT FIT: {share} exceeds the {self.usable / GB:.0f} GB usable; largest item: {largest.name} "
            f"({largest.gpu_bytes / GB:.1f} GB): {hint}"
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(gpu_total=self.gpu_total, cpu_total=self.cpu_total, fits=self.fits, verdict=self.verdict())
        return out


def config_at_world_size(cfg: RunConfig, world_size: int) -> RunConfig:
    """Re-validate ``cfg`` as if launched with ``world_size`` workers (batch rules depend on it)."""
    tree = cfg.model_dump(mode="json", exclude_unset=True)
    kind = cfg.launcher.kind if cfg.launcher.kind != "local" or world_size == 1 else "multiprocess"
    return validate(apply_overrides(tree, [f"launcher.workers={world_size}", f"launcher.kind={kind}"]))


def estimate(cfg: RunConfig, world_size: int, gpu_memory: float, token_budget: float | None = None) -> DryRunReport:
    """The memory table and token arithmetic for ``cfg`` on ``world_size`` GPUs of ``gpu_memory`` bytes."""
    cfg = config_at_world_size(cfg, world_size)
    arch = cfg.model.resolve()
    n = param_count(arch)
    deepspeed = cfg.engine.kind == "deepspeed"
    stage = int(cfg.engine.resolved_zero_stage()) if deepspeed else 0
    offload_opt, offload_par = cfg.engine.resolved_offload() if deepspeed else ("none", "none")
    bf16 = cfg.engine.precision != "fp32"  # auto means bf16 on the GPUs this plans for
    w = world_size
    # DeepSpeed bf16 keeps bf16 weights/gradients and fp32 masters; the plain engine autocasts fp32 weights.
    weight_bytes, grad_bytes, optim_bytes = (2, 2, 12) if bf16 and deepspeed else (4, 4, 8)

    def shard(total: float, partitioned: bool) -> float:
        return total / w if partitioned else total

    params = shard(weight_bytes * n, stage >= 3)
    grads = shard(grad_bytes * n, stage >= 2)
    optim = shard(optim_bytes * n, stage >= 1)
    lines = [
        MemoryLine("parameters", 0.0 if offload_par == "cpu" else params, params if offload_par == "cpu" else 0.0,
                   f"{'bf16' if weight_bytes == 2 else 'fp32'}{', partitioned' if stage >= 3 else ', replicated'}"
                   f"{', offloaded to CPU' if offload_par == 'cpu' else ''}"),
        MemoryLine("gradients", grads, 0.0, "partitioned" if stage >= 2 else "replicated"),
        MemoryLine("optimizer states", 0.0 if offload_opt == "cpu" else optim, optim if offload_opt == "cpu" else 0.0,
                   f"{'fp32 master + ' if weight_bytes == 2 else ''}Adam m, v{', partitioned' if stage >= 1 else ', replicated'}"
                   f"{', offloaded to CPU' if offload_opt == 'cpu' else ''}"),
    ]
    if stage >= 3:
        largest = max(arch.vocab_size * arch.d_model, _block_param_count(arch))
        lines.append(MemoryLine("ZeRO-3 gathered layers", 2 * largest * weight_bytes, 0.0,
                                "the layer in use and the one prefetched"))
    s, b, h, f = cfg.data.seq_len, cfg.run.micro_batch_size, arch.d_model, arch.mlp_hidden
    per_layer = (16 * h + 8 * f) * s * b * (1 if bf16 else 2)
    if cfg.engine.activation_checkpointing:
        acts = 2 * s * b * h * (1 if bf16 else 2) * arch.n_layers + per_layer
        act_note = f"checkpointed: block inputs of {arch.n_layers} layers + one block recomputed"
    else:
        acts = per_layer * arch.n_layers
        act_note = f"(16h + 8f)·s·b per layer x {arch.n_layers} layers, micro-batch {b} x {s}"
    lines.append(MemoryLine("activations", float(acts), 0.0, act_note))
    chunk = min(cfg.objective.loss_chunk_size, s * b)
    lines.append(MemoryLine("LM-head loss chunk", 2.0 * chunk * arch.vocab_size * 4, 0.0,
                            f"fp32 logits + grad of {chunk} masked rows x {arch.vocab_size} vocab"))
    from dlm.training.deepspeed_engine import uses_zero_init

    build_peak = float(n * weight_bytes) if uses_zero_init(cfg, arch) else 0.0
    tokens_per_step = cfg.run.micro_batch_size * cfg.run.grad_accum_steps * w * s
    budget = float(token_budget) if token_budget is not None else float(tokens_per_step * cfg.run.steps)
    return DryRunReport(
        world_size=w, params=n, zero_stage=stage, precision="bf16" if bf16 else "fp32",
        offload_optimizer=offload_opt, offload_params=offload_par,
        activation_checkpointing=cfg.engine.activation_checkpointing, micro_batch_size=cfg.run.micro_batch_size,
        grad_accum_steps=cfg.run.grad_accum_steps, seq_len=s, tokens_per_step=tokens_per_step, steps=cfg.run.steps,
        token_budget=budget, steps_for_budget=math.ceil(budget / tokens_per_step), gpu_memory=gpu_memory, build_peak=build_peak,
        lines=lines,
    )


def _block_param_count(arch: Any) -> int:
    """Parameters of one transformer block (what ZeRO-3 gathers at a time inside the stack)."""
    return non_embedding_param_count(arch) // arch.n_layers


def format_report(report: DryRunReport, config_name: str) -> str:
    """The table ``dlm launch --dry-run`` prints."""
    engine = f"ZeRO-{report.zero_stage}" if report.zero_stage else "no ZeRO sharding"
    rows = [
        f"dry run of {config_name} at world size {report.world_size} ({engine}, {report.precision}, "
        f"offload optimizer: {report.offload_optimizer}, params: {report.offload_params})",
        f"  parameters         {report.params:,}",
        f"  tokens per step    {report.tokens_per_step:,} (micro {report.micro_batch_size} x accum "
        f"{report.grad_accum_steps} x {report.world_size} ranks x {report.seq_len} tokens)",
        f"  run.steps          {report.steps:,} = {report.steps * report.tokens_per_step:.3e} tokens",
        f"  token budget       {report.token_budget:.3e} tokens = {report.steps_for_budget:,} steps",
        f"  per-GPU memory     {'GPU GB':>8} {'CPU GB':>8}",
    ]
    for line in report.lines:
        rows.append(f"    {line.name:<24} {line.gpu_bytes / GB:8.2f} {line.cpu_bytes / GB:8.2f}  {line.note}")
    rows.append(f"    {'total':<24} {report.gpu_total / GB:8.2f} {report.cpu_total / GB:8.2f}  per rank")
    if report.build_peak:
        rows.append(f"    {'build peak (zero.Init)':<24} {report.build_peak / GB:8.2f} {'':8}  the whole model "
                    f"gathered once to initialise it")
    rows.append(report.verdict())
    return "\n".join(rows)
