"""Capture overhead and trace comparison on a 12-block conformer-style model (batch 4,
400 frames, d=256), forward + backward.

Run: .venv/bin/python bench/bench_trace.py [--repeats 5]
- stats: a step under capture(mode="stats") against the plain step;
- full: a step under capture(mode="full", out=folder) against the plain step plus
  safetensors.torch.save_file of the same tensors (the ceiling the background writer beats);
- compare: compare_traces of two full traces against `cat` of both folders' files.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import OUT, cat_time  # noqa: E402
from conformer import conformer, features  # noqa: E402

from tensorparity.trace.capture import capture  # noqa: E402
from tensorparity.trace.compare import compare_traces  # noqa: E402


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, x = conformer(), features()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def stats_step() -> None:
        with capture(model, mode="stats"):
            step()

    folder = OUT / "trace_full"

    def full_step() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        with capture(model, mode="full", out=folder):
            step()

    plain = timed(step, args.repeats)
    stats = timed(stats_step, args.repeats)
    full = timed(full_step, args.repeats)

    # The same tensors saved in one call, as a user without a background writer would.
    with capture(model, mode="full") as trace:
        step()
    tensors = {r.key: trace.load(r).contiguous() for r in trace.records if r.stored}
    size_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        from safetensors.torch import save_file

        save = timed(lambda: save_file(tensors, str(Path(tmp) / "all.safetensors")), args.repeats)

    # Two traces of the same run, compared; baseline: reading both folders.
    a, b = OUT / "trace_a", OUT / "trace_b"
    for target in (a, b):
        shutil.rmtree(target, ignore_errors=True)
        torch.manual_seed(0)
        with capture(model, mode="full", out=target):
            step()
    files = sorted(p for d in (a, b) for p in d.rglob("*") if p.is_file())
    read = cat_time(*files, repeats=args.repeats)
    compare = timed(lambda: compare_traces(a, b), args.repeats)

    print(f"model: 12-block conformer, batch 4 x 400 frames, d=256; {len(tensors)} tensors, {size_mb:.0f} MB per trace")
    print(f"{'what':<34} {'median s':>9} {'ratio':>8}")
    print(f"{'plain step (fwd+bwd)':<34} {plain:>9.3f}")
    print(f"{'stats capture step':<34} {stats:>9.3f} {stats / plain:>7.2f}x  (target <= 1.15x)")
    print(f"{'save_file of the same tensors':<34} {save:>9.3f}")
    print(f"{'full capture step (to disk)':<34} {full:>9.3f} {full / (plain + save):>7.2f}x  of plain + save_file (target <= 1.00x)")
    print(f"{'cat both traces':<34} {read:>9.3f}")
    print(f"{'compare_traces':<34} {compare:>9.3f} {compare / read:>7.2f}x  (target <= 2x)")


if __name__ == "__main__":
    main()
