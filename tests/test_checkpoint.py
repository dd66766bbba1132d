"""Checkpoints: atomic saves, `latest` last, pruning, fallbacks after a crash, and clear refusals."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dlm.config import load_config
from dlm.modeling import DiffusionTransformer
from dlm.training.checkpoint import CheckpointError, Checkpointer, rng_state, set_rng_state
from dlm.training.engine import PlainEngine

from .conftest import ROOT

SMOKE = ROOT / "configs" / "smoke.yaml"


def _engine(seed: int = 0) -> PlainEngine:
    cfg = load_config(SMOKE, ["model.vocab_size=64", "model.d_model=16", "model.n_layers=1", "model.n_heads=2"])
    torch.manual_seed(seed)
    model = DiffusionTransformer(cfg.model.resolve())
    engine = PlainEngine(model, cfg, torch.device("cpu"))
    engine.backward(model(torch.randint(0, 64, (2, 8))).pow(2).mean())
    engine.step()
    return engine


def _save(ckpt: Checkpointer, step: int, engine: PlainEngine) -> Path:
    return ckpt.save(step, engine, {"step": step, "rng": rng_state()}, {"model": {"d_model": 16}, "tokenizer": {}})


def test_save_is_complete_latest_points_at_it_and_old_ones_are_pruned(tmp_path: Path) -> None:
    ckpt, engine = Checkpointer(tmp_path, keep_last=2), _engine()
    for step in (1, 2, 3):
        _save(ckpt, step, engine)
    assert ckpt.complete_steps() == [2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert ckpt.resolve("auto") == tmp_path / "checkpoints" / "step_000003"
    assert ckpt.resolve(str(tmp_path)) == ckpt.resolve("auto")


def test_engine_state_round_trips_exactly(tmp_path: Path) -> None:
    ckpt, engine = Checkpointer(tmp_path), _engine(0)
    path = _save(ckpt, 1, engine)
    other = _engine(1)
    other.load_checkpoint(path / "engine")
    for (name, a), b in zip(engine.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.optimizer.state_dict()["state"][0]["exp_avg"].equal(engine.optimizer.state_dict()["state"][0]["exp_avg"])
    assert other.scheduler.state_dict() == engine.scheduler.state_dict()


def test_a_kill_mid_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    ckpt, engine = Checkpointer(tmp_path), _engine()
    _save(ckpt, 1, engine)
    half = ckpt.begin(2)  # the process died here: a temp dir with partial content, latest untouched
    (half / "client_rank00000.pt").write_bytes(b"partial")
    assert ckpt.resolve("auto") == tmp_path / "checkpoints" / "step_000001"
    # a complete-looking dir whose `latest` pointer was never written is still found, newest first
    _save(ckpt, 3, engine)
    (tmp_path / "checkpoints" / "latest").write_text("step_000009\n")  # names something that is gone
    assert ckpt.resolve("auto") == tmp_path / "checkpoints" / "step_000003"
    assert not half.exists(), "the next successful save removes stale temp dirs"


def test_a_full_disk_during_save_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, engine = Checkpointer(tmp_path), _engine()
    good = _save(ckpt, 1, engine)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"^no space left on device in .*checkpoints while saving step 2; "
                       r"the checkpoint of step 1 is kept"):
        _save(ckpt, 2, engine)
    monkeypatch.undo()
    assert ckpt.complete_steps() == [1]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert ckpt.resolve("auto") == good
    _engine(5).load_checkpoint(good / "engine")


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])


def test_incompatible_or_missing_checkpoints_are_refused_clearly(tmp_path: Path) -> None:
    ckpt, engine = Checkpointer(tmp_path), _engine()
    path = _save(ckpt, 1, engine)
    with pytest.raises(CheckpointError, match=r"model.d_model: checkpoint 16 vs config 32"):
        Checkpointer.check_compatible(path, {"model": {"d_model": 32}, "tokenizer": {}})
    # resuming needs the checkpoint's weights, not the source a new run would start from
    Checkpointer.check_compatible(path, {"model": {"d_model": 16, "init_from": "/elsewhere"}, "tokenizer": {}})
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.resolve(str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="no state for rank 1"):
        Checkpointer.read_client_state(path, 1)
    (path / "client_rank00000.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpointer.read_client_state(path, 0)
    (path / "engine" / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read the engine state"):
        _engine().load_checkpoint(path / "engine")
