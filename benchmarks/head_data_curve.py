"""Is the fitted length head short of data, or of what the backbone's states say? A learning curve (issue 17).

``dlm fit-head`` fits the head on a frozen backbone's cached states. This script refits it on nested random
subsets of one data file's training examples (drawn from the first max(``--sizes``), the set ``dlm fit-head
--limit`` reads; the other files' examples always in), ``--seeds`` draws per size, and scores every fit on
the held-out split the way ``dlm eval length`` does: the bucket head's best coverage at mean budget / true
length <= ``--target-ratio`` over the same fine q grid (:func:`dlm.evaluation.sweep.coverage_at_ratio`).
A curve still rising at the largest size says "more examples"; a flat one says the states hold no more
about the length, whatever the head.

Only the bucket head is plotted: it is generation's default and picks its epoch within ~6 (``--epochs``
bounds the fits), while the EOS head keeps improving for 100 epochs and would be under-fitted here.
States come from two :class:`~dlm.training.state_cache.StateCache` directories (training and held-out
split); examples they lack are computed first (~1.2 s each for SmolLM2-135M on 2 cores).

    .venv/bin/python benchmarks/head_data_curve.py --model runs/smollm-sft-length \\
        --data ../shared/data/sft/alpaca_en_demo.json --data ../shared/data/sft/gsm8k_train.jsonl \\
        --vary gsm8k_train.jsonl --sizes 250,500,1000,2000,3000 --cache runs/smollm-head-states \\
        --held-out-cache runs/smollm-heldout-states --out benchmarks/plots/smollm_head_data_curve.png
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _env import environment  # noqa: E402

from dlm.evaluation.readings import Readings, read_all  # noqa: E402
from dlm.evaluation.sweep import coverage_at_ratio  # noqa: E402
from dlm.generation import load_for_generation  # noqa: E402
from dlm.modeling import LengthHead  # noqa: E402
from dlm.training.head_fit import cached_features, fit_length_head  # noqa: E402
from dlm.training.state_cache import Features  # noqa: E402


def held_out_readings(head: LengthHead, feats: Features, width: int, batch_size: int = 64) -> Readings:
    """Both heads' probabilities on the cached held-out states, as :func:`~dlm.evaluation.readings.read_lengths`
    reads them from a live pass (no zero-shot reading: it is not what this curve is about)."""
    eos, bucket = [], []
    with torch.no_grad():
        for start in range(0, len(feats), batch_size):
            out = head.read(*feats.batch(range(start, min(start + batch_size, len(feats)))))
            eos.append(out.eos_probs().numpy())
            bucket.append(out.bucket_probs().numpy())
    eos_probs = np.concatenate(eos)
    return Readings(width, np.zeros_like(eos_probs), eos_probs, np.concatenate(bucket), head.cfg.edges,
                    min(head.cfg.min_bucket, width))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="run directory with a length head (the source of fit-head)")
    parser.add_argument("--data", required=True, action="append", help="the run's SFT files (repeat)")
    parser.add_argument("--vary", required=True, help="file name whose training examples are subsampled")
    parser.add_argument("--sizes", default="250,500,1000,2000,3000", help="subset sizes of --vary, comma-separated")
    parser.add_argument("--seeds", type=int, default=3, help="random subsets (and fit seeds) per size")
    parser.add_argument("--epochs", type=int, default=15, help="most epochs per fit")
    parser.add_argument("--target-ratio", type=float, default=2.0)
    parser.add_argument("--cache", required=True, help="state cache directory of the training split")
    parser.add_argument("--held-out-cache", required=True, help="state cache directory of the held-out split")
    parser.add_argument("--out", required=True, help="the plot (.png); the figures go beside it as .json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    loaded = load_for_generation(args.model, device="cpu")
    head = loaded.model.length_head
    assert head is not None, f"{args.model} has no length head"
    width = head.cfg.max_len
    train = read_all(args.data, loaded, template=None, split="train", eval_fraction=None, limit=None).examples
    varied = [e for e in train if Path(e.source).name == args.vary]
    fixed = [e for e in train if Path(e.source).name != args.vary]
    if not varied or max(sizes) > len(varied):
        raise SystemExit(f"--vary {args.vary}: {len(varied)} training examples, sizes up to {max(sizes)} asked")
    pool = varied[: max(sizes)]  # what `dlm fit-head --limit MAX` reads, so a cache built by it holds them all
    draws = {seed: random.Random(seed).sample(pool, len(pool)) for seed in range(args.seeds)}
    cached_features(loaded, fixed + pool, width, Path(args.cache))  # compute what the cache lacks, once
    held_out = read_all(args.data, loaded, template=None, split="held-out", eval_fraction=None, limit=None).examples
    ho_feats = cached_features(loaded, held_out, width, Path(args.held_out_cache))
    lengths = [e.length for e in held_out]

    rows = []
    for size in sizes:
        for seed in range(args.seeds):
            chosen = fixed + draws[seed][:size]
            feats = cached_features(loaded, chosen, width, Path(args.cache), progress=False)
            t0 = time.perf_counter()
            result = fit_length_head(head, feats, epochs=args.epochs, patience=args.epochs, seed=seed,
                                     progress=False)
            fitted = LengthHead(loaded.model.cfg.d_model, head.cfg)
            fitted.load_state_dict(result.state)
            points = coverage_at_ratio(held_out_readings(fitted.eval(), ho_feats, width), lengths,
                                       ["bucket-head"], args.target_ratio)
            point = points["bucket-head"]
            assert point is not None
            rows.append({"size": size, "seed": seed, "examples": len(chosen), "coverage": point["coverage"],
                         "mean_ratio": point["mean_ratio"], "q": point["q"],
                         "bucket_epoch": result.best_epoch["bucket"], "fit_seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)

    out = Path(args.out)
    by_size = {s: [r["coverage"] * 100 for r in rows if r["size"] == s] for s in sizes}
    mean = [float(np.mean(by_size[s])) for s in sizes]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    ax.plot(sizes, mean, "o-", color="tab:green", label=f"bucket head, mean of {args.seeds} subsets")
    ax.fill_between(sizes, [min(by_size[s]) for s in sizes], [max(by_size[s]) for s in sizes], color="tab:green",
                    alpha=0.2, label="min-max over subsets")
    ax.axhline(95, ls="--", color="gray", label="issue 17 goal (mix)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel(f"{args.vary} training examples in the fit (+ {len(fixed)} of the other files)")
    ax.set_ylabel(f"held-out coverage at mean b/L <= {args.target_ratio:g} (%)")
    ax.set_title(f"dlm fit-head on {Path(args.model).name}: {len(held_out)} held-out examples")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    record = {"rows": rows, "mean_by_size": dict(zip(map(str, sizes), mean)), "held_out": len(held_out),
              "environment": environment(torch.device("cpu"))}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    for s, m in zip(sizes, mean):
        print(f"{args.vary} {s:>5}: coverage {m:.1f}% (" + ", ".join(f"{c:.1f}" for c in by_size[s]) + ")")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
