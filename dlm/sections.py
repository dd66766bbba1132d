"""What every config section is built from, at the bottom of the stack so that each component can define
its own section beside its code (``dlm.modeling.section``, ``dlm.data_streams.config``,
``dlm.training.config``, ``dlm.launcher.config``) without importing the tree that assembles them
(:mod:`dlm.config`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section: unknown keys are errors and assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CrossFieldError(ValueError):
    """A rule between fields (of one section or of several) that a value breaks.

    It carries the dotted key to blame, because pydantic would name the section (or the root) that holds the
    validator, not the field the user has to change.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(allowed)
        self.key, self.value, self.allowed = key, value, allowed

    def line(self) -> str:
        """The one line a user sees: the dotted key, the value given and what is allowed."""
        return f"config error: {self.key} = {self.value!r}: {self.allowed}"


__all__ = ["CrossFieldError", "Section"]
