"""Package ``__init__`` modules that import their exports on first use (PEP 562).

:mod:`dlm.config` assembles sections that live inside ``dlm.training``, ``dlm.launcher`` and
``dlm.data_streams``; importing a section runs its package's ``__init__`` first. Were those to import the
training loop or the launchers eagerly, which themselves import :mod:`dlm.config`, the import would meet a
half-initialised :mod:`dlm.config`; and ``import dlm.config`` would pay for torch data loaders, datasets and
transformers it does not need. So they name their exports here and import each one when it is first used.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each module to the public names it defines.

    The value is cached on the package, so each name is imported once and later lookups are plain attribute
    reads. An exported name must not also be a submodule's name: importing that submodule would set the
    package attribute to the module, and the export would be shadowed.
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["lazy_exports"]
