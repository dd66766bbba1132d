"""What the length benchmark reads: the prompt → answer pairs of its data files, tokenized as training did,
and the one model pass over each prompt that every predictor's budgets are read from.

One forward pass per prompt over ``[prompt, W masks]`` (``W`` the head's ``max_len``, else the largest fixed
canvas) yields the readings of all three predictors (the LM's zero-shot EOS probability, the EOS head, the
bucket head), kept as probabilities, so any quantile ``q`` is cheap afterwards
(:mod:`dlm.evaluation.sweep`) and no q needs another pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from tqdm import tqdm

from dlm.data_streams.sft import SftExample, detect_layout, encode_examples, example_of_row
from dlm.data_streams.sources import file_pieces, iter_piece_rows, piece_columns
from dlm.data_streams.split import eval_threshold
from dlm.errors import DataError, GenerationError
from dlm.evaluation.synthetic import is_synthetic
from dlm.generation import LoadedModel, next_power_of_two
from dlm.generation.rows import RowBatch, pack_rows, run_model
from dlm.modeling.length_head import bucket_edges

Split = Literal["all", "held-out", "train"]
DEFAULT_EVAL_FRACTION = 0.05  # DataSection.eval_fraction's default, for runs whose config does not say
_LM_CHUNK = 128  # canvas positions per LM-head call in the zero-shot reading: [B, 128, V] logits at most


@dataclass(frozen=True)
class EvalExample:
    """One prompt → answer pair, tokenized with the model's template; ``question`` is the raw prompt text."""

    question: str
    prompt_ids: list[int]
    answer_ids: list[int]
    source: str = ""

    @property
    def length(self) -> int:
        """The true answer length in tokens (EOS excluded), at least 1."""
        return max(1, len(self.answer_ids))


@dataclass(frozen=True)
class EvalData:
    """The examples of one data file and how they were read."""

    examples: list[EvalExample]
    layout: str
    template: str
    synthetic: bool
    notes: list[str]


def _run_eval_fraction(directory: Path) -> float | None:
    """``data.eval_fraction`` of the run beside the weights (or one level up, for a checkpoint), if any."""
    for path in (directory / "config.yaml", directory.parent / "config.yaml"):
        if path.is_file():
            data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
            value = data.get("eval_fraction")
            return float(value) if value is not None else None
    return None


def _question(example: SftExample) -> str:
    """The prompt text a checker reads: the prompt, or the last turn before the answer of a conversation."""
    return example.messages[-2][1] if example.messages else example.prompt


def read_examples(
    data: str | Path,
    loaded: LoadedModel,
    *,
    template: str | None = None,
    split: Split = "all",
    eval_fraction: float | None = None,
    limit: int | None = None,
) -> EvalData:
    """Read an alpaca json / gsm8k jsonl / messages file with the SFT reader and tokenize it as training did.

    ``template`` defaults to the run's SFT template (``plain`` for a pretraining run, whose prompts have no
    template: plain adds only the blank line between prompt and answer). ``split`` keeps the examples the
    training run held out (``held-out``) or trained on (``train``), by the same content hash and
    ``eval_fraction`` (default: the run's ``data.eval_fraction``); ``limit`` keeps the first ``limit`` after that.
    """
    path = Path(data)
    if not path.is_file():
        raise DataError(f"data file {data} does not exist (cwd {Path.cwd()}); pass an alpaca .json or a gsm8k-style "
                        ".jsonl file with --data")
    notes: list[str] = []
    chosen = template or ("plain" if loaded.template == "raw" else loaded.template)
    if loaded.template == "raw" and template is None:
        notes.append("the model is a pretraining run: prompts use the plain template (prompt + blank line)")
    piece = file_pieces([path])[0]
    layout, columns = detect_layout(piece_columns(piece), piece.name)
    threshold = None
    if split != "all":
        fraction = eval_fraction or _run_eval_fraction(loaded.directory) or DEFAULT_EVAL_FRACTION
        threshold = eval_threshold(fraction)
        notes.append(f"{split} split at eval_fraction {fraction:g} (the training run's content-hash split)")
    kept: list[SftExample] = []
    for row in iter_piece_rows(piece, columns, fix="every row of an SFT file needs the same columns"):
        example = example_of_row(row, layout, piece.name)
        if example is None:
            continue
        if threshold is not None and (example.split_hash() < threshold) != (split == "held-out"):
            continue
        kept.append(example)
        if limit is not None and len(kept) >= limit:
            break
    if not kept:
        where = f" in the {split} split" if split != "all" else ""
        raise DataError(f"{data} holds no usable examples{where} (blank prompts or answers are skipped); check the "
                        "file, --split and --eval-fraction")
    pairs = encode_examples(loaded.tokenizer, kept, chosen)
    examples = [EvalExample(_question(e), p.tolist(), a.tolist(), path.name) for e, (p, a) in zip(kept, pairs)]
    synthetic = layout == "qa" and all(is_synthetic(e.question) for e in examples)
    return EvalData(examples, layout, chosen, synthetic, notes)


