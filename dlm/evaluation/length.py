"""The length benchmark behind ``dlm eval length``: how well does each way of choosing a generation canvas
cover the true answers, how much does it over-allocate, and what does generation with it cost?

Methods, all scored on the same prompt → answer pairs (answer length = its tokens, EOS excluded, as the SFT
rows count it):

- ``fixed:N``: LLaDA's setting, one canvas of ``N`` for every prompt (default 512 and 1024). A canvas that
  would run past the model's ``max_seq_len`` after the prompt is capped there, and the table says so.
- ``zero-shot``: the seed project's baseline. The LM's own EOS probability at every canvas position in the
  state generation starts from (answer region fully masked), read as "this position is past the end" and
  turned into a bound exactly as the EOS head's is (:func:`~dlm.modeling.length_head.predict_eos_bound`).
- ``eos-head`` and ``bucket-head``: dlm's length head, read as :func:`~dlm.generation.predict_budgets` reads
  it (the same pass over ``[prompt, max_len masks]``, the same bounds and power-of-two budgets).
- ``oracle``: the true length rounded up to a power of two; the best any power-of-two budget can do.

One forward pass per prompt over ``[prompt, W masks]`` (``W`` the head's ``max_len``, else the largest fixed
canvas) yields the readings of all three predictors, kept as probabilities, so any quantile ``q`` is cheap: the
coverage-vs-budget curves sweep ``q`` without another pass, and each predictor's best coverage within a target
mean budget / true length (default 2) is searched on a fine grid of ``q``, both on the scored examples and, as
a user who fixes ``q`` in advance would get it, cross-fitted over folds. Over several data files every method
is also scored per file, because a mix's average hides the file the predictors cannot read.

Cost is counted as the sampler counts it: canvas tokens = forward passes × canvas width, summed over a
sample's steps. The *estimate* runs each schedule to its end (no early stop at EOS) and extends a predicted
canvas that has no room for the answer plus its EOS, as the sampler would; predicted methods add their one
prediction pass of ``W`` canvas positions. With ``generate=True`` the sampler really runs every method, and
the report adds the measured canvas and forward tokens, wall time and, on the synthetic task, exact-match
accuracy (:func:`dlm.evaluation.synthetic.check`).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from dlm.evaluation.synthetic import check, is_synthetic
from dlm.generation import (
    LoadedModel,
    block_schedule,
    budget_from_bound,
    extend_budget,
    generate,
    load_for_generation,
    next_power_of_two,
)
from dlm.generation.rows import pack_rows, run_model
from dlm.modeling.length_head import bucket_edges, bucket_of, predict_bucket_bound, predict_eos_bound

Split = Literal["all", "held-out", "train"]
DEFAULT_FIXED: tuple[int, ...] = (512, 1024)
SWEEP_QS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
# the fine grid the operating point at a target mean budget / true length is searched on
FRONTIER_QS: tuple[float, ...] = (*(k / 100 for k in range(1, 100)), 0.995, 0.999, 1.0)
DEFAULT_TARGET_RATIO = 2.0
CROSS_FIT_FOLDS = 5
PREDICTORS: tuple[str, ...] = ("zero-shot", "eos-head", "bucket-head")
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


# ================================================================================ readings and budgets


@dataclass
class Readings:
    """What one pass over ``[prompt, width masks]`` says about every example, as probabilities.

    ``zero_shot [N, W]``: the LM's EOS probability per canvas position; ``eos_head [N, W]``: the EOS head's
    past-the-end probability; ``bucket [N, K]``: the bucket head's distribution (None without a head).
    ``backbone_seconds`` / ``lm_seconds``: wall time of the backbone + heads and of the zero-shot LM-head
    reading, kept apart so each method is charged for what it needs.
    """

    width: int
    zero_shot: np.ndarray
    eos_head: np.ndarray | None
    bucket: np.ndarray | None
    edges: list[int]
    min_budget: int
    backbone_seconds: float = 0.0
    lm_seconds: float = 0.0

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


@torch.no_grad()
def read_lengths(
    loaded: LoadedModel, examples: Sequence[EvalExample], width: int, *, batch_size: int = 8, progress: bool = True
) -> Readings:
    """Run the prediction pass over every example (batches of ``batch_size``, similar prompt lengths together)."""
    model = loaded.model
    head = model.length_head
    tok = loaded.tokenizer
    cfg = model.cfg
    longest = max(len(e.prompt_ids) for e in examples) + width
    if cfg.positions == "learned" and longest > cfg.max_seq_len:
        raise GenerationError(f"prompt + canvas reaches {longest} tokens but this model's learned positions stop at "
                              f"{cfg.max_seq_len}; use --limit on shorter prompts or smaller --fixed canvases")
    device = next(model.parameters()).device
    n = len(examples)
    zero_shot = np.zeros((n, width), dtype=np.float32)
    eos_head = np.zeros((n, width), dtype=np.float32) if head is not None else None
    edges = head.cfg.edges if head is not None else bucket_edges(16, max(16, next_power_of_two(width)))
    bucket = np.zeros((n, len(edges)), dtype=np.float32) if head is not None else None
    order = sorted(range(n), key=lambda i: len(examples[i].prompt_ids))
    backbone_s = lm_s = 0.0
    bar = tqdm(total=n, desc="length readings", unit="prompt", disable=not progress)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        prompts = [torch.tensor(examples[i].prompt_ids, dtype=torch.long, device=device) for i in idx]
        canvases = [torch.full((width,), tok.mask_id, dtype=torch.long, device=device)] * len(idx)
        rows = pack_rows(prompts, canvases, tok.pad_id)
        t0 = time.perf_counter()
        hidden = run_model(model, rows)
        if head is not None:
            out = head(hidden, rows.prompt_mask)
            assert eos_head is not None and bucket is not None
            eos_head[idx] = out.eos_probs()[:, rows.prompt_width :].cpu().numpy()
            bucket[idx] = out.bucket_probs().cpu().numpy()
        t1 = time.perf_counter()
        # a shift model (objective.shift) predicts position i from the state at i - 1, as canvas_logits reads it
        lo = rows.prompt_width - 1 if loaded.shift else rows.prompt_width
        zero_shot[idx] = _eos_probability(model, hidden[:, lo : lo + width], tok.eos_id).cpu().numpy()
        t2 = time.perf_counter()
        backbone_s += t1 - t0
        lm_s += t2 - t1
        bar.update(len(idx))
    bar.close()
    min_budget = head.cfg.min_bucket if head is not None else 16
    return Readings(width, zero_shot, eos_head, bucket, edges, min(min_budget, width), backbone_s, lm_s)


def predicted_budgets(readings: Readings, method: str, q: float) -> tuple[list[int], list[int]]:
    """(bounds, budgets) of predictor ``method`` at quantile ``q``, exactly as ``predict_budgets`` makes them."""
    if method == "bucket-head":
        if readings.bucket is None:
            raise GenerationError("bucket-head needs a model with a length head")
        index = predict_bucket_bound(torch.from_numpy(readings.bucket), q).tolist()
        bounds = [readings.edges[k] for k in index]
    else:
        probs = readings.zero_shot if method == "zero-shot" else readings.eos_head
        if probs is None:
            raise GenerationError("eos-head needs a model with a length head")
        start = torch.zeros(probs.shape[0], dtype=torch.long)
        bounds = predict_eos_bound(torch.from_numpy(probs), start, q).tolist()
    return bounds, [budget_from_bound(b, readings.min_budget, readings.width) for b in bounds]


# ================================================================================ cost


def first_steps(budget: int, steps_per_token: float) -> int | None:
    """The ``steps`` the sampler gets for a first canvas of ``budget`` (None: its default, one per position)."""
    return None if steps_per_token == 1.0 else max(1, round(steps_per_token * budget))


def schedule_cost(
    budget: int,
    true_length: int,
    *,
    steps_per_token: float = 1.0,
    extend: bool,
    max_length: int,
    block_length: int | None = None,
) -> tuple[int, int, int]:
    """(steps, canvas tokens, final canvas) of one sample if every schedule runs to its end.

    Mirrors the sampler: the first canvas gets :func:`first_steps` steps over :func:`block_schedule`; with
    ``extend``, a canvas without room for the answer and its EOS (``canvas <= true_length``) grows to the next
    power of two up to ``max_length``, its tail denoised at the first canvas's steps-per-token rate. Canvas
    tokens are steps × canvas width, the sampler's ``canvas_tokens``.
    """
    given = first_steps(budget, steps_per_token)
    schedule = block_schedule(0, budget, budget if given is None else given, block_length)
    steps = sum(s for _, _, s in schedule)
    tokens = steps * budget
    canvas = budget
    while extend and canvas <= true_length:
        grown = extend_budget(canvas, max_length)
        if grown is None:
            break
        tail = grown - canvas
        tail_steps = tail if given is None else max(1, math.ceil(given / budget * tail))
        added = sum(s for _, _, s in block_schedule(canvas, grown, tail_steps, block_length))
        steps += added
        tokens += added * grown
        canvas = grown
    return steps, tokens, canvas


# ================================================================================ methods and metrics


@dataclass
class MethodResult:
    """One method's budgets and scores (see :func:`evaluate_length` for the metrics)."""

    name: str
    rule: str
    budgets: list[int]
    extend: bool
    max_length: int
    prediction_tokens: int = 0
    prediction_seconds: float = 0.0
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    generation: dict[str, float] | None = None
    generated: list[str] | None = None


