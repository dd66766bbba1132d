"""The training loop end to end through the CLI: run directory contents, repeatability, learning, wandb."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_model

from dlm.cli import main
from dlm.config import load_config
from dlm.modeling import DiffusionTransformer, TransformerConfig
from dlm.training.engine import PlainEngine
from dlm.training.schedule import lr_multiplier

from .conftest import ROOT, tiny_overrides

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_config_metrics_plot_weights_and_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", SMOKE, *tiny_overrides(run_dir)]) == 0
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["run"]["steps"] == 4 and resolved["model"]["d_model"] == 64
    records = _records(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_nelbo" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert [r["step"] for r in evals] == [2, 4]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_s", "mfu", "loss_t0.00-0.25", "loss_t0.75-1.00"):
        assert key in train[0], key
    assert train[0]["mfu"] is None  # a CPU has no entry in the peak table and no peak_tflops was given
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("steps", "tokens_per_s", "eval_nelbo", "unigram_entropy", "final_train_loss", "wall_time_s"):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["tokens_seen"] == 4 * 4 * 64
    assert summary["eval_nelbo"] == pytest.approx(evals[-1]["eval_nelbo"])
    png = (run_dir / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    arch = TransformerConfig.model_validate(json.loads((run_dir / "model_config.json").read_text()))
    model = DiffusionTransformer(arch)
    missing, unexpected = load_model(model, str(run_dir / "model.safetensors"))
    assert not missing and not unexpected
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())


def test_cpu_runs_repeat_exactly_and_depend_on_the_seed(tmp_path: Path) -> None:
    losses = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["train", SMOKE, *tiny_overrides(tmp_path / name, run__seed=seed, run__eval_every=0)]) == 0
        losses.append([r.get("loss", r.get("eval_nelbo")) for r in _records(tmp_path / name)])
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_loss_falls_while_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # From a zero output bias: the first 40 steps learn the token frequencies, a large and reliable fall (a
    # unigram-initialised head starts where that fall ends).
    overrides = tiny_overrides(
        run_dir, run__steps=40, logging__every=5, run__eval_every=0, optim__lr=5e-3, model__output_bias_init="zeros"
    )
    assert main(["train", SMOKE, *overrides]) == 0
    train = [r["loss"] for r in _records(run_dir) if "loss" in r]
    assert train[-1] < train[0] - 1.5, train


def test_wandb_offline_writes_a_local_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", SMOKE, *tiny_overrides(run_dir, logging__wandb__mode="offline", run__steps=2)]) == 0
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))


def test_lr_schedule_warmup_then_cosine_to_the_floor() -> None:
    kw = {"warmup_steps": 10, "total_steps": 110, "kind": "cosine", "min_lr_ratio": 0.1}
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, **kw) == pytest.approx(0.55)
    assert lr_multiplier(110, **kw) == pytest.approx(0.1)
    assert lr_multiplier(500, **kw) == pytest.approx(0.1)
    assert lr_multiplier(50, **{**kw, "kind": "constant"}) == 1.0


def _engine_and_reference_twin(cfg: RunConfig) -> tuple[DiffusionTransformer, DiffusionTransformer, PlainEngine]:
    """A 1-layer model of ``cfg``'s shape under a PlainEngine, and an identical copy to step by hand."""
    arch = cfg.model.resolve().model_copy(update={"vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2, "mlp_hidden": 32})
    torch.manual_seed(0)
    ours = DiffusionTransformer(arch)
    ref = DiffusionTransformer(arch)
    ref.load_state_dict(ours.state_dict())
    return ours, ref, PlainEngine(ours, cfg, torch.device("cpu"))


def test_plain_engine_matches_torch_adamw_with_clipping() -> None:
    cfg = load_config(SMOKE, ["optim.grad_clip=0.5", "schedule.warmup_steps=2", "run.steps=5", "engine.precision=fp32"])
    ours, ref, engine = _engine_and_reference_twin(cfg)
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    no_decay = [p for p in ref.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, warmup_steps=2, total_steps=5, kind="cosine", min_lr_ratio=0.1)
    )
    x = torch.randint(0, 64, (2, 8))
    for _ in range(5):
        engine.backward(ours(x).pow(2).mean())
        engine.step()
        ref(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad()
    # the engine runs torch's fused AdamW kernel, the reference its per-tensor loop: equal up to fp32 rounding
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert engine.optimizer.defaults["fused"]


def test_length_head_lr_gives_the_head_its_own_peak_rate_under_the_same_schedule() -> None:
    """`optim.length_head_lr`: the head's parameters step as AdamW with that peak rate would step them, the
    backbone's at `optim.lr`, both scaled by one warmup + cosine multiplier; the DeepSpeed engine's optimizer
    (its model wrapped, so names carry a prefix) gets the same groups."""
    from dlm.training.deepspeed_engine import _make_optimizer, _Objective

    overrides = ["optim.lr=1e-3", "optim.length_head_lr=5e-2", "schedule.warmup_steps=2", "run.steps=4",
                 "engine.precision=fp32", "model.length_head.max_len=16", "model.length_head.min_bucket=4",
                 "model.length_head.hidden=8"]
    cfg = load_config(SMOKE, overrides)
    ours, ref, engine = _engine_and_reference_twin(cfg)
    head = {id(p) for p in ref.length_head.parameters()}
    groups = [
        {"params": [p for p in ref.parameters() if id(p) not in head and p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in ref.parameters() if id(p) not in head and p.ndim < 2], "weight_decay": 0.0},
        {"params": [p for p in ref.length_head.parameters() if p.ndim >= 2], "weight_decay": 0.1, "lr": 5e-2},
        {"params": [p for p in ref.length_head.parameters() if p.ndim < 2], "weight_decay": 0.0, "lr": 5e-2},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, warmup_steps=2, total_steps=4, kind="cosine", min_lr_ratio=0.1)
    )
    x = torch.randint(0, 64, (2, 8))
    prompt = torch.ones(2, 8, dtype=torch.bool)

    def loss(model: DiffusionTransformer) -> torch.Tensor:
        hidden = model(x)
        out = model.length_head(hidden, prompt)
        return hidden.pow(2).mean() - out.bucket_logits[:, 0].mean() + (out.eos_logits - 3).pow(2).mean()

    for _ in range(4):
        engine.backward(loss(ours))
        engine.step()
        loss(ref).backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    moved = ours.length_head.bucket.out.weight.abs().max()  # zero at initialisation
    assert moved > 10 * 1e-3  # the head moved at its own rate, far beyond what 4 steps at 1e-3 allow

    ds = _make_optimizer("torch-adamw", _Objective(ours, chunk_size=64), cfg, torch.device("cpu"))
    assert [len(g["params"]) for g in ds.param_groups] == [len(g["params"]) for g in groups]
    assert [g["lr"] for g in ds.param_groups] == [1e-3, 1e-3, 5e-2, 5e-2]


def test_length_head_lr_without_a_length_head_is_refused() -> None:
    from dlm.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.length_head_lr.*does not have: set model.length_head.max_len"):
        load_config(SMOKE, ["optim.length_head_lr=1e-3"])


def test_joint_training_refuses_a_head_read_from_the_prompt_alone() -> None:
    """The joint objective trains the head on rows with their canvas; a head marked for the prompt-only pass
    would be read at inference from states it never saw (``dlm fit-head --pass prompt`` is the way there)."""
    from dlm.errors import ConfigError

    head = ["data.format=rows", "model.length_head.max_len=256", "objective.length_loss_weight=1"]
    assert load_config(SMOKE, head).model.resolve().length_head is not None
    with pytest.raises(ConfigError, match="prediction_pass.*leave it at canvas.*fit-head --pass prompt"):
        load_config(SMOKE, [*head, "model.length_head.prediction_pass=prompt"])


def test_unigram_output_bias_starts_a_fresh_model_at_the_unigram_loss(tmp_path: Path) -> None:
    """`model.output_bias_init: unigram` (the smoke config): the head's bias holds the train tokens' log
    frequencies, so the untrained model's held-out NELBO is the unigram baseline instead of ln V."""
    from dlm.data_streams import build_pretrain_stream
    from dlm.data_streams.tokenizer import load_tokenizer
    from dlm.training.engine import build_training_model
    from dlm.training.evaluate import evaluate_nelbo

    cfg = load_config(SMOKE, tiny_overrides(tmp_path / "run", engine__precision="fp32"))
    assert cfg.model.output_bias_init == "unigram"
    tokenizer = load_tokenizer(cfg.tokenizer.name_or_path, cfg.tokenizer.mask_token)
    data = build_pretrain_stream(cfg.data, tokenizer, seed=0, micro_batch_size=4)
    log_probs = data.unigram_log_probs()
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unigram_log_probs"):
        build_training_model(cfg, cpu)

    def nelbo(model: torch.nn.Module) -> float:
        return evaluate_nelbo(model, data.eval_batches(4), tokenizer.mask_id, eps=1e-3, samples=4, seed=0, device=cpu)

    torch.manual_seed(0)
    model = build_training_model(cfg, cpu, 1, log_probs)
    bias = model.lm_head_bias.detach()
    assert len(log_probs) == tokenizer.vocab_size < bias.shape[0]  # the table is padded to a multiple of 64
    torch.testing.assert_close(bias[: len(log_probs)], torch.from_numpy(log_probs).float())
    assert torch.all(bias[len(log_probs) :] == float(log_probs.min()))
    unigram = data.unigram_cross_entropy()
    assert nelbo(model) == pytest.approx(unigram, abs=0.05)

    torch.manual_seed(0)
    zeros = build_training_model(load_config(SMOKE, [*tiny_overrides(tmp_path / "z"), "model.output_bias_init=zeros"]), cpu)
    assert nelbo(zeros) > unigram + 2.0  # near ln V: a uniform guess over the vocabulary
