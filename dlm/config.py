"""The typed config tree of a dlm run: load YAML, apply dotted overrides, validate, dump the resolved tree.

Every section is a pydantic model with ``extra="forbid"`` so that a typo is an error, not a silently ignored
key. Validation happens before any data is read or any worker starts; every failure becomes one
:class:`~dlm.errors.ConfigError` line naming the dotted key, the value given and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from dlm.errors import ConfigError
from dlm.modeling import PRESETS, TransformerConfig, preset
from dlm.modeling.hf_init import InitFormat


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
    """Which architecture to train: a preset from :data:`dlm.modeling.PRESETS` and per-field overrides, and
    optionally the weights to start from (``init_from``) instead of a random initialisation."""

    preset: str = "tiny"
    init_from: Optional[str] = Field(  # noqa: UP045 - pydantic needs a runtime type here
        None,
        description="start from these weights: a dlm export, run or checkpoint directory, or a Hugging Face "
        "LLaDA / LLaMA / GPT-2 directory; the architecture must match the configured one",
    )
    init_from_format: InitFormat = Field("auto", description="auto (detect) | dlm | llada | llama | gpt2")
    output_bias_init: Literal["zeros", "unigram"] = Field(
        "zeros",
        description="zeros | unigram: start the output bias (model.output_bias) at the train tokens' log "
        "frequencies, so a fresh model starts at the unigram loss and learns context from its first step; "
        "weights from model.init_from (or a resumed checkpoint) replace it",
    )

    @model_validator(mode="after")
    def _known_preset(self) -> ModelSection:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(sorted(PRESETS))}")
        try:
            arch = self.resolve()  # surfaces impossible combinations (e.g. d_model not divisible by n_heads) now
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            key = f"model.{field}" if field else "model"
            value = self.overrides().get(field, first.get("input")) if field else self.overrides()
            raise _CrossFieldError(key, value, first["msg"].removeprefix("Value error, ")) from None
        if self.output_bias_init == "unigram":
            if arch.output_bias is False and (arch.tie_embeddings or not arch.bias):
                raise _CrossFieldError(
                    "model.output_bias_init", "unigram", "the model has no output bias: set model.output_bias=true"
                )
        if self.init_from is not None:
            self._check_init_from(arch, require=False)
        return self

    def check_init_from(self) -> None:
        """Refuse an ``init_from`` that is missing or does not fit the configured model (a ConfigError).

        Validation already checks a source that holds weights, so a wrong format or shape fails before any run
        directory or worker exists. A source without weights yet passes validation — a pipeline's config may
        name the output of an earlier run (``configs/sft-length.yaml`` starts from ``runs/smoke``), absent or
        still running — and is refused here, where a run is about to read it.
        """
        if self.init_from is not None:
            try:
                self._check_init_from(self.resolve(), require=True)
            except _CrossFieldError as exc:
                raise ConfigError(f"config error: {exc.key} = {exc.value!r}: {exc.allowed}") from None

    def _check_init_from(self, arch: TransformerConfig, require: bool) -> None:
        """Reads config files and safetensors headers only, never the weights; without ``require`` a source
        that holds no weights yet passes."""
        from dlm.modeling.hf_init import check_init_source, locate
        from dlm.modeling.hf_io import InteropError
        from dlm.modeling.hf_sources import NoWeightsError

        try:
            check_init_source(locate(self.init_from, self.init_from_format), arch)
        except NoWeightsError as exc:
            if require:
                raise _CrossFieldError("model.init_from", self.init_from, str(exc)) from None
        except InteropError as exc:
            raise _CrossFieldError("model.init_from", self.init_from, str(exc)) from None

    def overrides(self) -> dict[str, Any]:
        """The architecture fields the user set explicitly (everything else comes from the preset)."""
        return {k: v for k, v in self.model_dump(exclude=set(RUN_ONLY_MODEL_KEYS)).items() if v is not None}

    def resolve(self) -> TransformerConfig:
        """The full architecture: preset values with the user's overrides applied."""
        return preset(self.preset, **self.overrides())


