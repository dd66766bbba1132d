"""`model.init_from`: training starts from a dlm export, run or checkpoint, or a Hugging Face LLaMA / GPT-2
directory; a wrong path or architecture fails at config validation, before a run directory exists."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dlm.cli import main
from dlm.config import RunConfig, load_config
from dlm.errors import ConfigError
from dlm.generation import load_for_generation
from dlm.modeling import import_pretrained
from dlm.training.engine import PlainEngine, build_training_model
from dlm.training.objective import diffusion_loss, forward_process, mask_generator

from .conftest import ROOT, tiny_overrides
from .runs import SMOKE, load_weights, step_losses
from .test_hf_interop import _gpt2_dir, _llama_dir, _save_tokenizer

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch-extensions"))

CPU = torch.device("cpu")
TRAINED_STEPS = 4


def _fp32(run_dir: Path, *extra: str, **fields: object) -> list[str]:
    # A zero output bias: the tests below build models outside the loop, without the data's unigram table.
    return [*tiny_overrides(run_dir, engine__precision="fp32", model__output_bias_init="zeros", **fields), *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A trained tiny run (final checkpoint kept) and its fp32 `dlm export`."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    argv = ["train", SMOKE, *_fp32(run_dir, run__steps=TRAINED_STEPS, checkpoint__interval=TRAINED_STEPS)]
    assert main(argv) == 0
    assert main(["export", str(run_dir), str(root / "export"), "--dtype", "fp32"]) == 0
    return run_dir, root / "export"


def _batch_loss(model: torch.nn.Module, cfg: RunConfig) -> torch.Tensor:
    """The masked-diffusion loss of one fixed batch with the loop's step-1 mask draw."""
    ids = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(3))
    noised = forward_process(ids, 50257, mask_generator(cfg.run.seed, 1, 0, 0))
    with torch.no_grad():
        return diffusion_loss(model, noised, cfg.objective.loss_chunk_size).loss_sum


