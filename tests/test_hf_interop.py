"""Hugging Face interop: export/import round trips, sharding, parity with transformers' LLaMA and GPT-2, the
LLaDA-8B layout, mask-token adaptation, the CLI, AutoModel loading, and clear errors for broken checkpoints.

Reference models are built locally from tiny random transformers configs and saved with save_pretrained; the
hub is never contacted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from dlm.cli import main
from dlm.modeling import (
    DiffusionTransformer,
    InteropError,
    TransformerConfig,
    UnsupportedModelError,
    build_model,
    export,
    import_pretrained,
    preset,
)
from dlm.modeling.hf_export import llada_config_json
from dlm.modeling.hf_import import _llada_config
from dlm.modeling.hf_names import LLADA_NAMES, rename, to_llada

transformers = pytest.importorskip("transformers")

LLADA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "llada-8b-instruct"
MASK = "<|mdm_mask|>"
WORDS = 60  # tokenizer: <unk>, <eos>, w0..w59 (+ the mask token when asked) -> 62 or 63 tokens


def _cfg(**overrides: object) -> TransformerConfig:
    base: dict[str, object] = dict(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, max_seq_len=32
    )
    return TransformerConfig(**{**base, **overrides})


def _save_tokenizer(directory: Path, with_mask: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(WORDS)}}
    if with_mask:
        vocab[MASK] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", mask_token=MASK if with_mask else None
    )
    tok.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def mask_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tokenizer(tmp_path_factory.mktemp("tok_mask"), with_mask=True)


def _run_dir(directory: Path, cfg: TransformerConfig, tokenizer: Path, seed: int = 0) -> DiffusionTransformer:
    """What `dlm train` leaves: model.safetensors, model_config.json and config.yaml naming the tokenizer."""
    directory.mkdir(parents=True)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or dropped tensor shows in the outputs
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    save_model(model, str(directory / "model.safetensors"))
    (directory / "model_config.json").write_text(cfg.model_dump_json())
    (directory / "config.yaml").write_text(yaml.safe_dump({"tokenizer": {"name_or_path": str(tokenizer)}}))
    return model


def _load(cfg: TransformerConfig, state: dict[str, torch.Tensor]) -> DiffusionTransformer:
    model = build_model(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def _logits(model: DiffusionTransformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids))


def _ids(vocab: int, shape: tuple[int, int] = (2, 11)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------- round trips

VARIANTS = {
    "gqa-untied-rope": {},
    "tied-bias-rope": {"tie_embeddings": True, "bias": True, "n_kv_heads": 4},
    "tied-bias-learned": {"tie_embeddings": True, "bias": True, "positions": "learned", "n_kv_heads": 4},
}
# LLaDA's forward asserts RoPE, so its layout takes RoPE models only (the learned case is a refusal, below)
ROUND_TRIPS = [(fmt, variant) for fmt in ("dlm", "llada") for variant in sorted(VARIANTS)
               if fmt == "dlm" or VARIANTS[variant].get("positions") != "learned"]


@pytest.mark.parametrize(("fmt", "variant"), ROUND_TRIPS)
def test_export_import_round_trip_is_exact(tmp_path: Path, mask_tokenizer: Path, fmt: str, variant: str) -> None:
    cfg = _cfg(**VARIANTS[variant])
    model = _run_dir(tmp_path / "run", cfg, mask_tokenizer)
    result = export(tmp_path / "run", tmp_path / "out", format=fmt, dtype="fp32")  # type: ignore[arg-type]
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"} <= files
    assert result.shards == ["model-00001-of-00001.safetensors"] and result.shards[0] in files
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # the temporary directory is gone

    config_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_json["model_type"] == fmt
    assert config_json["mask_token_id"] == WORDS + 2 and config_json["eos_token_id"] == 1
    with safe_open(str(tmp_path / "out" / result.shards[0]), "pt") as f:
        stored = set(f.keys())
    expected_names = {to_llada(n) for n in model.state_dict()} if fmt == "llada" else set(model.state_dict())
    assert stored == expected_names

    imported = import_pretrained(tmp_path / "out")
    assert imported.model_type == fmt and imported.config == cfg and imported.mask_id == WORDS + 2
    original = model.state_dict()
    assert imported.state_dict.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(imported.state_dict[name], tensor), name
    ids = _ids(cfg.vocab_size)
    assert torch.equal(_logits(_load(imported.config, imported.state_dict), ids), _logits(model, ids))


def test_length_head_travels_in_dlm_format_and_is_refused_by_llada(tmp_path: Path, mask_tokenizer: Path) -> None:
    cfg = _cfg(length_head={"min_bucket": 16, "max_len": 32, "hidden": 8})
    model = _run_dir(tmp_path / "run", cfg, mask_tokenizer)
    assert any(name.startswith("length_head.") for name in model.state_dict())
    export(tmp_path / "run", tmp_path / "out", dtype="fp32")
    imported = import_pretrained(tmp_path / "out")
    assert imported.config == cfg
    assert all(torch.equal(imported.state_dict[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UnsupportedModelError, match=r"length_head\..* has no place in LLaDA's layout.*--format dlm"):
        export(tmp_path / "run", tmp_path / "llada", format="llada")


def test_bf16_export_is_the_rounded_model(tmp_path: Path, mask_tokenizer: Path) -> None:
    cfg = _cfg()
    model = _run_dir(tmp_path / "run", cfg, mask_tokenizer)
    result = export(tmp_path / "run", tmp_path / "out", format="llada")  # bf16 is the default
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llada"
    assert result.total_size == sum(t.numel() * 2 for t in model.state_dict().values())
    imported = import_pretrained(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        assert imported.state_dict[name].dtype == torch.bfloat16
        assert torch.equal(imported.state_dict[name], tensor.to(torch.bfloat16)), name
    ids = _ids(cfg.vocab_size)
    ours = _logits(_load(cfg, imported.state_dict), ids)  # bf16 weights loaded into the fp32 model
    torch.testing.assert_close(ours, _logits(model, ids), atol=0.02, rtol=0.05)


def test_sharding_lists_every_tensor_once(tmp_path: Path, mask_tokenizer: Path) -> None:
    cfg = _cfg()
    model = _run_dir(tmp_path / "run", cfg, mask_tokenizer)
    max_bytes = 8 * 1024
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", "fp32",
                 "--max-shard-size", str(max_bytes)]) == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    seen: list[str] = []
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            keys = list(f.keys())
            tensors = [f.get_tensor(k) for k in keys]
        assert all(index["weight_map"][k] == shard for k in keys)
        size = sum(t.numel() * t.element_size() for t in tensors)
        assert size <= max_bytes or len(keys) == 1, (shard, size)  # only a lone oversized tensor may exceed it
        seen += keys
    assert sorted(seen) == sorted(index["weight_map"]) == sorted(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    imported = import_pretrained(out)
    assert all(torch.equal(imported.state_dict[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- LLaMA parity


def _llama_dir(directory: Path, tokenizer_with_mask: bool, vocab: int = 64, tie: bool = False) -> torch.nn.Module:
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=tie, attn_implementation="eager", bos_token_id=1, eos_token_id=1, pad_token_id=None,
    )
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    hf.save_pretrained(str(directory))
    _save_tokenizer(directory, with_mask=tokenizer_with_mask)
    return hf


def _full_attention(batch: int, length: int) -> torch.Tensor:
    """A 4-D additive mask of zeros: transformers uses a 4-D mask as given, so nothing is causal any more."""
    return torch.zeros(batch, 1, length, length)


def _causal_logits(ours: DiffusionTransformer, ids: torch.Tensor) -> torch.Tensor:
    """Our model with attention made causal through its ``attn_mask`` (True = may attend)."""
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        return ours.logits(ours(ids, attn_mask=causal))


def test_llama_import_matches_transformers(tmp_path: Path) -> None:
    """GQA, untied head, RoPE theta 5e5: same hidden states and logits as LlamaForCausalLM, two ways.

    Bidirectional: transformers' LLaMA given a 4-D all-zero attention mask (transformers uses a 4-D mask as
    given, so its attention is full) against our model as it is. Causal: the untouched, causal LLaMA against
    our model with a lower-triangular ``attn_mask``. Both also prove that LLaMA's q/k rotary layout is our
    half-split one (an interleaved layout would fail here).
    """
    hf = _llama_dir(tmp_path / "llama", tokenizer_with_mask=True)
    imported = import_pretrained(tmp_path / "llama")
    assert imported.model_type == "llama" and imported.mask_id == WORDS + 2
    cfg = imported.config
    assert (cfg.kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.vocab_size) == (2, False, 500000.0, 64)
    ours = _load(cfg, imported.state_dict)
    ids = _ids(64)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=_full_attention(*ids.shape), output_hidden_states=True)
        causal = hf(input_ids=ids).logits
        hidden = ours(ids)
    torch.testing.assert_close(hidden, out.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logits(hidden), out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_causal_logits(ours, ids), causal, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- GPT-2 parity


def _gpt2_dir(directory: Path, vocab: int) -> torch.nn.Module:
    hf_cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=1,
        attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # GPT-2 initialises biases and norms to 0/1; perturb so each tensor's route matters
        for name, param in hf.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    hf.save_pretrained(str(directory))
    _save_tokenizer(directory, with_mask=False)
    return hf


def test_gpt2_import_matches_transformers(tmp_path: Path) -> None:
    """Conv1D transposes, fused c_attn split into q/k/v, learned positions, biased LayerNorm, tanh GELU, tied head.

    Compared as for LLaMA: GPT2LMHeadModel (eager) given a 4-D all-zero attention mask — transformers passes
    a 4-D mask through unchanged, which disables its causal mask — against our bidirectional model; and the
    unmodified causal GPT-2 against our model with a lower-triangular ``attn_mask``.
    """
    hf = _gpt2_dir(tmp_path / "gpt2", vocab=WORDS + 2)
    imported = import_pretrained(tmp_path / "gpt2")
    cfg = imported.config
    assert (cfg.norm, cfg.mlp, cfg.positions, cfg.bias, cfg.tie_embeddings) == ("layer", "gelu", "learned", True, True)
    assert imported.mask_id is None and any("no mask token" in a for a in imported.actions)
    ours = _load(cfg, imported.state_dict)
    ids = _ids(WORDS + 2)
    with torch.no_grad():
        full = hf(input_ids=ids, attention_mask=_full_attention(*ids.shape)).logits
        causal = hf(input_ids=ids).logits
    torch.testing.assert_close(_logits(ours, ids), full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, causal, atol=1e-3)  # the mask trick did change GPT-2's attention
    torch.testing.assert_close(_causal_logits(ours, ids), causal, atol=1e-5, rtol=1e-5)


def test_gpt2_add_mask_token_grows_vocab_with_the_mean_row(tmp_path: Path) -> None:
    hf = _gpt2_dir(tmp_path / "gpt2", vocab=WORDS + 2)  # exactly the tokenizer's size: no spare row
    imported = import_pretrained(tmp_path / "gpt2", add_mask_token=True)
    wte = hf.transformer.wte.weight.detach()
    embed = imported.state_dict["embed.weight"]
    assert imported.config.vocab_size == WORDS + 3 and imported.mask_id == WORDS + 2
    assert torch.equal(embed[: WORDS + 2], wte)
    torch.testing.assert_close(embed[WORDS + 2], wte.mean(dim=0))
    assert imported.tokenizer.mask_token == MASK and imported.tokenizer.mask_token_id == WORDS + 2
    assert any("grew the vocabulary from 62 to 63" in a for a in imported.actions)
    ours = _load(imported.config, imported.state_dict)
    assert _logits(ours, _ids(WORDS + 3)).shape == (2, 11, WORDS + 3)


def test_llama_mask_token_takes_a_spare_row(tmp_path: Path) -> None:
    hf = _llama_dir(tmp_path / "llama", tokenizer_with_mask=False, vocab=64)  # 62 tokens, 64 rows
    imported = import_pretrained(tmp_path / "llama", add_mask_token=True)
    assert imported.config.vocab_size == 64 and imported.mask_id == 62
    for name, hf_name in (("embed.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight")):
        table = hf.state_dict()[hf_name]
        torch.testing.assert_close(imported.state_dict[name][62], table[:62].mean(dim=0))
        assert torch.equal(imported.state_dict[name][:62], table[:62])
    assert any("spare row" in a for a in imported.actions)
    with pytest.raises(InteropError, match="no mask token.*--add-mask-token"):
        import_pretrained(tmp_path / "llama", require_mask=True)


# ---------------------------------------------------------------------------------------------- LLaDA-8B layout


def test_llada_8b_index_maps_one_to_one_onto_the_preset() -> None:
    index = json.loads((LLADA_DIR / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(index) == 291
    ours = build_model(preset("llada-8b"), device="meta").state_dict()
    mapped = {rename(name, LLADA_NAMES, reverse=True) for name in index}
    assert None not in mapped and mapped == set(ours) and len(mapped) == 291
    assert {to_llada(name) for name in ours} == set(index)
    assert to_llada("blocks.3.mlp.down_proj.weight") == "model.transformer.blocks.3.ff_out.weight"
    assert to_llada("lm_head.weight") == "model.transformer.ff_out.weight"


def test_llada_8b_config_translates_both_ways() -> None:
    real = json.loads((LLADA_DIR / "config.json").read_text())
    assert _llada_config(real) == preset("llada-8b")
    ids = {"mask_token_id": 126336, "bos_token_id": 126080, "eos_token_id": 126081, "pad_token_id": 126081}
    written = llada_config_json(preset("llada-8b"), ids)
    assert set(written) == set(real)
    # init_fn: ours is LLaDA's "normal" scheme; mlp_ratio is unused when mlp_hidden_size is set.
    differing = {k for k in real if written[k] != real[k]}
    assert differing == {"init_fn", "mlp_ratio", "transformers_version"}, differing


def test_real_llada_index_without_shards_names_the_missing_file() -> None:
    with pytest.raises(InteropError, match=r"to model-0000\d-of-00006.safetensors, which is not in"):
        import_pretrained(LLADA_DIR)


# ---------------------------------------------------------------------------------------------- CLI, AutoModel


def test_cli_import_export_import_is_bitwise(tmp_path: Path) -> None:
    _gpt2_dir(tmp_path / "gpt2", vocab=WORDS + 2)
    assert main(["import", str(tmp_path / "gpt2"), str(tmp_path / "a"), "--from", "gpt2", "--add-mask-token"]) == 0
    assert main(["export", str(tmp_path / "a"), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "b")]) == 0
    first = load_file(str(tmp_path / "a" / "model.safetensors"))
    second = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # The import is what training and generation load: a model config, its weights and a tokenizer with a mask.
    from dlm.data_streams import load_tokenizer

    cfg = TransformerConfig.model_validate_json((tmp_path / "b" / "model_config.json").read_text())
    missing, unexpected = load_model(DiffusionTransformer(cfg), str(tmp_path / "b" / "model.safetensors"))
    assert not missing and not unexpected
    info = load_tokenizer(str(tmp_path / "b"))
    assert (info.mask_id, info.eos_id, cfg.vocab_size) == (WORDS + 2, 1, WORDS + 3)


def test_cli_exports_a_plain_engine_checkpoint_or_a_run_without_final_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A step_N checkpoint exports the weights of that step; a run directory without final weights (killed, or
    checkpoint.save_final=false) exports its newest complete checkpoint; with neither, one line says what to pass."""
    from .conftest import tiny_overrides
    from .runs import SMOKE, assert_same_weights

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, run__steps=2, checkpoint__interval=2, engine__precision="fp32")
    assert main(["train", SMOKE, *overrides]) == 0
    assert main(["export", str(run_dir / "checkpoints" / "step_000002"), str(tmp_path / "a"), "--dtype", "fp32"]) == 0
    assert_same_weights(tmp_path / "a", run_dir / "model.safetensors")
    (run_dir / "model.safetensors").unlink()
    assert main(["export", str(run_dir), str(tmp_path / "b"), "--dtype", "fp32"]) == 0
    assert_same_weights(tmp_path / "b", tmp_path / "a")
    capsys.readouterr()
    for path in run_dir.glob("checkpoints/step_*"):
        (path / "COMPLETE").unlink()  # as if every save had been cut short
    assert main(["export", str(run_dir), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "holds no complete checkpoint" in err and len(err.strip().splitlines()) == 1


def test_cli_reports_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _gpt2_dir(tmp_path / "gpt2", vocab=WORDS + 2)
    assert main(["import", str(tmp_path / "gpt2"), str(tmp_path / "a"), "--from", "llama"]) == 2
    assert "holds a gpt2 checkpoint, not llama" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "gpt2"), str(tmp_path / "a")]) == 2  # GPT-2's vocab has no mask token
    assert "--add-mask-token" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("tie", [False, True])
