"""Export a dlm model as a Hugging Face-style directory: sharded safetensors, index, config, tokenizer.

Two layouts. ``dlm`` keeps our parameter names and writes our :class:`TransformerConfig` into ``config.json``
(``model_type: dlm``; :mod:`dlm.modeling.hf_model` registers it with ``transformers``' Auto classes).
``llada`` renames every tensor to GSAI-ML/LLaDA-8B's names and writes a ``config.json`` with LLaDA's fields, so
code written for LLaDA checkpoints (its ``modeling_llada.py``) loads the export unchanged.

The export streams: shards are planned from the safetensors header alone (meta tensors handed to
``huggingface_hub``'s own splitter, so file names and the index follow the hub's conventions exactly), then
each shard is read, cast and written in turn. Peak memory is one shard, never the whole model. The source may be
a run, a `dlm import` output or a resumable checkpoint of either engine, DeepSpeed ZeRO-3 included, whose
partitions are gathered tensor by tensor as each shard is written (:mod:`dlm.modeling.hf_sources`). The output
directory appears only when complete (:func:`~dlm.modeling.hf_io.atomic_directory`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from dlm.modeling.build import build_model
from dlm.modeling.config import TransformerConfig
from dlm.modeling.hf_io import (
    INDEX_NAME,
    InteropError,
    UnsupportedModelError,
    atomic_directory,
    check_shape,
    expected_shapes,
    listing,
)
from dlm.modeling.hf_names import to_llada
from dlm.modeling.hf_sources import ExportSource, WeightReader, resolve_source

__all__ = ["ExportResult", "ExportSource", "export", "resolve_source"]

ExportFormat = Literal["dlm", "llada"]
EXPORT_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
# LLaDA's remote code, as GSAI-ML/LLaDA-8B-Instruct's config.json names it. The two .py files are not part of
# an export; copy them next to it to load it with trust_remote_code (see the README).
LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote, for the CLI's summary and for tests."""

    out_dir: Path
    shards: list[str]
    num_tensors: int
    total_size: int
    format: ExportFormat
    dtype: str


# How a run executed its model (attention kernel, torch.compile), not what the model is: an export is read on
# other machines, so these go back to their defaults ("auto" picks the best kernel where it is loaded).
RUNTIME_FIELDS = ("attention", "compile")