def _coverage_metrics(budgets: Sequence[int], lengths: Sequence[int]) -> dict[str, float]:
    ratios = [b / n for b, n in zip(budgets, lengths)]
    return {
        "coverage": sum(b >= n for b, n in zip(budgets, lengths)) / len(lengths),
        "mean_ratio": statistics.fmean(ratios),
        "median_ratio": statistics.median(ratios),
        "mean_budget": statistics.fmean(budgets),
    }


def _metrics(budgets: Sequence[int], lengths: Sequence[int], edges: Sequence[int]) -> dict[str, float]:
    lo, hi = edges[0], edges[-1]
    hits = sum(bucket_of(b, lo, hi) == bucket_of(n, lo, hi) for b, n in zip(budgets, lengths))
    return {**_coverage_metrics(budgets, lengths), "bucket_accuracy": hits / len(lengths)}


def _fixed_method(size: int, examples: Sequence[EvalExample], max_seq_len: int) -> MethodResult:
    budgets = [max(1, min(size, max_seq_len - len(e.prompt_ids))) for e in examples]
    capped = sum(b < size for b in budgets)
    note = f"capped at max_seq_len {max_seq_len} − prompt for {capped} of {len(budgets)} prompts" if capped else ""
    return MethodResult(f"fixed:{size}", f"{size} positions", budgets, False, max(budgets), note=note)


