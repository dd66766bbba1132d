"""How much of an answer's length does the surface of its prompt tell? Baselines for the length head (issue 7).

`dlm eval length` scores the length head against fixed canvases. This script answers the question behind
its real-data figure: when the head's coverage at a mean budget / true length of 2 falls short, is the head
failing, or does the prompt not say more? On the same split the head was evaluated on (the training run's
content hash), per data file:

- ``ridge``: a ridge regression of log2(answer length) on the prompt's surface (log2 prompt tokens, how many
  numbers it holds, and the words seen in at least 3 training prompts), fitted on the train split; the bound
  at quantile q adds the q-quantile of its 5-fold cross-validated residuals, then rounds up to a power of two
  exactly as the head's bound does. ``spread`` is the residuals' standard deviation in log2 units. The mix is
  read two ways: each file through its own ridge (it knows the file), and through one ridge fitted on all
  the files, as the head is trained.
- ``spread within halves``: the standard deviation of log2(answer length) over the train split's answers
  shorter than ``--split-at`` tokens and over the rest: how much is left to predict for a model that knows
  exactly which half every answer falls in.
- ``calibrated σ``: what a perfectly calibrated log-normal predictor with residual spread σ (log2 units)
  would cover on the same true lengths, averaged over 20 draws: the spread a predictor needs for the goal.

Each line gives the best coverage within the target mean budget / true length over a fine grid of q
(:func:`dlm.evaluation.length.best_operating_point`, the same search as the report's) and, as the report's
"q fixed in advance" column does, with each fold's q picked on the other folds (:func:`cross_fitted_point`).

    .venv/bin/python benchmarks/length_baselines.py --model runs/sft-length \\
        --data ../shared/data/sft/alpaca_en_demo.json --data ../shared/data/sft/gsm8k_train.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from _env import environment

from dlm.evaluation.length import EvalExample, best_operating_point, cross_fitted_point, read_examples
from dlm.generation import budget_from_bound, load_for_generation

_WORD = re.compile(r"[a-z]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _words(example: EvalExample) -> set[str]:
    return set(_WORD.findall(example.question.lower()))


class RidgeBaseline:
    """log2(length) ~ prompt surface, with cross-validated residual quantiles for the bound."""

    def __init__(self, train: Sequence[EvalExample], lam: float, min_count: int = 3, folds: int = 5) -> None:
        counts = collections.Counter(w for e in train for w in _words(e))
        self.vocab = {w: i for i, w in enumerate(sorted(w for w, c in counts.items() if c >= min_count))}
        self.lam = lam
        x, y = self._features(train), np.log2([e.length for e in train])
        self.weights = self._fit(x, y)
        fold = np.arange(len(train)) % folds
        self.residuals = np.empty(len(train))
        for k in range(folds):
            held = fold == k
            self.residuals[held] = y[held] - x[held] @ self._fit(x[~held], y[~held])

    def _features(self, examples: Sequence[EvalExample]) -> np.ndarray:
        x = np.zeros((len(examples), len(self.vocab) + 3))
        for row, e in enumerate(examples):
            for w in _words(e) & self.vocab.keys():
                x[row, self.vocab[w]] = 1.0
            x[row, -3:] = (1.0, math.log2(len(e.prompt_ids)), math.log2(1 + len(_NUMBER.findall(e.question))))
        return x

    def _fit(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.linalg.solve(x.T @ x + self.lam * np.eye(x.shape[1]), x.T @ y)

    def predict(self, examples: Sequence[EvalExample]) -> np.ndarray:
        """The centre of each prompt's log2 length."""
        return self._features(examples) @ self.weights


def _budgets(log2_bounds: np.ndarray, min_budget: int, max_budget: int) -> list[int]:
    return [budget_from_bound(math.ceil(2.0**b), min_budget, max_budget) for b in log2_bounds]


def _calibrated(lengths: np.ndarray, sigma: float, target: float, min_budget: int, max_budget: int
                ) -> dict[str, float] | None:
    """A calibrated log-normal predictor with spread ``sigma``: centre = truth + N(0, σ), bound = centre + z_q σ."""
    from statistics import NormalDist

    rng = np.random.default_rng(0)
    draws = [np.log2(lengths) + rng.normal(0.0, sigma, lengths.shape) for _ in range(20)]

    def budgets_at(q: float) -> list[int]:
        z = NormalDist().inv_cdf(min(q, 0.999)) * sigma
        return [b for centre in draws for b in _budgets(centre + z, min_budget, max_budget)]

    return best_operating_point(budgets_at, np.tile(lengths, 20).tolist(), target)


def _points(budgets_at: Callable[[float], list[int]], lengths: np.ndarray, target: float) -> dict[str, object]:
    """The best point at ``target`` with q picked on these examples, and with q fixed in advance (5-fold)."""
    return {"ridge": best_operating_point(budgets_at, lengths.tolist(), target),
            "ridge_cross_fitted": cross_fitted_point(budgets_at, lengths.tolist(), target)}


