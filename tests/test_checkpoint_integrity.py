"""Checkpoint integrity as a user meets it: a resume from an earlier step keeps its own checkpoints, damaged
files are caught by the manifest, a refused resume changes nothing, broken files give one line instead of a
traceback, and SIGTERM/SIGINT save at a step boundary and resume exactly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm.cli import main
from dlm.modeling.manifest import MANIFEST_NAME
from dlm.training.checkpoint import CheckpointError, Checkpointer, load_state
from dlm.training.metrics import read_records

from .conftest import ROOT, tiny_overrides
from .runs import SMOKE, metric_records, start_run, wait_until
from .test_checkpoint import _engine, _save


def _overrides(run_dir: Path, **extra: object) -> list[str]:
    base = {"run__steps": 8, "run__eval_every": 0, "logging__every": 1, "checkpoint__interval": 4,
            "engine__precision": "fp32", "schedule__kind": "constant"}  # the same LR whatever run.steps is
    base.update(extra)
    return tiny_overrides(run_dir, **base)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_records(run_dir) if "loss" in r}


def _steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in sorted((run_dir / "checkpoints").glob("step_*")) if p.is_dir()]


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _flip(file: Path, offset: int, size: int = 4096) -> None:
    data = bytearray(file.read_bytes())
    offset = min(offset, len(data) - size)
    data[offset : offset + size] = bytes(b ^ 0xFF for b in data[offset : offset + size])
    file.write_bytes(bytes(data))


# -- 1. pruning after a resume from an earlier step ------------------------------------------------------------


def test_pruning_after_resuming_an_earlier_step_keeps_the_new_lineage(tmp_path: Path) -> None:
    old, engine = Checkpointer(tmp_path, keep_last=10), _engine()
    for step in (5, 10, 15, 20, 25, 30):
        _save(old, step, engine)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    start = ckpt.select(str(tmp_path / "checkpoints" / "step_000005"), lambda path: [])
    assert start == tmp_path / "checkpoints" / "step_000005"
    assert ckpt.foreign == {10, 15, 20, 25, 30}
    _save(ckpt, 10, engine)  # replaces the old branch's step 10
    assert ckpt.complete_steps() == [5, 10, 15, 20, 25, 30], "nothing of either lineage is pruned yet"
    _save(ckpt, 15, engine)
    assert ckpt.complete_steps() == [10, 15, 20, 25, 30], "this lineage keeps its last 2; the old branch is untouched"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000015"
    assert ckpt.resolve("auto") == tmp_path / "checkpoints" / "step_000015"
    # a broken `latest` falls back to the most recently committed checkpoint, not the highest step number
    (tmp_path / "checkpoints" / "latest").write_bytes(b"\xff\xfe")
    assert ckpt.resolve("auto") == tmp_path / "checkpoints" / "step_000015"
    # a second restart of the new lineage knows the old branch is foreign from the step numbers alone
    again = Checkpointer(tmp_path, keep_last=2)
    assert again.select("auto", lambda path: []) == tmp_path / "checkpoints" / "step_000015"
    assert again.foreign == {20, 25, 30}


def test_cli_resume_from_an_earlier_step_repeats_the_run_and_keeps_its_checkpoints(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert main(["train", SMOKE, *_overrides(straight, run__steps=12)]) == 0
    run = tmp_path / "run"
    assert main(["train", SMOKE, *_overrides(run, run__steps=20, checkpoint__keep_last=10)]) == 0
    assert _steps(run) == [4, 8, 12, 16, 20]
    step4 = run / "checkpoints" / "step_000004"
    argv = ["train", SMOKE, *_overrides(run, run__steps=12, checkpoint__keep_last=2), "--resume", str(step4)]
    assert main(argv) == 0
    assert _steps(run) == [8, 12, 16, 20], "the new step_8/step_12 survive; the old branch's 16/20 are kept"
    assert _latest(run) == "step_000012"
    assert {s: v for s, v in _losses(run).items() if s <= 12} == _losses(straight)
    assert main(["train", SMOKE, *_overrides(run, run__steps=12), "--resume", "auto"]) == 0  # done
    assert _latest(run) == "step_000012"


# -- 2. checksums: a flipped block is caught ---------------------------------------------------------------------


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path: Path) -> None:
    path = _save(Checkpointer(tmp_path), 1, _engine())
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["step"] == 1
    assert sorted(manifest["files"]) == ["client_rank00000.pt", "config.yaml", "engine/model.safetensors",
                                         "engine/optim.pt"]
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size
        assert len(entry["xxh3_128"]) == 32


def test_a_flipped_block_falls_back_on_auto_and_is_refused_by_name(tmp_path: Path, capsys) -> None:
    straight = tmp_path / "straight"
    assert main(["train", SMOKE, *_overrides(straight)]) == 0
    run = tmp_path / "run"
    assert main(["train", SMOKE, *_overrides(run)]) == 0
    weights = run / "checkpoints" / "step_000008" / "engine" / "model.safetensors"
    _flip(weights, weights.stat().st_size // 2)  # inside the tensor data: safetensors itself would load it
    capsys.readouterr()

    step8 = run / "checkpoints" / "step_000008"
    assert main(["train", SMOKE, *_overrides(run), "--resume", str(step8)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "damaged (engine/model.safetensors differs from what was written (checksum mismatch))" in err
    assert "--resume" in err and "step_000004" in err

    assert main(["train", SMOKE, *_overrides(run), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "step_000008 is damaged" in err and "trying an older one" in err
    assert _losses(run) == _losses(straight), "resumed from step 4 and repeated steps 5-8 exactly"


def test_every_checkpoint_damaged_is_one_line(tmp_path: Path) -> None:
    ckpt, engine = Checkpointer(tmp_path), _engine()
    for step in (1, 2):
        path = _save(ckpt, step, engine)
        (path / "client_rank00000.pt").write_bytes(b"x")
    from dlm.training.checkpoint import verify_checkpoint

    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged \(step_000002, step_000001\)"):
        ckpt.select("auto", verify_checkpoint, warn=lambda line: None)


# -- 3. a refused resume leaves config.yaml alone ------------------------------------------------------------------


def test_a_refused_resume_does_not_touch_the_run_config(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", SMOKE, *_overrides(run, run__steps=4)]) == 0
    before = (run / "config.yaml").read_text()
    argv = ["train", SMOKE, *_overrides(run, run__steps=8, model__n_layers=2), "--resume", "auto"]
    assert main(argv) == 2
    assert "model.n_layers: checkpoint 4 vs config 2" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before


# -- 4. one line instead of a traceback ----------------------------------------------------------------------------


def test_garbage_optimizer_state_is_one_line_without_torch_hint(tmp_path: Path) -> None:
    path = _save(Checkpointer(tmp_path), 1, _engine())
    (path / "engine" / "optim.pt").write_bytes(b"\x80\x04garbage that is no zip and no pickle")
    with pytest.raises(CheckpointError) as info:
        _engine().load_checkpoint(path / "engine")
    message = str(info.value)
    assert "optim.pt" in message and "corrupt" in message and "\n" not in message
    assert "weights_only" not in message
    (path / "engine" / "optim.pt").unlink()
    with pytest.raises(CheckpointError, match="optim.pt is missing"):
        load_state(path / "engine" / "optim.pt")


def test_broken_files_of_a_legacy_checkpoint_exit_2_with_one_line(tmp_path: Path) -> None:
    """A checkpoint without a manifest (written before manifests existed) still fails cleanly."""
    run = tmp_path / "run"
    assert main(["train", SMOKE, *_overrides(run, run__steps=4)]) == 0
    step = run / "checkpoints" / "step_000004"
    (step / MANIFEST_NAME).unlink()
    (step / "engine" / "optim.pt").write_bytes(b"\x00garbage")
    argv = [sys.executable, "-m", "dlm.cli", "train", SMOKE, *_overrides(run, run__steps=8), "--resume", "auto"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("dlm: cannot read") and "optim.pt" in err and err.count("\n") == 0, err
    assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr

    (step / "config.yaml").unlink()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "damaged (config.yaml is missing)" in proc.stderr
    with pytest.raises(CheckpointError, match="has no config.yaml; it is incomplete"):
        Checkpointer.check_compatible(step, {"model": {}, "tokenizer": {}})


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path: Path, capsys) -> None:
    straight = tmp_path / "straight"
    assert main(["train", SMOKE, *_overrides(straight)]) == 0
    run = tmp_path / "run"
    assert main(["train", SMOKE, *_overrides(run, run__steps=4)]) == 0
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "loss": 7.1, "grad_n')  # the process died mid-write
    assert len(read_records(run / "metrics.jsonl")) == len(metric_records(straight)) - 4
    assert main(["train", SMOKE, *_overrides(run), "--resume", "auto"]) == 0
    assert "skipped 1 torn or malformed line(s)" in capsys.readouterr().err
    assert _losses(run) == _losses(straight)
    assert (run / "loss_curve.png").is_file()


def test_a_full_disk_at_save_names_the_directory_and_the_kept_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real = Checkpointer.write_client_state

    def fill_disk_at_step_8(tmp: Path, rank: int, state: dict) -> None:
        if state["step"] == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, rank, state)

    monkeypatch.setattr(Checkpointer, "write_client_state", staticmethod(fill_disk_at_step_8))
    run = tmp_path / "run"
    assert main(["train", SMOKE, *_overrides(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"no space left on device in {run / 'checkpoints'} while saving step 8; the checkpoint of step 4 is kept" in err
    assert _steps(run) == [4] and not list((run / "checkpoints").glob("*.tmp"))


def test_torch_save_on_a_full_disk_is_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a full disk only as its zip writer's "unexpected pos"; the free space tells."""
    ckpt, engine = Checkpointer(tmp_path), _engine()
    _save(ckpt, 1, engine)

    def torn_write(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", torn_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    with pytest.raises(CheckpointError, match="no space left on device .* the checkpoint of step 1 is kept"):
        _save(ckpt, 2, engine)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: a real bug, not hidden
        _save(ckpt, 2, engine)


# -- 5. SIGTERM / SIGINT: save at the step boundary, stop, resume exactly ----------------------------------------


def _signal_after_first_step(argv: list[str], run_dir: Path, signum: int, group: bool) -> tuple[int, str]:
    """Start a run, send ``signum`` once it has logged a step (to its process group, as a terminal or a
    scheduler does, or to the process alone), and return its exit code and stderr."""
    proc = start_run(argv, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    wait_until(proc, lambda: metrics.is_file() and bool(metrics.read_text().strip()))
    (os.killpg if group else os.kill)(proc.pid, signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.parametrize(
    ("signum", "group", "workers"),
    [(signal.SIGTERM, True, 0), (signal.SIGINT, True, 1)],
    ids=["sigterm-to-group", "ctrl-c-with-a-data-worker"],
)
def test_a_stop_signal_saves_at_a_step_boundary_and_resume_repeats_the_run(
    tmp_path: Path, signum: int, group: bool, workers: int
) -> None:
    steps = 24
    extra = {"run__steps": steps, "checkpoint__interval": 0, "data__num_workers": workers}
    straight = tmp_path / "straight"
    assert main(["train", SMOKE, *_overrides(straight, **extra)]) == 0
    run = tmp_path / "run"
    returncode, err = _signal_after_first_step(["train", SMOKE, *_overrides(run, **extra)], run, signum, group)
    assert returncode == 128 + signum, err
    stopped = _steps(run)
    assert len(stopped) == 1 and 0 < stopped[0] < steps, err
    name = signal.Signals(signum).name
    assert f"dlm: stopped by {name} after step {stopped[0]} of {steps}; its checkpoint is" in err
    assert "--resume auto" in err and "Traceback" not in err
    assert not (run / "summary.json").exists()
    assert main(["train", SMOKE, *_overrides(run, **extra), "--resume", "auto"]) == 0
    assert _losses(run) == _losses(straight)


def test_sigterm_to_dlm_launch_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    run = tmp_path / "launch"
    argv = ["launch", SMOKE, *_overrides(run, run__steps=40, checkpoint__interval=0), "--workers", "2"]
    returncode, err = _signal_after_first_step(argv, run, signal.SIGTERM, group=False)  # the launcher alone
    assert returncode == 128 + signal.SIGTERM, err
    (step,) = _steps(run)
    saved = run / "checkpoints" / f"step_{step:06d}"
    assert sorted(p.name for p in saved.glob("client_rank*.pt")) == ["client_rank00000.pt", "client_rank00001.pt"]
    states = [torch.load(p, weights_only=True) for p in sorted(saved.glob("client_rank*.pt"))]
    assert [s["step"] for s in states] == [step, step], "both ranks saved the same step"
    assert f"stopped by SIGTERM after step {step} of 40" in err
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    assert "client_rank00001.pt" in manifest["files"], "rank 1's stripe of checksums reached the manifest"


def test_export_refuses_a_damaged_checkpoint(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", SMOKE, *_overrides(run, run__steps=4, checkpoint__save_final=False)]) == 0
    optim = run / "checkpoints" / "step_000004" / "engine" / "optim.pt"
    _flip(optim, optim.stat().st_size // 2, size=64)
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "step_000004 is damaged (engine/optim.pt differs from what was written (checksum mismatch))" in err
    assert not (tmp_path / "out").exists()
