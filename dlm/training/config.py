"""The sections the training stack reads — objective, curriculum, optimizer, schedule, engine, checkpoints,
logging and the run itself — each with the rules between its own fields.

A rule that needs another section's values is a method taking those values (``ObjectiveSection.check_rows``,
``CurriculumSection.check_lengths``, ``EngineSection.check_batch``), called by :class:`dlm.config.RunConfig`,
so each rule stays beside the fields it guards while only the assembled tree knows where the other values
come from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, model_validator

from dlm.data_streams.format_specs import ANSWER_LENGTH_FORMATS, FORMATS
from dlm.sections import CrossFieldError, Section
from dlm.training.engines import ENGINES


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

    def check_rows(self, data_format: str, length_head: bool) -> None:
        """The objective against the rows it trains on (``data.format``) and the model's length head."""
        rows = FORMATS[data_format]
        if (self.kind == "sft") != rows.prompts:
            fix = "set objective.kind=sft" if rows.prompts else "use data.format=sft for SFT"
            raise CrossFieldError("objective.kind", self.kind, f"does not fit data.format = {data_format!r}; {fix}")
        if self.length_loss_weight > 0:
            if not length_head:
                raise CrossFieldError(
                    "objective.length_loss_weight", self.length_loss_weight,
                    "needs a length head: set model.length_head.max_len (a power of two), or weight 0",
                )
            if not rows.answer_lengths:
                raise CrossFieldError(
                    "objective.length_loss_weight", self.length_loss_weight,
                    "needs rows with answer lengths: data.format rows ([text, EOS, pad ...]) or sft",
                )
        if self.canvas_share > 0 and not rows.answer_lengths:
            raise CrossFieldError("objective.canvas_share", self.canvas_share,
                                  f"needs rows with answer lengths: data.format {ANSWER_LENGTH_FORMATS}")


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

    def check_lengths(self, data_format: str, micro_batch_size: int, seq_len: int) -> None:
        """Every length the curriculum names must split a micro-batch's tokens (``micro_batch_size`` rows of
        ``seq_len``) into whole rows; pad annealing needs padded rows (``data.format`` rows or sft)."""
        if self.pad_annealing_steps and not FORMATS[data_format].answer_lengths:
            raise CrossFieldError("curriculum.pad_annealing_steps", self.pad_annealing_steps,
                                  f"applies to padded rows only: data.format {ANSWER_LENGTH_FORMATS}")
        if self.kind == "none":
            return
        tokens = micro_batch_size * seq_len
        if self.kind == "stages":
            self._check_stages(tokens, seq_len)
            return
        if self.steps < 1:
            raise CrossFieldError("curriculum.steps", self.steps, f"must be >= 1 for curriculum.kind = {self.kind}")
        allowed = curriculum_lengths(tokens, seq_len, self.multiple)
        if self.start_len not in allowed:
            raise CrossFieldError(
                "curriculum.start_len", self.start_len,
                f"must be a multiple of curriculum.multiple = {self.multiple} that divides the {tokens} tokens per "
                f"micro-batch (run.micro_batch_size x data.seq_len); allowed: {', '.join(map(str, allowed)) or 'none'}",
            )

    def _check_stages(self, tokens: int, seq_len: int) -> None:
        if not self.stages or self.stages[0][0] != 1:
            raise CrossFieldError(
                "curriculum.stages", self.stages, "must start with [1, seq_len] and list [from_step, seq_len] pairs"
            )
        steps = [stage[0] for stage in self.stages]
        if steps != sorted(set(steps)):
            raise CrossFieldError("curriculum.stages", self.stages, "from_step values must increase")
        for _, length in self.stages:
            if length < 2 or length > seq_len or tokens % length:
                raise CrossFieldError(
                    "curriculum.stages", self.stages,
                    f"seq_len {length} must divide the {tokens} tokens per micro-batch (run.micro_batch_size x "
                    f"data.seq_len) and be at most data.seq_len = {seq_len}",
                )