def test_dlm_export_loads_with_transformers_automodel(tmp_path: Path, mask_tokenizer: Path, tie: bool) -> None:
    import dlm.modeling.hf_model  # noqa: F401  (registers model_type "dlm" with the Auto classes)

    cfg = _cfg(tie_embeddings=tie, attention="math")
    model = _run_dir(tmp_path / "run", cfg, mask_tokenizer)
    export(tmp_path / "run", tmp_path / "out", dtype="fp32")
    # The run's kernel choice is not part of the model: the export lets the loading machine pick.
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attention"] == "auto"
    hf = transformers.AutoModel.from_pretrained(str(tmp_path / "out")).eval()
    assert type(hf).__name__ == "DlmDiffusionModel"
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
        padded = hf(input_ids=ids, attention_mask=torch.tensor([[1] * 11, [1] * 6 + [0] * 5])).logits
    torch.testing.assert_close(logits, _logits(model, ids), atol=1e-5, rtol=1e-5)  # same weights, other kernel
    torch.testing.assert_close(padded[1, :6], _logits(model, ids[1:, :6])[0], atol=1e-5, rtol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.mask_token_id == WORDS + 2


# ---------------------------------------------------------------------------------------------- bad inputs


def test_unknown_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    _llama_dir(tmp_path / "m", tokenizer_with_mask=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(UnsupportedModelError, match="model_type 'mamba'; dlm imports dlm, llada, llama, gpt2"):
        import_pretrained(tmp_path / "m")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("attention_bias", True, "attention_bias=True"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "rope scaling 'llama3'"),
    ],
)
def test_llama_features_dlm_cannot_compute_are_refused(tmp_path: Path, field: str, value: object, message: str) -> None:
    _llama_dir(tmp_path / "m", tokenizer_with_mask=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(UnsupportedModelError, match=message):
        import_pretrained(tmp_path / "m")


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    _llama_dir(tmp_path / "m", tokenizer_with_mask=True)
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    k_proj = state.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"lacks tensor\(s\) model.layers.1.self_attn.k_proj.weight"):
        import_pretrained(tmp_path / "m")
    state["model.layers.1.self_attn.k_proj.weight"] = k_proj
    state["model.layers.1.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"holds tensor\(s\) model.layers.1.self_attn.q_norm.weight"):
        import_pretrained(tmp_path / "m")


def test_shape_and_dtype_mismatches_name_tensor_and_file(tmp_path: Path) -> None:
    _llama_dir(tmp_path / "m", tokenizer_with_mask=True)
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(InteropError, match=r"model.layers.0.mlp.\w+_proj.weight in model.safetensors has shape"):
        import_pretrained(tmp_path / "m")
    config_path.write_text(json.dumps(config))
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(InteropError, match="model.norm.weight in model.safetensors has dtype I32"):
        import_pretrained(tmp_path / "m")


def test_pickle_truncated_shard_and_missing_shard_are_refused(tmp_path: Path, mask_tokenizer: Path) -> None:
    _llama_dir(tmp_path / "m", tokenizer_with_mask=True)
    weights = tmp_path / "m" / "model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "m" / "pytorch_model.bin")
    data = weights.read_bytes()
    weights.unlink()
    with pytest.raises(InteropError, match=r"pickle files \(pytorch_model.bin\).*weights_only=True"):
        import_pretrained(tmp_path / "m")

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InteropError, match="cannot read .*model.safetensors .*truncated or corrupt"):
        import_pretrained(tmp_path / "m")

    _run_dir(tmp_path / "run", _cfg(), mask_tokenizer)
    shards = export(tmp_path / "run", tmp_path / "hf", dtype="fp32", max_shard_size=8 * 1024).shards
    (tmp_path / "hf" / shards[1]).unlink()
    with pytest.raises(InteropError, match=rf"to {shards[1]}, which is not in"):
        import_pretrained(tmp_path / "hf")


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(positions="learned"), "positions=learned (LLaDA's forward asserts 'Rope must be used')"),
    (dict(output_bias=True), "output_bias=true (LLaDA's LM head has no bias)"),
])
def test_llada_export_refuses_what_llada_cannot_run_by_name(
    tmp_path: Path, mask_tokenizer: Path, capsys: pytest.CaptureFixture[str], overrides: dict[str, object],
    message: str,
) -> None:
    _run_dir(tmp_path / "run", _cfg(**overrides), mask_tokenizer)
    with pytest.raises(UnsupportedModelError, match=re.escape(message) + ".*export it with --format dlm"):
        export(tmp_path / "run", tmp_path / "out", format="llada")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "llada"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    export(tmp_path / "run", tmp_path / "out")  # the dlm layout keeps either
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "dlm"


def test_export_refuses_what_it_cannot_write_and_leaves_nothing(tmp_path: Path, mask_tokenizer: Path) -> None:
    gelu = _cfg(mlp="gelu", norm="layer", bias=True)
    _run_dir(tmp_path / "run", gelu, mask_tokenizer)
    with pytest.raises(UnsupportedModelError, match="mlp=gelu.*--format dlm"):
        export(tmp_path / "run", tmp_path / "out", format="llada")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("old")
    with pytest.raises(InteropError, match="exists and is not empty"):
        export(tmp_path / "run", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "old"

    # Weights that do not match model_config.json: found after the temporary directory exists; it is removed.
    weights = tmp_path / "run" / "model.safetensors"
    state = load_file(str(weights))
    del state["blocks.1.mlp.up_proj.bias"]
    save_file(state, str(weights))
    with pytest.raises(InteropError, match="missing blocks.1.mlp.up_proj.bias"):
        export(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]

    state["blocks.1.mlp.up_proj.bias"] = torch.zeros(48)
    save_file(state, str(weights))
    export(tmp_path / "run", tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]
