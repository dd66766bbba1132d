"""Training metrics: loss (overall and by noise level), grad norm, LR, throughput and MFU.

Values stay on the device between log steps and are read back only every ``logging.every`` steps, so
logging never stalls the accelerator more often than that. One record goes to three sinks: the tqdm
progress bar (with ETA), ``metrics.jsonl`` in the run directory, and wandb (offline unless configured).

FLOPs per token come from :func:`dlm.modeling.training_flops_per_token` (``6 N + 12 L d T``); MFU divides the
achieved FLOP/s by the device's dense bf16 peak from :data:`PEAK_TFLOPS`, or by ``logging.peak_tflops``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dlm.config import RunConfig
from dlm.training.distributed import DistContext
from dlm.training.objective import LENGTH_STATS, T_BUCKETS, LossParts

PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    # (substring of torch.cuda.get_device_name, dense bf16 TFLOP/s without sparsity); most specific first.
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPUs): MFU is then not reported."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


@dataclass
class StepStats:
    """What one optimizer step measured on this rank, summed over its micro-batches; after
    :meth:`summed_over_ranks`, over the whole job. The loop fills it, :class:`Metrics` reads it."""

    loss: Tensor  # the step's share of the global mean loss (each micro-batch divided by the global normaliser)
    bucket_sums: Tensor  # per-token loss summed by noise level (T_BUCKETS)
    bucket_counts: Tensor
    length: Tensor | None  # the length head's sums (LENGTH_STATS), when it trains
    tokens: int = 0
    grad_norm: Tensor = field(default_factory=lambda: torch.zeros(()))
    lr: float = 0.0
    data_seconds: float = 0.0

    @classmethod
    def zeros(cls, device: torch.device, length_head: bool) -> StepStats:
        n = len(T_BUCKETS)
        length = torch.zeros(len(LENGTH_STATS), device=device) if length_head else None
        return cls(torch.zeros((), device=device), torch.zeros(n, device=device), torch.zeros(n, device=device), length)

    def add(self, parts: LossParts, denominator: float | Tensor) -> None:
        """Accumulate one micro-batch's loss parts (the loss already divided by the step's normaliser)."""
        self.loss += parts.loss_sum.detach() / denominator
        self.bucket_sums += parts.bucket_sums
        self.bucket_counts += parts.bucket_counts
        if self.length is not None and parts.length_stats is not None:
            self.length += parts.length_stats

    def summed_over_ranks(self, ctx: DistContext) -> StepStats:
        """Everything logged summed over ranks in one all-reduce (the loss is already each rank's share of
        the global mean); grad norm, LR and data time stay this rank's. One process: itself."""
        if ctx.world_size == 1:
            return self
        n = self.bucket_sums.numel()
        extra = self.length if self.length is not None else torch.zeros(0, device=ctx.device)
        packed = torch.cat(
            [self.loss.reshape(1), self.bucket_sums, self.bucket_counts, extra,
             torch.tensor([float(self.tokens)], device=ctx.device)]
        ).double()
        packed = ctx.all_reduce_sum(packed)
        return StepStats(
            loss=packed[0].float(),
            bucket_sums=packed[1 : 1 + n].float(),
            bucket_counts=packed[1 + n : 1 + 2 * n].float(),
            length=packed[1 + 2 * n : -1].float() if self.length is not None else None,
            tokens=int(packed[-1].item()),
            grad_norm=self.grad_norm,
            lr=self.lr,
            data_seconds=self.data_seconds,
        )


