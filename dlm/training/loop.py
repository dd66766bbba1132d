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
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.config import RunConfig, dump_resolved
from dlm.data_streams import build_pretrain_stream, check_vocab, load_tokenizer, validate_data_source
from dlm.errors import ConfigError, TrainingStopped
from dlm.kernels import anneal_ratio
from dlm.modeling import model_info
from dlm.modeling.manifest import checksum_part, manifest_files
from dlm.training.checkpoint import (
    Checkpointer,
    is_disk_full,
    rng_state,
    set_rng_state,
    step_dir_name,
    verify_checkpoint,
)
from dlm.training.distributed import DistContext, init_distributed
from dlm.training.engine import build_engine, build_training_model, resolve_device
from dlm.training.curriculum import Curriculum
from dlm.training.evaluate import evaluate_nelbo
from dlm.training.hooks import StepInfo, TrainHook
from dlm.training.metrics import Metrics
from dlm.training.objective import LENGTH_STATS, T_BUCKETS, NoisedBatch, mask_generator, noise_batch
from dlm.training.preemption import StopRequest
from dlm.training.report import plot_loss_curve, save_weights


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so model init and data order repeat exactly on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: RunConfig, hooks: Sequence[TrainHook] = ()) -> dict[str, Any]:
    """Train as configured and return the summary that is also written to ``summary.json``."""
    ctx = init_distributed(resolve_device(cfg.run.device), require_group=cfg.engine.kind == "deepspeed")
    try:
        summary = _train(cfg, ctx, hooks)
        ctx.barrier()  # no rank tears the group down while another still uses it
        return summary
    finally:
        ctx.close()


