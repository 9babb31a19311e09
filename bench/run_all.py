"""Run every benchmark with its default sizes (writes multi-GB files under bench/out/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in ("bench_inspect.py", "bench_diff.py", "bench_trace.py", "bench_convert.py", "bench_startup.py"):
    print(f"\n== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