RUN_ONLY_MODEL_KEYS: frozenset[str] = frozenset(ModelSection.model_fields) - frozenset(TransformerConfig.model_fields)
"""Keys of the model section that say where a run's weights come from, not what shape they have (``preset``,
``init_from``, ...): a run's ``config.yaml`` records some of them, and readers of the shape skip them."""


class TokenizerSection(Section):
    """Where the tokenizer comes from: a local directory, a bundled name (default) or a hub name."""

    name_or_path: str = "gpt2-mdm"
    mask_token: Optional[str] = None


class DataSection(Section):
    """Training data: where documents come from, how they become rows, and how the loader runs.

    ``source``: ``files`` reads local parquet / jsonl / json / txt files, globs or directories (``paths``);
    ``hub`` streams a Hugging Face dataset by name (``hub_name``, ``hub_config``, ``hub_split``, ``hub_revision``);
    ``shards`` reads the one directory in ``paths`` written by ``dlm data prepare``. ``format``:
    ``pretrain-packed`` (documents joined with EOS, cut every ``seq_len``), ``rows`` (one document per row,
    ``[text, EOS, pad ...]``) or ``sft`` (``[prompt, answer, EOS ...]`` from alpaca / question-answer /
    messages files). See :mod:`dlm.data_streams` for the guarantees (sharding, shuffling, exact resume).
    """

    source: Literal["files", "hub", "shards"] = "files"
    paths: list[str] = Field(default_factory=lambda: ["data/fineweb-sample/*.parquet"], min_length=1)
    hub_name: Optional[str] = Field(None, description="e.g. HuggingFaceFW/fineweb (source: hub)")
    hub_config: Optional[str] = Field(None, description="e.g. sample-10BT (source: hub)")
    hub_split: str = "train"
    hub_revision: Optional[str] = None
    text_column: str = "text"
    format: Literal["pretrain-packed", "rows", "sft"] = "pretrain-packed"
    seq_len: int = Field(256, gt=1)
    overflow: Literal["drop", "cut"] = Field("drop", description="rows/sft: a document longer than a row")
    pad: Literal["eos", "pad"] = Field("eos", description="rows/sft padding: EOS (LLaDA) or the tokenizer's pad id")
    sft_template: Literal["plain", "chat"] = Field("plain", description="chat: the tokenizer's chat template")
    eval_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_eval_rows: int = Field(512, gt=0, description="held-out rows kept, the first ones in file order")
    max_docs: Optional[int] = Field(None, gt=0, description="use only the first documents (quick runs)")
    shuffle: bool = True
    shuffle_buffer: int = Field(1024, gt=0, description="documents per shuffled block of a streamed source")
    num_workers: int = Field(0, ge=0, description="data-loader worker processes per rank; 0 = in the loop")
    worker_batches: Optional[int] = Field(
        None, ge=1, le=1024,
        description="batches a worker hands over at once (null: about 256k tokens' worth, at most 64); "
        "each hand-off between processes has a fixed cost of about a millisecond",
    )
    doc_attention: bool = Field(True, description="tokens attend only within their own packed document")

    @model_validator(mode="after")
    def _source_fields(self) -> DataSection:
        # Compared with the defaults, not with the keys given, so a dumped resolved config validates again.
        if self.source == "hub":
            if not self.hub_name:
                raise _CrossFieldError("data.hub_name", self.hub_name, "is required with data.source=hub")
            if self.paths != DataSection.model_fields["paths"].get_default(call_default_factory=True):
                raise _CrossFieldError("data.paths", self.paths, "is not used with data.source=hub; remove it")
        else:
            for key in ("hub_name", "hub_config", "hub_revision"):
                if getattr(self, key) is not None:
                    raise _CrossFieldError(
                        f"data.{key}", getattr(self, key), f"applies only to data.source=hub (source is {self.source})"
                    )
        if self.source == "shards":
            if len(self.paths) != 1:
                raise _CrossFieldError(
                    "data.paths", self.paths, "must name exactly one directory written by dlm data prepare"
                )
            if self.format == "sft":
                raise _CrossFieldError(
                    "data.format", self.format, "token shards hold plain documents; read SFT data with source=files"
                )
        if self.format != "sft" and self.sft_template != "plain":
            raise _CrossFieldError("data.sft_template", self.sft_template, "applies only to data.format=sft")
        return self


