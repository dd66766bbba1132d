"""The joint objective (diffusion + length head) with the sequence-length curriculum on 2 ranks under ZeRO-3
equals one process accumulating the same global batch: the length loss is normalised over the whole step,
not per rank or per micro-batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlm.cli import main

from .conftest import tiny_overrides
from .runs import SMOKE, assert_same_weights, metric_records

STEPS = 6
LENGTH_KEYS = ("loss", "length_eos_bce", "length_bucket_ce", "length_eos_acc", "length_bucket_acc")


def _joint(run_dir: Path, *extra: str) -> list[str]:
    base = tiny_overrides(
        run_dir, run__steps=STEPS, logging__every=1, run__eval_every=0, data__format="rows", data__overflow="cut",
        model__length_head__max_len=64, objective__length_loss_weight=1.0, curriculum__kind="linear",
        curriculum__start_len=32, curriculum__multiple=32, curriculum__steps=3, curriculum__pad_annealing_steps=4,
        engine__precision="fp32",
    )
    return [*base, *extra]


@pytest.mark.slow
def test_joint_objective_on_two_zero3_ranks_matches_one_process(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    overrides = _joint(reference, "run.grad_accum_steps=2", "data.num_workers=2", "data.worker_batches=1")
    assert main(["train", SMOKE, *overrides]) == 0
    run_dir = tmp_path / "zero3"
    argv = ["launch", SMOKE, *_joint(run_dir, "engine.kind=deepspeed", "engine.zero_stage=3"), "--workers", "2"]
    assert main(argv) == 0
    want = [r for r in metric_records(reference) if "loss" in r]
    got = [r for r in metric_records(run_dir) if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert [r["seq_len"] for r in got] == [r["seq_len"] for r in want] == [32, 32, 32, 64, 64, 64]
    for g, w in zip(got, want):
        for key in LENGTH_KEYS:
            assert g[key] == pytest.approx(w[key], abs=1e-4), (g["step"], key)
    assert_same_weights(run_dir / "model.safetensors", reference / "model.safetensors", atol=1e-4)
