"""Resumable checkpoints that a crash can never corrupt.

Layout of a run directory::

    checkpoints/
      step_000100/           one directory per save, complete or absent
        engine/              written by the engine (plain: model.safetensors + optim.pt; DeepSpeed: its own)
        client_rank00000.pt  per-rank state: RNG, data loader position, step, tokens seen, curriculum
        config.yaml          the resolved config the state belongs to
        MANIFEST.json        every file above with its size and XXH3-128 checksum (:mod:`dlm.modeling.manifest`)
        COMPLETE             written last, after everything above was flushed
      latest                 the name of the newest complete step directory

A save goes to ``step_N.tmp/``; every file is fsynced, ``COMPLETE`` is written, the directory is renamed to
``step_N`` and only then ``latest`` is replaced (via a temp file and ``os.replace``). A kill at any moment
therefore leaves either the old ``latest`` or the new one pointing at a complete directory; a failed write
(full disk) removes the temp directory and re-raises, leaving earlier checkpoints untouched.
``--resume auto`` follows ``latest`` and falls back to the most recently committed directory holding
``COMPLETE``; a checkpoint whose files no longer match its manifest is skipped with a warning (``auto``) or
refused (a named path). A full disk is reported in one line naming the directory and the checkpoint that is
kept.

Pruning (``keep_last``) touches only the *lineage* of the running job: the checkpoint it resumed from, the
older ones, and those it wrote. A resume from an earlier step (``--resume step_5`` in a run that reached
step 30) leaves the newer checkpoints of the abandoned branch alone — they are the user's, and a save of the
same step number replaces one — and ``latest`` always names the new branch. The layout's
names and that lookup live in :mod:`dlm.modeling.hf_sources`, which ``dlm export`` and ``model.init_from``
read checkpoints through, so all of them agree on which checkpoint is the newest.

Non-weight state is written with ``torch.save`` and read with ``torch.load(weights_only=True)``, so it may
only hold tensors and plain containers — numpy's RNG state is converted accordingly.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dlm.errors import UserError
from dlm.modeling.config import RUN_ONLY_MODEL_KEYS
from dlm.modeling.hf_io import fsync_tree
from dlm.modeling.hf_sources import (
    COMPLETE_NAME,
    LATEST_NAME,
    RUN_CONFIG_NAME,
    STEP_DIR,
    checkpoint_candidates,
    complete_steps,
    find_checkpoint,
    step_dir_name,
)
from dlm.modeling.manifest import (
    MANIFEST_NAME,
    checksum_part,
    manifest_files,
    read_manifest,
    summarize,
    verify_part,
    write_manifest,
)
from dlm.training.distributed import DistContext

__all__ = [
    "CheckpointError", "Checkpointer", "is_disk_full", "load_state", "rng_state", "save_on_every_rank",
    "select_resume", "set_rng_state", "step_dir_name", "verify_checkpoint",
]

# Below this many free bytes a failed write is taken for a full disk: torch.save reports one only as
# "unexpected pos" from its zip writer, without an errno.
_FULL_DISK_FREE_BYTES = 16 << 20

Problems = Callable[[Path], list[str]]
"""What is wrong with a checkpoint directory (empty when intact); in a job, every rank's findings together."""


class CheckpointError(UserError):
    """A checkpoint cannot be found, read, or does not fit the current config."""


