"""Small helpers for what rpc_py reports: byte sizes in summaries and tables, and the CPU's name in
the machine description that benchmarks and training runs record."""

from __future__ import annotations

import platform


def format_bytes(n: float) -> str:
    """``512 B``, ``1.50 KiB``, ... up to GiB (larger sizes stay in GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n} B"


def cpu_name(fallback: str | None = None) -> str:
    """The CPU's model name from ``/proc/cpuinfo``; elsewhere ``fallback``, or else what
    ``platform`` knows (processor, then machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return fallback or platform.processor() or platform.machine()


def copy_bandwidth_gbps(device="cuda", nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """The device's own copy rate in GB/s, bytes read plus bytes written (``dst.copy_(src)`` of
    ``nbytes``, median of ``repeats``): the yardstick every bandwidth of a benchmark is divided by.
    ``RPC_PY_COPY_GBPS`` in the environment (set by benchmarks/gpu_check.sh after measuring it once)
    is returned instead, so that every step of a run uses the same figure."""
    import os
    import statistics
    import time

    import torch

    env = os.environ.get("RPC_PY_COPY_GBPS")
    if env:
        return float(env)
    device = torch.device(device)
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 2:  # two warm-up copies
            times.append(seconds)
    return 2 * n * 4 / statistics.median(times) / 1e9
