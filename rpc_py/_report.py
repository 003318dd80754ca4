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
