"""Benchmark 5b: every attention backend that runs here, forward + backward time at several lengths.

Rows are either one document each (``--docs single``: dense non-causal attention, the setting of the
"TFLOP/s for head-dim 128 at 4k" figure) or packed ragged documents (``--docs packed``: lengths drawn
from a fixed seed, including length-1 documents). The attention mask is built and prepared once per length
outside the timed region, as the model does once per forward pass for all its layers.

Throughput counts only the FLOPs that the mask leaves: ``4 · B · H · hd · Σ L_doc²`` forward and 2.5 times
that backward (flash-attn's convention: the backward recomputes the scores). A backend without a backward
pass on the device (FlexAttention on CPU) is timed forward-only and marked so. Besides wall time the
process CPU time is reported: on a shared machine it varies far less than wall time.

    .venv/bin/python benchmarks/attention.py                                   # CPU defaults
    .venv/bin/python benchmarks/attention.py --device cuda --docs single --head-dim 128 --heads 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from _env import environment, sync

from dlm.kernels import BACKENDS, AttentionBackendError, AttentionMask, attention, resolve_backend


def doc_lengths(total: int, mean: int, gen: torch.Generator) -> list[int]:
    """Ragged document lengths filling ``total`` tokens: uniform in [1, 2·mean], every tenth of length 1."""
    lengths: list[int] = []
    while sum(lengths) < total:
        draw = 1 if len(lengths) % 10 == 9 else int(torch.randint(1, 2 * mean + 1, (1,), generator=gen))
        lengths.append(min(draw, total - sum(lengths)))
    return lengths


def make_doc_ids(batch: int, seq_len: int, mean: int, packed: bool, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seq_len)
    rows = []
    for _ in range(batch):
        lengths = doc_lengths(seq_len, mean, gen) if packed else [seq_len]
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows).to(device)


def attended_pairs(doc_ids: torch.Tensor) -> int:
    """Σ over rows and documents of L², the query-key pairs the document mask leaves."""
    total = 0
    for row in doc_ids.cpu():
        _, counts = torch.unique_consecutive(row, return_counts=True)
        total += int((counts.long() ** 2).sum())
    return total


def time_backend(name: str, args: argparse.Namespace, seq_len: int, device: torch.device) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, hd = args.batch, args.heads, args.kv_heads or args.heads, args.head_dim
    q, k, v = (
        torch.randn(shape, generator=gen).to(device, dtype)
        for shape in ((b, h, seq_len, hd), (b, hkv, seq_len, hd), (b, hkv, seq_len, hd))
    )
    doc_ids = make_doc_ids(b, seq_len, args.mean_doc_len, args.docs == "packed", device)
    mask = AttentionMask(doc_ids) if args.docs == "packed" else None
    backward = not (name == "flex" and device.type == "cpu")  # PyTorch has no FlexAttention backward on CPU
    if mask is not None:
        BACKENDS[name].prepare(mask)
    grad_out = torch.randn(b, h, seq_len, hd, generator=gen).to(device, dtype)
    inputs = [x.requires_grad_(backward) for x in (q, k, v)]

    def step() -> None:
        for x in inputs:
            x.grad = None
        out = attention(*inputs, backend=name, mask=mask)
        if backward:
            out.backward(grad_out)

    times, cpu_times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.repeats):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    flops = 4 * h * hd * attended_pairs(doc_ids) * (3.5 if backward else 1.0)
    result = {
        "backend": name,
        "seq_len": seq_len,
        "pass": "fwd+bwd" if backward else "fwd only",
        "median_ms": median * 1e3,
        "median_cpu_ms": statistics.median(cpu_times) * 1e3,
        "tflops": flops / median / 1e12,
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", default=None, help="comma-separated; default 512,1024,2048 (CPU), 1k..16k (CUDA)")
    parser.add_argument("--backends", default=None, help="comma-separated; default every backend that runs here")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 8 (CPU), 32 (CUDA)")
    parser.add_argument("--kv-heads", type=int, default=None, help="default = heads (no GQA)")
    parser.add_argument("--head-dim", type=int, default=None, help="default 64 (CPU), 128 (CUDA)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="fp32 CPU, bf16 CUDA")
    parser.add_argument("--docs", default="packed", choices=["packed", "single"])
    parser.add_argument("--mean-doc-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.lengths = args.lengths or ("1024,2048,4096,8192,16384" if cuda else "512,1024,2048")
    args.heads = args.heads or (32 if cuda else 8)
    args.head_dim = args.head_dim or (128 if cuda else 64)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    names = args.backends.split(",") if args.backends else list(BACKENDS)
    runnable = []
    for name in names:
        try:
            resolve_backend(name, device, getattr(torch, args.dtype), head_dim=args.head_dim)
        except AttentionBackendError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        runnable.append(name)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    report: dict[str, Any] = {"benchmark": "attention", "config": config, "env": environment(device), "results": []}
    print(json.dumps({"config": config, "env": report["env"]}, indent=2), flush=True)
    print(f"{'backend':8s} {'T':>6s} {'pass':9s} {'ms':>10s} {'CPU ms':>10s} {'TFLOP/s':>9s}")
    for seq_len in (int(x) for x in args.lengths.split(",")):
        for name in runnable:
            result = time_backend(name, args, seq_len, device)
            report["results"].append(result)
            print(
                f"{name:8s} {seq_len:6d} {result['pass']:9s} {result['median_ms']:10.2f} "
                f"{result['median_cpu_ms']:10.2f} {result['tflops']:9.4f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