def load_state(file: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` whose failure is one line naming the file, never a pickle traceback.

    torch's own message for a file it cannot unpickle suggests ``weights_only=False``, i.e. running whatever
    the file holds; that is never the fix for a damaged checkpoint, so it is not passed on.
    """
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete, resume from an older step") from None
    except PermissionError:
        raise CheckpointError(f"cannot read {file}: permission denied; fix its permissions") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, TypeError, AttributeError,
            KeyError, IndexError) as exc:
        raise CheckpointError(
            f"cannot read {file} ({type(exc).__name__}): it is truncated, corrupt or not a dlm checkpoint file; "
            f"resume from an older step"
        ) from None


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write means the file system of ``directory`` is full (or over quota)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "no space left on device" in str(exc).lower():  # safetensors, wrapped OSErrors
        return True
    try:
        return shutil.disk_usage(directory).free < _FULL_DISK_FREE_BYTES
    except OSError:
        return False


def verify_checkpoint(path: Path, part: tuple[int, int] = (0, 1)) -> list[str]:
    """This rank's share of the problems of checkpoint ``path``: its stripe of the manifest. A checkpoint
    written before manifests existed can only be checked for its ``config.yaml``."""
    manifest = read_manifest(path)
    if manifest is not None:
        return verify_part(path, manifest, part)
    return [f"{RUN_CONFIG_NAME} is missing"] if part[0] == 0 and not (path / RUN_CONFIG_NAME).is_file() else []


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
        # Steps of another lineage: newer than the checkpoint this job resumed from. Never pruned.
        self.foreign: set[int] = set()

    # -- writing -------------------------------------------------------------------------------------------

    def save(self, step: int, engine: Any, client_state: dict[str, Any], resolved_config: dict[str, Any]) -> Path:
        """One complete, atomic save; on any error the temp directory is removed and the error re-raised
        (a full disk as a :class:`CheckpointError` naming the checkpoint that is kept)."""
        tmp = self.begin(step)
        try:
            engine.save_checkpoint(tmp / "engine")
            self.write_client_state(tmp, 0, client_state)
            return self.commit(tmp, step, resolved_config)
        except Exception as exc:
            full = is_disk_full(exc, self.root)
            self.abort(tmp)
            if full:
                raise self.disk_full_error(step) from None
            raise
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

    def commit(
        self, tmp: Path, step: int, resolved_config: dict[str, Any], checksums: dict[str, dict[str, Any]] | None = None
    ) -> Path:
        """Flush, write the manifest, mark complete, rename into place, then point ``latest`` at it and prune.

        ``checksums`` holds the entries other ranks already computed (their stripes); whatever is missing,
        ``config.yaml`` at least, is checksummed here.
        """
        (tmp / RUN_CONFIG_NAME).write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        entries = dict(checksums or {})
        missing = [name for name in manifest_files(tmp, skip=(MANIFEST_NAME, COMPLETE_NAME)) if name not in entries]
        entries.update(checksum_part(tmp, missing))
        write_manifest(tmp, entries, step)
        fsync_tree(tmp)
        (tmp / COMPLETE_NAME).write_text(f"{step}\n")
        fsync_tree(tmp)
        final = self.root / step_dir_name(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.foreign.discard(step)  # replaced by this lineage's save of the same step
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

    def disk_full_error(self, step: int) -> CheckpointError:
        """The one line for a save that ran out of space: where, and which checkpoint survives."""
        kept = [s for s in self.complete_steps() if s not in self.foreign]
        survivor = f"the checkpoint of step {kept[-1]} is kept" if kept else "no earlier checkpoint exists"
        return CheckpointError(
            f"no space left on device in {self.root} while saving step {step}; {survivor}: free space (or lower "
            f"checkpoint.keep_last), then continue with --resume auto"
        )

    def _prune(self) -> None:
        lineage = [step for step in self.complete_steps() if step not in self.foreign]
        for step in lineage[: -self.keep_last]:
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
            candidates = checkpoint_candidates(self.root)
            return candidates[0] if candidates else None
        found = find_checkpoint(Path(resume))
        if found is not None:
            return found
        raise CheckpointError(
            f"no complete checkpoint at {resume!r}; pass a run directory, its checkpoints/ directory or a "
            f"step_N directory holding COMPLETE, or use --resume auto"
        )

    def select(self, resume: str, problems: Problems, warn: Callable[[str], None] | None = None) -> Path | None:
        """The checkpoint to resume from, checked against its manifest, and the lineage that follows from it.

        ``auto`` skips damaged checkpoints, newest first, with a one-line warning each, and fails only when
        every one is damaged; a named checkpoint that is damaged is refused. Checkpoints newer than the
        chosen one (a resume from an earlier step) become foreign: kept, never pruned by this job.
        """
        warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        if resume == "auto":
            damaged = []
            for path in checkpoint_candidates(self.root):
                found = problems(path)
                if not found:
                    return self._branch(path)
                damaged.append(path.name)
                warn(f"dlm: warning: checkpoint {path} is damaged ({summarize(found)}); trying an older one")
            if damaged:
                raise CheckpointError(
                    f"every checkpoint in {self.root} is damaged ({', '.join(damaged)}); restore one from a backup "
                    f"or start a new run directory"
                )
            return None
        path = self.resolve(resume)
        assert path is not None
        found = problems(path)
        if found:
            older = [p.name for p in checkpoint_candidates(path.parent) if p != path]
            hint = f"resume from an older one (e.g. --resume {path.parent / older[0]})" if older else (
                "restore it from a backup")
            raise CheckpointError(f"checkpoint {path} is damaged ({summarize(found)}); {hint}")
        return self._branch(path)

    def _branch(self, path: Path) -> Path:
        """Record which checkpoints of this run directory are not this job's lineage (see :meth:`_prune`)."""
        match = STEP_DIR.match(path.name)
        if match and path.parent.resolve() == self.root.resolve():
            self.foreign = {s for s in self.complete_steps() if s > int(match.group(1))}
        return path

    # -- reading -------------------------------------------------------------------------------------------

    @staticmethod
    def read_client_state(path: Path, rank: int) -> dict[str, Any]:
        file = path / f"client_rank{rank:05d}.pt"
        if not file.is_file():
            raise CheckpointError(
                f"checkpoint {path} has no state for rank {rank} ({file.name}); resume with the world size "
                f"it was written with"
            )
        return load_state(file)  # type: ignore[no-any-return]

    @staticmethod
    def check_compatible(path: Path, resolved_config: dict[str, Any]) -> None:
        """Refuse a checkpoint whose model shape or tokenizer differ from the current config."""
        file = path / RUN_CONFIG_NAME
        try:
            saved = yaml.safe_load(file.read_text())
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {path} has no {RUN_CONFIG_NAME}; it is incomplete: resume from an older step"
            ) from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise CheckpointError(
                f"cannot read {file} ({type(exc).__name__}); it is corrupt: resume from an older step"
            ) from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{file} holds no config mapping; it is corrupt: resume from an older step")
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


def save_on_every_rank(
    ctx: DistContext, checkpointer: Checkpointer, step: int, engine: Any, client_state: dict[str, Any],
    resolved: dict[str, Any],
) -> Path:
    """One complete checkpoint written by every rank (engine partitions, per-rank client state), checksummed
    by all ranks in stripes and committed by rank 0; the directory must be shared by all ranks' nodes.

    Each phase ends with every rank learning whether any rank failed, so a failure on one rank (a full disk)
    stops all of them with the same error instead of leaving the others in a barrier.
    """
    if ctx.world_size == 1:
        return checkpointer.save(step, engine, client_state, resolved)
    tmp = checkpointer.root / f"{step_dir_name(step)}.tmp"

    def write() -> None:
        engine.save_checkpoint(tmp / "engine")
        Checkpointer.write_client_state(tmp, ctx.rank, client_state)

    _agree(ctx, checkpointer, tmp, step, lambda: checkpointer.begin(step) if ctx.is_main else None)
    _agree(ctx, checkpointer, tmp, step, write)
    names = ctx.all_gather_object(manifest_files(tmp) if ctx.is_main else None)[0]
    stripes = ctx.all_gather_object(
        _agree(ctx, checkpointer, tmp, step, lambda: checksum_part(tmp, names, (ctx.rank, ctx.world_size)))
    )
    checksums = {name: entry for stripe in stripes for name, entry in stripe.items()}
    _agree(
        ctx, checkpointer, tmp, step, lambda: checkpointer.commit(tmp, step, resolved, checksums) if ctx.is_main else None
    )
    return checkpointer.root / step_dir_name(step)


def _agree(ctx: DistContext, checkpointer: Checkpointer, tmp: Path, step: int, action: Any) -> Any:
    """Run one phase of a save on this rank, then agree with the others on whether every rank succeeded.

    On any failure rank 0 removes the half-written directory and every rank raises: a full disk anywhere as
    the one-line :class:`CheckpointError`, otherwise the failing rank its own error
    and the others an error naming it.
    """
    error: BaseException | None = None
    result = None
    try:
        result = action()
    except Exception as exc:
        error = exc
    report = None if error is None else (is_disk_full(error, checkpointer.root), f"{type(error).__name__}: {error}")
    failures = [(rank, r) for rank, r in enumerate(ctx.all_gather_object(report)) if r is not None]
    if not failures:
        return result
    if ctx.is_main:
        checkpointer.abort(tmp)
    if any(full for _, (full, _) in failures):
        raise checkpointer.disk_full_error(step) from None
    if error is not None:
        raise error
    rank, (_, message) = failures[0]
    raise RuntimeError(f"rank {rank} failed while saving the checkpoint of step {step}: {message}")


def select_resume(
    resume: str | None, checkpointer: Checkpointer, resolved: dict[str, Any], ctx: DistContext
) -> Path | None:
    """The checkpoint ``resume`` (``checkpoint.resume``) names, intact and fitting this config; None for a
    fresh run.

    Every rank checks its stripe of the checkpoint's manifest and they share their findings, so all ranks
    choose the same checkpoint (``auto`` skips a damaged one for the one before it) and only rank 0 warns.
    """
    if not resume:
        return None

    def problems(path: Path) -> list[str]:
        found = verify_checkpoint(path, (ctx.rank, ctx.world_size))
        return [p for part in ctx.all_gather_object(found) for p in part]

    path = checkpointer.select(resume, problems, warn=None if ctx.is_main else lambda line: None)
    if path is not None:
        Checkpointer.check_compatible(path, resolved)
        if ctx.is_main and checkpointer.foreign:
            steps = ", ".join(step_dir_name(s) for s in sorted(checkpointer.foreign))
            print(
                f"dlm: note: {steps} are newer than {path.name} and belong to the run it branched from; they are "
                f"kept (never pruned) until a save of the same step replaces them",
                file=sys.stderr,
                flush=True,
            )
    return path
