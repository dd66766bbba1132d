"""What ``dlm eval length`` prints and writes: one :class:`MethodResult` per method, the :class:`LengthReport`
that holds them with the settings, sweep and target-ratio points, its markdown tables (budgets, the q sweep,
the target-ratio points overall and per file, every method per file, and after generation the measured cost
and the comparisons with the fixed canvases) and its JSON form, written by :func:`write_report`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlm.evaluation.sweep import CROSS_FIT_FOLDS, DEFAULT_TARGET_RATIO


@dataclass
class MethodResult:
    """One method's budgets and scores (see :func:`~dlm.evaluation.length.evaluate_length` for the metrics)."""

    name: str
    rule: str
    budgets: list[int]
    extend: bool
    max_length: int
    prediction_tokens: int = 0  # canvas positions of the prediction pass (0 when it reads the prompt alone)
    prediction_seconds: float = 0.0
    predicted: bool = False  # a prediction pass ran over every prompt before generation
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    generation: dict[str, float] | None = None
    generated: list[str] | None = None


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
    cross_fitted_by_source: dict[str, dict[str, dict[str, Any] | None]] = field(default_factory=dict)

    def method(self, name: str) -> MethodResult:
        """The result of method ``name`` (``fixed:512``, ``zero-shot``, ``eos-head``, ``bucket-head``, ``oracle``)."""
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"no method {name!r}; have {', '.join(m.name for m in self.methods)}")

    @property
    def fixed(self) -> list[MethodResult]:
        """The fixed canvases, in the order given: every relative cost in the tables is against them."""
        return [m for m in self.methods if m.name.startswith("fixed:")]

    def comparisons(self) -> list[dict[str, Any]]:
        """Each budgeted method (predictors, oracle) against each fixed canvas, from the generation runs.

        ``saving`` is the fixed canvas's measured canvas tokens over the method's (4.0 = four times less
        compute), ``wall_saving`` the same for wall time, ``accuracy_delta`` the method's exact-match accuracy
        minus the fixed canvas's in percentage points (synthetic task only): the issue's "quality kept" reads
        ``accuracy_delta >= -1`` and ``saving >= 4``.
        """
        if not self.generated:
            return []
        fixed = self.fixed
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
        lines = [*_summary(self), *_budget_table(self), *_sweep_table(self)]
        if self.frontier:
            lines += _frontier_tables(self)
        lines += _by_source_table(self)
        if self.generated:
            lines += _generation_tables(self)
        return "\n".join(lines) + "\n"


def _summary(r: LengthReport) -> list[str]:
    """Title, the settings and true lengths in one sentence, and the notes."""
    lines = [
        f"# Length budgets: {r.data}",
        "",
        f"model `{r.model}`, {len(r.lengths)} examples ({r.layout} layout, {r.template} template), "
        f"q = {r.q:g}, prediction canvas {r.width}, {r.steps_per_token:g} steps per canvas token; "
        f"true answer length: median {statistics.median(r.lengths):g}, max {max(r.lengths)} tokens.",
        "",
    ]
    return lines + [f"- {note}" for note in r.notes] + ([""] if r.notes else [])


def _budget_table(r: LengthReport) -> list[str]:
    """Per method: its rule, coverage, budget ratios, bucket accuracy and estimated cost against each fixed canvas."""
    fixed = r.fixed
    vs = [f"cost vs {f.name}" for f in fixed]
    lines = ["| method | budget | coverage | mean b/L | median b/L | bucket acc | est. canvas tokens | "
             + " | ".join(vs) + " |", "|" + "---|" * (7 + len(vs))]
    for m in r.methods:
        x = m.metrics
        rel = [f"{x['est_canvas_tokens'] / f.metrics['est_canvas_tokens']:.3f}×" for f in fixed]
        lines.append(f"| {m.name} | {m.rule} | {x['coverage']:.1%} | {x['mean_ratio']:.2f} | "
                     f"{x['median_ratio']:.2f} | {x['bucket_accuracy']:.1%} | {x['est_canvas_tokens']:.3g} | "
                     + " | ".join(rel) + " |")
    notes = [f"- {m.name}: {m.note}" for m in r.methods if m.note]
    return lines + ["", "b/L = budget / true length. Estimated cost runs every schedule to its end (no stop at EOS); "
                    "predicted methods include their prediction pass.", *notes]


def _sweep_table(r: LengthReport) -> list[str]:
    """Coverage / mean b/L of each predictor at every q of the sweep."""
    qs = [p["q"] for p in next(iter(r.sweep.values()))]
    lines = ["", "### Coverage / mean b/L as q sweeps", "",
             "| predictor | " + " | ".join(f"q {q:g}" for q in qs) + " |", "|" + "---|" * (1 + len(qs))]
    for name, points in r.sweep.items():
        lines.append(f"| {name} | " + " | ".join(f"{p['coverage']:.1%} / {p['mean_ratio']:.2f}" for p in points)
                     + " |")
    return lines


