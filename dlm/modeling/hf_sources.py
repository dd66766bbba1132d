"""Where a dlm model's weights live, and lazy readers for each place: what ``dlm export`` and ``model.init_from``
read.

Three places hold a dlm model:

* a **weights directory**: ``model.safetensors`` + ``model_config.json`` — a finished ``dlm train`` run or a
  ``dlm import`` output;
* a **resumable checkpoint** ``checkpoints/step_N/`` (complete when it holds ``COMPLETE``): the architecture is
  the ``model`` section of its ``config.yaml``; the weights are in ``engine/``, as ``model.safetensors`` (plain
  engine) or as DeepSpeed's own files in one tag directory (``engine/ds/``, ZeRO stage 0-3);
* a **run directory** without final weights (killed, or ``checkpoint.save_final=false``): its newest complete
  checkpoint.

The checkpoint layout is defined here, below :mod:`dlm.training.checkpoint` (which writes it), so that the
writer, ``--resume auto`` and the export agree on what "the newest complete checkpoint" is.

DeepSpeed checkpoints are read with DeepSpeed's own ``deepspeed.utils.zero_to_fp32`` in its lazy mode, as its
authors intend for models that do not fit in memory: the optimizer partitions are memory-mapped and each
ZeRO-3 parameter is gathered from the ranks' fp32 partitions only when it is asked for, so an export holds one
output shard at a time, never the whole fp32 model. (ZeRO-1/2 partitions are flat over the whole model;
DeepSpeed's reader concatenates them, which costs one fp32 copy of the model in host memory.) DeepSpeed's
files hold pickled Python objects and DeepSpeed reads them with ``torch.load(weights_only=False)``: export
only DeepSpeed checkpoints you trust (the README says so where checkpoints are described).
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import yaml

from dlm.modeling.config import RUN_ONLY_MODEL_KEYS, TransformerConfig
from dlm.modeling.hf_io import WEIGHTS_NAME, CheckpointReader, InteropError, TensorInfo, read_json
from dlm.modeling.manifest import read_manifest, summarize, verify_part

MODEL_CONFIG_NAME = "model_config.json"
RUN_CONFIG_NAME = "config.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_NAME = "COMPLETE"
LATEST_NAME = "latest"
ENGINE_DIR = "engine"
STEP_DIR = re.compile(r"^step_(\d+)$")
# The DeepSpeed engine trains an objective module that holds the transformer as ``.model``.
DEEPSPEED_PREFIX = "model."

WeightsLayout = Literal["safetensors", "deepspeed"]


class NoWeightsError(InteropError):
    """The path holds no model weights (yet): it is absent, or a run that has written neither final weights nor
    a complete checkpoint."""


def step_dir_name(step: int) -> str:
    """``step_000100``: zero-padded so that directory listings sort by step."""
    return f"step_{step:06d}"


def complete_steps(root: Path) -> list[int]:
    """Steps whose directory under ``root`` holds ``COMPLETE``, oldest first (none when ``root`` is absent)."""
    if not root.is_dir():
        return []
    return sorted(
        int(match.group(1))
        for path in root.iterdir()
        if (match := STEP_DIR.match(path.name)) and (path / COMPLETE_NAME).is_file()
    )


def committed_at(directory: Path) -> float:
    """When a checkpoint was committed: its manifest's time, else the mtime of its ``COMPLETE`` marker.

    Commit order, not the step number, tells which checkpoint is the newest after a resume from an earlier
    step: the run went on from there, and its new checkpoints are newer than the higher-numbered ones it left.
    """
    manifest = read_manifest(directory)
    if manifest is not None and isinstance(manifest.get("committed_at"), (int, float)):
        return float(manifest["committed_at"])
    marker = directory / COMPLETE_NAME
    return marker.stat().st_mtime if marker.is_file() else 0.0


def checkpoint_candidates(root: Path) -> list[Path]:
    """The complete checkpoints of ``root``, newest first: what ``latest`` names, then the others in commit
    order (the step breaks ties).

    ``latest`` alone is not enough after a kill between the rename of ``step_N`` and the update of
    ``latest``, when ``latest`` names a directory that was pruned or lost, or when the newest checkpoint turns
    out to be damaged and the one before it is needed.
    """
    steps = [root / step_dir_name(step) for step in complete_steps(root)]
    ordered = sorted(steps, key=lambda path: (committed_at(path), path.name), reverse=True)
    try:
        named = root / (root / LATEST_NAME).read_text().strip()
    except (OSError, UnicodeDecodeError):  # absent or garbage: the commit order alone decides
        named = None
    if named is not None and named in ordered:
        ordered.remove(named)
        ordered.insert(0, named)
    return ordered


def newest_checkpoint(root: Path) -> Path | None:
    """The first of :func:`checkpoint_candidates`: what ``latest`` names if that is complete, else the most
    recently committed complete checkpoint, else None."""
    candidates = checkpoint_candidates(root)
    return candidates[0] if candidates else None


def find_checkpoint(path: Path) -> Path | None:
    """The complete checkpoint ``path`` names: itself (a step directory), or the newest one in it (a
    ``checkpoints`` directory) or in its ``checkpoints`` (a run directory); None when there is none."""
    for candidate in (path, path / CHECKPOINTS_DIR):
        if (candidate / COMPLETE_NAME).is_file():
            return candidate
        found = newest_checkpoint(candidate)
        if found is not None:
            return found
    return None


class WeightReader(Protocol):
    """Lazy access to a model's tensors under dlm's parameter names (a context manager)."""

    directory: Path
    tensors: dict[str, TensorInfo]

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read (or gathered) now."""

    def __enter__(self) -> WeightReader: ...

    def __exit__(self, *exc: object) -> None: ...