def _fmt(point: dict[str, float] | None) -> str:
    return "–" if point is None else f"{point['coverage']:.1%} at {point['mean_ratio']:.2f} (q {point['q']:g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the run whose tokenizer, template and split to use")
    parser.add_argument("--data", required=True, action="append", help="prompt → answer file (repeatable)")
    parser.add_argument("--target-ratio", type=float, default=2.0)
    parser.add_argument("--lam", type=float, default=10.0, help="ridge penalty")
    parser.add_argument("--min-budget", type=int, default=16)
    parser.add_argument("--max-budget", type=int, default=512)
    parser.add_argument("--sigmas", default="0.3,0.4,0.5,0.6,0.8,1.0,1.4")
    parser.add_argument("--split-at", type=int, default=128, help="the length that splits answers into halves")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    loaded = load_for_generation(args.model, device="cpu")
    lo, hi, target = args.min_budget, args.max_budget, args.target_ratio
    results: dict[str, dict[str, object]] = {}
    all_centres, all_residuals, all_lengths = [], [], []
    all_train: list[EvalExample] = []
    all_held: list[EvalExample] = []
    for data in args.data:
        train = read_examples(data, loaded, split="train").examples
        held = read_examples(data, loaded, split="held-out").examples
        all_train += train
        all_held += held
        ridge = RidgeBaseline(train, args.lam)
        centres, lengths = ridge.predict(held), np.array([e.length for e in held], dtype=float)
        residuals = ridge.residuals

        def at(q: float, centres: np.ndarray = centres, residuals: np.ndarray = residuals) -> list[int]:
            return _budgets(centres + np.quantile(residuals, q), lo, hi)

        logs = np.log2([e.length for e in train])
        short, long = logs[logs < math.log2(args.split_at)], logs[logs >= math.log2(args.split_at)]
        halves = [float(h.std()) if len(h) > 1 else float("nan") for h in (short, long)]
        results[Path(data).name] = {"train": len(train), "held_out": len(held), "spread": float(residuals.std()),
                                    "spread_within_halves": halves, "halves": [len(short), len(long)],
                                    **_points(at, lengths, target)}
        all_centres.append(centres)
        all_residuals.append(residuals)
        all_lengths.append(lengths)
    # the mix at one q, each file read through its own ridge and residual quantile (so it knows the file)
    lengths = np.concatenate(all_lengths)

    def mixed_at(q: float) -> list[int]:
        return [b for c, r in zip(all_centres, all_residuals) for b in _budgets(c + np.quantile(r, q), lo, hi)]

    results["all files, a ridge per file"] = {"held_out": len(lengths), **_points(mixed_at, lengths, target)}
    # one ridge fitted on the whole mix, as the head is trained: it must tell the files apart from the words
    pooled = RidgeBaseline(all_train, args.lam)
    pooled_centres = pooled.predict(all_held)

    def pooled_at(q: float) -> list[int]:
        return _budgets(pooled_centres + np.quantile(pooled.residuals, q), lo, hi)

    results["all files, one ridge"] = {
        "train": len(all_train), "held_out": len(lengths), "spread": float(pooled.residuals.std()),
        **_points(pooled_at, lengths, target)}
    sigmas = [float(s) for s in args.sigmas.split(",")]
    calibrated = {s: _calibrated(lengths, s, target, lo, hi) for s in sigmas}

    print(f"best coverage at mean budget / true ≤ {target:g}, held-out split of {args.model}\n")
    print("| data | train | held-out | ridge residual spread (log2) | ridge baseline | q fixed in advance (5-fold) |"
          "\n|---|---|---|---|---|---|")
    for name, r in results.items():
        spread = f"{r['spread']:.2f}" if "spread" in r else "–"
        point, cross = r["ridge"], r["ridge_cross_fitted"]
        assert (point is None or isinstance(point, dict)) and (cross is None or isinstance(cross, dict))
        held = "–" if cross is None else f"{cross['coverage']:.1%} at {cross['mean_ratio']:.2f}"
        print(f"| {name} | {r.get('train', '–')} | {r['held_out']} | {spread} | {_fmt(point)} | {held} |")
    print(f"\n| data (train split) | answers < {args.split_at} / ≥ {args.split_at} | log2 spread within each half |"
          "\n|---|---|---|")
    for name, r in results.items():
        if "halves" in r:
            n, sd = r["halves"], r["spread_within_halves"]
            assert isinstance(n, list) and isinstance(sd, list)
            print(f"| {name} | {n[0]} / {n[1]} | {sd[0]:.2f} / {sd[1]:.2f} |")
    print("\n| calibrated σ (log2) | " + " | ".join(f"{s:g}" for s in sigmas) + " |")
    print("|---|" + "---|" * len(sigmas))
    print("| coverage at mean ≤ target | " + " | ".join(_fmt(calibrated[s]).split(" (")[0] for s in sigmas) + " |")
    env = environment(torch.device("cpu"))
    print("\n" + json.dumps(env))
    if args.json:
        args.json.write_text(json.dumps({"files": results, "calibrated": {str(s): p for s, p in calibrated.items()},
                                         "environment": env}, indent=1))


if __name__ == "__main__":
    main()
