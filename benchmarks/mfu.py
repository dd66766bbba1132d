"""Benchmark 5c: model FLOPs utilisation of a training step of an 8B-width model on one GPU.

The llada-8b preset (4096 wide, 32 heads, SwiGLU 12288, vocab 126464) cut to ``--layers`` layers, sequences
of ``--seq-len`` tokens, bf16 autocast over fp32 master weights, fused AdamW. Each step is the LLaDA
pretraining step: ``t ~ U(eps, 1)`` per row, tokens masked with ``p_mask``, the masked rows alone sent
through the chunked LM-head loss weighted by ``1 / p_mask`` (the path of ``dlm.training.objective``,
written out here so the benchmark measures kernels, not data loading).

MFU = tokens/s × ``training_flops_per_token`` (``6 N + 12 L d T``, N non-embedding) / the GPU's dense bf16
peak (:func:`dlm.training.metrics.peak_tflops`). That count leaves out the LM head, which does real work on
the masked rows (``6 d V`` per masked token); with few layers the head is a large share of the step, so
the hardware utilisation including it is reported too.

    .venv/bin/python benchmarks/mfu.py                      # needs a CUDA GPU
    .venv/bin/python benchmarks/mfu.py --layers 2 --compile --attention flash
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from _env import environment, sync

from dlm.kernels import masked_lm_loss, resolve_backend
from dlm.modeling import build_model, preset, training_flops_per_token
from dlm.training.metrics import peak_tflops

EPS = 1e-3


def _batches(args: argparse.Namespace, vocab: int, mask_id: int, device: torch.device, n: int) -> list[dict[str, Any]]:
    """Random token rows, packed into ragged documents unless ``--docs single``, masked the LLaDA way."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab - 1, (args.micro_batch, args.seq_len), generator=gen)
        doc_ids = None
        if args.docs == "packed":
            cuts = torch.randint(1, args.seq_len, (args.seq_len // args.mean_doc_len,), generator=gen)
            starts = torch.zeros(args.seq_len, dtype=torch.long)
            starts[cuts] = 1
            doc_ids = starts.cumsum(0).expand(args.micro_batch, -1).contiguous()
        t = torch.rand(args.micro_batch, generator=gen)
        p_mask = (1 - EPS) * t + EPS
        masked = torch.rand(args.micro_batch, args.seq_len, generator=gen) < p_mask[:, None]
        noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
        batch = {"ids": ids, "noisy": noisy, "masked": masked, "weights": 1.0 / p_mask, "doc_ids": doc_ids}
        batches.append({k: (v.to(device) if v is not None else None) for k, v in batch.items()})
    return batches


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="layers of llada-8b kept (the issue: 2 to 4)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--attention", default="auto", help="model.attention: auto, flash, sdpa, flex, math")
    parser.add_argument("--compile", action="store_true", help="model.compile: torch.compile each block")
    parser.add_argument("--docs", default="packed", choices=["packed", "single"])
    parser.add_argument("--mean-doc-len", type=int, default=1024)
    parser.add_argument("--loss-chunk", type=int, default=4096, help="rows per LM-head chunk")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/mfu.py measures utilisation against a GPU's bf16 peak and needs a CUDA device; none is "
            "available here (torch.cuda.is_available() is False). Run it on a GPU machine.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    peak = peak_tflops(device, args.peak_tflops)
    if peak is None:
        print(f"unknown bf16 peak for {torch.cuda.get_device_name(device)}; pass --peak-tflops", file=sys.stderr)
        return 2
    cfg = preset("llada-8b", n_layers=args.layers, attention=args.attention, compile=args.compile,
                 max_seq_len=max(args.seq_len, 4096))  # fmt: skip
    model = build_model(cfg, device)
    if model.embed.weight.is_meta:  # above build_model's meta threshold: materialise on the GPU
        model.to_empty(device=device)
        model.init_weights()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batches = _batches(args, cfg.vocab_size, cfg.vocab_size - 1, device, args.warmup + args.steps)

    def step(batch: dict[str, Any]) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(batch["noisy"], doc_ids=batch["doc_ids"])
            rows, cols = batch["masked"].nonzero(as_tuple=True)
            loss = masked_lm_loss(
                hidden[rows, cols],
                model.lm_head_weight,
                batch["ids"][rows, cols],
                batch["weights"][rows],
                chunk_size=args.loss_chunk,
            ) / batch["ids"].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[: args.warmup]:
        step(batch)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for batch in batches[args.warmup :]:
        step(batch)
    sync(device)
    elapsed = time.perf_counter() - start

    timed = batches[args.warmup :]
    tokens = sum(b["ids"].numel() for b in timed)
    masked_fraction = sum(int(b["masked"].sum()) for b in timed) / tokens
    tokens_per_s = tokens / elapsed
    flops_per_token = training_flops_per_token(cfg, args.seq_len)
    head_flops_per_token = 6 * cfg.d_model * cfg.vocab_size * masked_fraction
    report = {
        "benchmark": "mfu",
        "config": {**vars(args), "model": cfg.model_dump(mode="json")},
        "env": environment(device),
        "attention_backend": resolve_backend(cfg.attention, device, torch.bfloat16, head_dim=cfg.head_dim),
        "peak_tflops": peak,
        "step_s": elapsed / len(timed),
        "tokens_per_s": tokens_per_s,
        "masked_fraction": masked_fraction,
        "mfu": tokens_per_s * flops_per_token / (peak * 1e12),
        "hfu_with_lm_head": tokens_per_s * (flops_per_token + head_flops_per_token) / (peak * 1e12),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 1024**3,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
