"""Budgets as the predictors' quantile ``q`` moves, and the scores they earn: coverage, budget / true length,
bucket accuracy; the coarse q sweep of the report; and each predictor's operating point at a target mean
budget / true length, picked on the scored examples (:func:`best_operating_point`) and cross-fitted as a user
who fixes q in advance gets it (:func:`cross_fitted_point`).

Everything here reads :class:`~dlm.evaluation.readings.Readings` (or any ``q -> budgets`` function, a baseline
included) and never runs the model: every q is a different reading of the same pass.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dlm.errors import GenerationError
from dlm.evaluation.readings import Readings
from dlm.generation import budget_from_bound
from dlm.modeling.length_head import bucket_of, predict_bucket_bound, predict_eos_bound

SWEEP_QS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
# the fine grid the operating point at a target mean budget / true length is searched on
FRONTIER_QS: tuple[float, ...] = (*(k / 100 for k in range(1, 100)), 0.995, 0.999, 1.0)
DEFAULT_TARGET_RATIO = 2.0
CROSS_FIT_FOLDS = 5
PREDICTORS: tuple[str, ...] = ("zero-shot", "eos-head", "bucket-head")


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


def coverage_metrics(budgets: Sequence[int], lengths: Sequence[int]) -> dict[str, float]:
    """Share of answers that fit their budget, and the budget / true length ratios and mean budget."""
    ratios = [b / n for b, n in zip(budgets, lengths)]
    return {
        "coverage": sum(b >= n for b, n in zip(budgets, lengths)) / len(lengths),
        "mean_ratio": statistics.fmean(ratios),
        "median_ratio": statistics.median(ratios),
        "mean_budget": statistics.fmean(budgets),
    }


def metrics(budgets: Sequence[int], lengths: Sequence[int], edges: Sequence[int]) -> dict[str, float]:
    """:func:`coverage_metrics` plus bucket accuracy: the budget in the true length's bucket of ``edges``."""
    lo, hi = edges[0], edges[-1]
    hits = sum(bucket_of(b, lo, hi) == bucket_of(n, lo, hi) for b, n in zip(budgets, lengths))
    return {**coverage_metrics(budgets, lengths), "bucket_accuracy": hits / len(lengths)}


def metrics_by_source(budgets: Sequence[int], lengths: Sequence[int], groups: dict[str, list[int]],
                      edges: Sequence[int]) -> dict[str, dict[str, float]]:
    """The :func:`metrics` of each data file's examples alone (``groups``: indices per file), with their count:
    a mix's average hides the file the predictors cannot read."""
    return {src: {"examples": float(len(idx)),
                  **metrics([budgets[i] for i in idx], [lengths[i] for i in idx], edges)}
            for src, idx in groups.items()}


def q_sweep(readings: Readings, lengths: Sequence[int], methods: Sequence[str], q: float
            ) -> dict[str, list[dict[str, float]]]:
    """Coverage and mean budget / true length of each predictor at every q of the sweep, the chosen q included."""
    sweep: dict[str, list[dict[str, float]]] = {}
    qs = sorted({*SWEEP_QS, q})
    for name in methods:
        points = []
        for point in qs:
            _, budgets = predicted_budgets(readings, name, point)
            m = metrics(budgets, lengths, readings.edges)
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
        m = coverage_metrics(budgets_at(point), lengths)
        if m["mean_ratio"] > target:
            continue
        if best is None or (m["coverage"], -m["mean_ratio"]) > (best["coverage"], -best["mean_ratio"]):
            best = {"q": point, "coverage": m["coverage"], "mean_ratio": m["mean_ratio"]}
    return best


def budgets_by_q(readings: Readings, method: str) -> Callable[[float], Sequence[int]]:
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
    return {name: best_operating_point(budgets_by_q(readings, name), lengths, target) for name in methods}


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
    m = coverage_metrics(budgets, lengths)
    return {"coverage": m["coverage"], "mean_ratio": m["mean_ratio"], "qs": chosen}
