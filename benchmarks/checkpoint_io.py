"""Benchmark: resumable checkpoints and exports of the ``small`` preset — save and load GB/s, and the time from
``--resume auto`` to the first trained step.

* **Resumable checkpoints** (model + AdamW state + schedule + client state), written by
  :class:`~dlm.training.checkpoint.Checkpointer` exactly as the loop writes them (temp dir, fsync, rename,
  ``latest``), for the plain engine and for DeepSpeed ZeRO-2 in one process (a one-rank gloo group). Save
  figures include the fsyncs: the checkpoint is durable when the call returns. Before each load the files are
  dropped from the page cache (``posix_fadvise(DONTNEED)``), so loads read from the disk, as after a crash.
* **Exports** (``dlm export``, fp32 and bf16) of the plain checkpoint and of the ZeRO-2 checkpoint: bytes of
  the export over the wall time of the call (fsync included), the best of ``--repeats``.
* **Resume to first step**: ``dlm train``'s ``train()`` in this process (imports already warm) from the call
  to the end of step 1 of a fresh run, and to the end of the first step after ``--resume auto``; the
  difference is what resuming costs.

    .venv/bin/python benchmarks/checkpoint_io.py
    .venv/bin/python benchmarks/checkpoint_io.py --preset tiny --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _env import environment
from hf_interop import _best

from dlm.config import RunConfig, load_config
from dlm.modeling import export
from dlm.training.checkpoint import Checkpointer, rng_state
from dlm.training.engine import build_engine, build_training_model
from dlm.training.hooks import StepInfo, TrainHook
from dlm.training.loop import train
from dlm.training.objective import forward_process, mask_generator

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
CPU = torch.device("cpu")


def _config(run_dir: Path, preset: str, *extra: str) -> RunConfig:
    overrides = [
        f"model.preset={preset}", f"run.dir={run_dir}", "run.micro_batch_size=1", "data.seq_len=128",
        "data.max_docs=200", "run.steps=4", "schedule.warmup_steps=1", "run.eval_every=0", "run.eval_batches=1",
        "run.eval_samples=1", "engine.precision=fp32", "logging.progress=false", "logging.wandb.mode=disabled",
        *extra,
    ]
    return load_config(SMOKE, overrides)


def _size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _evict(root: Path) -> None:
    """Drop ``root``'s files from the page cache, so the next read comes from the disk."""
    for file in root.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _trained_engine(cfg: RunConfig) -> Any:
    """An engine after one optimizer step, so the optimizer holds its full state (AdamW's two moments)."""
    torch.manual_seed(0)
    engine = build_engine(cfg, build_training_model(cfg, CPU), CPU)
    ids = torch.randint(0, 50257, (1, 128), generator=torch.Generator().manual_seed(0))
    noised = forward_process(ids, 50257, mask_generator(0, 1))
    engine.backward(engine.loss(noised, 4096).loss_sum / noised.normalizer)
    engine.step()
    return engine


def _checkpoint_io(label: str, cfg: RunConfig, root: Path, repeats: int) -> tuple[dict[str, Any], Path]:
    """Save and load GB/s of one engine's resumable checkpoint; returns the row and the step directory."""
    engine = _trained_engine(cfg)
    checkpointer = Checkpointer(root / label, keep_last=2)
    client = {"step": 1, "tokens_seen": 128, "rng": rng_state()}
    resolved = cfg.resolved()
    steps = iter(range(1, 1000))
    save_s, path = _best(lambda: checkpointer.save(next(steps), engine, client, resolved), repeats)
    size = _size(path)

    def load() -> None:
        _evict(path)
        engine.load_checkpoint(path / "engine")
        Checkpointer.read_client_state(path, 0)

    load_s, _ = _best(load, repeats)
    gb = size / 1e9
    row = {"what": f"resumable checkpoint, {label}", "GB": round(gb, 3), "save_s": round(save_s, 3),
           "save_GB_per_s": round(gb / save_s, 3), "load_s": round(load_s, 3), "load_GB_per_s": round(gb / load_s, 3)}
    return row, path


