"""The registry of engines: ``engine.kind`` → the class that owns backward, the optimizer and the schedule.

A new engine is one module implementing :class:`~dlm.training.engine.Engine` (a constructor
``(model, cfg, device)`` and a ``build_model`` classmethod) plus one entry here. Entries name their module
instead of importing it, so a run pays only for the engine it uses (importing DeepSpeed takes seconds).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineSpec:
    """Where an engine lives and what it needs from the process around it."""

    module: str
    cls: str
    needs_process_group: bool
    """DeepSpeed needs a process group even for one process; the plain engine works without one."""

    def load(self) -> Any:
        return getattr(importlib.import_module(self.module), self.cls)


ENGINES: dict[str, EngineSpec] = {
    "plain": EngineSpec("dlm.training.engine", "PlainEngine", needs_process_group=False),
    "deepspeed": EngineSpec("dlm.training.deepspeed_engine", "DeepSpeedEngine", needs_process_group=True),
}


def engine_spec(kind: str) -> EngineSpec:
    """The entry of ``kind`` (validated by the config already; a KeyError here is a registry bug)."""
    return ENGINES[kind]
