"""The typed config tree of a dlm run: assemble the sections, load YAML, apply dotted overrides, validate,
dump the resolved tree.

Each section lives beside the component that reads it and checks its own fields (:mod:`dlm.modeling.section`,
:mod:`dlm.data_streams.config`, :mod:`dlm.training.config`, :mod:`dlm.launcher.config`, all built on
:mod:`dlm.sections`); this module holds the rules between sections and re-exports every section, so
``from dlm.config import DataSection`` keeps working. Every section has ``extra="forbid"`` so that a typo is
an error, not a silently ignored key. Validation happens before any data is read or any worker starts; every
failure becomes one :class:`~dlm.errors.ConfigError` line naming the dotted key, the value given and what is
allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from dlm.data_streams.config import DataSection, TokenizerSection
from dlm.errors import ConfigError
from dlm.launcher.config import LauncherSection
from dlm.modeling.config import RUN_ONLY_MODEL_KEYS
from dlm.modeling.section import ModelSection
from dlm.sections import CrossFieldError, Section
from dlm.training.config import (
    CheckpointSection,
    CurriculumSection,
    EngineSection,
    LoggingSection,
    ObjectiveSection,
    OptimSection,
    RunSection,
    ScheduleSection,
    WandbSection,
    curriculum_lengths,
)


class RunConfig(Section):
    """The whole run: one section per component, each owned by the component that reads it."""

    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection = Field(default_factory=DataSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    curriculum: CurriculumSection = Field(default_factory=CurriculumSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    launcher: LauncherSection = Field(default_factory=LauncherSection)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        arch = self.model.resolve()
        if arch.positions == "learned" and self.data.seq_len > arch.max_seq_len:
            raise CrossFieldError(
                "data.seq_len",
                self.data.seq_len,
                f"must be at most model.max_seq_len = {arch.max_seq_len} with learned positions",
            )
        if self.schedule.warmup_steps >= self.run.steps:
            raise CrossFieldError(
                "schedule.warmup_steps",
                self.schedule.warmup_steps,
                f"must be fewer than run.steps = {self.run.steps}",
            )
        return self

    @model_validator(mode="after")
    def _objective(self) -> RunConfig:
        """The objective, the row format, the length head and the curriculum must fit together."""
        head = self.model.resolve().length_head
        has_head = head is not None and head.enabled
        self.objective.check_rows(self.data.format, length_head=has_head)
        if self.optim.length_head_lr is not None and not has_head:
            raise CrossFieldError(
                "optim.length_head_lr", self.optim.length_head_lr,
                "sets the rate of a length head this model does not have: set model.length_head.max_len, "
                "or drop optim.length_head_lr",
            )
        if has_head and head.prediction_pass == "prompt" and self.objective.length_loss_weight > 0:
            raise CrossFieldError(
                "model.length_head.prediction_pass", head.prediction_pass,
                "joint training reads the head from rows with their canvas, so inference must too; leave it at "
                "canvas (dlm fit-head --pass prompt fits a head for the prompt-only pass after training)",
            )
        self.curriculum.check_lengths(self.data.format, self.run.micro_batch_size, self.data.seq_len)
        return self

    @model_validator(mode="after")
    def _distributed(self) -> RunConfig:
        """Batch sizes across ranks, the DeepSpeed JSON against this tree, and the launcher against the device."""
        self.engine.check_batch(self.run, self.launcher.workers, self.optim.grad_clip)
        if self.launcher.use_gpu and self.run.device == "cpu":
            raise CrossFieldError("launcher.use_gpu", True, "contradicts run.device = 'cpu'; drop one of them")
        return self

    def resolved(self) -> dict[str, Any]:
        """The full tree with the model preset expanded, as written to ``config.yaml`` in the run dir."""
        tree = self.model_dump(mode="json")
        tree["model"] = {"preset": self.model.preset, **self.model.resolve().model_dump(mode="json")}
        if self.model.init_from is not None:
            tree["model"].update(init_from=self.model.init_from, init_from_format=self.model.init_from_format)
        return tree


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at ``loc`` (the parent of an unknown key) in the RunConfig tree."""
    model: Any = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _format_error(err: ValidationError) -> str:
    """One line: the first problem, with its dotted key, the value given and what is allowed."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if p not in ("function-after",))
    ctx_error = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_error, CrossFieldError):
        return ctx_error.line()
    key = ".".join(str(p) for p in loc) or "<root>"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"config error: {key}: unknown key; allowed keys here: {', '.join(allowed)}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"config error: {key} = {first.get('input')!r}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` → (["a", "b"], yaml value of c). The value is YAML so ``1e-3``, ``true``, ``[a, b]`` work."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config error: override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a copy of ``tree``; unknown keys are caught later by validation."""
    tree = json.loads(json.dumps(tree))
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"config error: {'.'.join(path)}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or malformed YAML is a ConfigError with the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: config file {str(path)!r} not found; pass a YAML file such as configs/smoke.yaml")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"config error: {path} is not valid YAML{at}; fix the syntax") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config error: {path} must hold a mapping of sections, got {type(tree).__name__}")
    return tree


def validate(tree: dict[str, Any]) -> RunConfig:
    """Build the typed tree; the first problem becomes one ConfigError line."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (or defaults when ``path`` is None) + dotted overrides → validated RunConfig."""
    tree = load_yaml(path) if path is not None else {}
    return validate(apply_overrides(tree, list(overrides or [])))


def dump_resolved(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Write the resolved tree to ``run_dir/config.yaml`` so a run can be reproduced from its directory."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    return out


__all__ = [
    "RUN_ONLY_MODEL_KEYS", "CheckpointSection", "CurriculumSection", "DataSection", "EngineSection",
    "LauncherSection", "LoggingSection", "ModelSection", "ObjectiveSection", "OptimSection", "RunConfig",
    "RunSection", "ScheduleSection", "Section", "TokenizerSection", "WandbSection", "apply_overrides",
    "curriculum_lengths", "dump_resolved", "load_config", "load_yaml", "parse_override", "validate",
]