class DeepSpeedReader:
    """The fp32 weights of a DeepSpeed engine checkpoint (``engine/`` of a step directory), under dlm's names.

    ZeRO-1/2/3: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`` — the fp32 master
    weights from the optimizer partitions, which are the weights training continues from even in bf16.
    ZeRO-3 tensors stay ``GatheredTensor`` placeholders until :meth:`get` gathers one. Stage 0 has no
    partitions; its whole module state is in ``mp_rank_00_model_states.pt``, which is plain tensors and is
    read with ``torch.load(weights_only=True)``.
    """

    def __init__(self, engine_dir: Path) -> None:
        self.directory = engine_dir
        tag = deepspeed_tag(engine_dir)
        if tag is None:
            raise InteropError(
                f"{engine_dir} holds no DeepSpeed checkpoint (no directory with *_model_states.pt); pass a step "
                "directory written by `dlm train`/`dlm launch` with engine.kind=deepspeed"
            )
        self.tag_dir = engine_dir / tag
        raw = self._open_partitioned(engine_dir, tag) if any(self.tag_dir.glob("*_optim_states.pt")) else None
        if raw is None:
            raw = self._open_stage0(self.tag_dir)
        self._lazy = {self._ours(name): tensor for name, tensor in raw.items()}
        self.tensors = {
            name: TensorInfo(file=self.tag_dir, shape=tuple(t.shape), dtype=_safetensors_dtype(t.dtype))
            for name, t in self._lazy.items()
        }

    @staticmethod
    def _open_partitioned(engine_dir: Path, tag: str) -> dict[str, Any]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed prints its progress to stdout; keep stdout for the CLI's own one-line summary.
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return dict(get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=tag, lazy_mode=True))
        except (OSError, ValueError, RuntimeError, KeyError, EOFError) as exc:
            raise InteropError(
                f"cannot read the DeepSpeed checkpoint in {engine_dir / tag} ({type(exc).__name__}: {exc}); it is "
                "incomplete or corrupt (every rank's *_optim_states.pt must be there) — export an older step"
            ) from exc

    @staticmethod
    def _open_stage0(tag_dir: Path) -> dict[str, Any]:
        file = tag_dir / "mp_rank_00_model_states.pt"
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise InteropError(f"cannot read {file} ({exc}); it is truncated or corrupt — export an older step") from exc
        module = state.get("module") if isinstance(state, dict) else None
        if not isinstance(module, dict):
            raise InteropError(f"{file} holds no module state; it is not a DeepSpeed model checkpoint")
        return module

    @staticmethod
    def _ours(name: str) -> str:
        return name.removeprefix(DEEPSPEED_PREFIX)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``; a ZeRO-3 tensor is gathered from every rank's partition now (and only now)."""
        tensor = self._lazy[name]
        return tensor if isinstance(tensor, torch.Tensor) else tensor.contiguous()

    def close(self) -> None:
        self._lazy.clear()

    def __enter__(self) -> DeepSpeedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return _SAFETENSORS_DTYPES.get(dtype, str(dtype))


def deepspeed_tag(engine_dir: Path) -> str | None:
    """The tag directory DeepSpeed wrote into ``engine_dir`` (the one holding ``*_model_states.pt``)."""
    if not engine_dir.is_dir():
        return None
    tags = sorted(d.name for d in engine_dir.iterdir() if d.is_dir() and any(d.glob("*_model_states.pt")))
    return tags[0] if len(tags) == 1 else None