def _export_rows(label: str, source: Path, root: Path, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for dtype in ("fp32", "bf16"):
        out = root / f"export-{label}-{dtype}"

        def do_export(out: Path = out, dtype: str = dtype) -> Any:
            shutil.rmtree(out, ignore_errors=True)
            return export(source, out, dtype=dtype, max_shard_size="200MB")

        seconds, result = _best(do_export, repeats)
        gb = result.total_size / 1e9
        rows.append({"what": f"dlm export {dtype} of the {label} checkpoint", "GB": round(gb, 3),
                     "shards": len(result.shards), "export_s": round(seconds, 3),
                     "export_GB_per_s": round(gb / seconds, 3)})
    return rows


class _FirstStep(TrainHook, Exception):
    """Records when the first step of this ``train()`` call ended, then stops the run (no eval, no save)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None
        self.step: int | None = None

    def on_step_end(self, info: StepInfo) -> None:
        self.at, self.step = time.perf_counter(), info.step
        raise self


def _to_first_step(cfg: RunConfig) -> tuple[float, int]:
    hook = _FirstStep()
    start = time.perf_counter()
    try:
        train(cfg, [hook])
    except _FirstStep:
        pass
    assert hook.at is not None and hook.step is not None
    return hook.at - start, hook.step


def _resume_rows(preset: str, root: Path) -> list[dict[str, Any]]:
    """Fresh start vs ``--resume auto`` from a checkpoint the loop wrote, to the end of the first step."""
    run_dir = root / "resume-run"
    train(_config(run_dir, preset, "run.steps=2", "checkpoint.interval=1", "checkpoint.save_final=false"))
    _evict(run_dir)
    resume_s, step = _to_first_step(_config(run_dir, preset, "run.steps=3", "checkpoint.resume=auto"))
    assert step == 3, "the resumed run must start after the last checkpoint (step 2)"
    fresh_s, _ = _to_first_step(_config(root / "fresh-run", preset, "run.steps=2"))
    return [{"what": "train() call to end of first step, fresh start", "seconds": round(fresh_s, 2)},
            {"what": "train() call to end of first step, --resume auto", "seconds": round(resume_s, 2),
             "resume_overhead_s": round(resume_s - fresh_s, 2)}]


def _measure(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def keep(new: list[dict[str, Any]]) -> None:
        for row in new:
            print(json.dumps(row), flush=True)
        rows.extend(new)

    keep(_resume_rows(args.preset, root))
    plain_row, plain_ckpt = _checkpoint_io("plain engine", _config(root / "cfg", args.preset), root, args.repeats)
    keep([plain_row])
    keep(_export_rows("plain engine", plain_ckpt, root, args.repeats))
    if not args.skip_deepspeed:
        from dlm.training.distributed import init_distributed

        ctx = init_distributed(CPU, require_group=True)  # DeepSpeed needs a process group, even of one rank
        try:
            cfg = _config(root / "cfg", args.preset, "engine.kind=deepspeed", "engine.zero_stage=2")
            ds_row, ds_ckpt = _checkpoint_io("DeepSpeed ZeRO-2, 1 process", cfg, root, args.repeats)
            keep([ds_row])
            keep(_export_rows("DeepSpeed ZeRO-2", ds_ckpt, root, args.repeats))
        finally:
            ctx.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-deepspeed", action="store_true")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed)")
    args = parser.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dlm-bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        rows = _measure(args, root)
        loadavg = os.getloadavg()
        report = {"preset": args.preset, "repeats": args.repeats, "environment": _versions(),
                  "loadavg_1_5_15": [round(x, 2) for x in loadavg], "results": rows}
        print(json.dumps(report, indent=2))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


def _versions() -> dict[str, Any]:
    import importlib.metadata

    env = environment(CPU)
    for package in ("deepspeed", "safetensors", "transformers"):
        env[package] = importlib.metadata.version(package)
    env["argv"] = sys.argv
    return env


if __name__ == "__main__":
    main()
