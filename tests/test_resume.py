"""Exact resume: N steps straight equal k steps, SIGKILL, `--resume auto`, N − k steps — bit for bit on CPU."""

from __future__ import annotations

import json
from pathlib import Path

from dlm.cli import main

from .conftest import tiny_overrides
from .runs import SMOKE, kill_after_first_checkpoint, metric_records

STEPS = 60


def _overrides(run_dir: Path) -> list[str]:
    return tiny_overrides(
        run_dir,
        run__steps=STEPS,
        run__eval_every=20,
        logging__every=1,
        checkpoint__interval=4,
        engine__precision="fp32",
        objective__random_length_prob=0.2,  # exercise the random-length draw across the resume too
    )


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r.get("loss", r.get("eval_nelbo"))) for r in metric_records(run_dir)]


def test_sigkill_then_resume_auto_repeats_the_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert main(["train", SMOKE, *_overrides(straight)]) == 0

    killed = tmp_path / "killed"
    resumed_from = kill_after_first_checkpoint(["train", SMOKE, *_overrides(killed)], killed)
    assert 0 < resumed_from < STEPS

    assert main(["train", SMOKE, *_overrides(killed), "--resume", "auto"]) == 0
    assert _losses(killed) == _losses(straight)
    summary = json.loads((killed / "summary.json").read_text())
    reference = json.loads((straight / "summary.json").read_text())
    assert summary["eval_nelbo"] == reference["eval_nelbo"]
    assert summary["tokens_seen"] == reference["tokens_seen"]


def test_resume_auto_without_checkpoints_starts_fresh_and_bad_paths_fail(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "fresh"
    assert main(["train", SMOKE, *tiny_overrides(run_dir, run__steps=2), "--resume", "auto"]) == 0
    assert [s for s, _ in _losses(run_dir) if s] == [2, 2]
    assert main(["train", SMOKE, *tiny_overrides(tmp_path / "x", run__steps=2), "--resume", str(tmp_path / "nope")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", SMOKE, *tiny_overrides(run_dir, run__steps=2, checkpoint__interval=2)]) == 0
    argv = ["train", SMOKE, *tiny_overrides(run_dir, run__steps=4, model__n_layers=2), "--resume", "auto"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.n_layers: checkpoint 4 vs config 2" in err
