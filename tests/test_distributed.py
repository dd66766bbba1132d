"""Distributed training on CPU (gloo): the DeepSpeed engine against the plain one, the launchers, Ray Train
restarts, the dry run, and the errors that must come before any worker starts.

The multi-process tests compare against the single-process plain engine on the *same global batch*: two
ranks with one micro-batch each see exactly the rows one process sees as two accumulated micro-batches
(the data stream's consumers are rank x worker, so world 2 x 0 workers = world 1 x 2 workers), and the
mask draw is keyed by the global micro-batch slot.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dlm.cli import main
from dlm.training.hooks import StepInfo, TrainHook

from .conftest import ROOT, tiny_overrides
from .runs import SMOKE, assert_same_weights, step_losses

# DeepSpeed JIT-builds its shared-memory op on first use (~45 s); one cache next to the environment means a
# CI run builds it at most once, and a developer's second run never.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch-extensions"))

# Ray's own modules warn about their deprecated settings on import; nothing here uses them.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

LLADA_8B = str(ROOT / "configs" / "fineweb-llada-8b.yaml")


def _fails_before_start(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str, run_dir: Path) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not run_dir.exists(), "the error must come before any worker (or run directory) exists"
    return err


# -- (e) errors caught before any worker starts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["engine.zero_stage=4"], "engine.zero_stage = 4"),
        (["engine.offload_optimizer=cpu", "engine.zero_stage=2", "engine.optimizer=fused-adam"],
         "cannot update optimizer states offloaded to the CPU"),
        (["engine.offload_params=cpu", "engine.zero_stage=2"], "engine.offload_params = 'cpu': needs ZeRO stage 3"),
        (["engine.global_batch_size=30"], "engine.global_batch_size = 30"),
        (["engine.global_batch_size=64"], "set run.grad_accum_steps=2"),
    ],
)
def test_impossible_configs_fail_before_any_worker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, overrides: list[str], expected: str
) -> None:
    run_dir = tmp_path / "run"
    argv = ["launch", SMOKE, f"run.dir={run_dir}", "engine.kind=deepspeed", *overrides, "--workers", "2"]
    _fails_before_start(capsys, argv, expected, run_dir)


def test_deepspeed_json_that_contradicts_the_config_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ds_json = tmp_path / "zero.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}))
    run_dir = tmp_path / "run"
    argv = ["launch", SMOKE, f"run.dir={run_dir}", "engine.kind=deepspeed", f"engine.deepspeed_config={ds_json}",
            "--workers", "2"]
    err = _fails_before_start(capsys, argv, "gradient_clipping = 0.5 but optim.grad_clip = 1.0", run_dir)
    assert "engine.deepspeed_config" in err
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    _fails_before_start(capsys, argv, "zero_optimization.stage = 4; allowed stages are 0, 1, 2, 3", run_dir)


def test_placeable_workers_never_splits_a_worker_across_nodes() -> None:
    from dlm.launcher.ray_launcher import placeable_workers

    nodes = [{"CPU": 3.0, "GPU": 2.0}, {"CPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert placeable_workers(nodes, {"CPU": 1.0}) == 12
    assert placeable_workers(nodes, {"CPU": 2.0, "GPU": 1.0}) == 2  # 1 on the first node (CPU-bound), 1 on the last
    assert placeable_workers(nodes, {"CPU": 1.0, "GPU": 1.0}) == 3


# -- (dry run) ------------------------------------------------------------------------------------------------


def test_dry_run_of_the_8b_config_at_64_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", LLADA_8B, "--dry-run", "--world-size", "64", "--gpu-memory", "80GB", "--tokens", "2.3T",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    n = 8_015_581_184
    lines = {line["name"]: line for line in report["lines"]}
    assert report["params"] == n and report["zero_stage"] == 3 and report["fits"]
    assert report["tokens_per_step"] == 4 * 5 * 64 * 4096
    assert report["steps_for_budget"] == -(-2_300_000_000_000 // report["tokens_per_step"])
    # ZeRO-3 in bf16: 2 + 2 + 12 bytes per parameter, all divided over the 64 ranks.
    assert lines["parameters"]["gpu_bytes"] == pytest.approx(2 * n / 64)
    assert lines["gradients"]["gpu_bytes"] == pytest.approx(2 * n / 64)
    assert lines["optimizer states"]["gpu_bytes"] == pytest.approx(12 * n / 64)
    assert report["gpu_total"] < 0.9 * 80e9

    # The same job without activation checkpointing does not fit, and the dry run says why (exit 1).
    assert main(["launch", LLADA_8B, "engine.activation_checkpointing=false", "--dry-run", "--world-size", "64"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "largest item: activations" in out and "activation_checkpointing" in out
    assert "optimizer states" in out and "per rank" in out

    # Another world size keeps the global batch only with another accumulation: the check names the fix.
    assert main(["launch", LLADA_8B, "--dry-run", "--world-size", "32"]) == 2
    assert "set run.grad_accum_steps=10" in capsys.readouterr().err


def test_dry_run_offload_moves_optimizer_states_to_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["launch", LLADA_8B, "engine.deepspeed_config=configs/zero/zero3-offload.json", "--dry-run",
            "--world-size", "64", "--json"]
    assert main(argv) == 0
    lines = {line["name"]: line for line in json.loads(capsys.readouterr().out)["lines"]}
    assert lines["optimizer states"]["gpu_bytes"] == 0.0
    assert lines["optimizer states"]["cpu_bytes"] == pytest.approx(12 * 8_015_581_184 / 64)
    assert lines["parameters"]["gpu_bytes"] == 0.0


# -- the DeepSpeed engine against the plain engine ---------------------------------------------------------

ENGINE_BASE = ["model.preset=tiny", "run.micro_batch_size=2", "data.seq_len=32", "schedule.warmup_steps=1",
               "run.steps=3", "optim.lr=1e-2", "optim.grad_clip=0.5"]


def _engine_losses(engine: Any, rank: int, world: int, accum: int) -> list[tuple[float, float, float]]:
    """Three optimizer steps on synthetic batches keyed by the global micro-batch slot."""
    from dlm.training.objective import forward_process, mask_generator

    out = []
    for step in range(1, 4):
        noised = []
        for i in range(accum):
            slot = rank * accum + i
            ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1000 * step + slot))
            noised.append(forward_process(ids, 50257, mask_generator(0, step, 0, slot)))
        denominator = torch.tensor(float(sum(n.normalizer for n in noised)))
        loss = torch.zeros(())
        if world > 1:
            torch.distributed.all_reduce(denominator)
        for n in noised:
            parts = engine.loss(n, 4096)
            engine.backward(parts.loss_sum / denominator)
            loss += parts.loss_sum.detach() / denominator
        if world > 1:
            torch.distributed.all_reduce(loss)
        lr = engine.lr()
        out.append((float(loss), float(engine.step()), lr))
    return out


def _engine_worker(rank: int, port: int, variants: list[list[str]], results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from dlm.training.distributed import init_distributed

    ctx = init_distributed(torch.device("cpu"))
    try:
        _run_variants(rank, variants, results)
        ctx.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        ctx.close()  # a gloo group still alive at interpreter exit can abort the process (SIGABRT)


def _run_variants(rank: int, variants: list[list[str]], results: Any) -> None:
    from dlm.config import load_config
    from dlm.training.engine import build_engine, build_training_model

    for variant in variants:
        cfg = load_config(None, [*ENGINE_BASE, "run.grad_accum_steps=2", "launcher.kind=multiprocess",
                                 "launcher.workers=2", *variant])
        torch.manual_seed(0)
        engine = build_engine(cfg, build_training_model(cfg, torch.device("cpu"), 2), torch.device("cpu"))
        losses = _engine_losses(engine, rank, 2, 2)
        if rank == 0:
            results.put((variant, losses))


@pytest.mark.slow
def test_deepspeed_engine_matches_plain_engine_for_every_stage() -> None:
    """The plain engine on 2 ranks, ZeRO 0, 1, and 3 with CPU offload (2 ranks x 2 accumulated micro-batches)
    against one plain process accumulating the same 4 micro-batches: loss, pre-clip grad norm (clipping
    active) and LR per step."""
    import torch.multiprocessing as mp

    from dlm.config import load_config
    from dlm.training.distributed import free_port
    from dlm.training.engine import build_engine, build_training_model

    cfg = load_config(None, [*ENGINE_BASE, "run.grad_accum_steps=4"])
    torch.manual_seed(0)
    plain = _engine_losses(build_engine(cfg, build_training_model(cfg, torch.device("cpu")), torch.device("cpu")), 0, 1, 4)

    variants = [
        ["engine.kind=plain"],  # plain data parallelism: gradients summed over ranks
        ["engine.kind=deepspeed", "engine.zero_stage=0"],
        ["engine.kind=deepspeed", "engine.zero_stage=1"],
        ["engine.kind=deepspeed", "engine.deepspeed_config=configs/zero/zero3-offload.json", "engine.optimizer=torch-adamw"],
    ]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_engine_worker, args=(free_port(), variants, results), nprocs=2, start_method="spawn")
    got = {}
    while not results.empty():
        variant, losses = results.get()
        got[tuple(variant)] = losses
    assert len(got) == len(variants)
    for variant, losses in got.items():
        for (loss, norm, lr), (ref_loss, ref_norm, ref_lr) in zip(losses, plain, strict=True):
            assert loss == pytest.approx(ref_loss, abs=1e-4), variant
            # DeepSpeed accumulates gradient norms in fp64, torch's clip_grad_norm_ in fp32: on the tiny model's
            # sparse embedding gradient the two differ by ~1e-4 relative (the fp64 value is the right one).
            assert norm == pytest.approx(ref_norm, rel=1e-3), variant
            assert lr == pytest.approx(ref_lr), variant
    assert plain[0][1] > 0.5, "the grad norm must exceed optim.grad_clip so that clipping is exercised"


# -- the training loop on several ranks: (a) processes, (b) Ray, (c) two Ray nodes, (d) a killed worker ----

STEPS = 6


def _run_overrides(run_dir: Path, *extra: str) -> list[str]:
    """The tiny smoke run, every step logged, a checkpoint every 2 steps, one eval at the end."""
    base = tiny_overrides(run_dir, run__steps=STEPS, logging__every=1, run__eval_every=0, checkpoint__interval=2)
    return [*base, *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    return step_losses(run_dir)


def _summary(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    """The final model.safetensors (gathered from the ranks' shards) equals the single process's, to 1e-4."""
    assert_same_weights(run_dir / "model.safetensors", reference / "model.safetensors", atol=1e-4)


def _assert_same_losses(got: dict[int, float], want: dict[int, float], tol: float) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=tol), (step, got[step], want[step])


class Recorder(TrainHook):
    """Appends, per rank and step, the process id, the loss, a fingerprint of every micro-batch trained on and
    the Ray node; a test reads it back to see which samples each attempt trained on."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_step_end(self, info: StepInfo) -> None:
        node = None
        if "ray" in sys.modules:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        row = {
            "pid": os.getpid(), "rank": info.rank, "step": info.step, "loss": float(info.loss), "node": node,
            "batches": [hashlib.sha1(b["input_ids"].numpy().tobytes()).hexdigest() for b in info.batches],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / f"rank{info.rank}.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def _recorded(out_dir: Path, rank: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / f"rank{rank}.jsonl").read_text().splitlines()]


class KillOnce(TrainHook):
    """SIGKILLs this worker after ``step`` on ``rank`` — once: the marker file survives the restart."""

    def __init__(self, marker: Path, rank: int, step: int) -> None:
        self.marker, self.rank, self.step = marker, rank, step

    def on_step_end(self, info: StepInfo) -> None:
        if info.rank == self.rank and info.step == self.step and not self.marker.exists():
            self.marker.write_text(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class PartitionProbe(TrainHook):
    """Writes, at step 1, how many elements of each parameter this rank holds under ZeRO-3."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_step_end(self, info: StepInfo) -> None:
        if info.step != 1 or info.model is None:
            return
        held = {name: [int(p.ds_tensor.numel()), int(p.ds_numel)] for name, p in info.model.named_parameters()}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{info.rank}.json").write_text(json.dumps(held))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, plain engine, the same global batch: 2 accumulated micro-batches read by 2 data workers
    (the consumers that 2 ranks with 0 workers each are)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    overrides = _run_overrides(run_dir, "run.grad_accum_steps=2", "data.num_workers=2", "data.worker_batches=1")
    assert main(["train", SMOKE, *overrides]) == 0
    return run_dir


@pytest.mark.slow
def test_two_processes_zero2_match_one_process(reference: Path, tmp_path: Path) -> None:
    """(a) `dlm launch --workers 2` with ZeRO-2: per-step losses within 1e-4 of the single process."""
    run_dir = tmp_path / "run"
    argv = ["launch", SMOKE, *_run_overrides(run_dir, "engine.kind=deepspeed", "engine.zero_stage=2"), "--workers", "2"]
    assert main(argv) == 0
    _assert_same_losses(_losses(run_dir), _losses(reference), 1e-4)
    assert _summary(run_dir)["eval_nelbo"] == pytest.approx(_summary(reference)["eval_nelbo"], abs=1e-4)
    assert _summary(run_dir)["world_size"] == 2
    _assert_same_weights(run_dir, reference)
    assert (run_dir / "checkpoints" / "step_000006" / "client_rank00001.pt").is_file()


@pytest.mark.slow
def test_two_processes_zero3_match_one_process(reference: Path, tmp_path: Path) -> None:
    """(a) ZeRO-3 with every parameter partitioned (persistence threshold 0), built under zero.Init, with
    activation checkpointing: per-step losses within 1e-4 of the single process."""
    from dlm.launcher import launch, load_launch_config

    ds_json = tmp_path / "zero3.json"
    zero3 = json.loads((ROOT / "configs" / "zero" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_json.write_text(json.dumps(zero3))
    run_dir = tmp_path / "run"
    overrides = _run_overrides(run_dir, "engine.kind=deepspeed", f"engine.deepspeed_config={ds_json}",
                               "engine.zero_init=true", "engine.activation_checkpointing=true")
    cfg = load_launch_config(SMOKE, overrides, workers=2)
    summary = launch(cfg, [functools.partial(PartitionProbe, tmp_path / "probe")])
    _assert_same_losses(_losses(run_dir), _losses(reference), 1e-4)
    assert summary["eval_nelbo"] == pytest.approx(_summary(reference)["eval_nelbo"], abs=1e-4)
    _assert_same_weights(run_dir, reference)
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name, (held, total) in ranks[0].items():
        assert held < total, f"{name} is not partitioned"
        assert held + ranks[1][name][0] >= total, f"{name}: the two partitions do not cover the parameter"


# -- Ray ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    """Two Ray nodes on this machine, one CPU each, so a 2-worker job must span both (``ray start`` twice)."""
    # Ray Train polls its workers every 2 s by default; every report and the final result wait for a poll.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    import ray
    from ray.cluster_utils import Cluster

    # The test hooks live in this module, which Ray's workers cannot import by name: ship them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _ray_run(cluster: Any, run_dir: Path, hooks: list[Any], *extra: str) -> dict[str, Any]:
    from dlm.launcher import launch, load_launch_config

    overrides = _run_overrides(run_dir, "engine.kind=deepspeed", "engine.zero_stage=2", *extra)
    cfg = load_launch_config(SMOKE, overrides, workers=2, ray_address=cluster.address)
    return launch(cfg, hooks)


@pytest.fixture(scope="module")
def ray_uninterrupted(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """(b, c) the 2-worker ZeRO-2 job through Ray Train on the two-node cluster, recorded."""
    root = tmp_path_factory.mktemp("ray-uninterrupted")
    _ray_run(ray_cluster, root / "run", [functools.partial(Recorder, root / "record")])
    return root


@pytest.mark.slow
def test_ray_two_workers_on_two_nodes_match_one_process(ray_uninterrupted: Path, reference: Path) -> None:
    """(b) Ray Train with 2 workers gives the single process's losses; (c) the workers ran on both nodes,
    and every checkpoint was reported to Ray's storage."""
    run_dir = ray_uninterrupted / "run"
    _assert_same_losses(_losses(run_dir), _losses(reference), 1e-4)
    assert _summary(run_dir)["eval_nelbo"] == pytest.approx(_summary(reference)["eval_nelbo"], abs=1e-4)
    nodes = {rank: {row["node"] for row in _recorded(ray_uninterrupted / "record", rank)} for rank in (0, 1)}
    assert all(len(n) == 1 and None not in n for n in nodes.values()), nodes
    assert nodes[0] != nodes[1], "the two workers must run on different nodes"
    reported = sorted(p.name for p in (run_dir / "ray" / "smoke").glob("step_*"))
    assert reported == ["step_000004", "step_000006"], "Ray keeps checkpoint.keep_last = 2 reported checkpoints"


@pytest.mark.slow
def test_ray_restarts_a_killed_worker_from_the_last_checkpoint(
    ray_cluster: Any, ray_uninterrupted: Path, tmp_path: Path
) -> None:
    """(d) SIGKILL rank 1 after step 5: Ray restarts the group, every worker resumes from the step-4
    checkpoint, and the run ends exactly as the uninterrupted one: same losses, no sample skipped or repeated."""
    marker = tmp_path / "killed"
    hooks = [functools.partial(Recorder, tmp_path / "record"), functools.partial(KillOnce, marker, 1, 5)]
    summary = _ray_run(ray_cluster, tmp_path / "run", hooks, "launcher.max_failures=1")
    assert marker.is_file(), "the worker was never killed"
    for rank in (0, 1):
        rows = _recorded(tmp_path / "record", rank)
        attempts = list(dict.fromkeys(row["pid"] for row in rows))
        assert len(attempts) == 2, f"rank {rank} should have run in two worker processes, ran in {attempts}"
        first = [row for row in rows if row["pid"] == attempts[0]]
        second = [row for row in rows if row["pid"] == attempts[1]]
        assert [row["step"] for row in second] == [5, 6], "the restart resumes after the step-4 checkpoint"
        trained = [row for row in first if row["step"] <= 4] + second
        want = _recorded(ray_uninterrupted / "record", rank)
        assert [row["batches"] for row in trained] == [row["batches"] for row in want], "samples skipped or repeated"
        assert [row["loss"] for row in trained] == [row["loss"] for row in want]
    _assert_same_losses(_losses(tmp_path / "run"), _losses(ray_uninterrupted / "run"), 0.0)
    assert summary["eval_nelbo"] == _summary(ray_uninterrupted / "run")["eval_nelbo"]
    assert summary["final_train_loss"] == _summary(ray_uninterrupted / "run")["final_train_loss"]


def test_more_workers_than_the_cluster_can_place(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ray_cluster: Any
) -> None:
    """(e) 3 workers of 1 CPU on two 1-CPU nodes: refused before any worker starts."""
    run_dir = tmp_path / "run"
    argv = ["launch", SMOKE, f"run.dir={run_dir}", "--workers", "3", "--ray-address", ray_cluster.address]
    err = _fails_before_start(capsys, argv, "launcher.workers = 3: the Ray cluster can place at most 2 workers", run_dir)
    assert "{'CPU': 1.0}" in err
