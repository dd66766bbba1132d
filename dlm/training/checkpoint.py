"""Resumable checkpoints that a crash can never corrupt.

Layout of a run directory::

    checkpoints/
      step_000100/           one directory per save, complete or absent
        engine/              written by the engine (plain: model.safetensors + optim.pt; DeepSpeed: its own)
        client_rank00000.pt  per-rank state: RNG, data loader position, step, tokens seen, curriculum
        config.yaml          the resolved config the state belongs to
        COMPLETE             written last, after everything above was flushed
      latest                 the name of the newest complete step directory

A save goes to ``step_N.tmp/``; every file is fsynced, ``COMPLETE`` is written, the directory is renamed to
``step_N`` and only then ``latest`` is replaced (via a temp file and ``os.replace``). A kill at any moment
therefore leaves either the old ``latest`` or the new one pointing at a complete directory; a failed write
(full disk) removes the temp directory and re-raises, leaving earlier checkpoints untouched.
``--resume auto`` follows ``latest`` and falls back to the newest directory holding ``COMPLETE``. The layout's
names and that lookup live in :mod:`dlm.modeling.hf_sources`, which ``dlm export`` and ``model.init_from``
read checkpoints through, so all of them agree on which checkpoint is the newest.

Non-weight state is written with ``torch.save`` and read with ``torch.load(weights_only=True)``, so it may
only hold tensors and plain containers — numpy's RNG state is converted accordingly.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dlm.config import RUN_ONLY_MODEL_KEYS
from dlm.errors import UserError
from dlm.modeling.hf_io import fsync_tree
from dlm.modeling.hf_sources import (
    COMPLETE_NAME,
    LATEST_NAME,
    complete_steps,
    find_checkpoint,
    newest_checkpoint,
    step_dir_name,
)

__all__ = ["CheckpointError", "Checkpointer", "rng_state", "set_rng_state", "step_dir_name"]


class CheckpointError(UserError):
    """A checkpoint cannot be found, read, or does not fit the current config."""


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can touch, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants the nested tuples that a round trip through torch.save may turn into lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


class Checkpointer:
    """Writes, finds, prunes and validates the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, keep_last: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    # -- writing -------------------------------------------------------------------------------------------

    def save(self, step: int, engine: Any, client_state: dict[str, Any], resolved_config: dict[str, Any]) -> Path:
        """One complete, atomic save; on any error the temp directory is removed and the error re-raised."""
        tmp = self.begin(step)
        try:
            engine.save_checkpoint(tmp / "engine")
            self.write_client_state(tmp, 0, client_state)
            return self.commit(tmp, step, resolved_config)
        except BaseException:
            self.abort(tmp)
            raise

    def begin(self, step: int) -> Path:
        """Create (afresh) the temp directory a save of ``step`` writes into."""
        tmp = self.root / f"{step_dir_name(step)}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    @staticmethod
    def write_client_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
        torch.save(state, tmp / f"client_rank{rank:05d}.pt")

    def commit(self, tmp: Path, step: int, resolved_config: dict[str, Any]) -> Path:
        """Flush, mark complete, rename into place, then point ``latest`` at it and prune old ones."""
        (tmp / "config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        fsync_tree(tmp)
        (tmp / COMPLETE_NAME).write_text(f"{step}\n")
        fsync_tree(tmp)
        final = self.root / step_dir_name(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = self.root / f"{LATEST_NAME}.tmp"
        latest_tmp.write_text(final.name + "\n")
        with latest_tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(latest_tmp, self.root / LATEST_NAME)
        self._prune()
        return final

    def abort(self, tmp: Path) -> None:
        """Remove a half-written save (after an exception) so it can never be mistaken for a checkpoint."""
        shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self) -> None:
        complete = self.complete_steps()
        for step in complete[: -self.keep_last]:
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- finding -------------------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps whose directory holds ``COMPLETE``, oldest first."""
        return complete_steps(self.root)

    def resolve(self, resume: str) -> Path | None:
        """``auto`` → the newest complete checkpoint of this run (None when there is none); else a path.

        A path may name a step directory, a ``checkpoints`` directory or a run directory.
        """
        if resume == "auto":
            return newest_checkpoint(self.root)
        found = find_checkpoint(Path(resume))
        if found is not None:
            return found
        raise CheckpointError(
            f"no complete checkpoint at {resume!r}; pass a run directory, its checkpoints/ directory or a "
            f"step_N directory holding COMPLETE, or use --resume auto"
        )

    # -- reading -------------------------------------------------------------------------------------------

    @staticmethod
    def read_client_state(path: Path, rank: int) -> dict[str, Any]:
        file = path / f"client_rank{rank:05d}.pt"
        if not file.is_file():
            raise CheckpointError(
                f"checkpoint {path} has no state for rank {rank} ({file.name}); resume with the world size "
                f"it was written with"
            )
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: name it instead of a pickle traceback
            raise CheckpointError(f"cannot read {file}: {exc}; it is corrupt, resume from an older step") from None

    @staticmethod
    def check_compatible(path: Path, resolved_config: dict[str, Any]) -> None:
        """Refuse a checkpoint whose model shape or tokenizer differ from the current config."""
        saved = yaml.safe_load((path / "config.yaml").read_text())
        diffs = []
        for section in ("model", "tokenizer"):
            before, now = saved.get(section, {}), resolved_config.get(section, {})
            for key in sorted(set(before) | set(now)):
                if key in ("attention", "compile") or key in RUN_ONLY_MODEL_KEYS:
                    # kernels may change between runs; the weights do not depend on them, nor, once a
                    # checkpoint exists, on where the run's first weights came from
                    continue
                if before.get(key) != now.get(key):
                    diffs.append(f"{section}.{key}: checkpoint {before.get(key)!r} vs config {now.get(key)!r}")
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} does not fit this config ({'; '.join(diffs)}); resume with the config it was "
                f"written with or start a new run directory"
            )
