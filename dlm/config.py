"""The typed config tree of a dlm run: load YAML, apply dotted overrides, validate, dump the resolved tree.

Every section is a pydantic model with ``extra="forbid"`` so that a typo is an error, not a silently ignored
key. Validation happens before any data is read or any worker starts; every failure becomes one
:class:`~dlm.errors.ConfigError` line naming the dotted key, the value given and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from dlm.errors import ConfigError
from dlm.modeling import PRESETS, TransformerConfig, preset


class Section(BaseModel):
    """Base of every config section: unknown keys are errors and assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The `model` section is the preset name plus any TransformerConfig field as an optional override, so a
# user writes `model.preset=small model.n_layers=4` and the architecture switches stay in one place.
_ModelOverrides = create_model(  # type: ignore[call-overload]
    "_ModelOverrides",
    __base__=Section,
    **{
        name: (Optional[field.annotation], None)  # noqa: UP045 - pydantic needs a runtime type here
        for name, field in TransformerConfig.model_fields.items()
    },
)


class ModelSection(_ModelOverrides):  # type: ignore[misc, valid-type]
    """Which architecture to train: a preset from :data:`dlm.modeling.PRESETS` and per-field overrides."""

    preset: str = "tiny"

    @model_validator(mode="after")
    def _known_preset(self) -> ModelSection:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(sorted(PRESETS))}")
        try:
            self.resolve()  # surfaces impossible combinations (e.g. d_model not divisible by n_heads) now
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            key = f"model.{field}" if field else "model"
            value = self.overrides().get(field, first.get("input")) if field else self.overrides()
            raise _CrossFieldError(key, value, first["msg"].removeprefix("Value error, ")) from None
        return self

    def overrides(self) -> dict[str, Any]:
        """The architecture fields the user set explicitly (everything else comes from the preset)."""
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}

    def resolve(self) -> TransformerConfig:
        """The full architecture: preset values with the user's overrides applied."""
        return preset(self.preset, **self.overrides())


class TokenizerSection(Section):
    """Where the tokenizer comes from: a local directory, a bundled name (default) or a hub name."""

    name_or_path: str = "gpt2-mdm"
    mask_token: Optional[str] = None


class DataSection(Section):
    """Pretraining text: local parquet/jsonl/txt files or globs, packed into rows of ``seq_len`` tokens."""

    paths: list[str] = Field(default_factory=lambda: ["data/fineweb-sample/*.parquet"], min_length=1)
    text_column: str = "text"
    seq_len: int = Field(256, gt=1)
    eval_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_docs: Optional[int] = Field(None, gt=0)
    doc_attention: bool = Field(True, description="tokens attend only within their own packed document")


class ObjectiveSection(Section):
    """The masked-diffusion objective (LLaDA).

    ``kind`` lists what the data path can feed: SFT (prompt never masked) is implemented in
    :func:`dlm.training.objective.forward_process` and becomes selectable here with prompt/answer rows.
    """

    kind: Literal["pretrain"] = "pretrain"
    eps: float = Field(1e-3, ge=0.0, lt=1.0, description="p_mask = (1 - eps) t + eps keeps every t maskable")
    random_length_prob: float = Field(0.01, ge=0.0, le=1.0)
    t_sampling: Literal["uniform", "stratified"] = Field(
        "uniform", description="uniform: LLaDA's iid t; stratified: (i + u) / B, same expectation, less variance"
    )
    loss_chunk_size: int = Field(4096, gt=0, description="masked rows per LM-head chunk")


class OptimSection(Section):
    """AdamW hyper-parameters and gradient clipping."""

    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables clipping")

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimSection:
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"each beta must be in [0, 1), got {list(self.betas)}")
        return self


class ScheduleSection(Section):
    """Learning-rate schedule: linear warmup, then cosine (or constant) decay to ``min_lr_ratio * lr``."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)


class EngineSection(Section):
    """What executes backward and the optimizer step. ``plain`` is single-process torch."""

    kind: Literal["plain"] = "plain"
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class CheckpointSection(Section):
    """What is written to the run directory at the end of training."""

    save_final: bool = True


class WandbSection(Section):
    """Weights & Biases logging; offline by default because most machines cannot reach a server."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "dlm"
    entity: Optional[str] = None


class LoggingSection(Section):
    """How often and where metrics go (progress bar, ``metrics.jsonl``, wandb)."""

    every: int = Field(10, gt=0)
    progress: bool = True
    peak_tflops: Optional[float] = Field(
        None, gt=0.0, description="device peak for MFU when the device is not in the built-in table"
    )
    wandb: WandbSection = Field(default_factory=WandbSection)


class LauncherSection(Section):
    """How workers are started. ``local`` runs the loop in this process."""

    kind: Literal["local"] = "local"


class RunSection(Section):
    """The run itself: where it writes, how long it trains, batch sizes and the seed."""

    name: str = "run"
    dir: str = "runs/run"
    seed: int = 0
    steps: int = Field(100, gt=0, description="optimizer steps")
    micro_batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(0, ge=0, description="optimizer steps between evals; 0 evaluates at the end only")
    eval_batches: int = Field(8, gt=0)
    eval_samples: int = Field(4, gt=0, description="noise levels t per held-out row for the NELBO estimate")


class RunConfig(Section):
    """The whole run: one section per component, each owned by the component that reads it."""

    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection = Field(default_factory=DataSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
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
            raise _CrossFieldError(
                "data.seq_len",
                self.data.seq_len,
                f"must be at most model.max_seq_len = {arch.max_seq_len} with learned positions",
            )
        if self.schedule.warmup_steps >= self.run.steps:
            raise _CrossFieldError(
                "schedule.warmup_steps",
                self.schedule.warmup_steps,
                f"must be fewer than run.steps = {self.run.steps}",
            )
        return self

    def resolved(self) -> dict[str, Any]:
        """The full tree with the model preset expanded, as written to ``config.yaml`` in the run dir."""
        tree = self.model_dump(mode="json")
        tree["model"] = {"preset": self.model.preset, **self.model.resolve().model_dump(mode="json")}
        return tree


class _CrossFieldError(ValueError):
    """A rule between two sections; carries the dotted key so the message can name it."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(allowed)
        self.key, self.value, self.allowed = key, value, allowed


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
    if isinstance(ctx_error, _CrossFieldError):
        return f"config error: {ctx_error.key} = {ctx_error.value!r}: {ctx_error.allowed}"
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
