"""``model.init_from``: start a training run from existing weights instead of a random initialisation.

A source is any of: a ``dlm export`` directory (``config.json`` with ``model_type: dlm`` and sharded
safetensors), anything :func:`~dlm.modeling.hf_sources.resolve_source` reads (a run directory, a resumable
checkpoint of either engine, a ``dlm import`` output), or a Hugging Face LLaDA, LLaMA or GPT-2 directory, read
through the importers of :mod:`dlm.modeling.hf_import`. ``auto`` tells them apart by ``config.json``'s
``model_type`` and the presence of ``model_config.json``/``checkpoints``.

The configured model stays the source of truth for the architecture: :func:`check_init_source` compares it
with the source's, from the config files and safetensors headers alone, so a mismatch fails while the config
is validated, before a run directory or a worker exists. The one tolerated difference is a length head the
source lacks (pretraining → SFT with the head): its parameters keep their fresh initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.modeling.build import build_model
from dlm.modeling.config import INIT_FORMATS, InitFormat, TransformerConfig
from dlm.modeling.hf_io import CheckpointReader, InteropError, TensorInfo, expected_shapes, listing
from dlm.modeling.hf_sources import (
    MODEL_CONFIG_NAME,
    NoWeightsError,
    ExportSource,
    WeightReader,
    find_checkpoint,
    resolve_source,
)

HF_FORMATS = ("llada", "llama", "gpt2")
# Fields that change neither a tensor's shape nor what the weights compute: how a run executes the model, how
# fresh weights would be drawn, and (with RoPE) the longest sequence it is set up for.
FREE_FIELDS = ("attention", "compile", "init_std", "max_seq_len", "length_head")
LENGTH_HEAD_PREFIX = "length_head."


@dataclass(frozen=True)
class InitSource:
    """A located ``init_from`` source: its format and architecture, known without reading any weights."""

    path: Path
    format: str
    config: TransformerConfig
    export: ExportSource | None = None  # set for dlm runs, checkpoints and imports


def locate(path: str | Path, fmt: str = "auto") -> InitSource:
    """Identify the source at ``path`` (``fmt`` ``auto`` detects it) and read its architecture."""
    from dlm.modeling.hf_import import ADAPTERS, detect_model_type

    directory = Path(path)
    if fmt not in INIT_FORMATS:
        raise InteropError(f"init format {fmt!r} is not supported; allowed: {', '.join(INIT_FORMATS)}")
    if not directory.exists():
        raise NoWeightsError(
            f"{directory} does not exist; name a dlm export, run or checkpoint directory, or a Hugging Face "
            f"{'/'.join(HF_FORMATS)} directory"
        )
    has_hf_config = (directory / "config.json").is_file()
    dlm_layout = (directory / MODEL_CONFIG_NAME).is_file() or find_checkpoint(directory) is not None
    if has_hf_config and not dlm_layout:
        model_type, hf = detect_model_type(directory)
        if fmt not in ("auto", model_type):
            raise InteropError(
                f"{directory} holds a {model_type} checkpoint (config.json model_type), not {fmt}; set "
                f"model.init_from_format={model_type} or auto"
            )
        return InitSource(directory, model_type, ADAPTERS[model_type].config(hf))
    if fmt not in ("auto", "dlm"):
        raise InteropError(
            f"{directory} is not a Hugging Face {fmt} directory (no config.json); it looks like a dlm run or "
            "checkpoint: set model.init_from_format=dlm or auto"
        )
    source = resolve_source(directory)
    return InitSource(directory, "dlm", source.config, source)


def check_init_source(source: InitSource, arch: TransformerConfig) -> None:
    """Refuse a source whose weights do not fit ``arch``: the first differing tensor name or shape, or
    a differing architecture field that changes what the same tensors compute (norm type, eps, RoPE theta)."""
    ours = _shapes(arch)
    theirs = _shapes(source.config)
    missing = [n for n in ours if n not in theirs and not n.startswith(LENGTH_HEAD_PREFIX)]
    unexpected = [n for n in theirs if n not in ours]
    where = f"the {source.format} model at {source.path}"
    if missing or unexpected:
        parts = ([f"lacks {listing(missing, 3)}"] if missing else []) + (
            [f"has {listing(unexpected, 3)} that the configured model lacks"] if unexpected else []
        )
        raise InteropError(
            f"{where} {' and '.join(parts)}; set the model.* fields to the source's architecture "
            f"({_describe(source.config)})"
        )
    for name, shape in ours.items():
        if name in theirs and theirs[name] != shape:
            raise InteropError(
                f"tensor {name} has shape {list(theirs[name])} in {where} but the configured model needs "
                f"{list(shape)}; set the model.* fields to the source's architecture ({_describe(source.config)})"
            )
    for field in TransformerConfig.model_fields:
        if field in FREE_FIELDS:
            continue
        mine, yours = getattr(arch, field), getattr(source.config, field)
        if mine != yours:
            raise InteropError(
                f"{where} has {field}={yours!r} but the configured model has {field}={mine!r}; set model.{field}={yours}"
            )


def check_init_from(path: str | Path, fmt: str, arch: TransformerConfig, require: bool) -> None:
    """Refuse a source that cannot start a model of ``arch`` (an :class:`InteropError` naming why).

    Reads config files and safetensors headers only, never the weights, so the config's validation can call
    it. Without ``require`` a source that holds no weights yet passes: a pipeline's config may name the output
    of an earlier run (``configs/sft-length.yaml`` starts from ``runs/smoke``), absent or still running, and
    it is checked again with ``require`` where a run is about to read it.
    """
    try:
        check_init_source(locate(path, fmt), arch)
    except NoWeightsError:
        if require:
            raise


def _shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    return expected_shapes(build_model(cfg, device="meta").state_dict())


def _describe(cfg: TransformerConfig) -> str:
    keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "norm", "mlp", "positions",
            "bias", "tie_embeddings", "output_bias")
    return ", ".join(f"{k}={getattr(cfg, k)}" for k in keys)


class _StateDictReader:
    """A :class:`WeightReader` over an imported state dict (LLaDA/LLaMA/GPT-2 are converted in memory)."""

    def __init__(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        self.directory = directory
        self._state = state
        self.tensors = {
            name: TensorInfo(file=directory, shape=tuple(t.shape), dtype=str(t.dtype)) for name, t in state.items()
        }

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]

    def __enter__(self) -> _StateDictReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._state.clear()


def open_weights(source: InitSource) -> WeightReader:
    """The source's tensors under dlm's names, read lazily where the format allows (dlm layouts, DeepSpeed
    checkpoints tensor by tensor); a Hugging Face LLaDA/LLaMA/GPT-2 model is converted whole in memory."""
    from dlm.modeling.hf_import import import_pretrained

    if source.export is not None:
        return source.export.open()
    if source.format == "dlm":
        return CheckpointReader(source.path)
    imported = import_pretrained(source.path, expect=source.format)
    return _StateDictReader(source.path, imported.state_dict)


__all__ = [
    "INIT_FORMATS", "InitFormat", "InitSource", "check_init_from", "check_init_source", "locate", "open_weights",
]
