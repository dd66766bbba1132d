"""Figures of the length benchmark (matplotlib, Agg: no display needed, so they render on a headless node).

- ``predicted_vs_true.png``: one panel per method, true answer length against the budget it got, log axes,
  with the lines budget = length (below it the answer does not fit) and budget = 2 × length (the oracle's worst
  case); the eye sees at once who under-allocates and by how much the rest over-allocate.
- ``coverage_vs_budget.png``: coverage against mean budget / true length, one curve per predictor as its
  quantile ``q`` sweeps, with the fixed canvases and the oracle as points; the upper-left corner is the goal,
  and each predictor's best coverage at the report's target ratio is marked on the dotted vertical line.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from dlm.evaluation.report import LengthReport  # noqa: E402


def plot_predicted_vs_true(report: LengthReport, path: Path) -> Path:
    """Scatter of budget against true length per method (log-log)."""
    methods = report.methods
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False, sharex=True, sharey=True)
    lengths = report.lengths
    top = max(max(lengths), *(max(m.budgets) for m in methods)) * 1.5
    line = [1, top]
    for ax, m in zip(axes.flat, methods):
        ax.scatter(lengths, m.budgets, s=8, alpha=0.5)
        ax.plot(line, line, "k-", lw=0.8, label="budget = length")
        ax.plot(line, [2 * v for v in line], "k--", lw=0.8, label="budget = 2 × length")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlim(1, top)
        ax.set_ylim(1, top)
        ax.set_title(f"{m.name}: coverage {m.metrics['coverage']:.0%}", fontsize=9)
        ax.set_xlabel("true answer length (tokens)")
        ax.set_ylabel("budget (tokens)")
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_coverage_vs_budget(report: LengthReport, path: Path) -> Path:
    """Coverage against mean budget / true length: a curve per predictor over ``q``, points for the rest."""
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    for name, points in report.sweep.items():
        xs = [p["mean_ratio"] for p in points]
        ys = [p["coverage"] for p in points]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{name} (q {points[0]['q']:g} … {points[-1]['q']:g})")
        chosen = report.method(name).metrics
        ax.scatter([chosen["mean_ratio"]], [chosen["coverage"]], s=60, facecolors="none", edgecolors="k")
    fixed = report.fixed
    for i, m in enumerate(fixed):
        grey = str(0.2 + 0.5 * i / max(1, len(fixed) - 1))
        ax.scatter([m.metrics["mean_ratio"]], [m.metrics["coverage"]], marker="s", s=30, color=grey, label=m.name)
    oracle = report.method("oracle").metrics
    ax.scatter([oracle["mean_ratio"]], [oracle["coverage"]], marker="*", s=90, color="k", label="oracle")
    if report.frontier:
        ax.axvline(report.target_ratio, color="grey", lw=0.6, ls=":")
        points = [p for p in report.frontier.values() if p is not None]
        ax.scatter([p["mean_ratio"] for p in points], [p["coverage"] for p in points], marker="D", s=28,
                   color="tab:red", zorder=3, label=f"best at mean ≤ {report.target_ratio:g}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("mean budget / true length")
    ax.set_ylabel("coverage (budget ≥ true length)")
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.95, color="grey", lw=0.6, ls=":")
    ax.set_title(f"coverage vs budget (circled: q = {report.q:g})", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_report(report: LengthReport, directory: Path) -> list[Path]:
    """Both figures into ``directory``."""
    return [
        plot_predicted_vs_true(report, directory / "predicted_vs_true.png"),
        plot_coverage_vs_budget(report, directory / "coverage_vs_budget.png"),
    ]
