"""Benchmark: `dlm export` and `dlm import` throughput (GB/s) for the ``small`` preset.

A run directory is written first (fp32 ``model.safetensors`` + ``model_config.json``, the bundled tokenizer),
then exported in each dtype and format and imported back; each figure is the bytes of the export divided by
the wall time of the call (which includes fsync-ing the export: it is durable when the call returns), the
best of ``--repeats``. Export streams shard by shard; to show it, the peak *anonymous* resident memory above
the baseline is sampled during one export (a thread reads ``RssAnon`` every 2 ms). File-backed pages of the
memory-mapped source are left out of that figure: they are page cache the kernel can drop, not a copy.

    .venv/bin/python benchmarks/hf_interop.py
    .venv/bin/python benchmarks/hf_interop.py --preset tiny --repeats 1 --max-shard-size 100MB
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _env import current_rss_bytes, environment
from safetensors.torch import save_model

from dlm.modeling import build_model, export, import_pretrained, preset


def _run_dir(directory: Path, preset_name: str) -> int:
    cfg = preset(preset_name)
    torch.manual_seed(0)
    model = build_model(cfg)
    directory.mkdir(parents=True)
    save_model(model, str(directory / "model.safetensors"))
    (directory / "model_config.json").write_text(cfg.model_dump_json())
    (directory / "config.yaml").write_text(yaml.safe_dump({"tokenizer": {"name_or_path": "gpt2-mdm"}}))
    return model.num_params()


def _rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return current_rss_bytes()


def _peak_anon_during(fn: Any) -> int:
    """Peak anonymous resident memory above the level before ``fn`` runs, sampled every 2 ms."""
    baseline, peak, done = _rss_anon_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_anon_bytes()) - baseline


def _best(fn: Any, repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-shard-size", default="200MB")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dlm-bench-interop-"))
    try:
        params = _run_dir(root / "run", args.preset)
        rows = []
        for fmt in ("dlm", "llada"):
            for dtype in ("bf16", "fp32"):
                out = root / f"{fmt}-{dtype}"

                def do_export(out: Path = out, fmt: str = fmt, dtype: str = dtype) -> Any:
                    shutil.rmtree(out, ignore_errors=True)
                    shard = args.max_shard_size
                    return export(root / "run", out, dtype=dtype, format=fmt, max_shard_size=shard)  # type: ignore[arg-type]

                do_export()  # warm: imports, tokenizer load, page cache of the source
                anon_peak = _peak_anon_during(do_export)
                export_s, result = _best(do_export, args.repeats)
                import_s, _ = _best(lambda out=out: import_pretrained(out), args.repeats)
                gb = result.total_size / 1e9
                rows.append({
                    "format": fmt,
                    "dtype": dtype,
                    "shards": len(result.shards),
                    "GB": round(gb, 3),
                    "export_s": round(export_s, 3),
                    "export_GB_per_s": round(gb / export_s, 2),
                    "export_peak_anon_MB": round(anon_peak / 1e6),
                    "import_s": round(import_s, 3),
                    "import_GB_per_s": round(gb / import_s, 2),
                })
                print(json.dumps(rows[-1]))
        report = {
            "preset": args.preset,
            "params": params,
            "max_shard_size": args.max_shard_size,
            "repeats": args.repeats,
            "environment": environment(torch.device("cpu")),
            "results": rows,
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