class OptimSection(Section):
    """AdamW hyper-parameters and gradient clipping."""

    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables clipping")
    length_head_lr: float | None = Field(
        None, gt=0.0,
        description="peak LR of the length head's parameters (default: lr); a fresh head on a pretrained "
        "backbone learns faster at a higher rate than the backbone's fine-tuning rate",
    )

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

    kind: Literal[tuple(ENGINES)] = "plain"  # type: ignore[valid-type]  # the engine registry's names
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
                    raise CrossFieldError(f"engine.{key}", getattr(self, key), "applies only to engine.kind=deepspeed")
            for key in ("optimizer", "zero_init"):
                if key in self.model_fields_set and getattr(self, key) != "auto":
                    raise CrossFieldError(f"engine.{key}", getattr(self, key), "applies only to engine.kind=deepspeed")
            return self
        ds_json = self.deepspeed_json()
        stage = self.resolved_zero_stage()
        if stage not in (0, 1, 2, 3):
            raise CrossFieldError(
                "engine.deepspeed_config", self.deepspeed_config,
                f"sets zero_optimization.stage = {stage!r}; allowed stages are 0, 1, 2, 3",
            )
        for key in ("optimizer", "scheduler", "fp16"):
            if key in ds_json and not (key == "fp16" and not ds_json[key].get("enabled", False)):
                raise CrossFieldError(
                    "engine.deepspeed_config", self.deepspeed_config,
                    f"sets {key!r}, which dlm owns (optim.*, schedule.*, engine.optimizer, engine.precision); "
                    f"remove it from the JSON",
                )
        offload_opt, offload_par = self.resolved_offload()
        if offload_par == "cpu" and stage != 3:
            raise CrossFieldError("engine.offload_params", offload_par, f"needs ZeRO stage 3 (stage is {stage})")
        if offload_opt == "cpu" and stage == 0:
            raise CrossFieldError("engine.offload_optimizer", offload_opt, "needs ZeRO stage 1, 2 or 3 (stage is 0)")
        if offload_opt == "cpu" and self.optimizer == "fused-adam":
            raise CrossFieldError(
                "engine.optimizer", self.optimizer,
                "fused-adam steps on the GPU and cannot update optimizer states offloaded to the CPU; "
                "use cpu-adam (or torch-adamw) with engine.offload_optimizer=cpu",
            )
        if self.zero_init is True and stage != 3:
            raise CrossFieldError("engine.zero_init", self.zero_init, f"needs ZeRO stage 3 (stage is {stage})")
        return self

    def deepspeed_json(self) -> dict[str, Any]:
        """The DeepSpeed JSON named by ``deepspeed_config`` ({} when none); unreadable files are config errors."""
        if self.deepspeed_config is None:
            return {}
        path = Path(self.deepspeed_config)
        if not path.is_file():
            raise CrossFieldError(
                "engine.deepspeed_config", self.deepspeed_config, "file not found; name a JSON such as configs/zero/zero2.json"
            )
        try:
            tree = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CrossFieldError("engine.deepspeed_config", self.deepspeed_config, f"is not valid JSON ({exc})") from None
        if not isinstance(tree, dict):
            raise CrossFieldError("engine.deepspeed_config", self.deepspeed_config, "must hold a JSON object")
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
                raise CrossFieldError(
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

    def check_batch(self, run: RunSection, workers: int, grad_clip: float) -> None:
        """``global_batch_size`` and the DeepSpeed JSON against what the tree decides: the run's batch sizes
        over ``workers`` ranks, ``optim.grad_clip`` (``grad_clip``), the precision and the device.

        Everything here is known before a worker starts, so a 64-node job fails in the first second instead of
        after every node has loaded the data and built the model.
        """
        per_step = run.micro_batch_size * run.grad_accum_steps * workers
        if self.global_batch_size is not None and self.global_batch_size != per_step:
            per_accum = run.micro_batch_size * workers
            if self.global_batch_size % per_accum:
                fix = f"choose a multiple of run.micro_batch_size x launcher.workers = {per_accum}"
            else:
                fix = f"set run.grad_accum_steps={self.global_batch_size // per_accum}"
            raise CrossFieldError(
                "engine.global_batch_size", self.global_batch_size,
                f"must equal run.micro_batch_size x run.grad_accum_steps x launcher.workers = {run.micro_batch_size} "
                f"x {run.grad_accum_steps} x {workers} = {per_step}; {fix}",
            )
        if self.kind == "deepspeed":
            self._check_deepspeed_json(run, per_step, grad_clip)

    def _check_deepspeed_json(self, run: RunSection, per_step: int, grad_clip: float) -> None:
        ds_json = self.deepspeed_json()
        ours = {
            "train_micro_batch_size_per_gpu": (run.micro_batch_size, "run.micro_batch_size"),
            "gradient_accumulation_steps": (run.grad_accum_steps, "run.grad_accum_steps"),
            "train_batch_size": (per_step, "run.micro_batch_size x run.grad_accum_steps x launcher.workers"),
            "gradient_clipping": (grad_clip, "optim.grad_clip"),
        }
        for key, (value, source) in ours.items():
            theirs = ds_json.get(key, "auto")
            if theirs != "auto" and theirs != value:
                raise CrossFieldError(
                    "engine.deepspeed_config", self.deepspeed_config,
                    f"sets {key} = {theirs!r} but {source} = {value!r}; remove the key, write \"auto\" or make them equal",
                )
        bf16 = (ds_json.get("bf16") or {}).get("enabled", "auto")
        if bf16 != "auto" and (self.precision == "auto" or bf16 != (self.precision == "bf16")):
            raise CrossFieldError(
                "engine.deepspeed_config", self.deepspeed_config,
                f"sets bf16.enabled = {bf16!r} but engine.precision = {self.precision!r} decides; write \"auto\"",
            )
        if self.resolved_optimizer() == "cpu-adam" and self.resolved_offload()[0] != "cpu" and run.device == "cuda":
            raise CrossFieldError(
                "engine.optimizer", "cpu-adam",
                "steps on the CPU, so on CUDA it needs engine.offload_optimizer=cpu; or use torch-adamw / fused-adam",
            )


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


def curriculum_lengths(tokens: int, max_len: int, multiple: int) -> list[int]:
    """Row lengths a linear / root curriculum may use: multiples of ``multiple`` (and ``max_len`` itself) that
    split ``tokens`` into whole rows, so the tokens per step stay exactly constant."""
    return [n for n in range(2, max_len + 1) if tokens % n == 0 and (n % multiple == 0 or n == max_len)]


__all__ = [
    "CheckpointSection", "CurriculumSection", "EngineSection", "LoggingSection", "ObjectiveSection", "OptimSection",
    "RunSection", "ScheduleSection", "WandbSection", "curriculum_lengths",
]