def dlm_config_json(cfg: TransformerConfig, ids: Mapping[str, int | None], dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of the ``dlm`` layout: our architecture fields plus the special token ids."""
    import transformers

    fields = cfg.model_dump(mode="json")
    for name in RUNTIME_FIELDS:
        if name in TransformerConfig.model_fields:
            fields[name] = TransformerConfig.model_fields[name].default
    return {
        "architectures": ["DlmDiffusionModel"],
        "model_type": "dlm",
        **fields,
        **ids,
        "dtype": _DTYPE_NAMES[dtype],
        "transformers_version": transformers.__version__,
    }


def check_llada_compatible(cfg: TransformerConfig) -> None:
    """Refuse architectures LLaDA's code cannot run: its MLP is always gated, its norm here is RMS, its LM head
    has no bias, and its forward asserts RoPE (``config.rope: false`` loads, then every call fails)."""
    problems = []
    if cfg.positions != "rope":
        problems.append(f"positions={cfg.positions} (LLaDA's forward asserts 'Rope must be used')")
    if cfg.mlp != "swiglu":
        problems.append(f"mlp={cfg.mlp} (LLaDA's llama block always gates its MLP: swiglu)")
    if cfg.norm != "rms":
        problems.append(f"norm={cfg.norm} (dlm exports LLaDA with layer_norm_type rms only)")
    if cfg.output_bias:
        problems.append("output_bias=true (LLaDA's LM head has no bias)")
    if problems:
        raise UnsupportedModelError(
            f"this model cannot be written in LLaDA's format: {'; '.join(problems)}; export it with --format dlm"
        )


def _llada_name(ours: str) -> str:
    try:
        return to_llada(ours)
    except KeyError:
        raise UnsupportedModelError(
            f"parameter {ours} has no place in LLaDA's layout; export this model with --format dlm"
        ) from None


def llada_config_json(cfg: TransformerConfig, ids: Mapping[str, int | None]) -> dict[str, Any]:
    """``config.json`` with exactly the fields of GSAI-ML/LLaDA-8B-Instruct's, holding this model's values.

    ``include_bias`` gives every linear layer a bias, as our ``bias`` does; ``bias_for_layer_norm`` is false
    because our RMSNorm has none. ``init_fn: normal`` with ``init_std`` describes our own initialisation
    (normal, residual projections scaled by ``1/sqrt(2 n_layers)``), which LLaDA's ``normal`` reproduces.
    """
    import transformers

    check_llada_compatible(cfg)
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": dict(LLADA_AUTO_MAP),
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": cfg.d_model,
        "embedding_dropout": 0.0,
        "embedding_size": cfg.vocab_size,
        "eos_token_id": ids["eos_token_id"],
        "flash_attention": False,
        "include_bias": cfg.bias,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "normal",
        "init_std": cfg.init_std,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": ids["mask_token_id"],
        "max_sequence_length": cfg.max_seq_len,
        "mlp_hidden_size": cfg.mlp_hidden,
        "mlp_ratio": max(1, round(cfg.mlp_hidden / cfg.d_model)),
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.kv_heads,
        "n_layers": cfg.n_layers,
        "pad_token_id": ids["pad_token_id"],
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": cfg.norm_eps,
        "rope": cfg.positions == "rope",
        "rope_full_precision": True,
        "rope_theta": cfg.rope_theta,
        "scale_logits": False,
        "transformers_version": transformers.__version__,
        "use_cache": False,
        "vocab_size": cfg.vocab_size,
        "weight_tying": cfg.tie_embeddings,
    }


def _check_weights(reader: WeightReader, expected: dict[str, tuple[int, ...]], src: ExportSource) -> None:
    missing = set(expected) - set(reader.tensors)
    unexpected = set(reader.tensors) - set(expected)
    if missing or unexpected:
        parts = ([f"missing {listing(missing)}"] if missing else []) + (
            [f"unexpected {listing(unexpected)}"] if unexpected else []
        )
        raise InteropError(
            f"the weights in {src.directory} do not match {src.config_file}: {'; '.join(parts)}; the weights and "
            "the config come from different runs — use the pair a run wrote together"
        )
    for name, shape in expected.items():
        check_shape(name, reader.tensors[name], shape, src.config_file)


def export(
    source: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_size: int | str = "5GB",
    format: ExportFormat = "dlm",
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``source``'s model to ``out_dir`` as HF-style sharded safetensors with config and tokenizer.

    ``tokenizer`` overrides the source's (a directory, bundled name or hub name). Files written:
    ``model-0000i-of-0000n.safetensors`` (always with an index, even for one shard, so consumers see one
    layout), ``model.safetensors.index.json`` (``metadata.total_size`` in bytes, ``weight_map``),
    ``config.json``, ``generation_config.json`` and the tokenizer's files.
    """
    from transformers import GenerationConfig

    from dlm.data_streams.tokenizer import check_vocab, load_tokenizer

    if dtype not in EXPORT_DTYPES:
        raise InteropError(f"export dtype {dtype!r} is not supported; allowed: {', '.join(EXPORT_DTYPES)}")
    if format not in ("dlm", "llada"):
        raise InteropError(f"export format {format!r} is not supported; allowed: dlm, llada")
    target = EXPORT_DTYPES[dtype]
    src = resolve_source(source, verify=True)
    if Path(out_dir).resolve() == src.directory.resolve():
        raise InteropError(f"the export would replace its own source {src.directory}; choose another output directory")
    cfg = src.config
    if format == "llada":
        check_llada_compatible(cfg)
    tokenizer_name = tokenizer or src.tokenizer
    if tokenizer_name is None:
        raise InteropError(
            f"{src.directory} has no config.yaml naming its tokenizer and no tokenizer files; pass the tokenizer "
            "it was trained with (--tokenizer NAME_OR_DIR)"
        )
    info = load_tokenizer(tokenizer_name, src.mask_token if tokenizer is None else None)
    check_vocab(info, cfg.vocab_size)
    ids: dict[str, int | None] = {
        "mask_token_id": info.mask_id,
        "bos_token_id": info.tokenizer.bos_token_id,
        "eos_token_id": info.eos_id,
        "pad_token_id": info.pad_id,
    }
    config_json = llada_config_json(cfg, ids) if format == "llada" else dlm_config_json(cfg, ids, target)

    expected = expected_shapes(build_model(cfg, device="meta").state_dict())
    out_name = {ours: (_llada_name(ours) if format == "llada" else ours) for ours in expected}
    plan = {out_name[ours]: torch.empty(shape, dtype=target, device="meta") for ours, shape in expected.items()}
    try:
        split = split_torch_state_dict_into_shards(
            plan, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
    except ValueError as exc:
        raise InteropError(
            f"max shard size {max_shard_size!r} is not a size such as 5GB, 500MB or 10000: {exc}"
        ) from exc
    files = split.filename_to_tensors
    if not split.is_sharded:
        files = {"model-00001-of-00001.safetensors": next(iter(files.values()))}
    ours_of = {theirs: ours for ours, theirs in out_name.items()}

    with src.open() as reader, atomic_directory(out_dir, overwrite) as tmp:
        _check_weights(reader, expected, src)
        for filename, names in files.items():
            shard = {name: reader.get(ours_of[name]).to(target).contiguous() for name in names}
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            del shard
        weight_map = {name: filename for filename, names in files.items() for name in names}
        total = sum(t.numel() * t.element_size() for t in plan.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        generation = GenerationConfig(
            bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"]
        )
        generation.save_pretrained(str(tmp))
        info.tokenizer.save_pretrained(str(tmp))
    return ExportResult(
        out_dir=Path(out_dir).resolve(),
        shards=list(files),
        num_tensors=len(weight_map),
        total_size=total,
        format=format,
        dtype=dtype,
    )
