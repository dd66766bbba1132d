"""What a benchmark figure was measured on: hardware, versions, and the peak memory of a process.

Every script prints this block with its results, so a figure in RESULTS.md always carries its context.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware and software versions relevant to kernel timings."""
    env: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["flash_attn"] = _version("flash-attn") or _version("flash_attn")
        env["liger_kernel"] = _version("liger-kernel") or _version("liger_kernel")
    return env


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (Linux: VmHWM; ru_maxrss is KiB there)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident memory (Linux >= 4.0: ``clear_refs`` value 5), so
    that the peak of the measured work is not the peak of building its inputs. False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset_bytes() -> int:
    """VmHWM from ``/proc/self/status`` (what :func:`reset_peak_rss` restarts), else ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def current_rss_bytes() -> int:
    """Resident memory now (Linux ``/proc/self/statm``; elsewhere the high-water mark, an upper bound)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_rss_bytes()


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers the work and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
