"""Benchmark 5a: the masked-only chunked LM-head loss against naive full logits, forward + backward.

The naive variant is what a model that returns logits does: project every position through the head
(``[tokens, V]``), select the masked rows, cross-entropy weighted by ``1 / p_mask``. The chunked variant
gathers the masked rows first and calls :func:`dlm.kernels.masked_lm_loss`. On CUDA with liger-kernel
installed the Liger implementation is measured too.

Each variant runs in its own subprocess, so the peak memory of one cannot hide in the other's high-water
mark: on CPU the peak is the process's resident-set high-water mark (VmHWM), reported in total and above
the resident memory once the inputs exist; on CUDA it is ``torch.cuda.max_memory_allocated``.

    .venv/bin/python benchmarks/loss_head.py                    # the issue's setting, CPU (~10 minutes)
    .venv/bin/python benchmarks/loss_head.py --tokens 1024      # a quick look
    .venv/bin/python benchmarks/loss_head.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from _env import current_rss_bytes, environment, peak_rss_since_reset_bytes, reset_peak_rss, sync

from dlm.kernels import masked_lm_loss

GiB = 1024**3


def _inputs(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """The same tensors in every subprocess: hidden states, head, targets, mask, and 1 / p_mask weights."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    n_masked = round(args.tokens * args.mask_rate)
    mask = torch.zeros(args.tokens, dtype=torch.bool)
    mask[torch.randperm(args.tokens, generator=gen)[:n_masked]] = True
    p_mask = torch.rand(args.tokens, generator=gen) * 0.9 + 0.1
    return {
        "hidden": torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype).requires_grad_(),
        "weight": torch.randn(args.vocab, args.hidden, generator=gen).mul_(0.02).to(device, dtype).requires_grad_(),
        "targets": torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device),
        "mask": mask.to(device),
        "token_weights": (1.0 / p_mask).to(device),
    }


def _naive(x: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
    logits = x["hidden"] @ x["weight"].T
    mask = x["mask"]
    ce = F.cross_entropy(logits[mask].float(), x["targets"][mask], reduction="none")
    return (ce * x["token_weights"][mask]).sum()


def _fused(impl: str) -> Any:
    def run(x: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
        rows = x["mask"].nonzero().squeeze(1)
        return masked_lm_loss(
            x["hidden"][rows],
            x["weight"],
            x["targets"][rows],
            x["token_weights"][rows],
            chunk_size=args.chunk_size,
            impl=impl,
        )

    return run


VARIANTS = {"naive": _naive, "chunked": _fused("chunked"), "liger": _fused("liger")}


def measure(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``warmup + repeats`` forward+backward passes of one variant and record its peak memory."""
    device = torch.device(args.device)
    x = _inputs(args, device)
    step = VARIANTS[variant]
    sync(device)
    base_rss = current_rss_bytes()
    peak_is_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    times, cpu_times, loss = [], [], 0.0
    for i in range(args.warmup + args.repeats):
        x["hidden"].grad = x["weight"].grad = None
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = step(x, args)
        out.backward()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        loss = out.item()
        del out
    result: dict[str, Any] = {
        "variant": variant,
        "loss": loss,
        "grad_norm_hidden": x["hidden"].grad.float().norm().item(),
        "grad_norm_weight": x["weight"].grad.float().norm().item(),
        "seconds": times,
        "median_s": statistics.median(times),
        "cpu_seconds": cpu_times,
        "inputs_rss_gib": base_rss / GiB,
        "peak_rss_gib": peak_rss_since_reset_bytes() / GiB,
        "peak_above_inputs_gib": (peak_rss_since_reset_bytes() - base_rss) / GiB,
        "peak_reset": peak_is_reset,
    }
    if device.type == "cuda":
        result["peak_cuda_above_inputs_gib"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / GiB
    return result


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=126464)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--mask-rate", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the chunked kernel")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=0, help="untimed passes per subprocess first")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per subprocess")
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per variant, alternating variants")
    parser.add_argument("--variants", default=None, help="comma-separated; default naive,chunked (+liger on CUDA)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run_child(variant: str, passthrough: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, *passthrough, "--child", variant], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant over all rounds: every timing, the median, and the largest peak."""
    merged = dict(rounds[-1])
    merged["seconds"] = [t for r in rounds for t in r["seconds"]]
    merged["median_s"] = statistics.median(merged["seconds"])
    merged["cpu_seconds"] = [t for r in rounds for t in r["cpu_seconds"]]
    merged["median_cpu_s"] = statistics.median(merged["cpu_seconds"])
    for key in ("peak_rss_gib", "peak_above_inputs_gib", "peak_cuda_above_inputs_gib"):
        if key in merged:
            merged[key] = max(r[key] for r in rounds)
    return merged


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return 0
    device = torch.device(args.device)
    default = "naive,chunked,liger" if device.type == "cuda" else "naive,chunked"
    variants = (args.variants or default).split(",")
    config = {k: v for k, v in vars(args).items() if k not in ("child", "json", "variants")}
    report: dict[str, Any] = {"benchmark": "loss_head", "config": config, "env": environment(device)}
    print(json.dumps({"config": config, "env": report["env"]}, indent=2), flush=True)
    raw = argv if argv is not None else sys.argv[1:]
    passthrough = [a for i, a in enumerate(raw) if not (a.startswith("--json") or (i and raw[i - 1] == "--json"))]
    # Rounds alternate the variants, so a machine whose load drifts (shared CPUs) slows both alike.
    per_variant: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            result = _run_child(variant, passthrough)
            per_variant[variant].append(result)
            cuda_peak = result.get("peak_cuda_above_inputs_gib")
            print(
                f"round {round_ + 1} {variant:8s} {statistics.median(result['seconds']):8.3f} s "
                f"(CPU {statistics.median(result['cpu_seconds']):8.3f} s)   peak RSS "
                f"{result['peak_rss_gib']:6.2f} GiB (above inputs {result['peak_above_inputs_gib']:6.2f} GiB)"
                + (f"   CUDA peak above inputs {cuda_peak:6.2f} GiB" if cuda_peak is not None else "")
                + f"   loss {result['loss']:.6g}",
                flush=True,
            )
    report["results"] = [_merge(per_variant[v]) for v in variants]
    by_name = {r["variant"]: r for r in report["results"]}
    peak_key = "peak_cuda_above_inputs_gib" if device.type == "cuda" else "peak_above_inputs_gib"
    for variant in variants:
        if variant == "naive" or "naive" not in by_name:
            continue
        naive, fused = by_name["naive"], by_name[variant]
        summary = {
            "speedup": naive["median_s"] / fused["median_s"],
            "speedup_cpu_time": naive["median_cpu_s"] / fused["median_cpu_s"],
            "peak_ratio_above_inputs": naive[peak_key] / fused[peak_key],
            "peak_ratio_total_rss": naive["peak_rss_gib"] / fused["peak_rss_gib"],
            "loss_rel_diff": abs(naive["loss"] - fused["loss"]) / abs(naive["loss"]),
        }
        report[f"{variant}_vs_naive"] = summary
        print(
            f"{variant} vs naive: {summary['speedup']:.2f}x faster (median wall time; "
            f"{summary['speedup_cpu_time']:.2f}x in process CPU time), {summary['peak_ratio_above_inputs']:.2f}x "
            f"less peak memory above the inputs, {summary['peak_ratio_total_rss']:.2f}x less peak RSS in total, "
            f"loss rel. diff {summary['loss_rel_diff']:.1e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