def read_all(
    data: str | Path | Sequence[str | Path], loaded: LoadedModel, *, template: str | None, split: Split,
    eval_fraction: float | None, limit: int | None,
) -> EvalData:
    """:func:`read_examples` over one file or several (an SFT mix: each file its own layout), concatenated;
    ``limit`` applies to each file."""
    files = [data] if isinstance(data, (str, Path)) else list(data)
    if not files:
        raise DataError("no data file given; pass --data FILE (repeat it for several files)")
    parts = [read_examples(f, loaded, template=template, split=split, eval_fraction=eval_fraction, limit=limit)
             for f in files]
    if len({Path(f).name for f in files}) < len(files):  # same file name in two folders: label by path
        parts = [replace(p, examples=[replace(e, source=str(f)) for e in p.examples]) for f, p in zip(files, parts)]
    notes = list(dict.fromkeys(n for p in parts for n in p.notes))
    if len(parts) > 1:
        notes.append("examples per file: " + ", ".join(f"{Path(f).name} {len(p.examples)}" for f, p in zip(files, parts)))
    return EvalData([e for p in parts for e in p.examples], "+".join(dict.fromkeys(p.layout for p in parts)),
                    parts[0].template, all(p.synthetic for p in parts), notes)


def source_groups(examples: Sequence[EvalExample]) -> dict[str, list[int]]:
    """Indices of each data file's examples, in file order."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.source, []).append(i)
    return groups


@dataclass
class Readings:
    """What one pass over ``[prompt, width masks]`` says about every example, as probabilities.

    ``zero_shot [N, W]``: the LM's EOS probability per canvas position; ``eos_head [N, W]``: the EOS head's
    past-the-end probability; ``bucket [N, K]``: the bucket head's distribution (None without a head).
    ``backbone_seconds`` / ``lm_seconds``: wall time of the backbone + heads and of the zero-shot LM-head
    reading, kept apart so each method is charged for what it needs. A head read from the prompt alone
    (``length_head.prediction_pass: prompt``) has its bucket readings from a second pass over the prompts only:
    ``bucket_width`` is that pass's canvas (0; else ``width``) and ``bucket_seconds`` its wall time.
    """

    width: int
    zero_shot: np.ndarray
    eos_head: np.ndarray | None
    bucket: np.ndarray | None
    edges: list[int]
    min_budget: int
    backbone_seconds: float = 0.0
    lm_seconds: float = 0.0
    bucket_width: int | None = None
    bucket_seconds: float | None = None

    @property
    def bucket_pass(self) -> tuple[int, float]:
        """The canvas width and wall time of the pass the bucket head was read from."""
        if self.bucket_width is None or self.bucket_seconds is None:
            return self.width, self.backbone_seconds
        return self.bucket_width, self.bucket_seconds

    def subset(self, index: Sequence[int]) -> Readings:
        """The readings of the examples at ``index`` only (timings kept whole: they belong to the pass)."""
        rows = np.asarray(index, dtype=np.int64)
        eos_head = None if self.eos_head is None else self.eos_head[rows]
        bucket = None if self.bucket is None else self.bucket[rows]
        return replace(self, zero_shot=self.zero_shot[rows], eos_head=eos_head, bucket=bucket)


@torch.no_grad()
def _eos_probability(model: Any, canvas_hidden: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``P(token = EOS)`` per canvas position ``[B, W]``, the LM head run over chunks of positions so the
    ``[B, W, V]`` logits never exist at once."""
    parts = []
    for start in range(0, canvas_hidden.shape[1], _LM_CHUNK):
        logits = model.logits(canvas_hidden[:, start : start + _LM_CHUNK]).float()
        parts.append((logits[..., eos_id] - torch.logsumexp(logits, dim=-1)).exp())
    return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class PassBatch:
    """One batch of the prediction pass: the examples at ``index`` as left-padded ``rows`` and the
    backbone's final ``hidden`` states ``[B, prompt_width + W, d]`` (canvas from column ``rows.prompt_width``)."""

    index: list[int]
    rows: RowBatch
    hidden: torch.Tensor
    seconds: float