class ObjectiveSection(Section):
    """The masked-diffusion objective (LLaDA), the jointly trained length head and AR-adaptation switches."""

    kind: Literal["pretrain", "sft"] = Field(
        "pretrain", description="sft: the prompt is never masked, each answer's loss is normalised by its length"
    )
    eps: float = Field(1e-3, ge=0.0, lt=1.0, description="p_mask = (1 - eps) t + eps keeps every t maskable")
    random_length_prob: float = Field(0.01, ge=0.0, le=1.0)
    t_sampling: Literal["uniform", "stratified"] = Field(
        "uniform", description="uniform: LLaDA's iid t; stratified: (i + u) / B, same expectation, less variance"
    )
    loss_chunk_size: int = Field(1024, gt=0, description="masked rows per LM-head chunk (1024 x 126k vocab = 0.5 GB fp32)")
    length_loss_weight: float = Field(
        0.0, ge=0.0, description="weight of the length head's loss in the joint objective; 0 leaves it untrained"
    )
    length_rows: float = Field(
        0.25, gt=0.0, le=1.0,
        description="share of each micro-batch's rows drawn in the generation-start state (answer fully masked) "
        "for the length head",
    )
    max_scored_per_row: Optional[int] = Field(  # noqa: UP045 - pydantic needs a runtime type here
        None, gt=0,
        description="LM-head positions scored per row; more masked ones are subsampled uniformly and reweighted "
        "(an unbiased estimate of the same loss at less head cost); null scores every masked position",
    )
    canvas_share: float = Field(
        0.0, ge=0.0, le=1.0,
        description="share of the diffusion rows (rows or sft format) trained on a canvas of the size generation "
        "gives them: the answer's power-of-two budget (x1, x2 or x4, room permitting) instead of the whole row; "
        "the positions past it are hidden from attention and the loss",
    )
    shift: bool = Field(False, description="position i predicts token i+1 (AR adaptation, DiffuGPT/DiffuLLaMA)")
    attention_annealing_steps: int = Field(
        0, ge=0, description="steps over which attention goes from causal to bidirectional (DiffuLLaMA); 0 = off"
    )