@dataclass
class LengthReport:
    """Everything ``dlm eval length`` prints and writes."""

    data: str
    model: str
    layout: str
    template: str
    synthetic: bool
    q: float
    width: int
    steps_per_token: float
    lengths: list[int]
    methods: list[MethodResult]
    sweep: dict[str, list[dict[str, float]]]
    notes: list[str]
    generated: bool
    target_ratio: float = DEFAULT_TARGET_RATIO
    frontier: dict[str, dict[str, float] | None] = field(default_factory=dict)
    frontier_by_source: dict[str, dict[str, dict[str, float] | None]] = field(default_factory=dict)
    cross_fitted: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def method(self, name: str) -> MethodResult:
        """The result of method ``name`` (``fixed:512``, ``zero-shot``, ``eos-head``, ``bucket-head``, ``oracle``)."""
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"no method {name!r}; have {', '.join(m.name for m in self.methods)}")

    def comparisons(self) -> list[dict[str, Any]]:
        """Each budgeted method (predictors, oracle) against each fixed canvas, from the generation runs.

        ``saving`` is the fixed canvas's measured canvas tokens over the method's (4.0 = four times less
        compute), ``wall_saving`` the same for wall time, ``accuracy_delta`` the method's exact-match accuracy
        minus the fixed canvas's in percentage points (synthetic task only): the issue's "quality kept" reads
        ``accuracy_delta >= -1`` and ``saving >= 4``.
        """
        if not self.generated:
            return []
        fixed = [m for m in self.methods if m.name.startswith("fixed:")]
        rows = []
        for m in self.methods:
            if m in fixed or m.generation is None:
                continue
            for f in fixed:
                g, fg = m.generation, f.generation or {}
                row: dict[str, Any] = {"method": m.name, "fixed": f.name,
                                       "saving": fg["canvas_tokens"] / max(g["canvas_tokens"], 1),
                                       "wall_saving": fg["wall_s"] / max(g["wall_s"], 1e-9)}
                if self.synthetic:
                    row["accuracy_delta"] = 100.0 * (g["accuracy"] - fg["accuracy"])
                rows.append(row)
        return rows

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: settings, notes, the q sweep, true lengths, per method its metrics and budgets, and the
        comparisons with the fixed canvases (after generation)."""
        head = {k: v for k, v in asdict(self).items() if k not in ("methods", "lengths")}
        methods = {m.name: {k: v for k, v in asdict(m).items() if k != "name"} for m in self.methods}
        return {**head, "examples": len(self.lengths), "true_lengths": self.lengths, "methods": methods,
                "comparisons": self.comparisons()}

    def markdown(self) -> str:
        """The tables: budgets (coverage, over-allocation, cost estimate) and, after --generate, measured cost."""
        fixed = [m for m in self.methods if m.name.startswith("fixed:")]
        lines = [
            f"# Length budgets: {self.data}",
            "",
            f"model `{self.model}`, {len(self.lengths)} examples ({self.layout} layout, {self.template} template), "
            f"q = {self.q:g}, prediction canvas {self.width}, {self.steps_per_token:g} steps per canvas token; "
            f"true answer length: median {statistics.median(self.lengths):g}, max {max(self.lengths)} tokens.",
            "",
        ]
        lines += [f"- {note}" for note in self.notes] + ([""] if self.notes else [])
        vs = [f"cost vs {f.name}" for f in fixed]
        lines += ["| method | budget | coverage | mean b/L | median b/L | bucket acc | est. canvas tokens | "
                  + " | ".join(vs) + " |", "|" + "---|" * (7 + len(vs))]
        for m in self.methods:
            x = m.metrics
            rel = [f"{x['est_canvas_tokens'] / f.metrics['est_canvas_tokens']:.3f}×" for f in fixed]
            lines.append(f"| {m.name} | {m.rule} | {x['coverage']:.1%} | {x['mean_ratio']:.2f} | "
                         f"{x['median_ratio']:.2f} | {x['bucket_accuracy']:.1%} | {x['est_canvas_tokens']:.3g} | "
                         + " | ".join(rel) + " |")
        notes = [f"- {m.name}: {m.note}" for m in self.methods if m.note]
        lines += ["", "b/L = budget / true length. Estimated cost runs every schedule to its end (no stop at EOS); "
                  "predicted methods include their prediction pass.", *notes]
        qs = [p["q"] for p in next(iter(self.sweep.values()))]
        lines += ["", "### Coverage / mean b/L as q sweeps", "",
                  "| predictor | " + " | ".join(f"q {q:g}" for q in qs) + " |", "|" + "---|" * (1 + len(qs))]
        for name, points in self.sweep.items():
            lines.append(f"| {name} | " + " | ".join(f"{p['coverage']:.1%} / {p['mean_ratio']:.2f}" for p in points)
                         + " |")
        if self.frontier:
            lines += ["", f"### Best coverage at mean b/L ≤ {self.target_ratio:g}", "",
                      f"| predictor | q | coverage | mean b/L | q fixed in advance ({CROSS_FIT_FOLDS}-fold) |",
                      "|---|---|---|---|---|"]
            for name, point in self.frontier.items():
                cross = self.cross_fitted.get(name)
                held = f"{cross['coverage']:.1%} at {cross['mean_ratio']:.2f}" if cross else "–"
                lines.append(f"| {name} | {point['q']:g} | {point['coverage']:.1%} | {point['mean_ratio']:.2f} | "
                             f"{held} |" if point else
                             f"| {name} | – | none within {self.target_ratio:g} | – | {held} |")
            if self.frontier_by_source:
                files = list(self.frontier_by_source)
                lines += ["", "Each data file alone (its own q):", "",
                          "| predictor | " + " | ".join(files) + " |", "|" + "---|" * (1 + len(files))]
                for name in self.frontier:
                    cells = [self.frontier_by_source[f][name] for f in files]
                    lines.append(f"| {name} | " + " | ".join(
                        f"{c['coverage']:.1%} at {c['mean_ratio']:.2f} (q {c['q']:g})" if c else "–" for c in cells)
                        + " |")
            lines += ["", "q is picked on these examples: a point of each predictor's trade-off curve. "
                      f"q fixed in advance: each of {CROSS_FIT_FOLDS} folds scored with the q picked on the others "
                      "(coverage at the mean b/L it then gets), what a user who sets q before seeing answers gets."]
        sources = list(self.methods[0].by_source)
        if sources:
            counts = {s: int(self.methods[0].by_source[s]["examples"]) for s in sources}
            lines += ["", "### By data file: coverage / mean b/L", "",
                      "| method | " + " | ".join(f"{s} ({counts[s]})" for s in sources) + " |",
                      "|" + "---|" * (1 + len(sources))]
            for m in self.methods:
                lines.append(f"| {m.name} | " + " | ".join(
                    f"{m.by_source[s]['coverage']:.1%} / {m.by_source[s]['mean_ratio']:.2f}" for s in sources) + " |")
        if self.generated:
            acc = "accuracy | " if self.synthetic else ""
            gen_vs = [f"vs {f.name}" for f in fixed]
            lines += ["", "## Generation (measured)", "",
                      f"| method | {acc}finished | mean answer tokens | canvas tokens | " + " | ".join(gen_vs)
                      + " | forward tokens | wall s |", "|" + "---|" * (6 + len(gen_vs) + bool(acc))]
            for m in self.methods:
                g = m.generation or {}
                rel = [f"{g['canvas_tokens'] / (f.generation or {})['canvas_tokens']:.3f}×" for f in fixed]
                a = f"{g['accuracy']:.1%} | " if self.synthetic else ""
                lines.append(f"| {m.name} | {a}{g['finished']:.1%} | {g['mean_answer_tokens']:.1f} | "
                             f"{g['canvas_tokens']:.3g} | " + " | ".join(rel)
                             + f" | {g['forward_tokens']:.3g} | {g['wall_s']:.1f} |")
            if self.synthetic:
                lines += ["", "accuracy: exact match after collapsing whitespace (dlm.evaluation.synthetic.check)."]
            delta = " accuracy Δ (points) |" if self.synthetic else ""
            lines += ["", "## Against the fixed canvases (measured)", "",
                      f"| method | fixed |{delta} compute saved (canvas tokens) | wall time saved |",
                      "|" + "---|" * (4 + bool(self.synthetic))]
            for c in self.comparisons():
                d = f" {c['accuracy_delta']:+.1f} |" if self.synthetic else ""
                lines.append(f"| {c['method']} | {c['fixed']} |{d} {c['saving']:.2f}× | {c['wall_saving']:.2f}× |")
        return "\n".join(lines) + "\n"


def _oracle(lengths: Sequence[int]) -> MethodResult:
    budgets = [next_power_of_two(n) for n in lengths]
    # an answer of exactly a power of two fills its canvas with no room for EOS: let it extend once
    return MethodResult("oracle", "next power of two of the true length", budgets, True, 2 * max(budgets))


def _sweep(readings: Readings, lengths: Sequence[int], methods: Sequence[str], q: float
           ) -> dict[str, list[dict[str, float]]]:
    """Coverage and mean budget / true length of each predictor at every q of the sweep, the chosen q included."""
    sweep: dict[str, list[dict[str, float]]] = {}
    qs = sorted({*SWEEP_QS, q})
    for name in methods:
        points = []
        for point in qs:
            _, budgets = predicted_budgets(readings, name, point)
            m = _metrics(budgets, lengths, readings.edges)
            points.append({"q": point, "coverage": m["coverage"], "mean_ratio": m["mean_ratio"]})
        sweep[name] = points
    return sweep


def best_operating_point(
    budgets_at: Callable[[float], Sequence[int]], lengths: Sequence[int], target: float,
    qs: Sequence[float] = FRONTIER_QS,
) -> dict[str, float] | None:
    """Of the quantiles ``qs``, the one whose budgets (``budgets_at(q)``) cover the most answers with a mean
    budget / true length within ``target`` (the cheaper one on a tie), as ``{q, coverage, mean_ratio}``; None
    when even the smallest q over-allocates. Any predictor with a quantile knob fits, a baseline included."""
    best: dict[str, float] | None = None
    for point in qs:
        m = _coverage_metrics(budgets_at(point), lengths)
        if m["mean_ratio"] > target:
            continue
        if best is None or (m["coverage"], -m["mean_ratio"]) > (best["coverage"], -best["mean_ratio"]):
            best = {"q": point, "coverage": m["coverage"], "mean_ratio": m["mean_ratio"]}
    return best


def _budgets_by_q(readings: Readings, method: str) -> Callable[[float], Sequence[int]]:
    """``q -> budgets`` of predictor ``method``, each q computed once however many searches read it."""
    return functools.cache(lambda q: predicted_budgets(readings, method, q)[1])


def coverage_at_ratio(readings: Readings, lengths: Sequence[int], methods: Sequence[str], target: float
                      ) -> dict[str, dict[str, float] | None]:
    """Each predictor's operating point at mean budget / true length ``target`` (:func:`best_operating_point`
    over :data:`FRONTIER_QS`).

    This is the figure a length-budget goal is stated in ("coverage at mean budget / true ≤ 2"). The q is picked
    on the scored examples themselves, so it reads as a point of the predictor's trade-off curve, as an ROC
    point does, not as a promise for that q on other data.
    """
    return {name: best_operating_point(_budgets_by_q(readings, name), lengths, target) for name in methods}


def cross_fitted_point(
    budgets_at: Callable[[float], Sequence[int]], lengths: Sequence[int], target: float,
    folds: int = CROSS_FIT_FOLDS, qs: Sequence[float] = FRONTIER_QS,
) -> dict[str, Any] | None:
    """The target-ratio operating point as a user who must fix q before seeing the answers gets it.

    :func:`best_operating_point` picks q on the very examples it scores, which flatters the figure. Here the
    examples are dealt into ``folds`` folds (example ``i`` to fold ``i % folds``, so every file of a mix is in
    every fold); each fold gets the q that :func:`best_operating_point` picks on the other folds (the smallest
    q when none of theirs fits the target), and coverage and mean budget / true length are read off the
    pooled budgets. The mean may land above ``target``: that is the honest price of choosing q in advance.
    Returns ``{coverage, mean_ratio, qs}`` (the q of each fold), or None with fewer than 2 examples.
    """
    n = len(lengths)
    folds = min(folds, n)
    if folds < 2:
        return None
    at = {q: list(budgets_at(q)) for q in qs}
    budgets = [0] * n
    chosen = []
    for k in range(folds):
        fit = [i for i in range(n) if i % folds != k]
        point = best_operating_point(lambda q: [at[q][i] for i in fit], [lengths[i] for i in fit], target, qs)
        q = point["q"] if point is not None else min(qs)
        chosen.append(q)
        for i in range(k, n, folds):
            budgets[i] = at[q][i]
    m = _coverage_metrics(budgets, lengths)
    return {"coverage": m["coverage"], "mean_ratio": m["mean_ratio"], "qs": chosen}


def _source_groups(examples: Sequence[EvalExample]) -> dict[str, list[int]]:
    """Indices of each data file's examples, in file order."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.source, []).append(i)
    return groups


