"""Parameter and FLOP counts computed from the config alone.

They let the launcher decide whether to build on the meta device, the dry run estimate memory, and the
metrics compute MFU, all without allocating a model. ``tests/test_model.py`` checks them against the built
module for every preset.
"""

from __future__ import annotations

from dlm.modeling.config import TransformerConfig
from dlm.modeling.length_head import length_head_param_count


def _block_params(cfg: TransformerConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    q_width, kv_width = cfg.n_heads * hd, cfg.kv_heads * hd
    attn = d * q_width + 2 * d * kv_width + q_width * d
    if cfg.bias:
        attn += q_width + 2 * kv_width + d
    n_in = 2 if cfg.mlp == "swiglu" else 1
    mlp = n_in * d * cfg.mlp_hidden + cfg.mlp_hidden * d
    if cfg.bias:
        mlp += n_in * cfg.mlp_hidden + d
    return attn + mlp + 2 * _norm_params(cfg)


def _norm_params(cfg: TransformerConfig) -> int:
    # RMSNorm has a weight only; LayerNorm carries a bias exactly when the model has biases.
    return cfg.d_model * (2 if cfg.norm == "layer" and cfg.bias else 1)


def non_embedding_param_count(cfg: TransformerConfig) -> int:
    """Parameters excluding the token embedding, learned position embedding and untied LM head.

    This is the N of the ``6N`` FLOP rule: those tables are looked up (or, for the head, applied only to
    masked positions) rather than multiplied on every token. The length head, when configured, is included:
    its EOS classifier runs on every token.
    """
    head = length_head_param_count(cfg.d_model, cfg.length_head)
    return cfg.n_layers * _block_params(cfg) + _norm_params(cfg) + head


def param_count(cfg: TransformerConfig) -> int:
    """Every parameter of the built model, a tied embedding/head counted once."""
    total = non_embedding_param_count(cfg) + cfg.vocab_size * cfg.d_model
    if cfg.positions == "learned":
        total += cfg.max_seq_len * cfg.d_model
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * cfg.d_model + (cfg.vocab_size if cfg.bias else 0)
    if cfg.output_bias:
        total += cfg.vocab_size
    return total


def training_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * n_layers * d_model * seq_len``.

    ``6N`` (N = non-embedding parameters) counts the weight matmuls, 2 FLOPs per multiply-add in the forward
    pass and twice that in the backward. ``12 L d T`` counts attention scores (QK^T) and the weighted sum of
    values, each 2·d·T per token per layer forward, times three for forward + backward; the context is the
    full sequence since the model is bidirectional (no causal halving).

    The LM head is excluded: the loss projects only the masked positions (a fraction t ~ U(eps, 1) of the
    tokens, about half on average), so charging ``6·d·V`` to every token would overstate the work. MFU
    computed from this count is therefore slightly conservative and comparable across vocab sizes.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    return float(6 * non_embedding_param_count(cfg) + 12 * cfg.n_layers * cfg.d_model * seq_len)


def model_info(cfg: TransformerConfig, seq_len: int) -> dict[str, int | float]:
    """The numbers a run logs once at start: ``params``, ``non_embedding_params``, ``flops_per_token``."""
    return {
        "params": param_count(cfg),
        "non_embedding_params": non_embedding_param_count(cfg),
        "flops_per_token": training_flops_per_token(cfg, seq_len),
    }
