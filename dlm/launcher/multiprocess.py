"""N training processes on this machine (``dlm launch CONFIG --workers N``), the way torchrun starts them.

Each worker is a fresh ``spawn``-ed interpreter with ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` set, running the same :func:`dlm.training.train` as ``dlm train``. A worker that fails takes
the others down (they would wait forever in the next collective); a :class:`~dlm.errors.UserError` in any
worker comes back to the caller as that one line, anything else as the worker's traceback.
"""

from __future__ import annotations

import os
import queue
import signal
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

from dlm.config import RunConfig
from dlm.errors import TrainingStopped, UserError
from dlm.training.distributed import free_port
from dlm.training.preemption import forward_signals


class WorkerError(RuntimeError):
    """A worker died of something that is not a user error (its traceback is the message)."""


HookFactory = Callable[[], Any]
"""Builds one training hook inside a worker (hooks hold per-process state, so they are made there)."""


def _worker(
    local_rank: int,
    world_size: int,
    port: int,
    tree: dict[str, Any],
    hook_factories: Sequence[HookFactory],
    results: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    from dlm.config import validate
    from dlm.training import train

    try:
        summary = train(validate(tree), hooks=[factory() for factory in hook_factories])
    except TrainingStopped as exc:
        results.put(("stopped", local_rank, str(exc.signum), str(exc)))
        raise SystemExit(128 + exc.signum) from None
    except UserError as exc:
        results.put(("user_error", local_rank, f"{type(exc).__name__}", str(exc)))
        raise SystemExit(2) from None
    except BaseException:
        results.put(("error", local_rank, "", traceback.format_exc()))
        raise SystemExit(1) from None
    if local_rank == 0:
        results.put(("summary", 0, "", summary))


def run_multiprocess(cfg: RunConfig, hook_factories: Sequence[HookFactory] = ()) -> dict[str, Any]:
    """Train with ``cfg.launcher.workers`` local processes; return rank 0's summary."""
    world = cfg.launcher.workers
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    tree = cfg.model_dump(mode="json", exclude_unset=True)
    error: BaseException | None = None
    context = mp.start_processes(
        _worker,
        args=(world, free_port(), tree, tuple(hook_factories), results),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    # A SIGTERM sent to this process alone (a scheduler, `kill`) must reach every rank, which saves and stops
    # at the same step; this process waits for them instead of dying first.
    previous = forward_signals(context.pids) if cfg.checkpoint.on_signal else {}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as exc:  # a worker exited non-zero or was killed: find out why below
        error = exc
    except mp.ProcessRaisedException as exc:
        error = exc
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    summary: dict[str, Any] | None = None
    failures: list[tuple[str, int, str, Any]] = []
    while True:
        try:
            kind, rank, name, payload = _get_nowait(results)
        except queue.Empty:
            break
        if kind == "summary":
            summary = payload
        else:
            failures.append((kind, rank, name, payload))
    for kind, rank, name, payload in sorted(failures, key=lambda failure: failure[1]):
        if kind == "stopped":  # every rank stopped at the same step after a signal: rank 0's report
            raise TrainingStopped(payload, int(name))
    for kind, rank, name, payload in failures:
        if kind == "user_error":
            raise _user_error(name, payload)
    if failures:
        kind, rank, _, payload = failures[0]
        raise WorkerError(f"worker {rank} of {world} failed:\n{payload}")
    if error is not None or summary is None:
        raise WorkerError(f"a worker of {world} died without a report ({error}); see its output above")
    return summary


def _get_nowait(results: Any) -> tuple[str, int, str, Any]:
    """``SimpleQueue`` has no ``get_nowait``; every worker has exited, so ``empty()`` is final."""
    if results.empty():
        raise queue.Empty
    return results.get()  # type: ignore[no-any-return]


def _user_error(name: str, message: str) -> UserError:
    """Rebuild the worker's error as the same UserError subclass, so the CLI prints it and exits 2."""
    import dlm.errors

    cls = getattr(dlm.errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, UserError)):
        cls = UserError
    return cls(message)
