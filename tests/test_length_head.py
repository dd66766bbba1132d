"""The length/EOS head: config, bucket rounding, shapes, pooling, the loss on hand-computed values, the
quantile bounds, and its place inside the transformer (init, accounting, safetensors round trip)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_model, save_model

from dlm.modeling import (
    LengthHead,
    LengthHeadConfig,
    LengthHeadOutput,
    TransformerConfig,
    bucket_edges,
    bucket_of,
    build_model,
    length_head_loss,
    param_count,
    predict_bucket_bound,
    predict_eos_bound,
    preset,
)


def _tiny(**overrides: object) -> TransformerConfig:
    base: dict[str, object] = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=256)
    return preset("tiny", **{**base, **overrides})


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_and_validation() -> None:
    cfg = LengthHeadConfig()
    assert (cfg.enabled, cfg.min_bucket, cfg.max_len, cfg.pooling, cfg.hidden) == (True, 16, 1024, "attention", 0)
    assert cfg.edges == [16, 32, 64, 128, 256, 512, 1024] and cfg.num_buckets == 7
    with pytest.raises(ValidationError, match="power of two"):
        LengthHeadConfig(max_len=1000)
    with pytest.raises(ValidationError, match="power of two"):
        LengthHeadConfig(min_bucket=24)
    with pytest.raises(ValidationError, match="must be >="):
        LengthHeadConfig(min_bucket=64, max_len=32)
    with pytest.raises(ValidationError, match="Extra inputs"):
        LengthHeadConfig(buckets=4)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        LengthHeadConfig(pooling="max")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ buckets


def test_bucket_edges() -> None:
    assert bucket_edges(16, 128) == [16, 32, 64, 128]
    assert bucket_edges(16, 16) == [16]
    with pytest.raises(ValueError):
        bucket_edges(16, 100)


@pytest.mark.parametrize(
    ("length", "index"), [(0, 0), (1, 0), (15, 0), (16, 0), (17, 1), (32, 1), (33, 2), (128, 3), (129, 3), (10_000, 3)]
)
def test_bucket_of_rounds_up_and_clips(length: int, index: int) -> None:
    assert bucket_of(length, 16, 128) == index
    assert bucket_of(torch.tensor([length]), 16, 128).tolist() == [index]


# ------------------------------------------------------------------------------------------------ module


@pytest.mark.parametrize("hidden", [0, 8])
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_head_shapes(hidden: int, pooling: str) -> None:
    head = LengthHead(12, LengthHeadConfig(max_len=128, hidden=hidden, pooling=pooling))  # type: ignore[arg-type]
    hidden_states = torch.randn(3, 7, 12)
    prompt = torch.zeros(3, 7, dtype=torch.bool)
    prompt[:, :3] = True
    out = head(hidden_states, prompt)
    assert out.eos_logits.shape == (3, 7) and out.bucket_logits.shape == (3, 4)
    assert out.eos_logits.dtype == torch.float32 and out.edges == (16, 32, 64, 128)
    assert out.eos_probs().shape == (3, 7)
    assert torch.allclose(out.bucket_probs().sum(-1), torch.ones(3))


def test_zero_init_starts_neutral_and_attention_pooling_starts_as_mean() -> None:
    torch.manual_seed(0)
    attn = LengthHead(8, LengthHeadConfig(max_len=64, pooling="attention"))
    mean = LengthHead(8, LengthHeadConfig(max_len=64, pooling="mean"))
    h = torch.randn(2, 6, 8)
    prompt = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    expected = torch.stack([h[0, :3].mean(0), h[1, 1:5].mean(0)])
    assert torch.allclose(attn.pool(h, prompt), expected, atol=1e-6)
    assert torch.allclose(mean.pool(h, prompt), expected, atol=1e-6)
    out = attn(h, prompt)
    assert torch.equal(out.eos_logits, torch.zeros(2, 6)) and torch.equal(out.bucket_logits, torch.zeros(2, 3))


def test_pooling_reads_only_prompt_positions_and_survives_an_empty_prompt() -> None:
    torch.manual_seed(0)
    head = LengthHead(8, LengthHeadConfig(max_len=64, hidden=4))
    torch.nn.init.normal_(head.pool_score.weight)  # type: ignore[union-attr]
    torch.nn.init.normal_(head.bucket.out.weight)
    h = torch.randn(2, 6, 8)
    prompt = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    changed = h.clone()
    changed[:, 2:] = torch.randn(2, 4, 8)
    a, b = head(h, prompt), head(changed, prompt)
    assert torch.equal(a.bucket_logits, b.bucket_logits)
    assert torch.isfinite(a.bucket_logits).all()
    assert torch.equal(head.pool(h, prompt)[1], torch.zeros(8))


# ------------------------------------------------------------------------------------------------ loss


def test_loss_matches_hand_computed_values() -> None:
    # One row of 5 positions: prompt 0..1, answer at 2..3 (length 2), past the end from 4 on.
    # Scored positions 2, 3, 4 with targets 0, 0, 1 and logits 0, ln 3, -ln 3:
    # BCE = ln 2, -ln(1 - 3/4) = ln 4, -ln(1/4) = ln 4 -> mean 5 ln 2 / 3. Position 0/1 logits are ignored.
    eos = torch.tensor([[9.0, -9.0, 0.0, math.log(3), -math.log(3)]])
    buckets = torch.tensor([[0.0, math.log(2), 0.0]])  # edges 16, 32, 64; length 2 -> bucket 0
    out = LengthHeadOutput(eos, buckets, (16, 32, 64))
    loss, metrics = length_head_loss(out, torch.tensor([2]), torch.tensor([2]))
    bucket_ce = -math.log(1 / 4)
    assert metrics["eos_bce"].item() == pytest.approx(5 * math.log(2) / 3, rel=1e-6)
    assert metrics["bucket_ce"].item() == pytest.approx(bucket_ce, rel=1e-6)
    assert loss.item() == pytest.approx(5 * math.log(2) / 3 + bucket_ce, rel=1e-6)
    assert metrics["eos_count"].item() == 3 and metrics["bucket_count"].item() == 1
    # predictions at logit 0 count as "not past the end": correct, wrong, wrong
    assert metrics["eos_acc"].item() == pytest.approx(1 / 3)
    assert metrics["bucket_acc"].item() == 0.0  # argmax is bucket 1, target bucket 0


def test_loss_respects_canvas_mask_and_long_answers() -> None:
    eos = torch.zeros(2, 4)
    out = LengthHeadOutput(eos, torch.zeros(2, 2), (16, 32))
    canvas = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    # row 1's answer (length 20) runs past the row: no position is past the end, bucket 1 (32)
    loss, metrics = length_head_loss(out, torch.tensor([1, 0]), torch.tensor([1, 20]), canvas_mask=canvas)
    assert metrics["eos_count"].item() == 3 + 2
    assert metrics["eos_bce"].item() == pytest.approx(math.log(2))
    assert metrics["bucket_ce"].item() == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(2 * math.log(2))


def test_loss_gradient_reaches_the_backbone() -> None:
    model = build_model(_tiny(length_head=LengthHeadConfig(max_len=64, hidden=8)))
    ids = torch.randint(0, 63, (2, 20))
    hidden = model(ids)
    prompt = torch.zeros(2, 20, dtype=torch.bool)
    prompt[:, :5] = True
    out = model.length_head(hidden, prompt)
    loss, _ = length_head_loss(out, torch.tensor([5, 5]), torch.tensor([3, 40]))
    loss.backward()
    assert model.length_head.eos.out.weight.grad.abs().sum() > 0
    assert model.length_head.bucket.out.weight.grad.abs().sum() > 0
    # zero-initialised output layers pass no gradient down at step 0; one update later they do
    with torch.no_grad():
        model.length_head.eos.out.weight.normal_()
    model.zero_grad()
    loss, _ = length_head_loss(model.length_head(model(ids), prompt), torch.tensor([5, 5]), torch.tensor([3, 40]))
    loss.backward()
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ bounds


def test_eos_bound_is_one_past_the_last_position_below_q() -> None:
    probs = torch.tensor([
        [0.99, 0.10, 0.50, 0.95, 0.99, 0.99],   # prompt at 0 (ignored): first at/above 0.9 from canvas pos 2 on
        [0.00, 0.00, 0.95, 0.30, 0.97, 0.99],   # not monotone: the dip at 3 keeps the bound at 3 (conservative)
        [0.00, 0.00, 0.10, 0.20, 0.30, 0.40],   # never reaches q: the whole canvas
        [0.00, 0.00, 0.99, 0.99, 0.99, 0.99],   # past the end right away: empty answer
    ])
    start = torch.tensor([1, 1, 2, 2])
    assert predict_eos_bound(probs, start, 0.9).tolist() == [2, 3, 4, 0]
    assert predict_eos_bound(probs, start, 0.99).tolist() == [3, 4, 4, 0]
    # answer_end limits the canvas: row 0 cut to positions 1..2 never reaches 0.99 there -> the whole canvas (2)
    assert predict_eos_bound(probs, start, 0.99, torch.tensor([3, 6, 6, 6])).tolist() == [2, 4, 4, 0]
    with pytest.raises(ValueError):
        predict_eos_bound(probs, start, 0.0)


def test_bucket_bound_is_the_smallest_bucket_reaching_q() -> None:
    probs = torch.tensor([[0.5, 0.4, 0.1], [0.05, 0.05, 0.9], [0.95, 0.03, 0.02], [0.3, 0.3, 0.3]])
    assert predict_bucket_bound(probs, 0.9).tolist() == [1, 2, 0, 2]
    assert predict_bucket_bound(probs, 0.5).tolist() == [0, 2, 0, 1]
    # float32 rounding must not push an exact 0.9 into the next bucket
    assert predict_bucket_bound(torch.tensor([[0.3, 0.3, 0.3, 0.1]]), 0.9).tolist() == [2]


# ------------------------------------------------------------------------------------------------ in the model


def test_model_without_head_is_unchanged() -> None:
    assert _tiny().length_head is None
    assert build_model(_tiny()).length_head is None
    assert not any(k.startswith("length_head") for k in build_model(_tiny()).state_dict())
    disabled = _tiny(length_head=LengthHeadConfig(enabled=False))
    assert build_model(disabled).length_head is None and param_count(disabled) == param_count(_tiny())


def test_head_leaves_backbone_init_and_forward_unchanged() -> None:
    torch.manual_seed(3)
    plain = build_model(_tiny())
    torch.manual_seed(3)
    headed = build_model(_tiny(length_head=LengthHeadConfig(max_len=64, hidden=8)))
    plain_state = plain.state_dict()
    for name, tensor in headed.state_dict().items():
        if not name.startswith("length_head."):
            assert torch.equal(tensor, plain_state[name]), name
    ids = torch.randint(0, 63, (2, 10))
    assert torch.equal(plain(ids), headed(ids))


def test_param_count_and_safetensors_round_trip(tmp_path: Path) -> None:
    cfg = _tiny(length_head=LengthHeadConfig(max_len=128, hidden=16, pooling="attention"))
    model = build_model(cfg)
    assert model.num_params() == param_count(cfg)
    assert param_count(cfg) - param_count(_tiny()) == (32 * 16 + 16 + 16 * 1 + 1) + (32 * 16 + 16 + 16 * 4 + 4) + 32
    with torch.no_grad():
        for p in model.length_head.parameters():
            p.normal_()
    save_model(model, str(tmp_path / "model.safetensors"))
    again = TransformerConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    loaded = build_model(again)
    load_model(loaded, str(tmp_path / "model.safetensors"), strict=True)
    h = torch.randn(1, 9, 32)
    prompt = torch.ones(1, 9, dtype=torch.bool)
    assert torch.equal(model.length_head(h, prompt).bucket_logits, loaded.length_head(h, prompt).bucket_logits)


def test_meta_built_model_materialises_the_head() -> None:
    cfg = _tiny(length_head=LengthHeadConfig(max_len=64))
    model = build_model(cfg, device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.length_head.bucket.out.weight, torch.zeros_like(model.length_head.bucket.out.weight))
    assert torch.equal(model.length_head.pool_score.weight, torch.zeros(1, 32))
