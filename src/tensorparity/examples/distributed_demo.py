"""The demo's distributed step: one DDP training step on 2 CPU ranks (gloo) captured under
``torchrun``, once with gradient synchronisation and once under ``no_sync()`` (the most common
DDP bug: the all-reduce is skipped), then compared rank by rank.

Run by the demo as ``torchrun --standalone --nproc-per-node 2 -m tensorparity.examples.distributed_demo
OUT sync|nosync``; each rank writes ``OUT/rank-<r>/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Net", "main", "step"]


class Net(nn.Module):
    """A tiny two-layer network."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.norm(self.fc1(x))))


def main() -> None:
    """One rank of the run: build the same weights on every rank, feed each its own batch, and
    capture one training step (forward, backward; gradients as the optimizer sees them)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tensorparity.trace import capture

    out, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = DDP(Net())
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    sync = contextlib.nullcontext() if mode == "sync" else net.no_sync()
    with capture(net, out=out), sync:
        net(x).pow(2).mean().backward()
    dist.barrier()
    dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown (torch: "terminate called without an
    # active exception", one run in three here): leave without it, the trace written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def step(console: Any, out: Path) -> None:
    """The demo step: two 2-rank runs, compared every rank against the same rank."""
    from tensorparity.trace._compare import compare_traces

    console.rule("[bold]6. distributed: a DDP step on 2 ranks, with and without the gradient all-reduce")
    folder = out / "distributed"
    if folder.exists():
        shutil.rmtree(folder)  # a rerun of the demo replaces its own previous traces
    folder.mkdir(parents=True)
    for mode in ("sync", "nosync"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tensorparity.examples.distributed_demo", str(folder / mode), mode]
        console.print(f"$ torchrun --nproc-per-node 2 -m tensorparity.examples.distributed_demo {folder / mode} {mode}")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"demo: the {mode} run failed:\n{done.stderr[-2000:]}")
    console.print("[bold]compare_traces(sync, nosync): every rank against the same rank; the parameter gradients "
                  "recorded are the ones the optimizer steps on (after the all-reduce)")
    report = compare_traces(folder / "sync", folder / "nosync")
    report.render(console, top=4)
    if report.passed:
        raise SystemExit("demo: a run without the gradient all-reduce must differ from the synchronised one")


if __name__ == "__main__":
    main()
