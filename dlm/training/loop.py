"""The one training loop: build, train, evaluate, write the run directory, close in ``finally``.

It delegates everything that varies: the engine owns backward and the optimizer, the objective owns
masking and the loss, :mod:`dlm.data_streams` owns batches, :class:`~dlm.training.metrics.Metrics` owns logging.

The same loop runs as one process or as one rank of many (``dlm launch``, Ray Train): every rank reads its
own shard of the data and keeps its own data/RNG state in the checkpoints; the loss normaliser and the
logged values are summed over ranks; rank 0 alone writes what exists once per run (metrics, wandb, plots,
summary, final weights). Code outside the loop observes it through :class:`~dlm.training.hooks.TrainHook`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.config import RunConfig, dump_resolved
from dlm.data_streams import build_pretrain_stream, check_vocab, load_tokenizer, validate_data_source
from dlm.errors import ConfigError, TrainingStopped
from dlm.kernels import anneal_ratio
from dlm.modeling import model_info
from dlm.training.checkpoint import Checkpointer, rng_state, save_on_every_rank, select_resume, set_rng_state
from dlm.training.distributed import DistContext, init_distributed
from dlm.training.engine import build_engine, build_training_model
from dlm.training.engines import engine_spec
from dlm.training.precision import resolve_device
from dlm.training.curriculum import Curriculum
from dlm.training.evaluate import evaluate_nelbo
from dlm.training.hooks import StepInfo, TrainHook
from dlm.training.metrics import Metrics, StepStats
from dlm.training.noise import NoiseSchedule
from dlm.training.objective import NoisedBatch, mask_generator, noise_batch
from dlm.training.preemption import StopRequest
from dlm.training.report import plot_loss_curve, save_weights


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so model init and data order repeat exactly on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: RunConfig, hooks: Sequence[TrainHook] = ()) -> dict[str, Any]:
    """Train as configured and return the summary that is also written to ``summary.json``."""
    ctx = init_distributed(resolve_device(cfg.run.device), require_group=engine_spec(cfg.engine.kind).needs_process_group)
    try:
        summary = Trainer(cfg, ctx, hooks).fit()
        ctx.barrier()  # no rank tears the group down while another still uses it
        return summary
    finally:
        ctx.close()


class Trainer:
    """One run on one rank: built by the constructor, trained by :meth:`fit`.

    The constructor checks everything it can before writing anything (tokenizer, vocabulary, data source,
    ``init_from``, the checkpoint to resume from), then builds data, model, engine and metrics and restores a
    checkpoint. :meth:`fit` is the loop: :meth:`train_step`, :meth:`maybe_eval`, :meth:`maybe_checkpoint`,
    and :meth:`finish` writes what a finished run leaves behind.
    """

    def __init__(self, cfg: RunConfig, ctx: DistContext, hooks: Sequence[TrainHook] = ()) -> None:
        self.started = time.perf_counter()
        self.cfg, self.ctx, self.hooks = cfg, ctx, hooks
        if ctx.world_size != cfg.launcher.workers:
            raise ConfigError(
                f"config error: launcher.workers = {cfg.launcher.workers} but this job has {ctx.world_size} "
                f"rank(s); the batch sizes were checked for {cfg.launcher.workers}: use dlm launch --workers "
                f"{cfg.launcher.workers}, or set launcher.workers={ctx.world_size}"
            )
        self.tokenizer = load_tokenizer(cfg.tokenizer.name_or_path, cfg.tokenizer.mask_token)
        self.arch = cfg.model.resolve()
        check_vocab(self.tokenizer, self.arch.vocab_size)
        validate_data_source(cfg.data, self.tokenizer)  # a bad path, hub name or shards fail before the run dir exists
        if not cfg.checkpoint.resume:  # a resumed run reads its own checkpoint, not init_from
            cfg.model.check_init_from()

        self.run_dir = Path(cfg.run.dir)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        self.resolved = cfg.resolved()
        # Before anything is written: a refused resume leaves the run directory as it was, config.yaml included.
        resume_path = select_resume(cfg.checkpoint.resume, self.checkpointer, self.resolved, ctx)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if ctx.is_main:
            dump_resolved(cfg, self.run_dir)
        seed_everything(cfg.run.seed)

        self.data = build_pretrain_stream(
            cfg.data, self.tokenizer, seed=cfg.run.seed, micro_batch_size=cfg.run.micro_batch_size, rank=ctx.rank,
            world_size=ctx.world_size,
        )
        unigram = self.data.unigram_log_probs() if cfg.model.output_bias_init == "unigram" else None
        self.engine = build_engine(cfg, build_training_model(cfg, ctx.device, ctx.world_size, unigram), ctx.device)
        self.info = model_info(self.arch, cfg.data.seq_len)
        self.curriculum = Curriculum.from_config(cfg)
        self.step, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        if resume_path is not None:
            self.restore(resume_path)
        # Tokens are counted over all ranks, so FLOPs per token / world size makes TFLOP/s and MFU per device.
        self.metrics = (
            Metrics(cfg, self.run_dir, self.info["flops_per_token"] / ctx.world_size, ctx.device, start_step=self.step)
            if ctx.is_main
            else None
        )
        if self.metrics is not None:
            self.metrics.tokens_seen = self.tokens_seen
        self.last_record: dict[str, Any] = {}

    # -- state ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's resumable state beside the engine's: the loop's counters and each component's own
        state (the file layout of ``client_rank*.pt`` is unchanged, so older checkpoints still load)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "data": self.data.state_dict(),
            "rng": rng_state(),
            "curriculum": self.curriculum.state(self.step),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])

    def restore(self, path: Path) -> None:
        """Engine, data position and RNGs from the checkpoint at ``path``.

        The mask draw needs no state (it is a function of seed and step), so restoring these is all it takes
        for the resumed run to repeat the uninterrupted one bit for bit. Every rank restores its own data
        position and RNGs (``client_rank{r}.pt``); the engine load is collective.
        """
        self.engine.load_checkpoint(path / "engine")
        self.load_state_dict(Checkpointer.read_client_state(path, self.ctx.rank))
        if self.ctx.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # -- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train from the restored step to ``run.steps``, evaluate, and return the summary.

        A stop signal (:mod:`~dlm.training.preemption`) ends the loop after the step it arrived in, with a
        checkpoint of that step, as :class:`~dlm.errors.TrainingStopped`.
        """
        cfg = self.cfg
        stop = StopRequest(cfg.checkpoint.on_signal).__enter__()  # left in the finally below
        try:
            batches = iter(self.data)
            for step in range(self.step + 1, cfg.run.steps + 1):
                stopping = self.train_step(step, batches, stop.requested)
                self.maybe_eval(step)
                saved = self.maybe_checkpoint(step, force=stopping)
                if stopping:
                    name = signal.Signals(stop.signum).name if stop.signum else "a stop signal on another rank"
                    raise TrainingStopped(
                        f"stopped by {name} after step {step} of {cfg.run.steps}; its checkpoint is {saved}: "
                        f"continue with --resume auto (or checkpoint.resume=auto)",
                        stop.signum or signal.SIGTERM,
                    )
            eval_nelbo = self.evaluate(cfg.run.steps)
        finally:
            stop.__exit__()
            if self.metrics is not None:
                self.metrics.close()
            self.data.close()
        return self.finish(eval_nelbo)

    def train_step(self, step: int, batches: Iterator[dict[str, torch.Tensor]], stop_requested: bool) -> bool:
        """One optimizer step over ``run.grad_accum_steps`` micro-batches, logged and shown to the hooks;
        returns whether any rank was asked to stop after it."""
        cfg, ctx, engine = self.cfg, self.ctx, self.engine
        step_start = time.perf_counter()
        schedule = self.curriculum.state(step)
        self.data.set_seq_len(schedule["seq_len"])
        micro = [_to_device(next(batches), ctx.device, cfg.data.doc_attention) for _ in range(cfg.run.grad_accum_steps)]
        data_seconds = time.perf_counter() - step_start
        train_length_head = cfg.objective.length_loss_weight > 0
        # Masks are keyed by the micro-batch's slot in the global batch (rank-major), like the data stream's
        # consumers: 2 ranks x 1 micro-batch draw exactly what 1 rank x 2 accumulated micro-batches draw.
        noised = [
            noise_batch(
                batch,
                cfg.objective,
                self.tokenizer.mask_id,
                mask_generator(cfg.run.seed, step, 0, ctx.rank * cfg.run.grad_accum_steps + index),
                train_length_head=train_length_head,
                pad_share=schedule["pad_share"],
                attention_ratio=anneal_ratio(step, cfg.objective.attention_annealing_steps),
            )
            for index, batch in enumerate(micro)
        ]
        denominator, stopping = _global_normalizers(noised, ctx, stop_requested)
        stats = StepStats.zeros(ctx.device, train_length_head)
        for n in noised:
            with engine.autocast():
                parts = engine.loss(n, cfg.objective.loss_chunk_size)
            engine.backward(parts.objective(denominator))
            stats.add(parts, denominator)
        stats.lr = engine.lr()
        stats.grad_norm = engine.step()
        stats.tokens = sum(n.num_tokens for n in noised)
        stats.data_seconds = data_seconds
        stats = stats.summed_over_ranks(ctx)
        self.step = step
        self.tokens_seen += stats.tokens
        record = self.metrics.update(step, stats, gauges=schedule) if self.metrics is not None else None
        self.train_seconds += time.perf_counter() - step_start
        if record is not None:
            self.last_record = record
        if self.hooks:
            done = StepInfo(step=step, rank=ctx.rank, world_size=ctx.world_size, loss=stats.loss.detach(),
                            batches=micro, record=record, model=engine.model)
            for hook in self.hooks:
                hook.on_step_end(done)
        return stopping

    def maybe_eval(self, step: int) -> None:
        """Held-out NELBO every ``run.eval_every`` steps (the last step is evaluated by :meth:`fit`)."""
        if self.cfg.run.eval_every and step % self.cfg.run.eval_every == 0 and step != self.cfg.run.steps:
            self.evaluate(step)

    def maybe_checkpoint(self, step: int, force: bool = False) -> Path | None:
        """A checkpoint every ``checkpoint.interval`` steps, or now when ``force`` (a stop signal)."""
        interval = self.cfg.checkpoint.interval
        if not (force or (interval and step % interval == 0)):
            return None
        saved = save_on_every_rank(self.ctx, self.checkpointer, step, self.engine, self.state_dict(), self.resolved)
        for hook in self.hooks:
            hook.on_checkpoint(step, saved, self.ctx.is_main)
        return saved

    def evaluate(self, step: int) -> float:
        """Every rank evaluates the same held-out rows (ZeRO-3 needs all of them in each forward)."""
        cfg, engine = self.cfg, self.engine
        nelbo = evaluate_nelbo(
            engine.model,
            _take(self.data.eval_batches(cfg.run.micro_batch_size), cfg.run.eval_batches),
            self.tokenizer.mask_id,
            schedule=NoiseSchedule.from_objective(cfg.objective),
            samples=cfg.run.eval_samples,
            estimator=cfg.run.eval_estimator,
            max_scored_per_row=cfg.run.eval_max_scored_per_row,
            seed=cfg.run.seed,
            device=self.ctx.device,
            autocast=engine.autocast,
            chunk_size=cfg.objective.loss_chunk_size,
            loss_fn=engine.loss,
            sft=cfg.objective.kind == "sft",
            shift=cfg.objective.shift,
        )
        if self.metrics is not None:
            self.metrics.log_eval(step, {"eval_nelbo": nelbo})
        return nelbo

    # -- the end --------------------------------------------------------------------------------------------

    def finish(self, eval_nelbo: float) -> dict[str, Any]:
        """Final weights, the summary (data counters summed over ranks), the loss plot, the hooks' last call."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.checkpoint.save_final:
            with self.engine.gathered_model() as whole:  # ZeRO-3: a collective, every rank enters
                if ctx.is_main:
                    save_weights(whole, self.arch, self.run_dir)
        counters = self.data.counters()
        if ctx.world_size > 1:
            keys = sorted(counters)
            summed = ctx.all_reduce_sum(torch.tensor([counters[k] for k in keys], dtype=torch.float64, device=ctx.device))
            counters = {k: int(v) for k, v in zip(keys, summed.tolist())}
        summary = {
            "steps": cfg.run.steps,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": self.tokens_seen / max(self.train_seconds, 1e-9),
            "final_train_loss": self.last_record.get("loss"),
            "eval_nelbo": eval_nelbo,
            "unigram_entropy": self.data.unigram_cross_entropy(cfg.run.eval_batches * cfg.run.micro_batch_size),
            "wall_time_s": time.perf_counter() - self.started,
            "params": self.info["params"],
            "non_embedding_params": self.info["non_embedding_params"],
            "flops_per_token": self.info["flops_per_token"],
            "device": str(ctx.device),
            "world_size": ctx.world_size,
            "engine": cfg.engine.kind,
            "eval_rows": self.data.num_eval_rows,
            "data": counters,
        }
        if ctx.is_main:
            _write_json_atomic(self.run_dir / "summary.json", summary)
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png", summary["unigram_entropy"])
        for hook in self.hooks:
            hook.on_train_end(summary)
        return summary


def _global_normalizers(
    noised: Sequence[NoisedBatch], ctx: DistContext, stop_requested: bool = False
) -> tuple[float | torch.Tensor, bool]:
    """The step's diffusion normaliser over all micro-batches and ranks (a device tensor, so no host sync, when
    there are several ranks), the length head's global position and row counts (set on each batch's
    targets), and whether any rank was asked to stop after this step. One all-reduce for all four; the stop
    flag is read on the host, one small sync per step of a job, because every rank must decide to save at
    the same step."""
    local = [sum(n.normalizer for n in noised), 0.0, 0.0, float(stop_requested)]
    for n in noised:
        if n.length is not None:
            local[1] += n.length.num_positions(n.input_ids.shape[1])
            local[2] += n.length.num_rows
    if ctx.world_size == 1:
        denominator, positions, rows, stopping = local[0], max(local[1], 1.0), max(local[2], 1.0), stop_requested
    else:
        summed = ctx.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=ctx.device))
        stopping = bool(summed[3].item() > 0)
        summed = summed.float()
        denominator, positions, rows = summed[0], summed[1].clamp(min=1.0), summed[2].clamp(min=1.0)
    for n in noised:
        if n.length is not None:
            n.length.eos_norm, n.length.bucket_norm = positions, rows
    return denominator, stopping


def _to_device(batch: dict[str, torch.Tensor], device: torch.device, doc_attention: bool) -> dict[str, torch.Tensor]:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if not doc_attention:
        out.pop("doc_ids", None)
    return out


def _take(iterator: Any, n: int) -> Any:
    for _, item in zip(range(n), iterator):
        yield item


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
