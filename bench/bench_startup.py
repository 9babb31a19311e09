"""Whole processes, start-up included: what a user waits for when typing a command.

The other benchmarks time the library in a process that has already imported it; this one times
``tensorparity ...`` as the shell runs it (issue #14's targets in brackets):

1. ``tensorparity --help`` (<= 0.3 s), beside ``python -c pass`` (the interpreter's own start-up)
   and ``python -c "import torch"`` (what an import of torch alone costs);
2. ``tensorparity inspect FILE`` of a safetensors and of a torch-zip (``torch.save``) file of
   ``--gb`` GB (<= 0.5 s end to end);
3. ``tensorparity diff A B`` of two such checkpoints, identical and differing in a few tensors,
   against ``cat A B > /dev/null`` timed in the same run (<= 1.5x cat).

The files are built in a temporary folder (``--dir`` to choose where; removed afterwards unless
``--keep``) from 64 MiB tensors; every file is read once before any timing, so the page cache is
warm and the figures are start-up plus work, not disk; the package's bytecode is compiled first
(as a user's second run finds it). Each row is the median of ``--repeats`` runs after one
warm-up run. Nothing here asserts a time: the "target" column says how far a
figure is from the issue's target.

Run: .venv/bin/python bench/bench_startup.py [--gb 2] [--repeats 5] [--dir DIR] [--keep]
Prints medians and ratios; see docs/benchmarks.md for recorded figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import median_time  # noqa: E402

TENSOR = (4096, 4096)  # float32: 64 MiB each
CHANGED = 3  # tensors that differ in the "differs" pair


def make_state(gb: float) -> dict[str, torch.Tensor]:
    """About ``gb`` GB of 64 MiB float32 matrices plus a small norm vector beside each."""
    per = TENSOR[0] * TENSOR[1] * 4
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i in range(max(CHANGED + 1, round(gb * 1e9 / per))):
        state[f"layers.{i}.weight"] = torch.randn(TENSOR, generator=gen)
        state[f"layers.{i}.norm.weight"] = torch.ones(TENSOR[1])
    return state


def build(folder: Path, gb: float) -> dict[str, Path]:
    """A (torch zip and safetensors), an identical copy of each, and B: A with a few tensors changed."""
    from safetensors.torch import save_file

    paths = {name: folder / name for name in ("a.pt", "a_copy.pt", "b.pt", "a.safetensors", "a_copy.safetensors",
                                              "b.safetensors")}
    state = make_state(gb)  # the largest thing held in memory: one checkpoint, ~gb GB
    torch.save(state, paths["a.pt"])
    save_file(state, str(paths["a.safetensors"]))
    for ext in ("pt", "safetensors"):  # a byte copy: identical content, another file
        shutil.copyfile(paths[f"a.{ext}"], paths[f"a_copy.{ext}"])
    weights = [k for k in state if k.endswith(".weight") and ".norm." not in k]
    for key in weights[1::max(1, len(weights) // CHANGED)][:CHANGED]:
        state[key] = state[key].clone()
        state[key].view(-1)[12345] += 1.0
    torch.save(state, paths["b.pt"])
    save_file(state, str(paths["b.safetensors"]))
    return paths


def warm(*paths: Path) -> None:
    """Read every file once, so that the timings that follow find it in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def timed(cmd: list[str], repeats: int, *, codes: tuple[int, ...] = (0,)) -> float:
    """Median seconds of running ``cmd`` (output discarded); its exit code must be one of ``codes``."""
    def run() -> None:
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
        if code not in codes:
            raise SystemExit(f"{' '.join(cmd)} exited {code}, expected {codes}")

    return median_time(run, repeats=repeats, warmup=1)


def row(name: str, seconds: float, base: float, base_name: str, target: str) -> None:
    print(f"{name:<54} {seconds:>8.3f} {seconds / base:>8.2f}x {base_name:<16} {target}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0, help="size of each checkpoint (GB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the built files")
    args = parser.parse_args()

    exe = shutil.which("tensorparity", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        raise SystemExit("no tensorparity console script beside this Python or on PATH: pip install -e . first")
    tp, py, n = [exe], [sys.executable], args.repeats
    # A user's second run finds the package's bytecode cached (its first writes it), even where
    # PYTHONDONTWRITEBYTECODE keeps the warm-up run from writing it: compile it once here.
    import tensorparity

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(tensorparity.__file__).parent)], check=True)
    folder = Path(tempfile.mkdtemp(prefix="tensorparity-bench-startup-", dir=args.dir))
    try:
        print(f"building {args.gb:g} GB checkpoints in {folder} ...", flush=True)
        p = build(folder, args.gb)
        warm(*p.values())
        size = p["a.pt"].stat().st_size / 1e9
        print(f"{exe}; checkpoints of {size:.2f} GB; medians of {n} runs after one warm-up; page cache warm\n")
        print(f"{'command':<54} {'median s':>8} {'ratio':>9} {'to':<16} target")

        base = timed(py + ["-c", "pass"], n)
        row("python -c pass", base, base, "python -c pass", "")
        row('python -c "import torch"', timed(py + ["-c", "import torch"], n), base, "python -c pass", "")
        helps = timed(tp + ["--help"], n)
        row("tensorparity --help", helps, base, "python -c pass", f"<= 0.3 s: {helps / 0.3:.1f}x the target")

        for fmt, ext in (("safetensors", "safetensors"), ("torch-zip", "pt")):
            s = timed(tp + ["inspect", str(p[f"a.{ext}"])], n)
            row(f"tensorparity inspect ({fmt})", s, base, "python -c pass", f"<= 0.5 s: {s / 0.5:.1f}x the target")

        for fmt, ext in (("torch-zip", "pt"), ("safetensors", "safetensors")):
            for case, other, codes in (("identical", f"a_copy.{ext}", (0,)), (f"{CHANGED} tensors differ", f"b.{ext}",
                                                                              (1,))):
                a, b = p[f"a.{ext}"], p[other]
                cat = timed(["cat", str(a), str(b)], n)
                s = timed(tp + ["diff", str(a), str(b)], n, codes=codes)
                print(f"{'cat A B > /dev/null (' + fmt + ')':<54} {cat:>8.3f}")
                row(f"tensorparity diff A B ({fmt}, {case})", s, cat, "cat A B", f"<= 1.5x cat: {s / cat / 1.5:.1f}x "
                                                                                "the target")
    finally:
        if args.keep:
            print(f"\nkept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
