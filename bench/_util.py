"""Shared helpers for the benchmarks: medians of repeated timings, a baseline command, memory."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cat_time(*paths: Path, repeats: int = 5) -> float:
    """Median seconds for ``cat PATHS > /dev/null`` (page cache warmed by a first run)."""
    cmd = ["cat", *map(str, paths)]
    return median_time(lambda: subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True), repeats)


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Reset VmHWM (peak RSS) so the next reading is the peak of what follows (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def mapped_rss_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps): the pages of
    that file this process has touched, and nothing else (no library code, no heap)."""
    total, inside = 0, False
    target = str(Path(path).resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not line.startswith(("Rss", "Size")):
            inside = len(fields) >= 6 and fields[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(fields[1])
    return total
