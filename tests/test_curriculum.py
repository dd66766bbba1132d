"""Curriculum over sequence length (tokens per step constant), pad-share annealing, and a joint-objective run
(length head + curriculum) that resumes bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlm.cli import main
from dlm.config import load_config
from dlm.errors import ConfigError
from dlm.training.curriculum import Curriculum
from dlm.training.hooks import TrainHook
from dlm.training.loop import train

from .conftest import ROOT, tiny_overrides

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _curriculum(*overrides: str) -> Curriculum:
    return Curriculum.from_config(load_config(SMOKE, list(overrides)))


def test_linear_and_root_growth_reach_seq_len_in_allowed_lengths() -> None:
    linear = _curriculum("curriculum.kind=linear", "curriculum.start_len=64", "curriculum.steps=100")
    lengths = [linear.seq_len(step) for step in range(1, 120)]
    assert lengths[0] == 64 and lengths[-1] == 256
    assert lengths == sorted(lengths)
    assert set(lengths) <= {64, 128, 256}  # 16 x 256 tokens split into whole rows of multiples of 64
    assert linear.seq_len(34) == 64 and linear.seq_len(35) == 128  # 64 + 192 x 34/100 = 129.3 -> 128
    root = _curriculum("curriculum.kind=root", "curriculum.start_len=64", "curriculum.steps=100")
    assert root.seq_len(30) >= linear.seq_len(30)  # root growth front-loads the length
    assert root.seq_len(101) == 256


def test_stages_switch_at_their_steps() -> None:
    c = _curriculum("curriculum.kind=stages", "curriculum.stages=[[1,64],[10,128],[20,256]]")
    assert [c.seq_len(s) for s in (1, 9, 10, 19, 20, 500)] == [64, 64, 128, 128, 256, 256]


def test_pad_share_rises_linearly_to_one() -> None:
    c = _curriculum("data.format=rows", "curriculum.pad_annealing_steps=10")
    assert [c.pad_share(s) for s in (1, 5, 10, 50)] == [0.1, 0.5, 1.0, 1.0]
    assert _curriculum().pad_share(1) == 1.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["curriculum.kind=linear", "curriculum.start_len=96", "curriculum.steps=10"], "curriculum.start_len"),
        (["curriculum.kind=linear", "curriculum.steps=0"], "curriculum.steps"),
        (["curriculum.kind=stages", "curriculum.stages=[[5,64]]"], "curriculum.stages"),
        (["curriculum.kind=stages", "curriculum.stages=[[1,100]]"], "curriculum.stages"),
        (["curriculum.pad_annealing_steps=10"], "curriculum.pad_annealing_steps"),
        (["objective.canvas_share=0.5"], "objective.canvas_share"),
        (["objective.kind=sft"], "objective.kind"),
        (["data.format=sft"], "objective.kind"),
        (["data.format=rows", "objective.length_loss_weight=1"], "objective.length_loss_weight"),
        (["model.length_head.max_len=256", "objective.length_loss_weight=1"], "objective.length_loss_weight"),
    ],
)
def test_inconsistent_objective_and_curriculum_settings_are_config_errors(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SMOKE, overrides)


def _joint(run_dir: Path, **extra: object) -> list[str]:
    return tiny_overrides(
        run_dir,
        run__steps=8,
        run__eval_every=0,
        logging__every=1,
        data__format="rows",
        data__overflow="cut",
        model__length_head__max_len=64,
        objective__length_loss_weight=1.0,
        curriculum__kind="linear",
        curriculum__start_len=16,
        curriculum__multiple=16,
        curriculum__steps=4,
        curriculum__pad_annealing_steps=6,
        engine__precision="fp32",
        **extra,
    )


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_joint_run_logs_the_curriculum_and_keeps_tokens_per_step_constant(tmp_path: Path) -> None:
    assert main(["train", SMOKE, *_joint(tmp_path)]) == 0
    steps = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["seq_len"] for r in steps] == [16, 16, 32, 32, 64, 64, 64, 64]  # 48 would not split 256 tokens
    assert [r["tokens_seen"] for r in steps] == [256 * s for s in range(1, 9)]
    assert [round(r["pad_share"], 4) for r in steps] == [round(min(1.0, s / 6), 4) for s in range(1, 9)]
    for key in ("length_eos_bce", "length_bucket_ce", "length_eos_acc", "length_bucket_acc"):
        assert all(0.0 <= r[key] < 10.0 for r in steps), key


class _StopAfterCheckpoint(TrainHook):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path, is_main: bool) -> None:
        if step == self.step:
            raise KeyboardInterrupt  # what a Ctrl-C or a preemption does to the loop


def test_joint_run_with_curriculum_resumes_bit_for_bit(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert main(["train", SMOKE, *_joint(straight)]) == 0

    interrupted = tmp_path / "interrupted"
    cfg = load_config(SMOKE, _joint(interrupted, checkpoint__interval=3))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, [_StopAfterCheckpoint(3)])  # stops in the short-row phase, mid pad annealing
    assert not (interrupted / "summary.json").exists()
    assert main(["train", SMOKE, *_joint(interrupted, checkpoint__interval=3), "--resume", "auto"]) == 0

    def key(records: list[dict]) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("length_eos_bce"), r.get("length_bucket_ce"), r.get("seq_len"),
                 r.get("eval_nelbo")) for r in records]

    assert key(_records(interrupted)) == key(_records(straight))
    client = json.loads((interrupted / "summary.json").read_text())
    assert client["eval_nelbo"] == json.loads((straight / "summary.json").read_text())["eval_nelbo"]
