"""Who this process is in a data-parallel job, and the few collectives the training loop needs.

Every launcher ends up here: ``dlm train`` (one process, no process group), ``dlm launch --workers N``
(env vars set by :mod:`dlm.launcher.multiprocess`, like torchrun) and Ray Train (which sets the same env vars
and may already have created the process group). The loop asks only for rank, world size, its device and
``all_reduce_sum``; it never imports ``torch.distributed`` itself, so a single process pays nothing.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dlm.errors import ConfigError

# Collectives that wait longer than this are a dead peer, not a slow one: fail loudly so a launcher (Ray) can
# restart the group, instead of hanging forever.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class DistContext:
    """This process's place in the job; ``world_size == 1`` with no process group is the local case."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what exists once per run: metrics, plots, wandb, summary, final weights."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks in place (no-op for one process) and return it."""
        if self.distributed and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process. For small things only:
        checkpoint checksums and error reports, never tensors on the training path."""
        if not (self.distributed and self.world_size > 1):
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it (Ray tears down its own)."""
        if self.owns_group and self.distributed:
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes (the tests' case)."""
    return "nccl" if device.type == "cuda" else "gloo"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it), for a rendezvous on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(
    device: torch.device, *, require_group: bool = False, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> DistContext:
    """Join the process group described by ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``.

    Without those variables (or with ``WORLD_SIZE=1``) this is a single process and no group is created,
    unless ``require_group``: DeepSpeed needs a process group even alone, so ``dlm train`` with the DeepSpeed
    engine gets a one-rank group on a free local port (instead of DeepSpeed's MPI discovery).
    An existing group (Ray Train creates one before calling the training function) is joined, not replaced.
    On CUDA each process takes the GPU of its local rank, so ``device`` becomes ``cuda:LOCAL_RANK``.
    """
    already = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if already else _env_int("WORLD_SIZE", 1)
    rank = dist.get_rank() if already else _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}; the launcher set an impossible rank")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; start at most one "
                f"worker per GPU on each node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if world == 1 and require_group and not already:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if (world > 1 or require_group) and not already:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ConfigError(f"WORLD_SIZE={world} but {name} is not set; start workers with dlm launch")
        dist.init_process_group(backend=backend_for(device), rank=rank, world_size=world, timeout=timeout)
        owns = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)
