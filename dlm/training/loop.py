"""The one training loop: build, train, evaluate, write the run directory, close in ``finally``.

It delegates everything that varies: the engine owns backward and the optimizer, the objective owns
masking and the loss, :mod:`dlm.data_streams` owns batches, :class:`~dlm.training.metrics.Metrics` owns logging.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.config import RunConfig, dump_resolved
from dlm.data_streams import check_vocab, load_pretrain_data, load_tokenizer, resolve_files
from dlm.modeling import build_model, model_info
from dlm.training.engine import build_engine, resolve_device
from dlm.training.evaluate import evaluate_nelbo
from dlm.training.metrics import Metrics
from dlm.training.objective import T_BUCKETS, diffusion_loss, forward_process, mask_generator
from dlm.training.report import plot_loss_curve, save_weights


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so model init and data order repeat exactly on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train as configured and return the summary that is also written to ``summary.json``."""
    started = time.perf_counter()
    device = resolve_device(cfg.run.device)
    tokenizer = load_tokenizer(cfg.tokenizer.name_or_path, cfg.tokenizer.mask_token)
    arch = cfg.model.resolve()
    check_vocab(tokenizer, arch.vocab_size)
    resolve_files(cfg.data.paths)  # fail on a bad path before the run directory exists

    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_resolved(cfg, run_dir)
    seed_everything(cfg.run.seed)

    data = load_pretrain_data(
        cfg.data.paths,
        tokenizer,
        cfg.data.seq_len,
        text_column=cfg.data.text_column,
        eval_fraction=cfg.data.eval_fraction,
        max_docs=cfg.data.max_docs,
        show_progress=cfg.logging.progress,
    )
    model = build_model(arch, device)
    engine = build_engine(cfg, model, device)
    info = model_info(arch, cfg.data.seq_len)
    metrics = Metrics(cfg, run_dir, info["flops_per_token"], device)

    def eval_batches() -> Any:
        return _take(data.eval_batches(cfg.run.micro_batch_size), cfg.run.eval_batches)

    def run_eval(step: int) -> float:
        nelbo = evaluate_nelbo(
            engine.model,
            eval_batches(),
            tokenizer.mask_id,
            eps=cfg.objective.eps,
            samples=cfg.run.eval_samples,
            seed=cfg.run.seed,
            device=device,
            autocast=engine.autocast,
            chunk_size=cfg.objective.loss_chunk_size,
        )
        metrics.log_eval(step, {"eval_nelbo": nelbo})
        return nelbo

    batches = data.train_batches(cfg.run.micro_batch_size, cfg.run.seed)
    last: dict[str, Any] = {}
    train_seconds = 0.0
    try:
        for step in range(1, cfg.run.steps + 1):
            step_start = time.perf_counter()
            micro = [_to_device(next(batches), device, cfg.data.doc_attention) for _ in range(cfg.run.grad_accum_steps)]
            data_seconds = time.perf_counter() - step_start
            noised = [
                forward_process(
                    batch["input_ids"],
                    tokenizer.mask_id,
                    mask_generator(cfg.run.seed, step, 0, index),
                    eps=cfg.objective.eps,
                    doc_ids=batch.get("doc_ids"),
                    random_length_prob=cfg.objective.random_length_prob,
                    stratified=cfg.objective.t_sampling == "stratified",
                )
                for index, batch in enumerate(micro)
            ]
            denominator = sum(n.normalizer for n in noised)
            loss = torch.zeros((), device=device)
            bucket_sums = torch.zeros(len(T_BUCKETS), device=device)
            bucket_counts = torch.zeros(len(T_BUCKETS), device=device)
            for n in noised:
                with engine.autocast():
                    parts = diffusion_loss(engine.model, n, cfg.objective.loss_chunk_size)
                engine.backward(parts.loss_sum / denominator)
                loss += parts.loss_sum.detach() / denominator
                bucket_sums += parts.bucket_sums
                bucket_counts += parts.bucket_counts
            lr = engine.lr()
            grad_norm = engine.step()
            tokens = sum(n.num_tokens for n in noised)
            record = metrics.update(step, loss, bucket_sums, bucket_counts, grad_norm, lr, tokens, data_seconds)
            train_seconds += time.perf_counter() - step_start
            if record is not None:
                last = record
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step != cfg.run.steps:
                run_eval(step)
        eval_nelbo = run_eval(cfg.run.steps)
    finally:
        metrics.close()

    if cfg.checkpoint.save_final:
        save_weights(engine.model, arch, run_dir)
    summary = {
        "steps": cfg.run.steps,
        "tokens_seen": metrics.tokens_seen,
        "tokens_per_s": metrics.tokens_seen / max(train_seconds, 1e-9),
        "final_train_loss": last.get("loss"),
        "eval_nelbo": eval_nelbo,
        "unigram_entropy": data.unigram_cross_entropy(),
        "wall_time_s": time.perf_counter() - started,
        "params": info["params"],
        "non_embedding_params": info["non_embedding_params"],
        "flops_per_token": info["flops_per_token"],
        "device": str(device),
        "train_rows": int(data.train_rows.shape[0]),
        "eval_rows": int(data.eval_rows.shape[0]),
    }
    _write_json_atomic(run_dir / "summary.json", summary)
    plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", summary["unigram_entropy"])
    return summary


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