class CurriculumSection(Section):
    """Sequence length by optimizer step, tokens per step held constant; pad-share annealing for padded rows.

    ``data.seq_len`` is the longest length and ``run.micro_batch_size`` the rows at that length; a shorter
    length ``n`` gets ``micro_batch_size * data.seq_len / n`` rows, so ``n`` must divide that token count.
    """

    kind: Literal["none", "stages", "linear", "root"] = Field(
        "none", description="stages: [[from_step, seq_len], ...]; linear / root: grow start_len -> data.seq_len"
    )
    start_len: int = Field(64, gt=1)
    steps: int = Field(0, ge=0, description="linear / root: optimizer steps to reach data.seq_len")
    stages: list[tuple[int, int]] = Field(default_factory=list, description="[from_step, seq_len] pairs, step 1 first")
    multiple: int = Field(64, gt=0, description="linear / root lengths are multiples of this")
    pad_annealing_steps: int = Field(
        0, ge=0, description="rows/sft: the share of EOS padding that may be masked rises 0 -> 1 over these steps"
    )


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
    """What executes backward and the optimizer step: ``plain`` torch or ``deepspeed`` (ZeRO stage 0-3).

    DeepSpeed settings come from two places. ``deepspeed_config`` names a DeepSpeed JSON file (the ones in
    ``configs/zero/``) whose tuning keys (bucket sizes, prefetching, pinned memory ...) are used as they are;
    ``zero_stage`` and ``offload_*`` here override that file's choice, so one JSON serves several runs. What
    this tree already decides (batch sizes, clipping, precision, optimizer, schedule) is never taken from the
    JSON: it may leave those keys out or write ``"auto"``, and any other value that differs is an error
    rather than a silent override, because a run whose batch differs from its config cannot be reproduced.
    """

    kind: Literal["plain", "deepspeed"] = "plain"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    deepspeed_config: Optional[str] = Field(None, description="DeepSpeed JSON, e.g. configs/zero/zero3.json")
    zero_stage: Optional[int] = Field(None, ge=0, le=3, description="0-3; overrides the JSON (default there, else 0)")
    offload_optimizer: Optional[Literal["none", "cpu"]] = Field(None, description="optimizer states on the CPU")
    offload_params: Optional[Literal["none", "cpu"]] = Field(None, description="parameters on the CPU (stage 3)")
    optimizer: Literal["auto", "torch-adamw", "cpu-adam", "fused-adam"] = Field(
        "auto", description="auto: DeepSpeed's cpu-adam with CPU optimizer offload, torch AdamW otherwise"
    )
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in backward")
    zero_init: Union[Literal["auto"], bool] = Field(  # noqa: UP007 - pydantic needs a runtime type here
        "auto", description="build the model under deepspeed.zero.Init (stage 3); auto: models over 1e9 params"
    )
    global_batch_size: Optional[int] = Field(
        None, gt=0, description="sequences per optimizer step; must be micro_batch_size x grad_accum_steps x workers"
    )

    @model_validator(mode="after")
    def _deepspeed_keys(self) -> EngineSection:
        if self.kind != "deepspeed":
            for key in ("deepspeed_config", "zero_stage", "offload_optimizer", "offload_params"):
                if getattr(self, key) is not None:
                    raise _CrossFieldError(f"engine.{key}", getattr(self, key), "applies only to engine.kind=deepspeed")
            for key in ("optimizer", "zero_init"):
                if key in self.model_fields_set and getattr(self, key) != "auto":
                    raise _CrossFieldError(f"engine.{key}", getattr(self, key), "applies only to engine.kind=deepspeed")
            return self
        ds_json = self.deepspeed_json()
        stage = self.resolved_zero_stage()
        if stage not in (0, 1, 2, 3):
            raise _CrossFieldError(
                "engine.deepspeed_config", self.deepspeed_config,
                f"sets zero_optimization.stage = {stage!r}; allowed stages are 0, 1, 2, 3",
            )
        for key in ("optimizer", "scheduler", "fp16"):
            if key in ds_json and not (key == "fp16" and not ds_json[key].get("enabled", False)):
                raise _CrossFieldError(
                    "engine.deepspeed_config", self.deepspeed_config,
                    f"sets {key!r}, which dlm owns (optim.*, schedule.*, engine.optimizer, engine.precision); "
                    f"remove it from the JSON",
                )
        offload_opt, offload_par = self.resolved_offload()
        if offload_par == "cpu" and stage != 3:
            raise _CrossFieldError("engine.offload_params", offload_par, f"needs ZeRO stage 3 (stage is {stage})")
        if offload_opt == "cpu" and stage == 0:
            raise _CrossFieldError("engine.offload_optimizer", offload_opt, "needs ZeRO stage 1, 2 or 3 (stage is 0)")
        if offload_opt == "cpu" and self.optimizer == "fused-adam":
            raise _CrossFieldError(
                "engine.optimizer", self.optimizer,
                "fused-adam steps on the GPU and cannot update optimizer states offloaded to the CPU; "
                "use cpu-adam (or torch-adamw) with engine.offload_optimizer=cpu",
            )
        if self.zero_init is True and stage != 3:
            raise _CrossFieldError("engine.zero_init", self.zero_init, f"needs ZeRO stage 3 (stage is {stage})")
        return self

    def deepspeed_json(self) -> dict[str, Any]:
        """The DeepSpeed JSON named by ``deepspeed_config`` ({} when none); unreadable files are config errors."""
        if self.deepspeed_config is None:
            return {}
        path = Path(self.deepspeed_config)
        if not path.is_file():
            raise _CrossFieldError(
                "engine.deepspeed_config", self.deepspeed_config, "file not found; name a JSON such as configs/zero/zero2.json"
            )
        try:
            tree = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise _CrossFieldError("engine.deepspeed_config", self.deepspeed_config, f"is not valid JSON ({exc})") from None
        if not isinstance(tree, dict):
            raise _CrossFieldError("engine.deepspeed_config", self.deepspeed_config, "must hold a JSON object")
        return tree

    def resolved_zero_stage(self) -> Any:
        """``zero_stage`` if given, else the JSON's ``zero_optimization.stage``, else 0."""
        if self.zero_stage is not None:
            return self.zero_stage
        return self.deepspeed_json().get("zero_optimization", {}).get("stage", 0)

    def resolved_offload(self) -> tuple[str, str]:
        """(optimizer, params) offload device, ``none`` or ``cpu``: ours if given, else the JSON's."""
        zero = self.deepspeed_json().get("zero_optimization", {})

        def from_json(key: str) -> str:
            device = (zero.get(key) or {}).get("device", "none")
            if device not in ("none", "cpu"):
                raise _CrossFieldError(
                    "engine.deepspeed_config", self.deepspeed_config,
                    f"sets zero_optimization.{key}.device = {device!r}; allowed: none, cpu",
                )
            return str(device)

        opt = self.offload_optimizer if self.offload_optimizer is not None else from_json("offload_optimizer")
        par = self.offload_params if self.offload_params is not None else from_json("offload_param")
        return opt, par

    def resolved_optimizer(self) -> str:
        """``auto`` → DeepSpeed's CPU Adam when optimizer states live on the CPU, torch's AdamW otherwise."""
        if self.optimizer != "auto":
            return self.optimizer
        return "cpu-adam" if self.kind == "deepspeed" and self.resolved_offload()[0] == "cpu" else "torch-adamw"