def _train(cfg: RunConfig, ctx: DistContext, hooks: Sequence[TrainHook]) -> dict[str, Any]:
    started = time.perf_counter()
    device = ctx.device
    if ctx.world_size != cfg.launcher.workers:
        raise ConfigError(
            f"config error: launcher.workers = {cfg.launcher.workers} but this job has {ctx.world_size} rank(s); "
            f"the batch sizes were checked for {cfg.launcher.workers}: use dlm launch --workers "
            f"{cfg.launcher.workers}, or set launcher.workers={ctx.world_size}"
        )
    tokenizer = load_tokenizer(cfg.tokenizer.name_or_path, cfg.tokenizer.mask_token)
    arch = cfg.model.resolve()
    check_vocab(tokenizer, arch.vocab_size)
    validate_data_source(cfg.data, tokenizer)  # fail on a bad path, hub name or shards before the run dir exists
    if not cfg.checkpoint.resume:  # a resumed run reads its own checkpoint, not init_from
        cfg.model.check_init_from()

    run_dir = Path(cfg.run.dir)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep_last)
    resolved = cfg.resolved()
    # Before anything is written: a refused resume leaves the run directory as it was, config.yaml included.
    resume_path = _select_resume(cfg, checkpointer, resolved, ctx)
    run_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        dump_resolved(cfg, run_dir)
    seed_everything(cfg.run.seed)

    data = build_pretrain_stream(
        cfg.data, tokenizer, seed=cfg.run.seed, micro_batch_size=cfg.run.micro_batch_size, rank=ctx.rank,
        world_size=ctx.world_size,
    )
    unigram = data.unigram_log_probs() if cfg.model.output_bias_init == "unigram" else None
    engine = build_engine(cfg, build_training_model(cfg, device, ctx.world_size, unigram), device)
    info = model_info(arch, cfg.data.seq_len)
    resumed = _resume(resume_path, engine, data, ctx)
    start_step = resumed.get("step", 0)
    # Tokens are counted over all ranks, so FLOPs per token / world size makes TFLOP/s and MFU per device.
    metrics = (
        Metrics(cfg, run_dir, info["flops_per_token"] / ctx.world_size, device, start_step=start_step)
        if ctx.is_main
        else None
    )
    tokens_seen = int(resumed.get("tokens_seen", 0))
    if metrics is not None:
        metrics.tokens_seen = tokens_seen

    def eval_batches() -> Any:
        return _take(data.eval_batches(cfg.run.micro_batch_size), cfg.run.eval_batches)

    def run_eval(step: int) -> float:
        """Every rank evaluates the same held-out rows (ZeRO-3 needs all of them in each forward)."""
        nelbo = evaluate_nelbo(
            engine.model,
            eval_batches(),
            tokenizer.mask_id,
            eps=cfg.objective.eps,
            samples=cfg.run.eval_samples,
            estimator=cfg.run.eval_estimator,
            max_scored_per_row=cfg.run.eval_max_scored_per_row,
            seed=cfg.run.seed,
            device=device,
            autocast=engine.autocast,
            chunk_size=cfg.objective.loss_chunk_size,
            loss_fn=engine.loss,
            sft=cfg.objective.kind == "sft",
            shift=cfg.objective.shift,
        )
        if metrics is not None:
            metrics.log_eval(step, {"eval_nelbo": nelbo})
        return nelbo

    curriculum = Curriculum.from_config(cfg)
    train_length_head = cfg.objective.length_loss_weight > 0
    batches = iter(data)
    last: dict[str, Any] = {}
    train_seconds = float(resumed.get("train_seconds", 0.0))
    stop = StopRequest(cfg.checkpoint.on_signal).__enter__()  # left in the finally below
    try:
        for step in range(start_step + 1, cfg.run.steps + 1):
            step_start = time.perf_counter()
            schedule = curriculum.state(step)
            data.set_seq_len(schedule["seq_len"])
            micro = [_to_device(next(batches), device, cfg.data.doc_attention) for _ in range(cfg.run.grad_accum_steps)]
            data_seconds = time.perf_counter() - step_start
            # Masks are keyed by the micro-batch's slot in the global batch (rank-major), like the data stream's
            # consumers: 2 ranks x 1 micro-batch draw exactly what 1 rank x 2 accumulated micro-batches draw.
            noised = [
                noise_batch(
                    batch,
                    cfg.objective,
                    tokenizer.mask_id,
                    mask_generator(cfg.run.seed, step, 0, ctx.rank * cfg.run.grad_accum_steps + index),
                    train_length_head=train_length_head,
                    pad_share=schedule["pad_share"],
                    attention_ratio=anneal_ratio(step, cfg.objective.attention_annealing_steps),
                )
                for index, batch in enumerate(micro)
            ]
            denominator, stopping = _global_normalizers(noised, ctx, stop.requested)
            loss = torch.zeros((), device=device)
            bucket_sums = torch.zeros(len(T_BUCKETS), device=device)
            bucket_counts = torch.zeros(len(T_BUCKETS), device=device)
            length_stats = torch.zeros(len(LENGTH_STATS), device=device) if train_length_head else None
            for n in noised:
                with engine.autocast():
                    parts = engine.loss(n, cfg.objective.loss_chunk_size)
                engine.backward(parts.objective(denominator))
                loss += parts.loss_sum.detach() / denominator
                bucket_sums += parts.bucket_sums
                bucket_counts += parts.bucket_counts
                if length_stats is not None and parts.length_stats is not None:
                    length_stats += parts.length_stats
            lr = engine.lr()
            grad_norm = engine.step()
            tokens = sum(n.num_tokens for n in noised)
            if ctx.world_size > 1:
                loss, bucket_sums, bucket_counts, tokens, length_stats = _sum_over_ranks(
                    ctx, loss, bucket_sums, bucket_counts, tokens, length_stats
                )
            tokens_seen += tokens
            record = None
            if metrics is not None:
                record = metrics.update(step, loss, bucket_sums, bucket_counts, grad_norm, lr, tokens, data_seconds,
                                        length_stats=length_stats, gauges=schedule)
            train_seconds += time.perf_counter() - step_start
            if record is not None:
                last = record
            if hooks:
                done = StepInfo(step=step, rank=ctx.rank, world_size=ctx.world_size, loss=loss.detach(), batches=micro,
                                record=record, model=engine.model)
                for hook in hooks:
                    hook.on_step_end(done)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step != cfg.run.steps:
                run_eval(step)
            if stopping or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
                client_state = {
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "train_seconds": train_seconds,
                    "data": data.state_dict(),
                    "rng": rng_state(),
                    "curriculum": schedule,
                }
                saved = _save_checkpoint(ctx, checkpointer, step, engine, client_state, resolved)
                for hook in hooks:
                    hook.on_checkpoint(step, saved, ctx.is_main)
            if stopping:
                name = signal.Signals(stop.signum).name if stop.signum else "a stop signal on another rank"
                raise TrainingStopped(
                    f"stopped by {name} after step {step} of {cfg.run.steps}; its checkpoint is {saved}: "
                    f"continue with --resume auto (or checkpoint.resume=auto)",
                    stop.signum or signal.SIGTERM,
                )
        eval_nelbo = run_eval(cfg.run.steps)
    finally:
        stop.__exit__()
        if metrics is not None:
            metrics.close()
        data.close()

    if cfg.checkpoint.save_final:
        with engine.gathered_model() as whole:  # ZeRO-3: a collective, every rank enters
            if ctx.is_main:
                save_weights(whole, arch, run_dir)
    counters = data.counters()
    if ctx.world_size > 1:
        keys = sorted(counters)
        summed = ctx.all_reduce_sum(torch.tensor([counters[k] for k in keys], dtype=torch.float64, device=device))
        counters = {k: int(v) for k, v in zip(keys, summed.tolist())}
    summary = {
        "steps": cfg.run.steps,
        "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
        "final_train_loss": last.get("loss"),
        "eval_nelbo": eval_nelbo,
        "unigram_entropy": data.unigram_cross_entropy(cfg.run.eval_batches * cfg.run.micro_batch_size),
        "wall_time_s": time.perf_counter() - started,
        "params": info["params"],
        "non_embedding_params": info["non_embedding_params"],
        "flops_per_token": info["flops_per_token"],
        "device": str(device),
        "world_size": ctx.world_size,
        "engine": cfg.engine.kind,
        "eval_rows": data.num_eval_rows,
        "data": counters,
    }
    if ctx.is_main:
        _write_json_atomic(run_dir / "summary.json", summary)
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", summary["unigram_entropy"])
    for hook in hooks:
        hook.on_train_end(summary)
    return summary


