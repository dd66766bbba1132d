"""Shared fixtures: the repository root as working directory and a tiny, fast training config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs name data relative to the repository root, as `make train` runs them."""
    monkeypatch.chdir(ROOT)


def tiny_overrides(run_dir: Path, **extra: object) -> list[str]:
    """A seconds-long run of the smoke config: small rows, few docs, no wandb unless asked."""
    base = {
        "run.dir": str(run_dir),
        "run.steps": 4,
        "run.micro_batch_size": 4,
        "run.eval_every": 2,
        "run.eval_batches": 2,
        "run.eval_samples": 2,
        "data.seq_len": 64,
        "data.max_docs": 40,
        "data.eval_fraction": 0.2,
        "schedule.warmup_steps": 1,
        "logging.every": 2,
        "logging.progress": False,
        "logging.wandb.mode": "disabled",
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect `gpu` tests where no CUDA device exists, so CPU runs report what they really ran."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