class CheckpointSection(Section):
    """Resumable checkpoints (``run.dir/checkpoints``) and the final weights."""

    interval: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 saves none")
    keep_last: int = Field(2, ge=2, description="complete checkpoints kept; at least 2 so one always survives")
    resume: Optional[str] = Field(None, description="auto (newest of this run, if any) or a checkpoint path")
    save_final: bool = True
    on_signal: bool = Field(
        True, description="on SIGTERM/SIGINT, save a checkpoint at the end of the current step and stop"
    )


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
    """How workers are started: ``local`` runs the loop in this process, ``multiprocess`` starts ``workers``
    processes on this machine, ``ray`` runs them as a Ray Train ``TorchTrainer`` on a Ray cluster (restarting
    the whole group from the last checkpoint after a failure, up to ``max_failures`` times)."""

    kind: Literal["local", "multiprocess", "ray"] = "local"
    workers: int = Field(1, gt=0, description="training processes = data-parallel world size")
    ray_address: Optional[str] = Field(None, description="auto | local (start one here) | HOST:PORT | ray://HOST:PORT")
    use_gpu: Optional[bool] = Field(None, description="one GPU per worker; default: when run.device is not cpu")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources of one worker; default {CPU: 1} (+ {GPU: 1} with use_gpu)"
    )
    max_failures: int = Field(0, ge=-1, description="Ray: group restarts after a worker failure; -1 = unlimited")
    storage_path: Optional[str] = Field(None, description="Ray: where checkpoints are copied; default run.dir/ray")
    check_resources: bool = Field(True, description="Ray: refuse to start when the cluster cannot place all workers")

    @model_validator(mode="after")
    def _kind_fields(self) -> LauncherSection:
        if self.kind == "local" and self.workers != 1:
            raise _CrossFieldError(
                "launcher.workers", self.workers, "needs launcher.kind=multiprocess or ray (local runs one process)"
            )
        if self.kind != "ray":
            for key, default in (("ray_address", None), ("storage_path", None), ("max_failures", 0)):
                if getattr(self, key) != default:
                    raise _CrossFieldError(f"launcher.{key}", getattr(self, key), "applies only to launcher.kind=ray")
        return self

    def worker_resources(self, use_gpu: bool) -> dict[str, float]:
        """What Ray reserves for each worker."""
        if self.resources_per_worker:
            return dict(self.resources_per_worker)
        return {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}


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
    eval_samples: int = Field(4, gt=0, description="noise levels per held-out row for the NELBO estimate")
    eval_estimator: Literal["count", "t"] = Field(
        "count",
        description="count: mask exactly l of n tokens, weight n/l (LLaDA's low-variance likelihood form); "
        "t: mask at rate t, weight 1/t, as training does",
    )
    eval_max_scored_per_row: Optional[int] = Field(  # noqa: UP045 - pydantic needs a runtime type here
        None,
        gt=0,
        description="score a uniform sample of at most this many masked positions per held-out row, reweighted "
        "(same expectation, a fraction of the LM-head cost); null scores them all",
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

    @model_validator(mode="after")
    def _objective(self) -> RunConfig:
        _check_objective(self)
        return self

    @model_validator(mode="after")
    def _distributed(self) -> RunConfig:
        _check_distributed(self)
        return self

    def resolved(self) -> dict[str, Any]:
        """The full tree with the model preset expanded, as written to ``config.yaml`` in the run dir."""
        tree = self.model_dump(mode="json")
        tree["model"] = {"preset": self.model.preset, **self.model.resolve().model_dump(mode="json")}
        if self.model.init_from is not None:
            tree["model"].update(init_from=self.model.init_from, init_from_format=self.model.init_from_format)
        return tree


def curriculum_lengths(tokens: int, max_len: int, multiple: int) -> list[int]:
    """Row lengths a linear / root curriculum may use: multiples of ``multiple`` (and ``max_len`` itself) that
    split ``tokens`` into whole rows, so the tokens per step stay exactly constant."""
    return [n for n in range(2, max_len + 1) if tokens % n == 0 and (n % multiple == 0 or n == max_len)]


def _check_objective(cfg: RunConfig) -> None:
    """The objective, the row format, the length head and the curriculum must fit together."""
    objective, data, curriculum = cfg.objective, cfg.data, cfg.curriculum
    if (objective.kind == "sft") != (data.format == "sft"):
        fix = "set objective.kind=sft" if data.format == "sft" else "use data.format=sft for SFT"
        raise _CrossFieldError("objective.kind", objective.kind, f"does not fit data.format = {data.format!r}; {fix}")
    if objective.length_loss_weight > 0:
        head = cfg.model.resolve().length_head
        if head is None or not head.enabled:
            raise _CrossFieldError(
                "objective.length_loss_weight", objective.length_loss_weight,
                "needs a length head: set model.length_head.max_len (a power of two), or weight 0",
            )
        if data.format == "pretrain-packed":
            raise _CrossFieldError(
                "objective.length_loss_weight", objective.length_loss_weight,
                "needs rows with answer lengths: data.format rows ([text, EOS, pad ...]) or sft",
            )
    if objective.canvas_share > 0 and data.format == "pretrain-packed":
        raise _CrossFieldError("objective.canvas_share", objective.canvas_share,
                               "needs rows with answer lengths: data.format rows or sft")
    if curriculum.pad_annealing_steps and data.format == "pretrain-packed":
        raise _CrossFieldError("curriculum.pad_annealing_steps", curriculum.pad_annealing_steps,
                               "applies to padded rows only: data.format rows or sft")
    if curriculum.kind == "none":
        return
    tokens = cfg.run.micro_batch_size * data.seq_len
    allowed = curriculum_lengths(tokens, data.seq_len, curriculum.multiple)
    allowed_text = ", ".join(map(str, allowed)) or "none"
    if curriculum.kind == "stages":
        if not curriculum.stages or curriculum.stages[0][0] != 1:
            raise _CrossFieldError("curriculum.stages", curriculum.stages, "must start with [1, seq_len] and list [from_step, seq_len] pairs")
        steps = [stage[0] for stage in curriculum.stages]
        if steps != sorted(set(steps)):
            raise _CrossFieldError("curriculum.stages", curriculum.stages, "from_step values must increase")
        for _, length in curriculum.stages:
            if length < 2 or length > data.seq_len or tokens % length:
                raise _CrossFieldError(
                    "curriculum.stages", curriculum.stages,
                    f"seq_len {length} must divide the {tokens} tokens per micro-batch (run.micro_batch_size x "
                    f"data.seq_len) and be at most data.seq_len = {data.seq_len}",
                )
        return
    if curriculum.steps < 1:
        raise _CrossFieldError("curriculum.steps", curriculum.steps, f"must be >= 1 for curriculum.kind = {curriculum.kind}")
    if curriculum.start_len not in allowed:
        raise _CrossFieldError(
            "curriculum.start_len", curriculum.start_len,
            f"must be a multiple of curriculum.multiple = {curriculum.multiple} that divides the {tokens} tokens per "
            f"micro-batch (run.micro_batch_size x data.seq_len); allowed: {allowed_text}",
        )


def _check_distributed(cfg: RunConfig) -> None:
    """Batch sizes across ranks, the DeepSpeed JSON against this tree, and the launcher against the device.

    Everything here is known before a worker starts, so a 64-node job fails in the first second instead of
    after every node has loaded the data and built the model.
    """
    run, engine, launcher = cfg.run, cfg.engine, cfg.launcher
    world = launcher.workers
    per_step = run.micro_batch_size * run.grad_accum_steps * world
    if engine.global_batch_size is not None and engine.global_batch_size != per_step:
        per_accum = run.micro_batch_size * world
        if engine.global_batch_size % per_accum:
            fix = f"choose a multiple of run.micro_batch_size x launcher.workers = {per_accum}"
        else:
            fix = f"set run.grad_accum_steps={engine.global_batch_size // per_accum}"
        raise _CrossFieldError(
            "engine.global_batch_size", engine.global_batch_size,
            f"must equal run.micro_batch_size x run.grad_accum_steps x launcher.workers = {run.micro_batch_size} x "
            f"{run.grad_accum_steps} x {world} = {per_step}; {fix}",
        )
    if engine.kind == "deepspeed":
        ds_json = engine.deepspeed_json()
        ours = {
            "train_micro_batch_size_per_gpu": (run.micro_batch_size, "run.micro_batch_size"),
            "gradient_accumulation_steps": (run.grad_accum_steps, "run.grad_accum_steps"),
            "train_batch_size": (per_step, "run.micro_batch_size x run.grad_accum_steps x launcher.workers"),
            "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip"),
        }
        for key, (value, source) in ours.items():
            theirs = ds_json.get(key, "auto")
            if theirs != "auto" and theirs != value:
                raise _CrossFieldError(
                    "engine.deepspeed_config", engine.deepspeed_config,
                    f"sets {key} = {theirs!r} but {source} = {value!r}; remove the key, write \"auto\" or make them equal",
                )
        bf16 = (ds_json.get("bf16") or {}).get("enabled", "auto")
        if bf16 != "auto" and (engine.precision == "auto" or bf16 != (engine.precision == "bf16")):
            raise _CrossFieldError(
                "engine.deepspeed_config", engine.deepspeed_config,
                f"sets bf16.enabled = {bf16!r} but engine.precision = {engine.precision!r} decides; write \"auto\"",
            )
        if engine.resolved_optimizer() == "cpu-adam" and engine.resolved_offload()[0] != "cpu" and run.device == "cuda":
            raise _CrossFieldError(
                "engine.optimizer", "cpu-adam",
                "steps on the CPU, so on CUDA it needs engine.offload_optimizer=cpu; or use torch-adamw / fused-adam",
            )
    if launcher.use_gpu and run.device == "cpu":
        raise _CrossFieldError("launcher.use_gpu", True, "contradicts run.device = 'cpu'; drop one of them")


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
