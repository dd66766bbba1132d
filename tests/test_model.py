"""The transformer: exact parameter counts, parity with a non-causal transformers LLaMA, bidirectionality,
document isolation in packed rows, every architecture switch, meta-device materialisation, config errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError

from dlm.modeling import (
    PRESETS,
    DiffusionTransformer,
    TransformerConfig,
    build_model,
    model_info,
    non_embedding_param_count,
    param_count,
    preset,
    training_flops_per_token,
)

LLADA_8B_PARAMS = 8_015_581_184  # model.safetensors.index.json total_size / 2 bytes (bf16)
GPT2_PARAMS = 124_439_808  # transformers GPT2Model(GPT2Config())


def _small(**overrides: object) -> TransformerConfig:
    base: dict[str, object] = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, mlp_hidden=48, max_seq_len=64)
    return TransformerConfig(**{**base, **overrides})


def _model(cfg: TransformerConfig, seed: int = 0) -> DiffusionTransformer:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_accounting_equals_built_module(name: str) -> None:
    cfg = preset(name)
    model = build_model(cfg, device="meta")
    assert model.num_params() == param_count(cfg)
    assert model.num_params(non_embedding=True) == non_embedding_param_count(cfg)


def test_preset_sizes() -> None:
    llada = build_model(preset("llada-8b"))  # over the threshold: lands on meta without asking
    assert llada.embed.weight.is_meta
    assert llada.num_params() == LLADA_8B_PARAMS
    assert param_count(preset("gpt2")) == GPT2_PARAMS
    assert param_count(preset("tiny")) < 5_000_000
    assert preset("tiny").vocab_size == 50304 and preset("tiny").vocab_size % 64 == 0
    assert not build_model(preset("tiny")).embed.weight.is_meta


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bias": True},
        {"tie_embeddings": True},
        {"norm": "layer", "bias": True, "mlp": "gelu"},
        {"positions": "learned", "n_kv_heads": 2},
        {"tie_embeddings": True, "output_bias": True},
        {"output_bias": True},
    ],
)
def test_accounting_equals_module_for_switches(overrides: dict[str, object]) -> None:
    cfg = _small(**overrides)
    model = _model(cfg)
    assert model.num_params() == param_count(cfg)
    assert model.num_params(non_embedding=True) == non_embedding_param_count(cfg)


def test_flops_per_token_formula() -> None:
    cfg = preset("llada-8b")
    n = non_embedding_param_count(cfg)
    assert n == LLADA_8B_PARAMS - 2 * 126464 * 4096
    assert training_flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 4096 * 4096
    info = model_info(cfg, 4096)
    assert info == {"params": LLADA_8B_PARAMS, "non_embedding_params": n, "flops_per_token": 6 * n + 12 * 32 * 4096**2}
    with pytest.raises(ValueError, match="seq_len"):
        training_flops_per_token(cfg, 0)


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="gpt2, llada-8b, small, tiny"):
        preset("llada-70b")
    assert preset("tiny", n_layers=2).n_layers == 2


# ---------------------------------------------------------------------------------------------- parity


def _hf_llama_from(model: DiffusionTransformer) -> torch.nn.Module:
    """A transformers LLaMA holding ``model``'s weights, its layers switched to non-causal attention."""
    transformers = pytest.importorskip("transformers")
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    renames = [("embed.", "embed_tokens."), ("blocks.", "layers."), (".attn_norm", ".input_layernorm"),
               (".attn.", ".self_attn."), (".mlp_norm", ".post_attention_layernorm"), ("final_norm", "norm")]
    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith("lm_head."):
            for old, new in renames:
                key = key.replace(old, new)
            key = "model." + key
        state[key] = value
    if cfg.tie_embeddings:
        state["lm_head.weight"] = model.embed.weight
    hf.load_state_dict(state, strict=True)
    for layer in hf.model.layers:
        layer.self_attn.is_causal = False
    return hf


