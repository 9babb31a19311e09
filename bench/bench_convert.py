"""Convert a torch zip to safetensors: `tensorparity.convert` against the naive
`safetensors.torch.save_file(torch.load(...))`, time and peak anonymous memory, in fresh processes.

Both write the same file (byte for byte: the last line checks it). Ours streams one tensor at a
time, writes under a temporary name, fsyncs and renames (atomic); by default it also reads the
result back and compares it bitwise with the source. The naive way holds the whole checkpoint in
memory and does not fsync, so it is also timed with an fsync at the end (same durability).

Run: .venv/bin/python bench/bench_convert.py [--gb 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import OUT  # noqa: E402
from bench_inspect import make_state  # noqa: E402

_SAMPLER = r"""
import json, sys, threading, time
sys.path.insert(0, {bench!r})
from _util import status_kb
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], status_kb("RssAnon")); time.sleep(0.002)
"""

OURS = _SAMPLER + r"""
from tensorparity.migrate import convert
import tensorparity
src, dst, verify = {src!r}, {dst!r}, {verify!r}
largest = max(e.nbytes for e in tensorparity.open(src).tensors())
base = status_kb("RssAnon")
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
report = convert(src, dst, overwrite=True, verify=verify)
s = time.perf_counter() - t
stop.set()
assert report.verified is (True if verify else None)
print(json.dumps({{"s": s, "anon_base_mb": base / 1024, "anon_peak_mb": max(peak[0], base) / 1024,
                  "largest_mb": largest / 2**20}}))
"""

NAIVE = _SAMPLER + r"""
import os, torch
from safetensors.torch import save_file
src, dst, fsync = {src!r}, {dst!r}, {fsync!r}
base = status_kb("RssAnon")
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
save_file(torch.load(src, weights_only=True), dst, metadata={{"format": "pt"}})
if fsync:  # the same durability as ours: data on disk before we say done
    fd = os.open(dst, os.O_RDONLY); os.fsync(fd); os.close(fd)
s = time.perf_counter() - t
stop.set()
print(json.dumps({{"s": s, "anon_base_mb": base / 1024, "anon_peak_mb": max(peak[0], base) / 1024}}))
"""


def source(gb: float) -> Path:
    """A transformer-shaped torch zip of about ``gb`` GB (bench_inspect's, when it exists)."""
    OUT.mkdir(parents=True, exist_ok=True)
    for path in (OUT / f"big_{gb}.pt", OUT / f"convert_{gb}.pt"):
        if path.exists():
            return path
    path = OUT / f"convert_{gb}.pt"
    torch.save(make_state(gb), path)
    return path


def child(code: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-verify-run", action="store_true", help="skip the run with verification")
    args = parser.parse_args()
    bench = str(Path(__file__).resolve().parent)
    src = source(args.gb)
    dst_ours, dst_naive = OUT / f"convert_{args.gb}_ours.safetensors", OUT / f"convert_{args.gb}_naive.safetensors"
    runs: dict[str, list[dict[str, float]]] = {"naive": [], "naive+fsync": [], "ours": [], "ours+verify": []}
    try:
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        for _ in range(args.repeats):  # interleaved, so that drift hits both alike
            runs["naive"].append(child(NAIVE.format(bench=bench, src=str(src), dst=str(dst_naive), fsync=False)))
            runs["naive+fsync"].append(child(NAIVE.format(bench=bench, src=str(src), dst=str(dst_naive), fsync=True)))
            runs["ours"].append(child(OURS.format(bench=bench, src=str(src), dst=str(dst_ours), verify=False)))
            if not args.no_verify_run:
                runs["ours+verify"].append(child(OURS.format(bench=bench, src=str(src), dst=str(dst_ours),
                                                             verify=True)))
        same = dst_ours.read_bytes() == dst_naive.read_bytes() if args.gb <= 4 else None
    finally:
        for p in (dst_ours, dst_naive):
            p.unlink(missing_ok=True)
    size_gb = src.stat().st_size / 1e9
    base = statistics.median(r["s"] for r in runs["naive"])
    largest = runs["ours"][0]["largest_mb"]
    print(f"torch zip ({size_gb:.2f} GB, largest tensor {largest:.0f} MB) -> safetensors; medians of {args.repeats}")
    base_fsync = statistics.median(r["s"] for r in runs["naive+fsync"])
    print(f"{'way':<38} {'s':>7} {'x naive':>8} {'x naive+fsync':>14} {'anon peak MB':>13} {'added MB':>9}")
    for name, label in (("naive", "save_file(torch.load(...))"), ("naive+fsync", "save_file(torch.load(...)) + fsync"),
                        ("ours", "tensorparity convert (atomic, fsync)"),
                        ("ours+verify", "tensorparity convert + verify (default)")):
        if not runs[name]:
            continue
        s = statistics.median(r["s"] for r in runs[name])
        peak = statistics.median(r["anon_peak_mb"] for r in runs[name])
        added = statistics.median(r["anon_peak_mb"] - r["anon_base_mb"] for r in runs[name])
        print(f"{label:<38} {s:>7.2f} {s / base:>7.2f}x {s / base_fsync:>13.2f}x {peak:>13.0f} {added:>9.0f}")
    print(f"memory target: added < 300 MB + largest tensor = {300 + largest:.0f} MB; "
          f"files byte-identical: {same}")


if __name__ == "__main__":
    main()
