"""Parameter-name tables between dlm's model and the Hugging Face layouts it exchanges weights with.

One table per layout maps each of *our* parameter names to the name the other layout stores it under. Import
walks our model's expected names and pulls each from the checkpoint (so a missing tensor is found by name, and
whatever is left over in the file is unexpected); export walks the same table forwards. Keeping both
directions in one table means the export and import of a layout cannot drift apart.

The names are templates: ``{i}`` is a layer index, ``{p}`` is ``weight`` or ``bias``, ``{attn}`` one of the
attention projections (``q_proj`` … ``o_proj``) and ``{mlp}`` one of ``gate_proj``, ``up_proj``, ``down_proj``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# (ours, theirs) pairs. LLaDA's own names (GSAI-ML/LLaDA-8B, an OLMo derivative): all under
# ``model.transformer.``; note ``blocks.{i}.ff_out`` is the MLP down projection while top-level ``ff_out`` is
# the LM head, and ``ff_proj`` is the SwiGLU gate.
LLADA_NAMES: tuple[tuple[str, str], ...] = (
    ("embed.weight", "model.transformer.wte.weight"),
    ("pos_embed.weight", "model.transformer.wpe.weight"),
    ("blocks.{i}.attn_norm.weight", "model.transformer.blocks.{i}.attn_norm.weight"),
    ("blocks.{i}.attn.q_proj.{p}", "model.transformer.blocks.{i}.q_proj.{p}"),
    ("blocks.{i}.attn.k_proj.{p}", "model.transformer.blocks.{i}.k_proj.{p}"),
    ("blocks.{i}.attn.v_proj.{p}", "model.transformer.blocks.{i}.v_proj.{p}"),
    ("blocks.{i}.attn.o_proj.{p}", "model.transformer.blocks.{i}.attn_out.{p}"),
    ("blocks.{i}.mlp_norm.weight", "model.transformer.blocks.{i}.ff_norm.weight"),
    ("blocks.{i}.mlp.gate_proj.{p}", "model.transformer.blocks.{i}.ff_proj.{p}"),
    ("blocks.{i}.mlp.up_proj.{p}", "model.transformer.blocks.{i}.up_proj.{p}"),
    ("blocks.{i}.mlp.down_proj.{p}", "model.transformer.blocks.{i}.ff_out.{p}"),
    ("final_norm.weight", "model.transformer.ln_f.weight"),
    ("lm_head.{p}", "model.transformer.ff_out.{p}"),
)

# transformers' LlamaForCausalLM (and the LLaMA family that shares its names: Mistral, LLaMA-2/3, ...).
LLAMA_NAMES: tuple[tuple[str, str], ...] = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.attn.{attn}.{p}", "model.layers.{i}.self_attn.{attn}.{p}"),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.mlp.{mlp}.{p}", "model.layers.{i}.mlp.{mlp}.{p}"),
    ("final_norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)

_FIELDS = {
    "i": r"\d+",
    "p": r"weight|bias",
    "attn": r"q_proj|k_proj|v_proj|o_proj",
    "mlp": r"gate_proj|up_proj|down_proj",
}


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(part) if k % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for k, part in enumerate(parts))
    return re.compile(regex)


def rename(name: str, table: Iterable[tuple[str, str]], reverse: bool = False) -> str | None:
    """``name`` (ours, or theirs with ``reverse``) in the other layout, or None when no row of ``table`` matches."""
    for ours, theirs in table:
        source, target = (theirs, ours) if reverse else (ours, theirs)
        match = _pattern(source).fullmatch(name)
        if match is not None:
            return target.format(**match.groupdict())
    return None


def to_llada(name: str) -> str:
    """Our parameter name under LLaDA's naming (raises KeyError for a name LLaDA's layout has no place for)."""
    mapped = rename(name, LLADA_NAMES)
    if mapped is None:
        raise KeyError(name)
    return mapped
