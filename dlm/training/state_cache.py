"""The backbone-state cache of ``dlm fit-head``: each example's generation-start states, in safetensors shards
read on demand.

One example's states are ``W × d`` floats for the canvas plus ``P × d`` for its prompt (SmolLM2-135M at a 512
canvas: 1.2 MB; LLaDA-8B: 8 MB), so the states of a whole SFT set outgrow memory on the models dlm is for.
The cache is therefore a directory of shards, each the states of one chunk of examples:

- extraction writes a shard per chunk (a temp name, then a rename), so a killed hour-long extraction keeps
  every chunk it finished and a rerun computes only the rest; growing the cache adds shards and never
  rewrites the ones it holds;
- reading maps the shards and copies out only the rows a batch asks for (safetensors slices of a
  memory-mapped file), so a fit holds its batches in memory, not the cache.

Every shard carries the fingerprint of what its states depend on (the weights' checksum and the canvas
width); a shard of other weights makes the whole directory refuse to load rather than mix two backbones.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from dlm.errors import UserError
from dlm.evaluation.readings import EvalExample

__all__ = ["HeadFeatures", "ShardedFeatures", "StateCache", "StateCacheError", "example_key", "SHARD_EXAMPLES"]

_CACHE_VERSION = "2"
# examples per shard: ~300 MB of SmolLM2 states, a few minutes of CPU extraction lost at most on a kill
SHARD_EXAMPLES = 256


class StateCacheError(UserError):
    """The cache cannot be used as given (another backbone's states, a file where a directory belongs)."""


def example_key(example: EvalExample) -> str:
    """What the cached states of an example depend on besides the weights and canvas: its prompt tokens and
    its answer length (the fit's target)."""
    digest = hashlib.sha256(json.dumps([example.prompt_ids, example.length]).encode())
    return digest.hexdigest()[:24]


def _pad_prompts(prompts: Sequence[Tensor], d_model: int) -> tuple[Tensor, Tensor]:
    """``(prompt_hidden [B, P, d], prompt_mask [B, P])``: prompts left-padded with zeros to the longest, as
    :func:`~dlm.generation.rows.pack_rows` lays rows out."""
    width = max(p.shape[0] for p in prompts)
    block = torch.zeros(len(prompts), width, d_model, dtype=prompts[0].dtype)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for r, p in enumerate(prompts):
        block[r, width - p.shape[0] :] = p
        mask[r, width - p.shape[0] :] = True
    return block, mask


@dataclass
class HeadFeatures:
    """The frozen backbone's final states in the generation-start state, held in memory, one entry per example.

    ``prompts[i] [P_i, d]``: the states of example ``i``'s prompt tokens (what the bucket head pools);
    ``canvas [N, W, d]``: the states of its ``W`` masked canvas positions (what the EOS head reads);
    ``lengths [N]``: the true answer lengths (EOS excluded, as the benchmark counts them); ``keys``:
    :func:`example_key` of each. One extraction chunk; written to disk it is one shard of a :class:`StateCache`.
    """

    prompts: list[Tensor]
    canvas: Tensor
    lengths: Tensor
    sources: list[str]
    keys: list[str]
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, index: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(prompt_hidden [B, P, d], prompt_mask [B, P], canvas_hidden [B, W, d])`` for ``index``, what
        :meth:`~dlm.modeling.LengthHead.read` takes."""
        block, mask = _pad_prompts([self.prompts[i] for i in index], self.canvas.shape[-1])
        return block, mask, self.canvas[list(index)]

    def save(self, path: Path) -> None:
        """One safetensors file (written to a temp name and renamed), fingerprint and keys in its metadata."""
        offsets = torch.tensor([0, *torch.tensor([p.shape[0] for p in self.prompts]).cumsum(0).tolist()])
        tensors = {"prompts": torch.cat(self.prompts).contiguous(), "prompt_offsets": offsets,
                   "canvas": self.canvas.contiguous(), "lengths": self.lengths}
        meta = {"version": _CACHE_VERSION, "fingerprint": self.fingerprint, "sources": json.dumps(self.sources),
                "keys": json.dumps(self.keys)}
        tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as fh:  # on disk before the rename publishes it, so a crash leaves no torn shard
            os.fsync(fh.fileno())
        tmp.replace(path)


class ShardedFeatures:
    """Chosen entries of a :class:`StateCache`, read from its memory-mapped shards a batch at a time.

    Holds only each entry's place (shard, row), the prompt offsets and the lengths; :meth:`batch` copies the
    rows it is asked for. Same reading interface as :class:`HeadFeatures`.
    """

    def __init__(self, handles: list[Any], offsets: list[list[int]], rows: list[tuple[int, int]], lengths: Tensor,
                 sources: list[str], keys: list[str], fingerprint: str) -> None:
        # one slice view per shard and tensor, taken once: batch() only indexes them (handles kept with them)
        self._handles = handles
        self._prompts = [fh.get_slice("prompts") for fh in handles]
        self._canvas = [fh.get_slice("canvas") for fh in handles]
        self._offsets, self._rows = offsets, rows
        self.lengths, self.sources, self.keys, self.fingerprint = lengths, sources, keys, fingerprint

    def __len__(self) -> int:
        return len(self._rows)

    def batch(self, index: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(prompt_hidden [B, P, d], prompt_mask [B, P], canvas_hidden [B, W, d])`` for ``index``."""
        prompts, canvas = [], []
        for i in index:
            shard, row = self._rows[i]
            offsets = self._offsets[shard]
            prompts.append(self._prompts[shard][offsets[row] : offsets[row + 1]])
            canvas.append(self._canvas[shard][row : row + 1])
        canvas_hidden = torch.cat(canvas)
        block, mask = _pad_prompts(prompts, canvas_hidden.shape[-1])
        return block, mask, canvas_hidden


Features = HeadFeatures | ShardedFeatures


class StateCache:
    """A directory of state shards for one backbone and canvas (``fingerprint``); see the module docstring."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        if directory.exists() and not directory.is_dir():
            raise StateCacheError(f"--cache {directory} is a file; the state cache is a directory of shards: pass a "
                                  f"directory (a single-file cache from an earlier dlm keeps its states if moved "
                                  f"into that directory)")
        self.directory, self.fingerprint = directory, fingerprint
        self._shards = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
        self._index: dict[str, tuple[int, int]] = {}
        for s, path in enumerate(self._shards):
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            if meta.get("version") != _CACHE_VERSION or meta.get("fingerprint") != fingerprint:
                raise StateCacheError(f"state cache {directory} holds states of other weights or another canvas "
                                      f"({path.name}); delete it or pass another --cache directory")
            for row, key in enumerate(json.loads(meta["keys"])):
                self._index.setdefault(key, (s, row))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def shards(self) -> list[Path]:
        """The shard files, in the order they were read."""
        return list(self._shards)

    def append(self, feats: HeadFeatures) -> Path:
        """Write ``feats`` as a new shard (atomically: a killed write leaves no partial shard behind)."""
        if feats.fingerprint != self.fingerprint:
            raise ValueError("these states belong to another backbone or canvas than the cache")
        path = self.directory / f"states-{len(self._shards):05d}-{uuid.uuid4().hex[:8]}.safetensors"
        feats.save(path)
        s = len(self._shards)
        self._shards.append(path)
        for row, key in enumerate(feats.keys):
            self._index.setdefault(key, (s, row))
        return path

    def features(self, keys: Sequence[str], sources: Sequence[str]) -> ShardedFeatures:
        """The entries of ``keys`` in that order (each must be held), labelled with ``sources``."""
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise KeyError(f"{len(missing)} of the {len(keys)} examples are not in the cache")
        handles = [safe_open(str(p), framework="pt") for p in self._shards]
        offsets = [fh.get_tensor("prompt_offsets").tolist() for fh in handles]
        lengths = [fh.get_tensor("lengths") for fh in handles]
        rows = [self._index[k] for k in keys]
        chosen = torch.stack([lengths[s][r] for s, r in rows]) if rows else torch.zeros(0, dtype=torch.long)
        return ShardedFeatures(handles, offsets, rows, chosen, list(sources), list(keys), self.fingerprint)
