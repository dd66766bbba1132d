"""Named model shapes, so run configs say ``model: llada-8b`` instead of repeating a dozen numbers."""

from __future__ import annotations

from typing import Any

from dlm.modeling.config import TransformerConfig

# GPT-2 BPE (50257) plus one mask token, padded to a multiple of 64 so the embedding/head matmuls tile well.
_GPT2_MASKED_VOCAB = 50304

PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the CPU smoke run: < 5 M parameters, almost all of them in the tied embedding.
    "tiny": dict(
        vocab_size=_GPT2_MASKED_VOCAB,
        d_model=64,
        n_layers=4,
        n_heads=4,
        mlp_hidden=192,
        max_seq_len=1024,
        rope_theta=10000.0,
        tie_embeddings=True,
    ),
    # GPT-2-small-sized member of the LLaDA family (SwiGLU hidden 2048 ≈ the 4·d GELU MLP in parameters).
    "small": dict(
        vocab_size=_GPT2_MASKED_VOCAB,
        d_model=768,
        n_layers=12,
        n_heads=12,
        mlp_hidden=2048,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    # The real GPT-2 (124 M) layout, for importing its weights.
    "gpt2": dict(
        vocab_size=50257,
        d_model=768,
        n_layers=12,
        n_heads=12,
        mlp_hidden=3072,
        max_seq_len=1024,
        norm="layer",
        norm_eps=1e-5,
        mlp="gelu",
        positions="learned",
        bias=True,
        tie_embeddings=True,
    ),
    # Exactly GSAI-ML/LLaDA-8B: 8,015,581,184 parameters.
    "llada-8b": dict(
        vocab_size=126464,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        mlp_hidden=12288,
        max_seq_len=4096,
        norm="rms",
        norm_eps=1e-5,
        mlp="swiglu",
        positions="rope",
        rope_theta=500000.0,
        bias=False,
        tie_embeddings=False,
        init_std=0.02,
    ),
}


def preset(name: str, **overrides: Any) -> TransformerConfig:
    """The config of preset ``name`` with ``overrides`` applied on top (validated as a whole)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return TransformerConfig(**{**PRESETS[name], **overrides})