@torch.no_grad()
def prediction_pass(
    loaded: LoadedModel, examples: Sequence[EvalExample], width: int, *, batch_size: int = 8, progress: bool = True,
    desc: str = "length readings",
) -> Iterator[PassBatch]:
    """The backbone over ``[prompt, width masks]`` for every example, the state generation starts in (batches
    of ``batch_size``, similar prompt lengths together). The length benchmark reads its predictors from it;
    :mod:`dlm.training.head_fit` fits the head on it, so both see exactly what inference sees."""
    model = loaded.model
    cfg = model.cfg
    longest = max(len(e.prompt_ids) for e in examples) + width
    if cfg.positions == "learned" and longest > cfg.max_seq_len:
        raise GenerationError(f"prompt + canvas reaches {longest} tokens but this model's learned positions stop at "
                              f"{cfg.max_seq_len}; use --limit on shorter prompts or smaller --fixed canvases")
    device = next(model.parameters()).device
    mask_id = loaded.tokenizer.mask_id
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    bar = tqdm(total=len(examples), desc=desc, unit="prompt", disable=not progress)
    for start in range(0, len(examples), batch_size):
        idx = order[start : start + batch_size]
        prompts = [torch.tensor(examples[i].prompt_ids, dtype=torch.long, device=device) for i in idx]
        canvases = [torch.full((width,), mask_id, dtype=torch.long, device=device)] * len(idx)
        rows = pack_rows(prompts, canvases, loaded.tokenizer.pad_id)
        t0 = time.perf_counter()
        hidden = run_model(model, rows)
        yield PassBatch(idx, rows, hidden, time.perf_counter() - t0)
        bar.update(len(idx))
    bar.close()


@torch.no_grad()
def read_lengths(
    loaded: LoadedModel, examples: Sequence[EvalExample], width: int, *, batch_size: int = 8, progress: bool = True
) -> Readings:
    """Every predictor's readings from :func:`prediction_pass`, as probabilities; a head read from the prompt
    alone has its bucket readings from a second, prompt-only pass (the EOS head keeps the canvas pass)."""
    model = loaded.model
    head = model.length_head
    n = len(examples)
    zero_shot = np.zeros((n, width), dtype=np.float32)
    eos_head = np.zeros((n, width), dtype=np.float32) if head is not None else None
    edges = head.cfg.edges if head is not None else bucket_edges(16, max(16, next_power_of_two(width)))
    bucket = np.zeros((n, len(edges)), dtype=np.float32) if head is not None else None
    backbone_s = lm_s = 0.0
    for batch in prediction_pass(loaded, examples, width, batch_size=batch_size, progress=progress):
        idx, rows, hidden = batch.index, batch.rows, batch.hidden
        t0 = time.perf_counter()
        if head is not None:
            out = head(hidden, rows.prompt_mask)
            assert eos_head is not None and bucket is not None
            eos_head[idx] = out.eos_probs()[:, rows.prompt_width :].cpu().numpy()
            bucket[idx] = out.bucket_probs().cpu().numpy()
        t1 = time.perf_counter()
        # a shift model (objective.shift) predicts position i from the state at i - 1, as canvas_logits reads it
        lo = rows.prompt_width - 1 if loaded.shift else rows.prompt_width
        zero_shot[idx] = _eos_probability(model, hidden[:, lo : lo + width], loaded.tokenizer.eos_id).cpu().numpy()
        t2 = time.perf_counter()
        backbone_s += batch.seconds + t1 - t0
        lm_s += t2 - t1
    min_budget = head.cfg.min_bucket if head is not None else 16
    readings = Readings(width, zero_shot, eos_head, bucket, edges, min(min_budget, width), backbone_s, lm_s)
    if head is not None and head.cfg.prediction_width == 0:
        assert bucket is not None
        readings.bucket_width, readings.bucket_seconds = 0, 0.0
        for batch in prediction_pass(loaded, examples, 0, batch_size=batch_size, progress=progress,
                                     desc="length readings, prompt only"):
            t0 = time.perf_counter()
            bucket[batch.index] = head(batch.hidden, batch.rows.prompt_mask).bucket_probs().cpu().numpy()
            readings.bucket_seconds += batch.seconds + time.perf_counter() - t0
    return readings
