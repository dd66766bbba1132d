"""The bidirectional transformer of the LLaDA family.

Parameter names follow the LLaMA layout (``embed``, ``blocks.i.attn.q_proj``, ``mlp.gate_proj``,
``final_norm``, ``lm_head``) so importing LLaDA/LLaMA/GPT-2 weights is a rename, never a reshape. The
forward pass returns final-normed hidden states rather than logits: the diffusion loss projects only the
masked positions through the head (see :func:`dlm.kernels.masked_lm_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.kernels import BACKENDS, AttentionMask, attention, compute_dtype, resolve_backend
from dlm.modeling.config import TransformerConfig
from dlm.modeling.length_head import LengthHead


def _norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class RotaryEmbedding(nn.Module):
    """RoPE in the half-split (``rotate_half``, LLaMA/NeoX) form, always evaluated in fp32.

    cos/sin for positions ``0..L-1`` are cached in non-persistent buffers, built on first use for
    ``max(T, max_seq_len)`` positions so the cache keeps one size for a whole run (no rebuilds as a length
    curriculum grows T, same size on every rank), and checkpoints never carry them. A model built on the
    meta device has no usable cache after ``to_empty()``; that is why :meth:`reset` exists and
    ``DiffusionTransformer.init_weights`` calls it. Explicit ``position_ids`` are computed directly (cheap:
    once per forward, shared by all layers) so no position can fall off the cache.
    """

    cos_cached: Tensor
    sin_cached: Tensor

    def __init__(self, head_dim: int, theta: float, max_seq_len: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_seq_len = max_seq_len
        self.register_buffer("cos_cached", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0, head_dim // 2), persistent=False)

    def reset(self) -> None:
        """Drop the cache (its contents are garbage after ``to_empty()``); it is rebuilt on the next call."""
        device = self.cos_cached.device
        self.cos_cached = torch.empty(0, self.head_dim // 2, device=device)
        self.sin_cached = torch.empty(0, self.head_dim // 2, device=device)

    def _angles(self, positions: Tensor) -> Tensor:
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        return positions.to(torch.float32)[..., None] * inv_freq

    def forward(
        self, seq_len: int, device: torch.device, position_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """cos and sin of shape ``[T, hd/2]`` (default positions) or ``[B, T, hd/2]`` (given ``position_ids``)."""
        if position_ids is not None:
            angles = self._angles(position_ids)
            return angles.cos(), angles.sin()
        cache = self.cos_cached
        stale = cache.shape[0] < seq_len or cache.dtype != torch.float32 or cache.device != device or cache.is_meta
        if stale:
            angles = self._angles(torch.arange(max(seq_len, self.max_seq_len), device=device))
            cos, sin = angles.cos(), angles.sin()
            if device.type == "meta":
                return cos[:seq_len], sin[:seq_len]
            self.cos_cached, self.sin_cached = cos, sin
        return self.cos_cached[:seq_len], self.sin_cached[:seq_len]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, hd]`` by angles given as cos/sin ``[T, hd/2]`` or ``[B, T, hd/2]``, in fp32."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention without a causal mask."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_width, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_width, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_width, bias=cfg.bias)
        self.o_proj = nn.Linear(q_width, cfg.d_model, bias=cfg.bias)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: AttentionMask | None, backend: str
    ) -> Tensor:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.cfg.kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.cfg.kv_heads, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = attention(q, k, v, mask=mask, backend=backend)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.cfg.n_heads * hd))


class MLP(nn.Module):
    """SwiGLU (``down(silu(gate(x)) * up(x))``) or GELU (``down(gelu(up(x)))``) feed-forward."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # The tanh approximation is GPT-2's "gelu_new", so imported GPT-2 weights compute what they did.
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: AttentionMask | None, backend: str
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, backend)
        return x + self.mlp(self.mlp_norm(x))


