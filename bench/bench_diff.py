"""diff of two checkpoints that differ in one element, against `cat A B` and against the naive
script (load both fully, `torch.allclose` per key), plus peak anonymous memory at 1, 2 and 4 GB.

Run: .venv/bin/python bench/bench_diff.py [--gb 2] [--memory-gb 1 2 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import OUT, cat_time  # noqa: E402
from bench_inspect import make_state  # noqa: E402


def build_pair(gb: float, fmt: str) -> tuple[Path, Path]:
    """A and B: the same weights except one element in the middle tensor."""
    OUT.mkdir(parents=True, exist_ok=True)
    ext = "pt" if fmt == "torch-zip" else "safetensors"
    a, b = OUT / f"diff_{gb}_a.{ext}", OUT / f"diff_{gb}_b.{ext}"
    if a.exists() and b.exists():
        return a, b
    state = make_state(gb)
    keys = list(state)
    save = (lambda s, p: torch.save(s, p)) if fmt == "torch-zip" else _save_safetensors
    save(state, a)
    mats = [k for k in keys if state[k].numel() > 12345]
    middle = mats[len(mats) // 2]
    state[middle] = state[middle].clone()
    state[middle].view(-1)[12345] += 1.0
    save(state, b)
    return a, b


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path))


OURS = r"""
import json, statistics, sys, threading, time
sys.path.insert(0, {bench!r})
from _util import status_kb
import tensorparity
a, b, repeats = {a!r}, {b!r}, {repeats}
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], status_kb("RssAnon")); time.sleep(0.002)
base = status_kb("RssAnon")
threading.Thread(target=sample, daemon=True).start()
times = []
for _ in range(repeats):
    t = time.perf_counter(); report = tensorparity.diff(a, b, progress=False); times.append(time.perf_counter() - t)
stop.set()
largest = max(e.nbytes for e in tensorparity.open(a).tensors())
print(json.dumps({{"s": statistics.median(times), "passed": report.passed, "anon_base_mb": base / 1024,
                  "anon_peak_mb": max(peak[0], base) / 1024, "largest_mb": largest / 2**20}}))
"""

NAIVE = r"""
import json, sys, time, torch
a, b, fmt = {a!r}, {b!r}, {fmt!r}
t = time.perf_counter()
if fmt == "torch-zip":
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
else:
    from safetensors.torch import load_file
    sa, sb = load_file(a), load_file(b)
bad = [k for k in sa if not torch.allclose(sa[k], sb[k])]
print(json.dumps({{"s": time.perf_counter() - t, "bad": bad}}))
"""


def child(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--memory-gb", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-repeats", type=int, default=3)
    args = parser.parse_args()
    bench = str(Path(__file__).resolve().parent)

    print("speed (page cache warm; medians)")
    print(f"{'format':<12} {'cat A B s':>9} {'diff s':>7} {'diff/cat':>8} {'naive s':>8} {'naive/diff':>10}")
    for fmt in ("torch-zip", "safetensors"):
        a, b = build_pair(args.gb, fmt)
        cat = cat_time(a, b, repeats=args.repeats)
        ours = child(OURS.format(bench=bench, a=str(a), b=str(b), repeats=args.repeats))
        assert ours["passed"] is False, "the one changed element must be found"
        naive = sorted(float(child(NAIVE.format(a=str(a), b=str(b), fmt=fmt))["s"])  # type: ignore[arg-type]
                       for _ in range(args.naive_repeats))[args.naive_repeats // 2]
        s = float(ours["s"])  # type: ignore[arg-type]
        print(f"{fmt:<12} {cat:>9.3f} {s:>7.3f} {s / cat:>7.2f}x {naive:>8.2f} {naive / s:>9.1f}x")

    print("\npeak anonymous memory of diff (torch zip, one element differs)")
    print(f"{'size GB':>7} {'base MB':>8} {'peak MB':>8} {'added MB':>9} {'largest MB':>10} {'limit MB':>9}")
    for gb in args.memory_gb:
        a, b = build_pair(gb, "torch-zip")
        m = child(OURS.format(bench=bench, a=str(a), b=str(b), repeats=1))
        base, peak, largest = (float(m[k]) for k in ("anon_base_mb", "anon_peak_mb", "largest_mb"))  # type: ignore[arg-type]
        print(f"{gb:>7.0f} {base:>8.0f} {peak:>8.0f} {peak - base:>9.0f} {largest:>10.0f} {300 + 2 * largest:>9.0f}")


if __name__ == "__main__":
    main()
