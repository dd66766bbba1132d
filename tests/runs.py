"""Helpers shared by the tests that run the real CLI: read a run directory back, compare weights, and kill a
run mid-way the way a crash would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .conftest import ROOT

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def metric_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of the run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per logged step."""
    return {r["step"]: r["loss"] for r in metric_records(run_dir) if "loss" in r}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or of every ``*.safetensors`` shard in a directory."""
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    out: dict[str, torch.Tensor] = {}
    for file in files:
        out.update(load_file(file))
    return out


def assert_same_weights(got: Path, want: Path, atol: float = 0.0) -> None:
    """Same names, fp32, and values within ``atol`` (0: bit for bit) — files or directories of shards."""
    a, b = load_weights(got), load_weights(want)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype == torch.float32, name
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def start_run(argv: list[str], stderr: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """``python -m dlm.cli ARGV`` in its own process group (a signal to the group reaches the workers it
    spawns, as a terminal's Ctrl-C or a scheduler's kill does)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dlm.cli", *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
        start_new_session=True,
    )


def wait_until(proc: subprocess.Popen[str], ready: Any, timeout: float = 300) -> None:
    """Return once ``ready()`` holds, polling what the other process writes (a file: there is no event to wait
    on across processes); fail if the run ended or ``timeout`` passed first, since the test would then prove
    nothing."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None and ready(), "the run ended (or timed out) before the test could act on it"


def kill_after_first_checkpoint(argv: list[str], run_dir: Path, timeout: float = 300) -> int:
    """Run ``python -m dlm.cli ARGV`` in its own process group, SIGKILL the whole group as soon as a complete
    checkpoint exists (a crash of the launcher and every worker it started), and return that checkpoint's step.

    Fails when the run ended before the kill: then the test would prove nothing about resuming.
    """
    proc = start_run(argv)
    latest = run_dir / "checkpoints" / "latest"
    wait_until(proc, latest.exists, timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended between the check and the kill: the assertion below says so
        pass
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished (or failed) before it could be killed"
    assert not (run_dir / "summary.json").exists()
    return int(latest.read_text().strip().split("_")[1])