class OutputBias(nn.Module):
    """The ``[V]`` bias ``model.output_bias`` adds to the LM head's logits, tied head or not.

    A module of its own, not a bare parameter of the transformer, so that everything that walks the model's
    children (transformers' ``DlmDiffusionModel`` adopts them, checkpoint loading replaces their tensors) carries
    it like any other layer."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))


class DiffusionTransformer(nn.Module):
    """Bidirectional transformer mapping token ids (some of them mask tokens) to final hidden states."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len) if cfg.positions == "rope" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = _norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.bias)
        self.output_bias = OutputBias(cfg.vocab_size) if cfg.output_bias else None
        self.length_head: LengthHead | None = None
        if cfg.compile:
            # Per block, not the whole model: one compiled graph serves every layer, compile time does not
            # grow with depth, and parameter names stay unchanged (checkpoints, DeepSpeed, HF interop).
            for block in self.blocks:
                block.compile()
        if not self.embed.weight.is_meta:
            self.init_weights()
        head = cfg.length_head
        if head is not None and head.enabled:
            # Built (and initialised by itself) after the backbone, so the backbone draws the same weights from
            # the same seed with or without a length head.
            self.length_head = LengthHead(cfg.d_model, head, init_std=cfg.init_std)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter: normal(0, init_std), residual output projections scaled down.

        ``o_proj`` and ``down_proj`` get ``init_std / sqrt(2 * n_layers)`` so the residual stream's variance
        does not grow with depth (GPT-2's scheme). Norm weights are 1, biases 0. Also the way to materialise
        a meta-built model: ``model.to_empty(device=...)`` then ``model.init_weights()``.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.output_bias is not None:
            nn.init.zeros_(self.output_bias.bias)
        if self.rope is not None:
            self.rope.reset()
        if self.length_head is not None:
            self.length_head.init_weights(std)

    def forward(
        self,
        input_ids: Tensor,
        doc_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Final-normed hidden states ``[B, T, d_model]`` for ``input_ids [B, T]``.

        ``doc_ids [B, T]`` confines attention to tokens of the same document in the same row (packing);
        ``position_ids [B, T]`` default to ``arange(T)`` in every row. ``attn_mask`` (bool ``[T, T]`` or
        ``[B, T, T]``, True = may attend) further restricts attention, e.g. the annealed causal mask of an
        AR-adapted model (:func:`dlm.kernels.annealed_mask`); only the sdpa, flex and math backends take it.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        for name, ids in (("doc_ids", doc_ids), ("position_ids", position_ids)):
            if ids is not None and tuple(ids.shape) != (b, t):
                raise ValueError(f"{name} must have the shape of input_ids {(b, t)}, got {tuple(ids.shape)}")

        x = self.embed(input_ids)
        rope = None
        if self.pos_embed is not None:
            if t > self.cfg.max_seq_len:
                raise ValueError(
                    f"sequence length {t} exceeds max_seq_len {self.cfg.max_seq_len} of the learned "
                    f"position embedding; use sequences of at most {self.cfg.max_seq_len} tokens"
                )
            positions = position_ids if position_ids is not None else torch.arange(t, device=input_ids.device)
            x = x + self.pos_embed(positions)
        elif self.rope is not None:
            rope = self.rope(t, input_ids.device, position_ids)

        # The backend and its form of the mask are settled once here, outside the (possibly compiled) blocks:
        # building cu_seqlens or a BlockMask costs a host sync or a mask evaluation, shared by every layer.
        mask = AttentionMask.build(doc_ids, attn_mask)
        backend = resolve_backend(
            self.cfg.attention,
            x.device,
            compute_dtype(x.device, self.blocks[0].attn.q_proj.weight.dtype),
            head_dim=self.cfg.head_dim,
            any_mask=attn_mask is not None,
        )
        if mask is not None:
            BACKENDS[backend].prepare(mask)
        for block in self.blocks:
            x = block(x, rope, mask, backend)
        return self.final_norm(x)

    @property
    def lm_head_weight(self) -> Tensor:
        """The output projection ``[V, d]``: the embedding table itself when embeddings are tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @property
    def lm_head_bias(self) -> Tensor | None:
        """The output bias ``[V]``: ``output_bias`` when configured, else an untied head's bias (``bias=True``)."""
        if self.output_bias is not None:
            return self.output_bias.bias
        return None if self.lm_head is None else self.lm_head.bias

    def logits(self, hidden: Tensor) -> Tensor:
        """Full logits ``[..., V]``; for generation and evaluation on small inputs only (training uses the
        chunked masked loss)."""
        return F.linear(hidden, self.lm_head_weight, self.lm_head_bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); ``non_embedding`` drops the token and position embeddings and
        the LM head (untied weight, output bias), matching
        :func:`dlm.modeling.accounting.non_embedding_param_count`."""
        excluded: set[int] = set()
        if non_embedding:
            tables = [self.embed, self.pos_embed, self.lm_head, self.output_bias]
            excluded = {id(p) for module in tables if module is not None for p in module.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in excluded)