def _global_normalizers(
    noised: Sequence[NoisedBatch], ctx: DistContext, stop_requested: bool = False
) -> tuple[float | torch.Tensor, bool]:
    """The step's diffusion normaliser over all micro-batches and ranks (a device tensor, so no host sync, when
    there are several ranks), the length head's global position and row counts (set on each batch's
    targets), and whether any rank was asked to stop after this step. One all-reduce for all four; only a
    stop request read on the host costs a sync, and only when a rank has been signalled or at every step of a
    job (the flag must be agreed on before any rank decides to save)."""
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


def _sum_over_ranks(
    ctx: DistContext, loss: torch.Tensor, bucket_sums: torch.Tensor, bucket_counts: torch.Tensor, tokens: int,
    length_stats: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """One all-reduce for everything logged: each rank's loss is already its share of the global mean."""
    n = bucket_sums.numel()
    extra = length_stats if length_stats is not None else torch.zeros(0, device=ctx.device)
    packed = torch.cat(
        [loss.reshape(1), bucket_sums, bucket_counts, extra, torch.tensor([float(tokens)], device=ctx.device)]
    ).double()
    packed = ctx.all_reduce_sum(packed)
    summed_extra = packed[1 + 2 * n : -1].float() if length_stats is not None else None
    return (packed[0].float(), packed[1 : 1 + n].float(), packed[1 + n : 1 + 2 * n].float(), int(packed[-1].item()),
            summed_extra)


def _save_checkpoint(
    ctx: DistContext, checkpointer: Checkpointer, step: int, engine: Any, client_state: dict[str, Any],
    resolved: dict[str, Any],
) -> Path:
    """One complete checkpoint written by every rank (engine partitions, per-rank client state), checksummed
    by all ranks in stripes and committed by rank 0; the directory must be shared by all ranks' nodes.

    Each phase ends with every rank learning whether any rank failed, so a failure on one rank (a full disk)
    stops all of them with the same error instead of leaving the others in a barrier.
    """
    if ctx.world_size == 1:
        return checkpointer.save(step, engine, client_state, resolved)
    tmp = checkpointer.root / f"{step_dir_name(step)}.tmp"

    def write() -> None:
        engine.save_checkpoint(tmp / "engine")
        Checkpointer.write_client_state(tmp, ctx.rank, client_state)

    _on_every_rank(ctx, checkpointer, tmp, step, lambda: checkpointer.begin(step) if ctx.is_main else None)
    _on_every_rank(ctx, checkpointer, tmp, step, write)
    names = ctx.all_gather_object(manifest_files(tmp) if ctx.is_main else None)[0]
    stripes = ctx.all_gather_object(
        _on_every_rank(ctx, checkpointer, tmp, step, lambda: checksum_part(tmp, names, (ctx.rank, ctx.world_size)))
    )
    checksums = {name: entry for stripe in stripes for name, entry in stripe.items()}
    _on_every_rank(
        ctx, checkpointer, tmp, step, lambda: checkpointer.commit(tmp, step, resolved, checksums) if ctx.is_main else None
    )
    return checkpointer.root / step_dir_name(step)


def _on_every_rank(ctx: DistContext, checkpointer: Checkpointer, tmp: Path, step: int, action: Any) -> Any:
    """Run one phase of a save on this rank, then agree with the others on whether every rank succeeded.

    On any failure rank 0 removes the half-written directory and every rank raises: a full disk anywhere as
    the one-line :class:`~dlm.training.checkpoint.CheckpointError`, otherwise the failing rank its own error
    and the others an error naming it.
    """
    error: BaseException | None = None
    result = None
    try:
        result = action()
    except Exception as exc:
        error = exc
    report = None if error is None else (is_disk_full(error, checkpointer.root), f"{type(error).__name__}: {error}")
    failures = [(rank, r) for rank, r in enumerate(ctx.all_gather_object(report)) if r is not None]
    if not failures:
        return result
    if ctx.is_main:
        checkpointer.abort(tmp)
    if any(full for _, (full, _) in failures):
        raise checkpointer.disk_full_error(step) from None
    if error is not None:
        raise error
    rank, (_, message) = failures[0]
    raise RuntimeError(f"rank {rank} failed while saving the checkpoint of step {step}: {message}")


def _select_resume(
    cfg: RunConfig, checkpointer: Checkpointer, resolved: dict[str, Any], ctx: DistContext
) -> Path | None:
    """The checkpoint ``checkpoint.resume`` names, intact and fitting this config; None for a fresh run.

    Every rank checks its stripe of the checkpoint's manifest and they share their findings, so all ranks
    choose the same checkpoint (``auto`` skips a damaged one for the one before it) and only rank 0 warns.
    """
    if not cfg.checkpoint.resume:
        return None

    def problems(path: Path) -> list[str]:
        found = verify_checkpoint(path, (ctx.rank, ctx.world_size))
        return [p for part in ctx.all_gather_object(found) for p in part]

    path = checkpointer.select(cfg.checkpoint.resume, problems, warn=None if ctx.is_main else lambda line: None)
    if path is not None:
        Checkpointer.check_compatible(path, resolved)
        if ctx.is_main and checkpointer.foreign:
            steps = ", ".join(step_dir_name(s) for s in sorted(checkpointer.foreign))
            print(
                f"dlm: note: {steps} are newer than {path.name} and belong to the run it branched from; they are "
                f"kept (never pruned) until a save of the same step replaces them",
                file=sys.stderr,
                flush=True,
            )
    return path


def _resume(path: Path | None, engine: Any, data: Any, ctx: DistContext) -> dict[str, Any]:
    """Restore engine, data position and RNGs from the checkpoint at ``path``; the client state, or {} for a
    fresh run.

    The mask draw needs no state (it is a function of seed and step), so restoring these is all it takes
    for the resumed run to repeat the uninterrupted one bit for bit. Every rank restores its own data
    position and RNGs (``client_rank{r}.pt``); the engine load is collective.
    """
    if path is None:
        return {}
    engine.load_checkpoint(path / "engine")
    client = Checkpointer.read_client_state(path, ctx.rank)
    data.load_state_dict(client["data"])
    set_rng_state(client["rng"])
    if ctx.is_main:
        print(f"resumed from {path} at step {client['step']}", flush=True)
    return client


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