def test_init_from_an_export_gives_the_loss_of_resuming_its_weights(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, exported = trained
    cfg = load_config(SMOKE, _fp32(tmp_path / "a", f"model.init_from={exported}"))
    from_export = build_training_model(cfg, CPU)

    plain = load_config(SMOKE, _fp32(tmp_path / "b"))
    resumed = PlainEngine(build_training_model(plain, CPU), plain, CPU)
    resumed.load_checkpoint(run_dir / "checkpoints" / f"step_{TRAINED_STEPS:06d}" / "engine")
    for (name, got), want in zip(from_export.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    loss = _batch_loss(from_export, cfg)
    assert torch.equal(loss, _batch_loss(resumed.model, plain))
    assert not torch.equal(loss, _batch_loss(build_training_model(plain, CPU), plain)), "weights were not loaded"


def test_a_resumed_run_skips_init_from(trained: tuple[Path, Path]) -> None:
    """Resuming restores the checkpoint's weights; reading init_from's first would only cost time."""
    run_dir, exported = trained
    resuming = load_config(SMOKE, _fp32(run_dir, f"model.init_from={exported}", "checkpoint.resume=auto"))
    fresh = load_config(SMOKE, _fp32(run_dir))
    torch.manual_seed(0)
    skipped = build_training_model(resuming, CPU)
    torch.manual_seed(0)
    for (name, got), want in zip(skipped.state_dict().items(), build_training_model(fresh, CPU).state_dict().values()):
        assert torch.equal(got, want), name


def test_dlm_train_starts_from_an_export_a_run_or_a_checkpoint_alike(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """The first logged loss of `dlm train` is the same from all three forms of the same weights, and not that of
    a fresh initialisation."""
    run_dir, exported = trained
    sources = {"export": exported, "run": run_dir, "checkpoint": run_dir / "checkpoints"}
    first = {}
    for label, source in {**sources, "fresh": None}.items():
        out = tmp_path / label
        extra = [f"model.init_from={source}"] if source is not None else []
        assert main(["train", SMOKE, *_fp32(out, *extra, run__steps=2, logging__every=1)]) == 0
        first[label] = step_losses(out)[1]
    assert first["export"] == first["run"] == first["checkpoint"]
    assert first["fresh"] != first["export"]
    assert first["export"] < first["fresh"], "trained weights start from a lower loss than a random init"


def test_a_checkpoint_of_a_run_started_from_init_from_exports_and_generates(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """Such a run's config.yaml records model.init_from; reading the checkpoint's architecture must skip it."""
    _, exported = trained
    run_dir = tmp_path / "run"
    extra = [f"model.init_from={exported}"]
    assert main(["train", SMOKE, *_fp32(run_dir, *extra, run__steps=2, checkpoint__interval=2)]) == 0
    step = run_dir / "checkpoints" / "step_000002"
    assert yaml.safe_load((step / "config.yaml").read_text())["model"]["init_from"] == str(exported)
    assert main(["export", str(step), str(tmp_path / "export"), "--dtype", "fp32"]) == 0
    final = load_weights(run_dir / "model.safetensors")
    for name, tensor in load_weights(tmp_path / "export").items():
        assert torch.equal(tensor, final[name]), name
    loaded = load_for_generation(step, device="cpu")
    assert torch.equal(loaded.model.state_dict()["embed.weight"], final["embed.weight"])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_init_from_a_transformers_model(kind: str, tmp_path: Path) -> None:
    """A small random LlamaForCausalLM / GPT2LMHeadModel saved by transformers: the configured model gets
    exactly the imported weights, and a short `dlm train` run from it works."""
    source = tmp_path / kind
    if kind == "llama":
        _llama_dir(source, tokenizer_with_mask=True)
        tokenizer = source
    else:
        _gpt2_dir(source, vocab=64)
        tokenizer = _save_tokenizer(tmp_path / "tokenizer", with_mask=True)
    imported = import_pretrained(source)
    fields = imported.config.model_dump(mode="json", exclude={"attention", "compile", "length_head"})
    arch = [f"model.{k}={'null' if v is None else v}" for k, v in fields.items()]
    run_dir = tmp_path / "run"
    overrides = _fp32(run_dir, *arch, f"model.init_from={source}", f"tokenizer.name_or_path={tokenizer}",
                      data__seq_len=32, run__steps=2, logging__every=1)
    cfg = load_config(SMOKE, overrides)
    model = build_training_model(cfg, CPU)
    assert model.state_dict().keys() == imported.state_dict.keys()
    for name, tensor in imported.state_dict.items():
        assert torch.equal(model.state_dict()[name], tensor), name

    assert main(["train", SMOKE, *overrides]) == 0
    assert all(torch.isfinite(torch.tensor(loss)) for loss in step_losses(run_dir).values())


def test_bad_format_or_shape_fails_in_one_line_before_the_run_starts(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, exported = trained
    cases = [
        ([f"model.init_from={exported}", "model.d_model=32"],
         "tensor embed.weight has shape [50304, 64] in the dlm model at"),
        ([f"model.init_from={exported}", "model.n_layers=2"], "has blocks.2.attn.k_proj.weight"),
        ([f"model.init_from={exported}", "model.rope_theta=500000"], "set model.rope_theta=10000.0"),
        ([f"model.init_from={exported}", "model.init_from_format=llama"], "holds a dlm checkpoint"),
        ([f"model.init_from={exported}", "model.init_from_format=nope"], "model.init_from_format"),
    ]
    for extra, expected in cases:
        run_dir = tmp_path / "run"
        assert main(["train", SMOKE, *_fp32(run_dir, *extra)]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert "model.init_from" in err
        assert not run_dir.exists(), "the error must come before the run directory exists"
    with pytest.raises(ConfigError, match="d_model=64"):  # the message names the source's architecture
        load_config(SMOKE, [f"model.init_from={exported}", "model.d_model=32"])


def test_a_missing_source_is_refused_when_the_run_needs_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config may name what an earlier run will write (configs/sft-length.yaml starts from runs/smoke): it
    validates, and the run that would read the missing source stops with one line, before any step."""
    missing = tmp_path / "not-yet"
    cfg = load_config(SMOKE, _fp32(tmp_path / "a", f"model.init_from={missing}"))
    with pytest.raises(ConfigError, match=r"model.init_from = .*not-yet.* does not exist"):
        cfg.model.check_init_from()
    (tmp_path / "running").mkdir()  # a run directory that has written no weights and no checkpoint yet
    running = load_config(SMOKE, _fp32(tmp_path / "b", f"model.init_from={tmp_path / 'running'}"))
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        running.model.check_init_from()
    assert main(["train", SMOKE, *_fp32(tmp_path / "run", f"model.init_from={missing}")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.init_from" in err and "does not exist" in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_zero3_partitioned_model_starts_from_the_export(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """2 processes, ZeRO-3 built under zero.Init with every parameter partitioned: rank 0 fills each parameter
    inside GatheredParameters. The first loss equals the single process's from the same export (same global
    batch: 2 ranks x 1 micro-batch = 1 rank x 2 accumulated micro-batches read by 2 data workers)."""
    _, exported = trained
    zero3 = json.loads((ROOT / "configs" / "zero" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    init = f"model.init_from={exported}"
    single = tmp_path / "single"
    argv = ["train", SMOKE, *_fp32(single, init, "run.grad_accum_steps=2", "data.num_workers=2",
                                   "data.worker_batches=1", run__steps=2, logging__every=1)]
    assert main(argv) == 0
    ranks = tmp_path / "zero3"
    argv = ["launch", SMOKE, *_fp32(ranks, init, "engine.kind=deepspeed", f"engine.deepspeed_config={tmp_path / 'zero3.json'}",
                                    "engine.zero_init=true", run__steps=2, logging__every=1), "--workers", "2"]
    assert main(argv) == 0
    assert step_losses(ranks)[1] == pytest.approx(step_losses(single)[1], abs=1e-5)
    weights = load_weights(ranks / "model.safetensors")
    assert weights.keys() == load_weights(single / "model.safetensors").keys()
