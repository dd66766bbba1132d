"""Fit the length head on a frozen backbone: ``dlm fit-head``.

Joint training gives the length head few examples: a share of each step's rows (``objective.length_rows``),
so a short SFT run on a big base ends with a head that has seen a fraction of an epoch while the backbone
is already good (measured on SmolLM2-135M: 480 length rows in 240 steps, bucket accuracy 34%, its training
loss still falling). The head is small and reads only the backbone's final states, so once the backbone is
frozen it can be fitted to convergence cheaply: one forward pass per training example in the state
generation starts in (``[prompt, W masks]``, exactly :func:`dlm.evaluation.readings.prediction_pass`, the
pass the length benchmark and the sampler's budget prediction read), the states cached
(:mod:`dlm.training.state_cache`: shards on disk, read memory-mapped, so the cache may outgrow memory), then
many epochs over the cache with the joint objective's own loss (:func:`~dlm.modeling.length_head.length_head_terms`).

``prediction_pass = "prompt"`` fits the bucket head on a pass over the prompt alone instead, and the new run's
``length_head.prediction_pass`` says so, so generation and the benchmark read it from that pass too. Without
the ``W`` masked positions a state costs the prompt's tokens only (SmolLM2-135M, 512 canvas: 0.15 s instead
of 1.2 s an example on 2 CPU cores, 180 KB instead of 1.3 MB cached) at the same held-out coverage; the EOS
head has no canvas to read there, so it is not fitted and keeps its trained weights.

Only the training split of the run's data is read (the same content hash and ``data.eval_fraction``), so the
held-out split stays unseen; a share of it (``val_fraction``) decides when to stop and which epoch to keep.
The backbone's tensors are written back bit for bit; only ``length_head.*`` changes.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from dlm.errors import UserError
from dlm.evaluation.readings import EvalExample, prediction_pass, read_all
from dlm.generation import LoadedModel, load_for_generation
from dlm.modeling import LengthHead
from dlm.modeling.hf_io import atomic_directory
from dlm.modeling.length_head import PredictionPass, length_head_terms
from dlm.modeling.manifest import file_checksum
from dlm.training.config import OptimSection
from dlm.training.param_groups import param_groups
from dlm.training.report import plot_head_fit, save_weights
from dlm.training.state_cache import SHARD_EXAMPLES, Features, HeadFeatures, StateCache, example_key

__all__ = [
    "FitResult", "HeadFitError", "cached_features", "check_settings", "extract_features", "fit_head",
    "fit_length_head", "score_head",
]

FIT_RECORD = "head_fit.json"
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "added_tokens.json"}


class HeadFitError(UserError):
    """The head cannot be fitted as asked (no head, bad settings, too few examples)."""


def extract_features(
    loaded: LoadedModel, examples: Sequence[EvalExample], width: int, *, batch_size: int = 8, progress: bool = True,
    desc: str = "backbone states",
) -> HeadFeatures:
    """Run :func:`~dlm.evaluation.readings.prediction_pass` once over ``examples`` and keep the states."""
    d = loaded.model.cfg.d_model
    prompts: list[Tensor] = [torch.empty(0)] * len(examples)
    canvas = torch.empty(len(examples), width, d, dtype=torch.float32)
    if examples:
        for batch in prediction_pass(loaded, examples, width, batch_size=batch_size, progress=progress,
                                     desc=desc):
            hidden = batch.hidden.float().cpu()
            p = batch.rows.prompt_width
            for r, i in enumerate(batch.index):
                n = len(examples[i].prompt_ids)
                prompts[i] = hidden[r, p - n : p].clone()
            canvas[batch.index] = hidden[:, p:]
    lengths = torch.tensor([e.length for e in examples], dtype=torch.long)
    return HeadFeatures(prompts, canvas, lengths, [e.source for e in examples], [example_key(e) for e in examples])


@dataclass
class FitResult:
    """What the fit did: per-epoch losses on the fit and validation examples, the epoch kept and its head."""

    history: list[dict[str, float | None]]  # epoch 0 (the head as given) has no training loss
    best_epoch: dict[str, int]  # per classifier: "eos", "bucket"
    state: dict[str, Tensor] = field(repr=False)
    train_examples: int = 0
    val_examples: int = 0

    def record(self) -> dict[str, Any]:
        """The JSON-able part (no tensors)."""
        out = asdict(self)
        out.pop("state")
        return out


def score_head(head: LengthHead, feats: Features, index: Sequence[int], batch_size: int) -> dict[str, float]:
    """Mean EOS BCE, mean bucket CE, their sum and the bucket accuracy of ``head`` over ``index``."""
    sums = torch.zeros(6)
    with torch.no_grad():
        for start in range(0, len(index), batch_size):
            chunk = list(index[start : start + batch_size])
            out = head.read(*feats.batch(chunk))
            sums += length_head_terms(out, torch.zeros(len(chunk), dtype=torch.long), feats.lengths[chunk]).stats()
    eos, bucket = (sums[0] / sums[2].clamp(min=1)).item(), (sums[3] / sums[5].clamp(min=1)).item()
    return {"eos_bce": eos, "bucket_ce": bucket, "loss": eos + bucket, "bucket_acc": (sums[4] / sums[5]).item()}


# The two classifiers share no parameter, so each keeps the epoch its own validation loss is lowest at: the
# bucket head (a per-row classifier) overfits within a few epochs of a cache of ~1,000 prompts, while the EOS
# head (hundreds of scored positions per row) is still improving (measured on SmolLM2-135M: epoch 4 vs 30+).
_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "eos": ("eos_bce", ("eos.",)),
    "bucket": ("bucket_ce", ("bucket.", "pool_score.")),
}


def check_settings(*, epochs: int = 100, lr: float = 1e-3, batch_size: int = 32, val_fraction: float = 0.1,
                   patience: int = 10, **_: Any) -> None:
    """Refuse fit settings out of range, before any backbone pass is paid for."""
    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0.0 <= val_fraction < 1.0 or patience < 1:
        raise HeadFitError(f"fit settings out of range (epochs {epochs} >= 1, batch size {batch_size} >= 1, lr {lr} "
                           f"> 0, val fraction {val_fraction} in [0, 1), patience {patience} >= 1)")


def fit_length_head(
    head: LengthHead,
    feats: Features,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 32,
    val_fraction: float = 0.1,
    patience: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> FitResult:
    """Fit a copy of ``head`` on ``feats`` with AdamW (decay on matrices only) and the joint objective's
    length loss (mean EOS BCE + mean bucket CE); ``head`` itself is not changed.

    A seeded ``val_fraction`` of the examples is kept out. Each classifier keeps the epoch its own validation
    loss (EOS BCE, bucket CE) is lowest at (epoch 0: the head as given, so a fit never returns a worse
    classifier than it started from), and the fit stops once neither has improved for ``patience`` epochs.
    ``val_fraction = 0`` keeps the last epoch. States without a canvas (a prompt-only pass) fit the bucket head
    alone: the EOS head is returned as given, epoch 0.
    """
    check_settings(epochs=epochs, lr=lr, batch_size=batch_size, val_fraction=val_fraction, patience=patience)
    n = len(feats)
    n_val = math.ceil(val_fraction * n) if val_fraction > 0 else 0
    if n - n_val < 1 or (val_fraction > 0 and n_val < 1):
        raise HeadFitError(f"{n} examples are too few to fit on with val fraction {val_fraction}; read more "
                           "(--limit) or lower --val-fraction")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).tolist()
    val, train = order[:n_val], order[n_val:]
    model = copy.deepcopy(head).float().cpu().train().requires_grad_(True)
    stray = [k for k in model.state_dict() if not k.startswith(tuple(p for _, ps in _PARTS.values() for p in ps))]
    if stray:
        raise RuntimeError(f"length head tensors {stray} belong to no classifier of _PARTS; list them there")
    # states of a prompt-only pass have no canvas: the EOS head is left out of the fit (weight decay included)
    parts = {part: spec for part, spec in _PARTS.items() if part != "eos" or feats.batch(order[:1])[2].shape[1]}
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(tuple(p for _, ps in parts.values() for p in ps)))
    optimizer = torch.optim.AdamW(param_groups(model, OptimSection(lr=lr, weight_decay=weight_decay)), lr=lr)
    watched = val or train
    first = score_head(model, feats, watched, batch_size)
    history: list[dict[str, float | None]] = [
        {"epoch": 0, "train_loss": None, **{f"val_{k}": v for k, v in first.items()}}]
    best = {part: first[metric] for part, (metric, _) in parts.items()}
    best_epoch = dict.fromkeys(_PARTS, 0)
    best_state = copy.deepcopy(model.state_dict())
    bar = tqdm(range(1, epochs + 1), desc="fitting the length head", unit="epoch", disable=not progress)
    for epoch in bar:
        perm = torch.randperm(len(train), generator=gen).tolist()
        total, batches = 0.0, 0
        for start in range(0, len(train), batch_size):
            chunk = [train[i] for i in perm[start : start + batch_size]]
            out = model.read(*feats.batch(chunk))
            terms = length_head_terms(out, torch.zeros(len(chunk), dtype=torch.long), feats.lengths[chunk])
            loss = terms.eos_bce_sum / terms.eos_count.clamp(min=1) + terms.bucket_ce_sum / terms.bucket_count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        scores = score_head(model, feats, watched, batch_size)
        history.append({"epoch": epoch, "train_loss": total / batches, **{f"val_{k}": v for k, v in scores.items()}})
        for part, (metric, prefixes) in parts.items():
            if not val or scores[metric] < best[part]:
                best[part], best_epoch[part] = scores[metric], epoch
                best_state.update({k: v.detach().clone() for k, v in model.state_dict().items()
                                   if k.startswith(prefixes)})
        bar.set_postfix(val_loss=f"{scores['loss']:.4f}", kept=best_epoch)
        if val and epoch - max(best_epoch[part] for part in parts) >= patience:
            break
    bar.close()
    return FitResult(history, best_epoch, best_state, len(train), len(val))


def _fingerprint(loaded: LoadedModel, width: int) -> str:
    """What every cached state depends on: the weights (checksum) and the canvas width."""
    weights = loaded.directory / "model.safetensors"
    return json.dumps({"weights": file_checksum(weights), "width": width}, sort_keys=True)


def cached_features(
    loaded: LoadedModel, examples: Sequence[EvalExample], width: int, cache: Path | None, *, batch_size: int = 8,
    progress: bool = True, shard_examples: int = SHARD_EXAMPLES,
) -> Features:
    """The states of ``examples``. Without ``cache`` they are computed and held in memory; with one (a
    :class:`~dlm.training.state_cache.StateCache` directory) those it holds are read from it, the rest computed
    ``shard_examples`` at a time, each chunk written as a shard before the next starts, then all are read
    on demand from the shards."""
    fingerprint = _fingerprint(loaded, width)
    if cache is None:
        feats = extract_features(loaded, examples, width, batch_size=batch_size, progress=progress)
        feats.fingerprint = fingerprint
        return feats
    store = StateCache(cache, fingerprint)
    keys = [example_key(e) for e in examples]
    missing = list({k: e for k, e in zip(keys, examples) if k not in store}.values())
    chunks = range(0, len(missing), shard_examples)
    for n, start in enumerate(chunks, 1):
        fresh = extract_features(loaded, missing[start : start + shard_examples], width, batch_size=batch_size,
                                 progress=progress, desc=f"backbone states, shard {n}/{len(chunks)}")
        fresh.fingerprint = fingerprint
        store.append(fresh)
    return store.features(keys, [e.source for e in examples])


def _run_files(directory: Path) -> list[Path]:
    """What the fitted run needs besides the weights and the architecture: the run config (beside a run's
    weights or one level up from a checkpoint's) and any tokenizer files beside the weights."""
    files = [p for p in (directory / "config.yaml", directory.parent / "config.yaml") if p.is_file()][:1]
    files += [p for p in directory.iterdir() if p.is_file() and p.name in _TOKENIZER_FILES]
    return files


def fit_head(
    model: str | Path,
    data: Sequence[str],
    out: str | Path,
    *,
    limit: int | None = None,
    cache: str | Path | None = None,
    prediction_pass: PredictionPass | None = None,
    device: str | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    **fit: Any,
) -> dict[str, Any]:
    """``dlm fit-head``: read the training split of ``data`` (the run's content-hash split), cache the frozen
    backbone's states (:func:`cached_features`: an example ``cache`` holds for these weights is not run again),
    fit the head (:func:`fit_length_head`, ``fit`` passes through) and write a new run directory ``out``: the
    source run's config and architecture, the backbone's tensors unchanged, the fitted head, ``head_fit.json``
    and ``head_fit.png``. The backbone runs on ``device``; the fit itself runs on the CPU, where the cache is.
    ``prediction_pass`` (default: the head's own) is the pass the states are read from and the new run's head is
    read from: ``canvas`` or ``prompt`` (the bucket head alone, see the module docstring).
    """
    check_settings(**fit)
    out_dir = Path(out)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise HeadFitError(f"output directory {out_dir} exists and is not empty; choose a new one or pass --overwrite")
    loaded = load_for_generation(model, device=device)
    head = loaded.model.length_head
    if head is None:
        raise HeadFitError(f"{loaded.directory} has no length head to fit; train with model.length_head set "
                           "(e.g. configs/sft-length.yaml)")
    head_cfg = head.cfg.model_copy(update={"prediction_pass": prediction_pass or head.cfg.prediction_pass})
    source = read_all(data, loaded, template=None, split="train", eval_fraction=None, limit=limit)
    width = head_cfg.prediction_width
    t0 = time.perf_counter()
    feats = cached_features(loaded, source.examples, width, Path(cache) if cache else None, batch_size=batch_size,
                            progress=progress)
    t1 = time.perf_counter()
    result = fit_length_head(head, feats, progress=progress, **fit)
    t2 = time.perf_counter()
    head.load_state_dict(result.state)
    record = {
        "source": str(loaded.directory), "data": [str(d) for d in data], "split": "train", "limit": limit,
        "examples": dict(Counter(feats.sources)), "canvas": width, "prediction_pass": head_cfg.prediction_pass,
        "eos_fitted": width > 0, "feature_seconds": round(t1 - t0, 1),
        "fit_seconds": round(t2 - t1, 1), "settings": dict(fit), **result.record(),
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_weights(loaded.model, loaded.model.cfg.model_copy(update={"length_head": head_cfg}), tmp)
        for path in _run_files(loaded.directory):
            shutil.copy2(path, tmp / path.name)
        (tmp / FIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        plot_head_fit(result.history, result.best_epoch, tmp / "head_fit.png")
    return record