def _by_source(method: MethodResult, examples: Sequence[EvalExample], groups: dict[str, list[int]],
               edges: Sequence[int]) -> dict[str, dict[str, float]]:
    """``method``'s coverage and budget ratios on each data file's examples alone (a mix hides a hard file)."""
    return {src: {"examples": float(len(idx)),
                  **_metrics([method.budgets[i] for i in idx], [examples[i].length for i in idx], edges)}
            for src, idx in groups.items()}


def _generate(
    loaded: LoadedModel,
    examples: Sequence[EvalExample],
    m: MethodResult,
    *,
    steps_per_token: float,
    batch_size: int,
    block_length: int | None,
    seed: int,
    synthetic: bool,
    progress: bool,
) -> None:
    """Run the sampler for method ``m`` (prompts grouped by budget, so each group gets its steps) and record
    measured cost, wall time and, on the synthetic task, accuracy."""
    tok = loaded.tokenizer
    by_budget: dict[int, list[int]] = {}
    for i, b in enumerate(m.budgets):
        by_budget.setdefault(b, []).append(i)
    answers: list[list[int]] = [[] for _ in examples]
    finished = [False] * len(examples)
    canvas_tokens = forward_tokens = 0
    seconds = 0.0
    bar = tqdm(total=len(examples), desc=f"generate {m.name}", unit="prompt", disable=not progress)
    for budget, idx in sorted(by_budget.items()):
        result = generate(
            loaded.model, [examples[i].prompt_ids for i in idx], mask_id=tok.mask_id, eos_id=tok.eos_id,
            pad_id=tok.pad_id, length=[budget] * len(idx), steps=first_steps(budget, steps_per_token),
            block_length=block_length, extend=m.extend, max_length=m.max_length, batch_size=batch_size, seed=seed,
            shift=loaded.shift,
        )
        for j, i in enumerate(idx):
            answers[i], finished[i] = result.answers[j], result.finished[j]
        canvas_tokens += sum(result.canvas_tokens)
        forward_tokens += result.total_forward_tokens
        seconds += result.wall_time_s
        bar.update(len(idx))
    bar.close()
    texts = [str(tok.tokenizer.decode(a, skip_special_tokens=True)) for a in answers]
    m.generated = texts
    # the prediction pass ran each prompt once more, with W masked positions after it
    prediction_forward = sum(len(e.prompt_ids) for e in examples) + m.prediction_tokens if m.prediction_tokens else 0
    m.generation = {
        "canvas_tokens": canvas_tokens + m.prediction_tokens,
        "forward_tokens": forward_tokens + prediction_forward,
        "wall_s": seconds + m.prediction_seconds,
        "finished": sum(finished) / len(finished),
        "mean_answer_tokens": statistics.fmean(len(a) for a in answers),
    }
    if synthetic:
        m.generation["accuracy"] = sum(check(e.question, t) for e, t in zip(examples, texts)) / len(examples)


