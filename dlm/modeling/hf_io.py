"""Reading and writing Hugging Face-style weight directories safely.

Reading: one ``model.safetensors`` or a ``model.safetensors.index.json`` with its shards, opened lazily so an
8B checkpoint is read tensor by tensor. Every way a checkpoint can be broken — a truncated or corrupt shard, an
index naming a file that is not there or a tensor its shard lacks, a pickle (``.bin``) instead of safetensors,
a tensor of the wrong shape or dtype — becomes an :class:`InteropError` naming the tensor, the file and the
fix, instead of a ``KeyError`` or a Rust panic message deep in a load.

Writing: :func:`atomic_directory` builds an output directory under a temporary name beside its destination
and renames it into place only once every file is flushed, so an interrupted export or import never leaves a
half-written directory where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dlm.errors import UserError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_SHOWN = 5


class InteropError(UserError):
    """A checkpoint directory cannot be exported or imported: unreadable, incomplete, or of a foreign shape."""


class UnsupportedModelError(InteropError):
    """The checkpoint is readable but describes an architecture dlm's transformer cannot represent."""


def listing(names: list[str] | set[str], shown: int = _SHOWN) -> str:
    """The first few of ``names`` (sorted) and how many more there are, for one-line error messages."""
    ordered = sorted(names)
    head = ", ".join(ordered[:shown])
    return head if len(ordered) <= shown else f"{head} (and {len(ordered) - shown} more)"


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or an :class:`InteropError` saying which file is missing or malformed."""
    if not path.is_file():
        raise InteropError(f"{path} does not exist; {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InteropError(f"{path} is not valid JSON ({exc}); {what}") from exc
    if not isinstance(data, dict):
        raise InteropError(f"{path} holds a JSON {type(data).__name__}, not an object; {what}")
    return data


def _refuse_pickles(directory: Path) -> None:
    pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()]
    if pickles:
        raise InteropError(
            f"{directory} holds weights only as pickle files ({listing(pickles)}); dlm reads weights from safetensors "
            "only, since unpickling can run arbitrary code. Convert them first, e.g. in Python: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) (transformers loads .bin with "
            "torch.load(weights_only=True) and saves safetensors), then import NEW_DIR"
        )


@dataclass(frozen=True)
class TensorInfo:
    """Where a stored tensor lives and what it is, known from the safetensors header without reading it."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


class CheckpointReader:
    """Lazy, validated access to the tensors of a safetensors checkpoint directory (single file or sharded).

    Opening checks the index against the shards (every named file exists and opens, every listed tensor is in
    its file), so later reads cannot fail halfway through a conversion. Use as a context manager.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._index()
        except BaseException:
            self._stack.close()
            raise

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise InteropError(
                    f"cannot read {file} ({exc}); the file is truncated or corrupt — re-download or re-export it"
                ) from exc
        return self._handles[file]

    def _info(self, handle: Any, file: Path, name: str) -> TensorInfo:
        view = handle.get_slice(name)
        return TensorInfo(file=file, shape=tuple(view.get_shape()), dtype=str(view.get_dtype()))

    def _index(self) -> None:
        if not self.directory.is_dir():
            raise InteropError(f"{self.directory} is not a directory; pass the directory that holds the checkpoint")
        index_path = self.directory / INDEX_NAME
        single = self.directory / WEIGHTS_NAME
        if index_path.is_file():
            weight_map = read_json(index_path, "re-export the checkpoint or restore its index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise InteropError(f"{index_path} has no 'weight_map' of tensor name -> file; re-export the checkpoint")
            by_file: dict[str, list[str]] = {}
            for name, filename in weight_map.items():
                by_file.setdefault(filename, []).append(name)
            for filename, names in sorted(by_file.items()):
                file = self.directory / filename
                if not file.is_file():
                    raise InteropError(
                        f"{index_path.name} maps {len(names)} tensor(s) ({listing(names, 3)}) to {filename}, which "
                        f"is not in {self.directory}; copy the missing shard there or re-export the checkpoint"
                    )
                handle = self._open(file)
                present = set(handle.keys())
                absent = [n for n in names if n not in present]
                if absent:
                    raise InteropError(
                        f"{index_path.name} maps {listing(absent, 3)} to {filename}, but that file does not hold "
                        "them; the index and the shards come from different exports — re-export the checkpoint"
                    )
                for name in names:
                    self.tensors[name] = self._info(handle, file, name)
        elif single.is_file():
            handle = self._open(single)
            for name in handle.keys():
                self.tensors[name] = self._info(handle, single, name)
        else:
            _refuse_pickles(self.directory)
            raise InteropError(
                f"{self.directory} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}; pass a directory written by "
                "save_pretrained(), `dlm export` or `dlm train`"
            )

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` read from its file (a float dtype; anything else is refused with the fix)."""
        info = self.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise InteropError(
                f"tensor {name} in {info.file.name} has dtype {info.dtype}; model weights must be one of "
                f"{', '.join(FLOAT_DTYPES)} — the file is not a model checkpoint or was quantised; use an "
                "unquantised one"
            )
        return self._open(info.file).get_tensor(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_shape(name: str, info: TensorInfo, expected: tuple[int, ...], source: str) -> None:
    """Refuse a stored tensor whose shape differs from what the model config implies."""
    if info.shape != expected:
        raise InteropError(
            f"tensor {name} in {info.file.name} has shape {list(info.shape)} but {source} implies {list(expected)}; "
            "the weights and the config do not belong together — use the config the weights were saved with"
        )


def expected_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name → shape of a (usually meta-device) state dict: what a checkpoint for that model must hold."""
    return {name: tuple(t.shape) for name, t in state.items()}


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directory itself, so a rename after it publishes whole files."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success flush it and rename it to ``out_dir``.

    On any error the temporary directory is removed and ``out_dir`` is untouched. An existing non-empty
    ``out_dir`` is refused unless ``overwrite``; then it is moved aside, the new one renamed in, and the old one
    deleted, so at every instant ``out_dir`` is either the old complete directory or the new one (or, for the
    moment between the two renames, absent — never partial).
    """
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise InteropError(f"output {out} exists and is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InteropError(
            f"output directory {out} exists and is not empty; choose a new directory or replace it (--overwrite)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if out.is_dir():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