@pytest.mark.parametrize(("backend", "tie"), [("sdpa", False), ("math", True)])
def test_matches_noncausal_transformers_llama_on_packed_rows(backend: str, tie: bool) -> None:
    """LLaDA is a LLaMA without the causal mask: same weights, an additive document mask → same states."""
    cfg = _small(n_kv_heads=2, rope_theta=500000.0, attention=backend, tie_embeddings=tie)
    model = _model(cfg)
    hf = _hf_llama_from(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
    doc_ids = torch.tensor([[0] * 5 + [1] * 1 + [2] * 6, [3] * 12])
    position_ids = torch.tensor([list(range(5)) + [0] + list(range(6)), list(range(12))])
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    additive = torch.zeros(2, 1, 12, 12).masked_fill(~same_doc[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = hf.model(input_ids=ids, attention_mask=additive, position_ids=position_ids).last_hidden_state
        ours = model(ids, doc_ids=doc_ids, position_ids=position_ids)
        expected_logits = hf(input_ids=ids, attention_mask=torch.zeros(2, 1, 12, 12)).logits
        ours_logits = model.logits(model(ids))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_logits, expected_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- behaviour


def test_bidirectional_later_token_changes_earlier_state() -> None:
    cfg = _small()
    model = _model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        out, out_changed = model(ids), model(changed)
    assert out.shape == (1, 10, cfg.d_model)
    assert not torch.allclose(out[0, 0], out_changed[0, 0])


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_documents_do_not_see_each_other(positions: str) -> None:
    cfg = _small(positions=positions, n_kv_heads=2)
    model = _model(cfg)
    doc_ids = torch.tensor([[0] * 4 + [1] * 1 + [2] * 5, [0] * 6 + [1] * 4])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    changed = ids.clone()
    changed[0, 5:] = (ids[0, 5:] + 7) % cfg.vocab_size  # document 2 of row 0
    changed[1, 6:] = (ids[1, 6:] + 3) % cfg.vocab_size  # document 1 of row 1
    with torch.no_grad():
        out = model(ids, doc_ids=doc_ids, position_ids=position_ids)
        out_changed = model(changed, doc_ids=doc_ids, position_ids=position_ids)
        # A document packed behind another equals the same document alone at the start of a row.
        alone = model(ids[:1, 5:], position_ids=position_ids[:1, 5:] * 0 + torch.arange(5))
    torch.testing.assert_close(out[0, :5], out_changed[0, :5], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1, :6], out_changed[1, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(out[0, 5:], out_changed[0, 5:])
    torch.testing.assert_close(out[0, 5:], alone[0], atol=1e-5, rtol=1e-5)


def test_gqa_shapes() -> None:
    cfg = _small(n_heads=8, n_kv_heads=2)
    model = _model(cfg)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (32, 32)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * cfg.head_dim, 32)
    hidden = model(torch.randint(0, cfg.vocab_size, (3, 7)))
    assert hidden.shape == (3, 7, 32)
    assert model.logits(hidden).shape == (3, 7, cfg.vocab_size)


SWITCHES = list(
    itertools.product(["rms", "layer"], ["swiglu", "gelu"], ["rope", "learned"], [False, True], [False, True])
)


@pytest.mark.parametrize(("norm", "mlp", "positions", "bias", "tie"), SWITCHES)
def test_every_switch_combination_trains(norm: str, mlp: str, positions: str, bias: bool, tie: bool) -> None:
    cfg = _small(norm=norm, mlp=mlp, positions=positions, bias=bias, tie_embeddings=tie, n_layers=1)
    model = _model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    hidden = model(ids, doc_ids=torch.tensor([[0] * 4 + [1] * 5, [0] * 9]))
    loss = torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert (model.lm_head is None) == tie
    assert (model.lm_head_bias is not None) == (bias and not tie)
    if tie:
        assert model.lm_head_weight is model.embed.weight
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_init_weights_scheme() -> None:
    cfg = _small(n_layers=8, d_model=128, mlp_hidden=512, bias=True, norm="layer")
    model = _model(cfg)
    block = model.blocks[0]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert torch.equal(block.attn_norm.weight, torch.ones(128))
    assert torch.equal(block.attn_norm.bias, torch.zeros(128))
    assert torch.equal(block.mlp.up_proj.bias, torch.zeros(512))


def test_hidden_states_are_final_normed() -> None:
    cfg = _small(norm_eps=1e-12)  # the default eps is not negligible against a freshly initialised stream
    hidden = _model(cfg)(torch.randint(0, cfg.vocab_size, (2, 5)))
    rms = hidden.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def test_learned_positions_reject_long_sequences() -> None:
    cfg = _small(positions="learned", max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        _model(cfg)(torch.zeros(1, 9, dtype=torch.long))


def test_rope_runs_past_max_seq_len_and_after_dtype_change() -> None:
    cfg = _small(max_seq_len=8)
    model = _model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(ids)
        explicit = model(ids, position_ids=torch.arange(12)[None])
        bf16 = model.to(torch.bfloat16)(ids)
    torch.testing.assert_close(explicit, ref)
    assert model.rope is not None and model.rope.cos_cached.dtype == torch.float32
    torch.testing.assert_close(bf16.float(), ref, atol=0.1, rtol=0.1)
    assert "rope.cos_cached" not in model.state_dict()


def test_meta_build_materialises_like_a_direct_build() -> None:
    cfg = _small(n_kv_heads=2)
    direct = build_model(cfg)
    meta = build_model(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta(torch.zeros(1, 5, dtype=torch.long, device="meta"))  # shape tracing on meta must not poison the cache
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    torch.manual_seed(3)
    direct.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        out = meta(ids)
        torch.testing.assert_close(out, direct(ids))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30}, r"d_model \(30\) must be divisible by n_heads \(4\)"),
        ({"n_kv_heads": 3}, r"n_kv_heads \(3\) must divide n_heads \(4\)"),
        ({"n_kv_heads": 8}, r"n_kv_heads \(8\) must divide n_heads \(4\)"),
        ({"d_model": 12, "n_heads": 4}, "rope needs an even head_dim"),
        ({"n_layers": 0}, "greater than 0"),
        ({"vocab_size": -1}, "greater than 0"),
        ({"norm": "batch"}, "'rms' or 'layer'"),
        ({"attention": "flash3"}, "'auto', 'flash', 'sdpa', 'flex' or 'math'"),
        ({"dropout": 0.1}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_impossible_shapes(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _small(**overrides)


def test_config_is_frozen_and_resolves_heads() -> None:
    cfg = _small(n_kv_heads=2, d_model=12, n_heads=4, positions="learned")
    assert (cfg.head_dim, cfg.kv_heads, _small().kv_heads) == (3, 2, 4)
    with pytest.raises(ValidationError):
        cfg.d_model = 64  # type: ignore[misc]


@pytest.mark.parametrize("tie", [True, False])
def test_output_bias_is_the_heads_bias_tied_or_not(tie: bool) -> None:
    cfg = _small(output_bias=True, tie_embeddings=tie)
    model = _model(cfg)
    assert model.lm_head_bias is model.output_bias.bias
    assert torch.equal(model.lm_head_bias, torch.zeros(cfg.vocab_size))
    with torch.no_grad():
        model.output_bias.bias.normal_()
    hidden = model(torch.randint(0, cfg.vocab_size, (2, 5)))
    torch.testing.assert_close(model.logits(hidden), hidden @ model.lm_head_weight.T + model.output_bias.bias)


def test_output_bias_on_a_head_that_has_one_is_refused() -> None:
    with pytest.raises(ValidationError, match="already has one"):
        _small(output_bias=True, tie_embeddings=False, bias=True)
