"""Ray Train: the same training loop in ``launcher.workers`` workers of a Ray cluster, restarted after failures.

``dlm launch CONFIG --workers N --ray-address auto|local|HOST:PORT`` builds a ``TorchTrainer`` with
``ScalingConfig`` (workers, GPUs, resources per worker), ``RunConfig`` (storage path, name),
``FailureConfig(max_failures)`` and ``CheckpointConfig(num_to_keep = checkpoint.keep_last)``. Ray creates
the process group and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; each worker runs :func:`dlm.training.train`.

Checkpoints: the loop writes them into ``run.dir/checkpoints`` as always (every rank its DeepSpeed partition,
so ``run.dir`` must be on storage all nodes share) and :class:`RayReportHook` reports each one with
``ray.train.report``, which copies it into ``storage_path/name``. When a worker dies, Ray tears the group
down, starts a new one, and every worker resumes from ``ray.train.get_checkpoint()`` — the last reported
checkpoint — exactly as ``checkpoint.resume`` would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlm.config import RunConfig, validate
from dlm.errors import ConfigError, UserError
from dlm.launcher.multiprocess import HookFactory
from dlm.training.hooks import StepInfo, TrainHook

# Environment the workers need to behave like this process (offline hubs, wandb mode, the op build cache).
_FORWARDED_ENV_PREFIXES = ("DLM_", "HF_", "WANDB_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_EXTENSIONS_DIR")


class RayReportHook(TrainHook):
    """Reports every complete checkpoint to Ray Train (rank 0 hands over the directory; every rank reports,
    because ``ray.train.report`` is a barrier across the workers)."""

    def __init__(self) -> None:
        self.last_loss: Any = None

    def on_step_end(self, info: StepInfo) -> None:
        self.last_loss = info.loss

    def on_checkpoint(self, step: int, path: Path, is_main: bool) -> None:
        import ray.train

        metrics: dict[str, Any] = {"step": step}
        if self.last_loss is not None:
            metrics["loss"] = float(self.last_loss)
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if is_main else None
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=path.name, delete_local_checkpoint_after_upload=False
        )


def _train_worker(config: dict[str, Any]) -> None:
    """The function every Ray worker runs: validate, pick up Ray's checkpoint if restarted, train."""
    import ray.train

    from dlm.training import train

    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])  # Ray starts workers elsewhere; configs name data relative to the launch dir
    cfg = validate(config["tree"])
    hooks: list[TrainHook] = [RayReportHook(), *(factory() for factory in config["hook_factories"])]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        train(cfg, hooks=hooks)
        return
    with checkpoint.as_directory() as directory:
        cfg.checkpoint.resume = str(directory)
        train(cfg, hooks=hooks)


def connect(address: str | None) -> None:
    """Join (``auto``, ``HOST:PORT``, ``ray://...``) or start (``local``) a Ray cluster, unless already joined."""
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES)}
    target = address or "auto"
    try:
        ray.init(address=target, runtime_env={"env_vars": env}, log_to_driver=True)
    except ConnectionError as exc:
        raise ConfigError(
            f"config error: launcher.ray_address = {target!r}: no Ray cluster there ({exc}); start one with "
            f"`ray start --head`, or use --ray-address local to run one inside this command"
        ) from None


def use_gpu(cfg: RunConfig, cluster: dict[str, float]) -> bool:
    """``launcher.use_gpu``, else: GPUs when the run may use CUDA and the cluster has some."""
    if cfg.launcher.use_gpu is not None:
        return cfg.launcher.use_gpu
    return cfg.run.device != "cpu" and cluster.get("GPU", 0.0) > 0


def placeable_workers(nodes: Sequence[dict[str, float]], need: dict[str, float]) -> int:
    """How many workers needing ``need`` each fit on ``nodes`` (a worker never spans two nodes)."""
    total = 0
    for node in nodes:
        fits = [math.floor(node.get(key, 0.0) / amount + 1e-9) for key, amount in need.items() if amount > 0]
        total += min(fits) if fits else 0
    return total


def check_placement(cfg: RunConfig, gpu: bool) -> None:
    """Refuse a job the cluster can never place, before any worker starts (Ray would wait forever)."""
    import ray

    need = cfg.launcher.worker_resources(gpu)
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    capacity = placeable_workers(nodes, need)
    if capacity < cfg.launcher.workers:
        have = ", ".join(
            f"{{{', '.join(f'{k}: {v:g}' for k, v in sorted(n.items()) if k in need)}}}" for n in nodes
        )
        raise ConfigError(
            f"config error: launcher.workers = {cfg.launcher.workers}: the Ray cluster can place at most {capacity} "
            f"workers needing {need} each (its {len(nodes)} node(s) have {have}); lower --workers, change "
            f"launcher.resources_per_worker, or add nodes (launcher.check_resources=false for autoscaling clusters)"
        )


def run_ray(cfg: RunConfig, hook_factories: Sequence[HookFactory] = ()) -> dict[str, Any]:
    """Run the job on Ray and return rank 0's summary (read from ``run.dir/summary.json``)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    connect(cfg.launcher.ray_address)
    gpu = use_gpu(cfg, ray.cluster_resources())
    if cfg.launcher.check_resources:
        check_placement(cfg, gpu)
    run_dir = Path(cfg.run.dir).resolve()
    storage = Path(cfg.launcher.storage_path).resolve() if cfg.launcher.storage_path else run_dir / "ray"
    previous = storage / cfg.run.name
    if previous.exists() and cfg.checkpoint.resume != "auto":
        # Ray restores a run whose name and storage it has seen before, which would silently resume it.
        # Only checkpoint.resume=auto asks for that; a fresh run (or an explicit checkpoint) starts clean.
        print(f"removing Ray's copy of an earlier run at {previous} (set checkpoint.resume=auto to continue it)")
        shutil.rmtree(previous)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "tree": cfg.model_dump(mode="json", exclude_unset=True),
            "cwd": os.getcwd(),
            "hook_factories": tuple(hook_factories),
        },
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.launcher.workers, use_gpu=gpu, resources_per_worker=cfg.launcher.worker_resources(gpu)
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.launcher.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise _user_error_in(exc) or exc from None
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        return dict(json.loads(summary_file.read_text()))
    return {"ray_result_path": str(result.path), "metrics": result.metrics}


def _user_error_in(exc: BaseException) -> UserError | None:
    """The first worker failure that is a dlm UserError (Ray wraps them), so the CLI can print one line."""
    failures = getattr(exc, "worker_failures", {}) or {}
    for failure in failures.values():
        seen: BaseException | None = failure
        while seen is not None:
            if isinstance(seen, UserError):
                return seen
            seen = getattr(seen, "cause", None) or seen.__cause__
    return None
