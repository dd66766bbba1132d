"""Data-path throughput: tokens/s from text and from token shards, and the smoke run's data wait.

    .venv/bin/python benchmarks/data_throughput.py                       # all three, prints JSON + Markdown
    .venv/bin/python benchmarks/data_throughput.py --skip-smoke --seconds 5

(a) parquet → packed batches, tokenizing on the fly (``data.source=files``), with 0 and 2 loader workers;
(b) token shards (written by ``prepare_shards``, timed too) → packed batches, with 0 and 2 workers;
(c) the share of step time the smoke config (``configs/smoke.yaml``) spends waiting for data, from the
    ``data_wait_pct`` its metrics log, with ``data.num_workers`` 0 and 1.

Throughput is measured after the first batch (worker start-up and the eval scan are reported separately as
``startup_s``), over ``--seconds`` of wall time. Goals on a 2-core machine: (a) >= 0.5 M tokens/s,
(b) >= 20 M tokens/s, (c) < 1 % of step time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlm.config import DataSection, load_config  # noqa: E402
from dlm.data_streams import build_pretrain_stream, load_tokenizer, prepare_shards  # noqa: E402


def _hardware() -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
            "platform": platform.platform()}


def _versions() -> dict[str, str]:
    names = ["torch", "torchdata", "datasets", "tokenizers", "transformers", "numpy", "pyarrow"]
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def _throughput(section: DataSection, seconds: float, micro_batch_size: int) -> dict[str, Any]:
    tokenizer = load_tokenizer("gpt2-mdm")
    started = time.perf_counter()
    stream = build_pretrain_stream(section, tokenizer, seed=0, micro_batch_size=micro_batch_size)
    next(stream)
    startup = time.perf_counter() - started
    batches, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        next(stream)
        batches += 1
    stream.close()
    tokens = batches * micro_batch_size * section.seq_len
    return {"workers": section.num_workers, "worker_batches": stream.bundle, "tokens_per_s": tokens / elapsed,
            "batches": batches, "tokens": tokens, "startup_s": startup}


def _tokenizer_ceiling(source: str, seconds: float) -> dict[str, Any]:
    """The bare Rust tokenizer on the same documents, in this process with its own thread pool: what (a) would
    reach if reading, shuffling and packing cost nothing."""
    from dlm.data_streams import iter_documents, resolve_files

    tokenizer = load_tokenizer("gpt2-mdm")
    texts = list(iter_documents(resolve_files([source])))
    backend = tokenizer.tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    tokens, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for start in range(0, len(texts), 32):
            tokens += sum(len(e.ids) for e in encode(texts[start : start + 32], add_special_tokens=False))
    return {"tokens_per_s": tokens / elapsed, "tokens": tokens}


def _smoke_wait(workers: int, steps: int) -> dict[str, Any]:
    from dlm.training import train

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(ROOT / "configs" / "smoke.yaml", [
            f"run.dir={run_dir}", f"run.steps={steps}", "run.eval_every=0", "run.eval_batches=1",
            "logging.every=10", "logging.progress=false", "logging.wandb.mode=disabled",
            f"data.num_workers={workers}", f"schedule.warmup_steps={min(30, steps - 1)}",
        ])
        summary = train(cfg)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait_pct"] for r in records if "data_wait_pct" in r]
    return {"workers": workers, "steps": steps, "data_wait_pct_mean": sum(waits) / len(waits),
            "data_wait_pct_first_window": waits[0],
            "data_wait_pct_after_first": sum(waits[1:]) / max(1, len(waits) - 1),
            "tokens_per_s": summary["tokens_per_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "fineweb"),
                        help="parquet directory or glob (default ../shared/data/fineweb, else the bundled sample)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per configuration")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--smoke-steps", type=int, default=300, help="the smoke config's own length")
    parser.add_argument("--skip-smoke", action="store_true")
    parser.add_argument("--json-out", default=None, help="also write the results here")
    args = parser.parse_args()
    source = args.source if Path(args.source).exists() else str(ROOT / "data" / "fineweb-sample")
    results: dict[str, Any] = {"hardware": _hardware(), "versions": _versions(), "source": source,
                               "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size}
    base = {"seq_len": args.seq_len, "eval_fraction": 0.05, "max_eval_rows": 64}

    results["tokenizer_ceiling"] = _tokenizer_ceiling(source, args.seconds)
    results["text_to_packed"] = [
        _throughput(DataSection(paths=[source], num_workers=w, **base), args.seconds, args.micro_batch_size)
        for w in (0, 2)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer("gpt2-mdm")
        started = time.perf_counter()
        index = prepare_shards(source, Path(tmp) / "shards", tokenizer, workers=2, show_progress=False)
        seconds = time.perf_counter() - started
        results["prepare"] = {"workers": 2, "tokens": index["tokens"], "seconds": seconds,
                              "tokens_per_s": index["tokens"] / seconds}
        # (2 workers, 1 batch per hand-off) is what the default bundles of batches are measured against.
        results["shards_to_packed"] = [
            _throughput(DataSection(source="shards", paths=[str(Path(tmp) / "shards")], num_workers=w,
                                    worker_batches=k, **base), args.seconds, args.micro_batch_size)
            for w, k in ((0, None), (2, 1), (2, None))
        ]
    if not args.skip_smoke:
        results["smoke_data_wait"] = [_smoke_wait(w, args.smoke_steps) for w in (0, 1)]

    print(json.dumps(results, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("| measurement | workers | batches per hand-off | tokens/s | start-up s |")
    print("|---|---|---|---|---|")
    for key, label in (("text_to_packed", "(a) parquet → packed, tokenizing on the fly"),
                       ("shards_to_packed", "(b) uint16 shards → packed (memmap)")):
        for r in results[key]:
            print(f"| {label} | {r['workers']} | {r['worker_batches']} | {r['tokens_per_s'] / 1e6:.2f} M | "
                  f"{r['startup_s']:.1f} |")
    t = results["tokenizer_ceiling"]
    print(f"| bare `encode_batch_fast` on the same text, batches of 32 (Rust thread pool) | – | – | "
          f"{t['tokens_per_s'] / 1e6:.2f} M | – |")
    p = results["prepare"]
    print(f"| `prepare_shards` (tokenize + write) | {p['workers']} | – | {p['tokens_per_s'] / 1e6:.2f} M | – |")
    for r in results.get("smoke_data_wait", []):
        print(f"| (c) smoke run data wait, {r['steps']} steps | {r['workers']} | – | "
              f"{r['data_wait_pct_mean']:.2f} % of step time "
              f"(after the first window {r['data_wait_pct_after_first']:.2f} %) | – |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
