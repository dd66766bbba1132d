"""The shape of a transformer: one frozen, validated record from which both the module and the analytic
parameter/FLOP accounting are derived, so the two can never disagree about what a model is.

Beside it, the keys of the run's ``model`` section that are not about shape (:class:`RunOnlyModelFields`,
:data:`RUN_ONLY_MODEL_KEYS`). They live here, at the bottom of the package, because the readers of a saved
architecture (:mod:`dlm.modeling.hf_sources`) skip them, and the section itself
(:class:`~dlm.modeling.section.ModelSection`) sits above those readers: it checks ``init_from`` with them.
"""

from __future__ import annotations

from typing import Literal, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dlm.modeling.length_head import LengthHeadConfig
from dlm.sections import Section

InitFormat = Literal["auto", "dlm", "llada", "llama", "gpt2"]
INIT_FORMATS: tuple[str, ...] = get_args(InitFormat)


class TransformerConfig(BaseModel):
    """Architecture of a :class:`~dlm.modeling.transformer.DiffusionTransformer`.

    The switches cover the LLaDA/LLaMA family (RMSNorm, SwiGLU, RoPE, no bias, untied head) and the GPT-2
    family (LayerNorm, GELU, learned positions, biases, tied head), which is what the presets and the HF
    interop need. Impossible shapes are rejected here, before any tensor is allocated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(gt=0)
    d_model: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0)
    mlp_hidden: int = Field(gt=0)
    max_seq_len: int = Field(default=4096, gt=0)
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = Field(default=1e-5, gt=0)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = Field(default=10000.0, gt=0)
    bias: bool = False
    tie_embeddings: bool = False
    # A learned bias on the LM head's logits, tied head or not (``lm_head_bias``). Initialised to the training
    # data's log unigram frequencies (``model.output_bias_init: unigram``) it starts the model at the unigram
    # loss, so training spends its steps on context instead of on token frequencies.
    output_bias: bool = False
    init_std: float = Field(default=0.02, gt=0)
    # Attention kernel (dlm.kernels.attention): auto = flash-attn on CUDA when installed, else SDPA.
    attention: Literal["auto", "flash", "sdpa", "flex", "math"] = "auto"
    # torch.compile each transformer block (fuses norms, RoPE and the MLP's elementwise ops; on CUDA).
    compile: bool = False
    # The jointly trained length/EOS head (dlm.modeling.length_head); absent unless configured.
    length_head: LengthHeadConfig | None = None

    @model_validator(mode="after")
    def _check_head_layout(self) -> TransformerConfig:
        if self.output_bias and not self.tie_embeddings and self.bias:
            raise ValueError(
                "output_bias adds a bias to the LM head, but this untied head already has one (bias=true); "
                "set output_bias=false"
            )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"allowed n_heads are the divisors of d_model"
            )
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(
                f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads}); "
                f"allowed are the divisors of n_heads, or null for n_kv_heads = n_heads"
            )
        if self.positions == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"rope needs an even head_dim, got d_model / n_heads = {self.head_dim}; "
                f"choose d_model and n_heads so that head_dim is even, or positions: learned"
            )
        return self

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads: ``n_kv_heads`` resolved (fewer than ``n_heads`` means GQA)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


class RunOnlyModelFields(Section):
    """The ``model`` keys that say how a run gets its first weights, not what shape they have: the preset the
    architecture starts from, the weights to load instead of a random initialisation, and how a fresh
    output bias starts."""

    preset: str = "tiny"
    init_from: Optional[str] = Field(  # noqa: UP045 - pydantic needs a runtime type here
        None,
        description="start from these weights: a dlm export, run or checkpoint directory, or a Hugging Face "
        "LLaDA / LLaMA / GPT-2 directory; the architecture must match the configured one",
    )
    init_from_format: InitFormat = Field("auto", description="auto (detect) | dlm | llada | llama | gpt2")
    output_bias_init: Literal["zeros", "unigram"] = Field(
        "zeros",
        description="zeros | unigram: start the output bias (model.output_bias) at the train tokens' log "
        "frequencies, so a fresh model starts at the unigram loss and learns context from its first step; "
        "weights from model.init_from (or a resumed checkpoint) replace it",
    )


RUN_ONLY_MODEL_KEYS: frozenset[str] = frozenset(RunOnlyModelFields.model_fields)
"""Keys of the model section that say where a run's weights come from, not what shape they have (``preset``,
``init_from``, ...): a run's ``config.yaml`` records some of them, and readers of the shape skip them."""
