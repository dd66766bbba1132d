"""DeepSpeed checkpoints end to end, two processes on CPU (gloo, fp32): exact resume after a SIGKILL of the
whole job under ZeRO-2 and ZeRO-3, and `dlm export` of DeepSpeed checkpoints of every ZeRO stage.

Each straight run keeps every checkpoint, so the export of a killed run's newest checkpoint can be compared with
the export of the straight run's checkpoint of the same step.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dlm.cli import main

from .conftest import ROOT, tiny_overrides
from .runs import SMOKE, assert_same_weights, kill_after_first_checkpoint, load_weights, metric_records

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch-extensions"))

STEPS = 8
ZERO3_PARTITIONED = {"stage3_param_persistence_threshold": 0}  # every parameter partitioned, even the norms


def _zero_args(tmp: Path, stage: int) -> list[str]:
    """ZeRO-2 as configured, or ZeRO-3 with every parameter partitioned and built under zero.Init."""
    if stage != 3:
        return ["engine.kind=deepspeed", f"engine.zero_stage={stage}"]
    zero3 = json.loads((ROOT / "configs" / "zero" / "zero3.json").read_text())
    zero3["zero_optimization"].update(ZERO3_PARTITIONED)
    ds_json = tmp / "zero3.json"
    ds_json.write_text(json.dumps(zero3))
    return ["engine.kind=deepspeed", f"engine.deepspeed_config={ds_json}", "engine.zero_init=true"]


def _launch_argv(run_dir: Path, stage: int, steps: int = STEPS) -> list[str]:
    overrides = tiny_overrides(
        run_dir, run__steps=steps, run__eval_every=0, logging__every=1, checkpoint__interval=2,
        checkpoint__keep_last=10, engine__precision="fp32",
    )
    return ["launch", SMOKE, *overrides, *_zero_args(run_dir.parent, stage), "--workers", "2"]


def _records(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r.get("loss", r.get("eval_nelbo"))) for r in metric_records(run_dir)]


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The uninterrupted 2-process run of a ZeRO stage (a checkpoint every 2 steps, all kept), run once."""
    runs: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in runs:
            run_dir = tmp_path_factory.mktemp(f"zero{stage}") / "straight"
            assert main(_launch_argv(run_dir, stage)) == 0
            runs[stage] = run_dir
        return runs[stage]

    return run


@pytest.fixture(params=[2, 3], ids=["zero2", "zero3"])
def straight(request: pytest.FixtureRequest, straight_runs: Callable[[int], Path]) -> tuple[int, Path]:
    return int(request.param), straight_runs(int(request.param))


@pytest.mark.slow
def test_sigkill_of_the_job_then_resume_auto_repeats_the_straight_run_bitwise(
    straight: tuple[int, Path], tmp_path: Path
) -> None:
    stage, reference = straight
    killed = tmp_path / "killed"
    resumed_from = kill_after_first_checkpoint(_launch_argv(killed, stage), killed)
    assert 0 < resumed_from < STEPS

    # What the crash left is exportable: the run directory's newest complete checkpoint, which holds exactly
    # the weights the straight run had at that step.
    assert main(["export", str(killed), str(tmp_path / "crashed-export"), "--dtype", "fp32"]) == 0
    step = f"step_{resumed_from:06d}"
    assert main(["export", str(reference / "checkpoints" / step), str(tmp_path / "reference-export"),
                 "--dtype", "fp32"]) == 0
    assert_same_weights(tmp_path / "crashed-export", tmp_path / "reference-export")

    # `dlm launch` takes the resume as an override: what `dlm train --resume auto` sets
    resume = _launch_argv(killed, stage)
    resume.insert(resume.index("--workers"), "checkpoint.resume=auto")
    assert main(resume) == 0
    assert _records(killed) == _records(reference), "per-step losses and the final eval must repeat bit for bit"
    assert [s for s, _ in _records(killed)][: STEPS] == list(range(1, STEPS + 1))
    assert_same_weights(killed / "model.safetensors", reference / "model.safetensors")
    summary, want = (json.loads((d / "summary.json").read_text()) for d in (killed, reference))
    assert summary["tokens_seen"] == want["tokens_seen"] and summary["world_size"] == 2