def _frontier_tables(r: LengthReport) -> list[str]:
    """Each predictor's best coverage at the target ratio, in sample and cross-fitted, and per file with several."""
    lines = ["", f"### Best coverage at mean b/L ≤ {r.target_ratio:g}", "",
             f"| predictor | q | coverage | mean b/L | q fixed in advance ({CROSS_FIT_FOLDS}-fold) |",
             "|---|---|---|---|---|"]
    for name, point in r.frontier.items():
        cross = r.cross_fitted.get(name)
        held = f"{cross['coverage']:.1%} at {cross['mean_ratio']:.2f}" if cross else "–"
        lines.append(f"| {name} | {point['q']:g} | {point['coverage']:.1%} | {point['mean_ratio']:.2f} | "
                     f"{held} |" if point else
                     f"| {name} | – | none within {r.target_ratio:g} | – | {held} |")
    if r.frontier_by_source:
        files = list(r.frontier_by_source)
        lines += ["", "Each data file alone (its own q; then q fixed in advance on that file):", "",
                  "| predictor | " + " | ".join(f"{f} | {f}, q in advance" for f in files) + " |",
                  "|" + "---|" * (1 + 2 * len(files))]
        for name in r.frontier:
            cells = []
            for f in files:
                point = r.frontier_by_source[f][name]
                cross = r.cross_fitted_by_source.get(f, {}).get(name)
                cells.append(f"{point['coverage']:.1%} at {point['mean_ratio']:.2f} (q {point['q']:g})"
                             if point else "–")
                cells.append(f"{cross['coverage']:.1%} at {cross['mean_ratio']:.2f}" if cross else "–")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + ["", "q is picked on these examples: a point of each predictor's trade-off curve. "
                    f"q fixed in advance: each of {CROSS_FIT_FOLDS} folds scored with the q picked on the others "
                    "(coverage at the mean b/L it then gets), what a user who sets q before seeing answers gets."]


def _by_source_table(r: LengthReport) -> list[str]:
    """Every method's coverage / mean b/L per data file (nothing for a single file)."""
    sources = list(r.methods[0].by_source)
    if not sources:
        return []
    counts = {s: int(r.methods[0].by_source[s]["examples"]) for s in sources}
    lines = ["", "### By data file: coverage / mean b/L", "",
             "| method | " + " | ".join(f"{s} ({counts[s]})" for s in sources) + " |",
             "|" + "---|" * (1 + len(sources))]
    for m in r.methods:
        lines.append(f"| {m.name} | " + " | ".join(
            f"{m.by_source[s]['coverage']:.1%} / {m.by_source[s]['mean_ratio']:.2f}" for s in sources) + " |")
    return lines


def _generation_tables(r: LengthReport) -> list[str]:
    """After --generate: measured cost per method, then each budgeted method against each fixed canvas."""
    fixed = r.fixed
    acc = "accuracy | " if r.synthetic else ""
    gen_vs = [f"vs {f.name}" for f in fixed]
    lines = ["", "## Generation (measured)", "",
             f"| method | {acc}finished | mean answer tokens | canvas tokens | " + " | ".join(gen_vs)
             + " | forward tokens | wall s |", "|" + "---|" * (6 + len(gen_vs) + bool(acc))]
    for m in r.methods:
        g = m.generation or {}
        rel = [f"{g['canvas_tokens'] / (f.generation or {})['canvas_tokens']:.3f}×" for f in fixed]
        a = f"{g['accuracy']:.1%} | " if r.synthetic else ""
        lines.append(f"| {m.name} | {a}{g['finished']:.1%} | {g['mean_answer_tokens']:.1f} | "
                     f"{g['canvas_tokens']:.3g} | " + " | ".join(rel)
                     + f" | {g['forward_tokens']:.3g} | {g['wall_s']:.1f} |")
    if r.synthetic:
        lines += ["", "accuracy: exact match after collapsing whitespace (dlm.evaluation.synthetic.check)."]
    delta = " accuracy Δ (points) |" if r.synthetic else ""
    lines += ["", "## Against the fixed canvases (measured)", "",
              f"| method | fixed |{delta} compute saved (canvas tokens) | wall time saved |",
              "|" + "---|" * (4 + bool(r.synthetic))]
    for c in r.comparisons():
        d = f" {c['accuracy_delta']:+.1f} |" if r.synthetic else ""
        lines.append(f"| {c['method']} | {c['fixed']} |{d} {c['saving']:.2f}× | {c['wall_saving']:.2f}× |")
    return lines


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