def _read_all(
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


def evaluate_length(
    data: str | Path | Sequence[str | Path],
    model: str | Path | LoadedModel,
    *,
    q: float = 0.9,
    fixed: Sequence[int] = DEFAULT_FIXED,
    limit: int | None = None,
    batch_size: int = 8,
    run_generation: bool = False,
    steps_per_token: float = 1.0,
    block_length: int | None = None,
    split: Split = "all",
    eval_fraction: float | None = None,
    template: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    target_ratio: float = DEFAULT_TARGET_RATIO,
) -> LengthReport:
    """Score every method on ``data`` (a file, or several files read one after the other) for ``model`` (a run
    directory or checkpoint that :func:`~dlm.generation.load_for_generation` reads, or a loaded model).

    Metrics per method: ``coverage`` (share of prompts whose budget ≥ the true answer length), ``mean_ratio`` /
    ``median_ratio`` (budget / true length), ``bucket_accuracy`` (budget in the true length's power-of-two
    bucket over the head's buckets), ``mean_budget``, and ``est_canvas_tokens`` (see the module docstring).
    ``frontier``: each predictor's best coverage with a mean budget / true length within ``target_ratio``
    (:func:`coverage_at_ratio`) and ``cross_fitted`` the same with q chosen on other folds
    (:func:`cross_fitted_point`); with several files, every method's metrics per file too (``by_source``).
    A model without a length head still gets the fixed, zero-shot and oracle methods, with a note.
    """
    _check_args(q, fixed, limit, batch_size, steps_per_token, target_ratio)
    loaded = model if isinstance(model, LoadedModel) else load_for_generation(model, device=device)
    source = _read_all(data, loaded, template=template, split=split, eval_fraction=eval_fraction, limit=limit)
    examples, notes = source.examples, list(source.notes)
    lengths = [e.length for e in examples]
    head = loaded.model.length_head
    max_seq_len = loaded.model.cfg.max_seq_len
    width = head.cfg.max_len if head is not None else min(max(fixed), max_seq_len)
    if head is None:
        notes.append("the model has no length head: eos-head and bucket-head are skipped; train with "
                     "model.length_head set to evaluate them")

    readings = read_lengths(loaded, examples, width, batch_size=batch_size, progress=progress)
    methods = [_fixed_method(size, examples, max_seq_len) for size in fixed]
    predictors = [p for p in PREDICTORS if head is not None or p == "zero-shot"]
    for name in predictors:
        bounds, budgets = predicted_budgets(readings, name, q)
        seconds = readings.backbone_seconds + (readings.lm_seconds if name == "zero-shot" else 0.0)
        rule = {"zero-shot": "LM's EOS probability at step 0", "eos-head": "EOS head",
                "bucket-head": "bucket head"}[name] + f", q = {q:g}, next power of two"
        methods.append(MethodResult(name, rule, budgets, True, width, prediction_tokens=width * len(examples),
                                    prediction_seconds=seconds))
    methods.append(_oracle(lengths))
    budgets_at = {name: _budgets_by_q(readings, name) for name in predictors}  # shared by both target searches
    groups = _source_groups(examples)
    several_files = len(groups) > 1
    frontier_by_source = {
        src: coverage_at_ratio(readings.subset(idx), [lengths[i] for i in idx], predictors, target_ratio)
        for src, idx in groups.items()} if several_files else {}
    for m in methods:
        m.metrics = _metrics(m.budgets, lengths, readings.edges)
        if several_files:
            m.by_source = _by_source(m, examples, groups, readings.edges)
        m.metrics["est_canvas_tokens"] = m.prediction_tokens + sum(
            schedule_cost(b, n, steps_per_token=steps_per_token, extend=m.extend, max_length=m.max_length,
                          block_length=block_length)[1]
            for b, n in zip(m.budgets, lengths)
        )
    if run_generation:
        for m in methods:
            _generate(loaded, examples, m, steps_per_token=steps_per_token, batch_size=batch_size,
                      block_length=block_length, seed=seed, synthetic=source.synthetic, progress=progress)
    return LengthReport(
        data=str(data) if isinstance(data, (str, Path)) else ", ".join(map(str, data)),
        model=str(loaded.directory), layout=source.layout, template=source.template, synthetic=source.synthetic,
        q=q, width=width, steps_per_token=steps_per_token, lengths=lengths, methods=methods,
        sweep=_sweep(readings, lengths, predictors, q), notes=notes, generated=run_generation,
        target_ratio=target_ratio, frontier_by_source=frontier_by_source,
        frontier={name: best_operating_point(at, lengths, target_ratio) for name, at in budgets_at.items()},
        cross_fitted={name: cross_fitted_point(at, lengths, target_ratio) for name, at in budgets_at.items()},
    )


def _check_args(q: float, fixed: Sequence[int], limit: int | None, batch_size: int, steps_per_token: float,
                target_ratio: float) -> None:
    problems = []
    if not 0.0 < q <= 1.0:
        problems.append(f"--q must be in (0, 1], got {q}")
    if not fixed or any(n < 1 for n in fixed):
        problems.append(f"--fixed needs positive canvas sizes, got {list(fixed)}")
    if limit is not None and limit < 1:
        problems.append(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 < steps_per_token <= 1.0:
        problems.append(f"--steps-per-token must be in (0, 1], got {steps_per_token}")
    if not target_ratio >= 1.0:
        problems.append(f"--target-ratio must be >= 1 (a budget below the true length covers nothing), "
                        f"got {target_ratio}")
    if problems:
        raise GenerationError("; ".join(problems))


def write_report(report: LengthReport, out: str | Path, plot: Callable[[LengthReport, Path], list[Path]] | None = None
                 ) -> list[Path]:
    """Write ``length_eval.md``, ``length_eval.json`` and (with ``plot``) the figures into ``out``."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / "length_eval.md"
    js = directory / "length_eval.json"
    md.write_text(report.markdown())
    js.write_text(json.dumps(report.as_dict(), indent=1))
    return [md, js, *(plot(report, directory) if plot is not None else [])]
