"""Capture overhead on a rank with 2 ranks (issue #13): run with
``.venv/bin/torchrun --nproc-per-node 2 bench/bench_trace_dist.py [--rounds 7]``.

A small transformer-shaped model under DDP (gloo, CPU); per rank, the median of ``--rounds``
steps (forward + backward) of: the plain step, the step under ``capture(mode="stats")``, and the
step under ``capture(mode="full", out=...)`` (capture block included, so the trace's writing);
plus ``save``: ``safetensors.torch.save_file`` of the same tensors a full trace stores, timed
alone. Ratios are against the plain step measured in the same run. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tensorparity.trace import capture


def model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
                           for _ in range(layers)], nn.Linear(width, 16))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = DDP(model(args.width, args.layers))
    x = torch.randn(8, 64, args.width, generator=torch.Generator().manual_seed(rank))
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-")) if rank == 0 else None
    root = [str(tmp)] if rank == 0 else [None]
    dist.broadcast_object_list(root)
    folder = Path(root[0])  # type: ignore[arg-type]

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()

    cpu: dict[str, list[float]] = {"plain": [], "stats": [], "full": [], "save": []}

    def timed(fn, name: str) -> float:  # type: ignore[no-untyped-def]
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        fn()
        cpu[name].append(time.process_time() - c)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"plain": [], "stats": [], "full": [], "save": []}
    step()  # warm-up
    for i in range(args.rounds):
        times["plain"].append(timed(step, "plain"))

        def stats() -> None:
            with capture(net, mode="stats", params=False):
                step()
        times["stats"].append(timed(stats, "stats"))
        out = folder / f"full-{i}"

        def full() -> None:
            with capture(net, out=out, mode="full", params=False) as trace:
                step()
            full.trace = trace  # type: ignore[attr-defined]
        times["full"].append(timed(full, "full"))
        trace = full.trace  # type: ignore[attr-defined]
        tensors = {r.key: trace.load(r).clone() for r in trace.records if r.stored}
        target = folder / f"save-{rank}-{i}.safetensors"
        times["save"].append(timed(lambda: save_file(tensors, str(target)), "save"))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        target.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    mc = {k: statistics.median(v) for k, v in cpu.items()}
    if rank == 0:
        print(f"world 2 (gloo, CPU), DDP, {args.layers} encoder layers of width {args.width}, batch 8x64; "
              f"medians of {args.rounds} rounds, rank 0; cpu: the process's CPU time (all its threads)")
        print(f"{'step':<8}{'s':>9}{'ratio':>9}{'cpu s':>10}{'ratio':>9}")
        for name in ("plain", "stats", "full"):
            print(f"{name:<8}{med[name]:>9.4f}{med[name] / med['plain']:>8.2f}x{mc[name]:>10.4f}"
                  f"{mc[name] / mc['plain']:>8.2f}x" + ("" if name != "full" else
                  f"   (step + save = {(med['plain'] + med['save']) / med['plain']:.2f}x, cpu "
                  f"{(mc['plain'] + mc['save']) / mc['plain']:.2f}x; save alone {med['save']:.4f} s)"))
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's threads can abort the interpreter's teardown (torch: "terminate called without an
    # active exception", one run in three here): leave without it, everything printed.
    sys.stdout.flush()
    os._exit(0)