@dataclass(frozen=True)
class ExportSource:
    """What an export reads: the weights and their layout, their architecture, and the tokenizer.

    ``directory`` is the weights directory (``model.safetensors`` there for the safetensors layout, the
    engine directory for DeepSpeed); ``checkpoint`` the step directory when the weights come from one.
    """

    directory: Path
    config: TransformerConfig
    tokenizer: str | None
    mask_token: str | None
    layout: WeightsLayout = "safetensors"
    checkpoint: Path | None = None

    @property
    def config_file(self) -> str:
        """Where the architecture was read from, for error messages."""
        if self.checkpoint is None:
            return MODEL_CONFIG_NAME
        return f"{self.checkpoint.name}/{RUN_CONFIG_NAME}"

    def open(self) -> WeightReader:
        """A lazy reader of the weights under dlm's names (use as a context manager)."""
        if self.layout == "deepspeed":
            return DeepSpeedReader(self.directory)
        return CheckpointReader(self.directory)


def _tokenizer_of(*directories: Path) -> tuple[str | None, str | None]:
    """The run's tokenizer (``config.yaml``'s tokenizer section in the first of ``directories`` that has one),
    else tokenizer files in the first directory."""
    for directory in directories:
        run_config = directory / RUN_CONFIG_NAME
        if run_config.is_file():
            section = _run_config(run_config).get("tokenizer")
            if isinstance(section, dict) and section.get("name_or_path"):
                return str(section["name_or_path"]), section.get("mask_token")
    if any((directories[0] / f).is_file() for f in TOKENIZER_FILES):
        return str(directories[0]), None
    return None, None


def _run_config(path: Path) -> dict[str, Any]:
    try:
        resolved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InteropError(f"{path} is not valid YAML ({exc}); pass --tokenizer explicitly") from exc
    return resolved if isinstance(resolved, dict) else {}


def _architecture(raw: Any, where: Path) -> TransformerConfig:
    if not isinstance(raw, dict):
        raise InteropError(f"{where} has no model section; it was not written by dlm")
    fields = {k: v for k, v in raw.items() if k not in RUN_ONLY_MODEL_KEYS}
    try:
        return TransformerConfig.model_validate(fields)
    except ValueError as exc:
        raise InteropError(f"{where} does not hold a valid dlm model config: {exc}") from exc


def _from_checkpoint(step: Path, verify: bool) -> ExportSource:
    run_config = step / RUN_CONFIG_NAME
    if not run_config.is_file():
        raise InteropError(f"checkpoint {step} lacks {RUN_CONFIG_NAME}; it is not a complete dlm checkpoint")
    manifest = read_manifest(step) if verify else None
    problems = verify_part(step, manifest) if manifest is not None else []
    if problems:
        raise InteropError(f"checkpoint {step} is damaged ({summarize(problems)}); export or start from another step")
    config = _architecture(_run_config(run_config).get("model"), run_config)
    tokenizer, mask = _tokenizer_of(step)
    engine = step / ENGINE_DIR
    if (engine / WEIGHTS_NAME).is_file():
        return ExportSource(engine, config, tokenizer, mask, "safetensors", step)
    if deepspeed_tag(engine) is not None:
        return ExportSource(engine, config, tokenizer, mask, "deepspeed", step)
    raise InteropError(
        f"checkpoint {step} holds neither {ENGINE_DIR}/{WEIGHTS_NAME} (plain engine) nor a DeepSpeed checkpoint in "
        f"{ENGINE_DIR}/; it is damaged — export another step"
    )


def resolve_source(source: str | Path, verify: bool = False) -> ExportSource:
    """Find weights, architecture and tokenizer of a weights directory, a checkpoint, or a run directory.

    A directory with ``model.safetensors`` + ``model_config.json`` (a finished run, a `dlm import` output) is
    read as it is; otherwise ``source`` must name a complete checkpoint, a ``checkpoints`` directory or a run
    directory that has one (the newest is taken). The tokenizer is the run's (``tokenizer.name_or_path`` and
    ``mask_token`` of ``config.yaml`` beside the weights or one level up), else tokenizer files beside them.
    ``verify`` checks a checkpoint against its manifest (a read of every file, optimizer states included: what
    an export costs anyway, but not what validating a config should).
    """
    path = Path(source)
    directory = path.parent if path.is_file() else path
    if (directory / WEIGHTS_NAME).is_file() and (directory / MODEL_CONFIG_NAME).is_file():
        raw = read_json(directory / MODEL_CONFIG_NAME, "it is written next to model.safetensors by dlm")
        config = _architecture(raw, directory / MODEL_CONFIG_NAME)
        tokenizer, mask = _tokenizer_of(directory, directory.parent)
        return ExportSource(directory, config, tokenizer, mask)
    step = find_checkpoint(directory)
    if step is not None:
        return _from_checkpoint(step, verify)
    missing = [n for n in (WEIGHTS_NAME, MODEL_CONFIG_NAME) if not (directory / n).is_file()]
    raise NoWeightsError(
        f"{directory} lacks {' and '.join(missing)} and holds no complete checkpoint; pass a run directory of "
        "`dlm train` or `dlm launch`, one of its checkpoints/step_N directories, or an output directory of "
        "`dlm import`"
    )