@pytest.mark.slow
def test_export_of_the_final_deepspeed_checkpoint_equals_the_runs_final_weights(
    straight: tuple[int, Path], tmp_path: Path
) -> None:
    """fp32 export of the step-N checkpoint = the gathered final weights, bit for bit; it loads with
    safetensors alone and with transformers' AutoModel."""
    from transformers import AutoModel

    import dlm.modeling.hf_model  # noqa: F401  (registers model_type dlm with the Auto classes)

    stage, run_dir = straight
    out = tmp_path / "export"
    assert main(["export", str(run_dir / "checkpoints" / f"step_{STEPS:06d}"), str(out), "--dtype", "fp32"]) == 0
    assert_same_weights(out, run_dir / "model.safetensors")
    model = AutoModel.from_pretrained(str(out)).eval()
    for name, tensor in load_weights(run_dir / "model.safetensors").items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_zero3_export_gathers_one_shard_at_a_time_and_matches_zero2(
    straight_runs: Callable[[int], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ZeRO-3 no parameter is gathered before the shard that holds it is written (peak memory is one
    shard, never the fp32 model), each exactly once; the result equals the ZeRO-2 run's export to 1e-4 (two
    ranks reduce in another order under each stage, so bitwise equality is not expected)."""
    from deepspeed.utils import zero_to_fp32

    import dlm.modeling.hf_export as hf_export

    run_dir = straight_runs(3)
    events: list[tuple[str, object]] = []
    original_gather, original_save = zero_to_fp32.GatheredTensor.contiguous, hf_export.save_file

    def gather(self: object) -> torch.Tensor:
        tensor = original_gather(self)
        events.append(("gather", tensor.numel()))
        return tensor

    def save(tensors: dict[str, torch.Tensor], filename: str, metadata: object = None) -> None:
        events.append(("save", sorted(t.numel() for t in tensors.values())))
        original_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(zero_to_fp32.GatheredTensor, "contiguous", gather)
    monkeypatch.setattr(hf_export, "save_file", save)
    out = tmp_path / "zero3-export"
    step = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    assert main(["export", str(step), str(out), "--dtype", "fp32", "--max-shard-size", "100KB"]) == 0
    monkeypatch.undo()
    shards = [payload for kind, payload in events if kind == "save"]
    assert len(shards) > 2, "the 100KB limit must split the tiny model into several shards"
    pending: list[object] = []
    for kind, payload in events:
        if kind == "gather":
            pending.append(payload)
        else:
            assert sorted(pending) == payload, "a shard's tensors, and only those, are gathered before it is written"
            pending = []

    assert main(["export", str(straight_runs(2)), str(tmp_path / "zero2-export"), "--dtype", "fp32"]) == 0
    assert_same_weights(out, tmp_path / "zero2-export", atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (0, "bf16"), (1, "fp32"), (3, "bf16")])
def test_export_of_other_stages_and_of_bf16_training(stage: int, precision: str, tmp_path: Path) -> None:
    """ZeRO-0 and ZeRO-1 checkpoints export the final weights too; after bf16 training the fp32 export holds
    DeepSpeed's fp32 master weights (what the run's final model.safetensors holds), not their bf16 casts."""
    run_dir = tmp_path / "run"
    argv = _launch_argv(run_dir, stage, steps=2)
    argv.insert(argv.index("--workers"), f"engine.precision={precision}")
    assert main(argv) == 0
    assert main(["export", str(run_dir / "checkpoints"), str(tmp_path / "export"), "--dtype", "fp32"]) == 0
    assert_same_weights(tmp_path / "export", run_dir / "model.safetensors")
