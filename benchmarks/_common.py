"""Helpers shared by the benchmark scripts (timing, peak memory, environment line)."""

from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import contextmanager

import torch


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes that finish on a laptop CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)


def setup(args, measures_memory: bool = True) -> torch.device:
    """Threads, seed and the environment line; `measures_memory` makes the resident set exact
    (`exact_rss`), which scripts that time only leave off: it turns every large allocation into
    fresh pages, a cost no user's process pays."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cpu" and measures_memory:
        exact_rss()
    print(environment(device), flush=True)
    return device


def exact_rss(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of at least `threshold` bytes with its own mmap, so that
    freeing a tensor returns its pages at once and the resident set tracks live memory (otherwise a
    later block reuses freed heap pages and its peak is under-counted). Linux/glibc only."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))
    except (OSError, AttributeError):
        return False


def environment(device: torch.device) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"# torch {torch.__version__} | device {device} ({where}) | torch threads {torch.get_num_threads()} | "
        f"load average {load:.1f}"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def peak_memory(device: torch.device, result: dict):
    """Peak memory above the level at entry, in bytes, into result["peak_bytes"].

    CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus
    the resident set at entry -- everything the block touched, torch's allocator included. CUDA:
    torch.cuda.max_memory_allocated above the allocation at entry.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - start
        result["method"] = "torch.cuda.max_memory_allocated"
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _status_kib("VmRSS")
        method = "VmHWM after reset (/proc/self/clear_refs) - VmRSS at start"
    except OSError:
        start = _status_kib("VmHWM")
        method = "VmHWM (not resettable here: a lower bound relative to earlier peaks)"
    yield result
    end = _status_kib("VmHWM")
    result["peak_bytes"] = None if start is None or end is None else max(0, end - start) * 1024
    result["method"] = method


@contextmanager
def timed(device: torch.device, result: dict, key: str = "seconds"):
    synchronize(device)
    start = time.perf_counter()
    yield result
    synchronize(device)
    result[key] = time.perf_counter() - start


def gib(num_bytes: float | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**30:.3f} GiB"


def mib(num_bytes: float | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f} MiB"