def read_records(path: Path, warn: bool = False) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, skipping lines that are not whole JSON records with a step.

    A kill while a line is being appended leaves it torn; the records before it are intact and are what a
    plot, a resume or a reader wants. ``warn`` says once on stderr how many lines were skipped.
    """
    if not path.is_file():
        return []
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.strip():
            skipped += 1
    if skipped and warn:
        print(f"dlm: warning: {path}: skipped {skipped} torn or malformed line(s)", file=sys.stderr, flush=True)
    return records


class Metrics:
    """Accumulates per-step values on the device and emits a record every ``logging.every`` steps."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        flops_per_token: float,
        device: torch.device,
        start_step: int = 0,
    ) -> None:
        self.every = cfg.logging.every
        self.total_steps = cfg.run.steps
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops(device, cfg.logging.peak_tflops)
        self.device = device
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.bar = tqdm(
            total=cfg.run.steps, initial=start_step, disable=not cfg.logging.progress, desc="train", unit="step"
        )
        self.wandb = self._init_wandb(cfg, run_dir)
        self.tokens_seen = 0
        self._reset_window()

    def _truncate_after(self, step: int) -> None:
        """Keep only records up to ``step``: after a resume, steps past the checkpoint are logged again. A line
        torn by a crash mid-write is dropped here (with a warning) rather than kept to break every reader."""
        kept = [r for r in read_records(self.path, warn=True) if r["step"] <= step] if step > 0 else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(tmp, self.path)

    @staticmethod
    def _init_wandb(cfg: RunConfig, run_dir: Path) -> Any:
        if cfg.logging.wandb.mode == "disabled":
            return None
        import wandb

        return wandb.init(
            project=cfg.logging.wandb.project,
            entity=cfg.logging.wandb.entity,
            name=cfg.run.name,
            dir=str(run_dir),
            mode=cfg.logging.wandb.mode,
            config=cfg.resolved(),
        )

    def _reset_window(self) -> None:
        n = len(T_BUCKETS)
        self._loss = torch.zeros((), device=self.device)
        self._grad_norm = torch.zeros((), device=self.device)
        self._bucket_sums = torch.zeros(n, device=self.device)
        self._bucket_counts = torch.zeros(n, device=self.device)
        self._steps = 0
        self._tokens = 0
        self._data_s = 0.0
        self._length: Tensor | None = None
        self._gauges: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def update(self, step: int, stats: StepStats, gauges: dict[str, float] | None = None) -> dict[str, Any] | None:
        """Record optimizer step ``step`` (1-based); return the emitted record on log steps.

        The length head's sums are added over the window; ``gauges`` (the curriculum's seq_len and pad share)
        are reported as of the last step.
        """
        if stats.length is not None:
            self._length = stats.length if self._length is None else self._length + stats.length
        if gauges:
            self._gauges = dict(gauges)
        self._loss += stats.loss.detach().float()
        self._grad_norm += stats.grad_norm.float().to(self.device)
        self._bucket_sums += stats.bucket_sums
        self._bucket_counts += stats.bucket_counts
        self._steps += 1
        self._tokens += stats.tokens
        self.tokens_seen += stats.tokens
        self._data_s += stats.data_seconds
        self.bar.update(1)
        if step % self.every and step != self.total_steps:
            return None
        return self._emit(step, stats.lr)

    def _emit(self, step: int, lr: float) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tokens_per_s = self._tokens / elapsed
        record: dict[str, Any] = {
            "step": step,
            "loss": self._loss.item() / self._steps,
            "grad_norm": self._grad_norm.item() / self._steps,
            "lr": lr,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "tflops_per_s": tokens_per_s * self.flops_per_token / 1e12,
            "mfu": tokens_per_s * self.flops_per_token / (self.peak * 1e12) if self.peak else None,
            "data_wait_pct": 100.0 * self._data_s / elapsed,
        }
        sums, counts = self._bucket_sums.tolist(), self._bucket_counts.tolist()
        lo = 0.0
        for hi, s, c in zip(T_BUCKETS, sums, counts):
            record[f"loss_t{lo:.2f}-{hi:.2f}"] = s / c if c else None
            lo = hi
        if self._length is not None:
            eos_bce, eos_hit, eos_n, bucket_ce, bucket_hit, bucket_n = self._length.tolist()
            record.update({
                "length_eos_bce": eos_bce / max(eos_n, 1.0),
                "length_eos_acc": eos_hit / max(eos_n, 1.0),
                "length_bucket_ce": bucket_ce / max(bucket_n, 1.0),
                "length_bucket_acc": bucket_hit / max(bucket_n, 1.0),
            })
        record.update(self._gauges)
        if self.device.type == "cuda":
            record["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        self._reset_window()
        return record

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        """Eval results go to the same sinks, tagged with the step they were measured at."""
        self._write({"step": step, **values})
        self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
