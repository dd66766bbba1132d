"""The config tree: YAML + dotted overrides, and one clear line for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dlm.config import RunConfig, apply_overrides, dump_resolved, load_config, validate
from dlm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def test_smoke_config_loads_and_overrides_apply() -> None:
    cfg = load_config(SMOKE, ["optim.lr=1e-3", "run.dir=/tmp/r", "model.n_layers=2", "data.paths=[a.txt, b.txt]"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.run.dir == "/tmp/r"
    assert cfg.model.resolve().n_layers == 2
    assert cfg.model.resolve().d_model == load_config(SMOKE).model.resolve().d_model
    assert cfg.data.paths == ["a.txt", "b.txt"]


def test_overrides_do_not_mutate_the_input_tree() -> None:
    tree = {"optim": {"lr": 1.0}}
    out = apply_overrides(tree, ["optim.lr=2"])
    assert tree["optim"]["lr"] == 1.0 and out["optim"]["lr"] == 2


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(SMOKE, ["model.preset=small"])
    path = dump_resolved(cfg, tmp_path)
    tree = yaml.safe_load(path.read_text())
    assert tree["model"]["d_model"] == 768 and tree["model"]["preset"] == "small"
    assert validate(tree).model.resolve() == cfg.model.resolve()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lrr=1"], "optim.lrr: unknown key; allowed keys here: betas, eps, grad_clip, length_head_lr, lr, weight_decay"),
        (["bogus.x=1"], "bogus: unknown key"),
        (["optim.lr=abc"], "optim.lr = 'abc': Input should be a valid number"),
        (["optim.lr=-1"], "optim.lr = -1: Input should be greater than 0"),
        (["engine.kind=zero4"], "engine.kind = 'zero4': Input should be 'plain'"),
        (["model.preset=huge"], "unknown preset 'huge'; allowed: gpt2, llada-8b, small, tiny"),
        (["model.d_model=100"], "model = {'d_model': 100, 'output_bias': True}: "),
        (["model.n_layers=0"], "model.n_layers = 0:"),
        (["schedule.warmup_steps=500", "run.steps=10"], "schedule.warmup_steps = 500: must be fewer than run.steps = 10"),
        (["model.preset=gpt2", "data.seq_len=4096"], "data.seq_len = 4096: must be at most model.max_seq_len = 1024"),
        (["optim.betas=[0.9, 1.5]"], "each beta must be in [0, 1)"),
        (["model.output_bias=false"], "model.output_bias_init = 'unigram': the model has no output bias: set model.output_bias=true"),
        (["optim.lr"], "is not of the form section.key=value"),
        (["optim.lr.x=1"], "'lr' is a value, not a section"),
    ],
)
def test_bad_values_name_the_key_value_and_what_is_allowed(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_every_shipped_config_validates() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), RunConfig), path
