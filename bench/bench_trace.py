"""Capture overhead and trace comparison on a 12-block conformer-style model (batch 4,
400 frames, d=256), forward + backward.

Run: .venv/bin/python bench/bench_trace.py [--repeats 5] [--only compare]
- stats: a step under capture(mode="stats") against the plain step;
- full: a step under capture(mode="full", out=folder) against the plain step plus
  safetensors.torch.save_file of the same tensors (the ceiling the background writer beats);
- compare: compare_traces of two full traces against `cat` of both folders' files;
- compare through layouts (and as the whole `tensorparity compare --map` command, start-up
  included): the same, against a port whose feed-forward weights are stored with
  their hidden features interleaved (rows of `up`, columns of `down` permuted), compared through
  the mapping that says so: every `up` output is reordered (its layout) before comparing, every
  activation between them is found to hold the same values reordered.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import OUT  # noqa: E402
from conformer import conformer, features  # noqa: E402

from tensorparity.mapping import Mapping, Rearrange, Rule, apply_mapping  # noqa: E402
from tensorparity.trace import capture  # noqa: E402
from tensorparity.trace._compare import compare_traces  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("all", "compare"), default="all",
                        help="compare: time only the compare rows (and their cat baselines)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
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

    # The same tensors saved in one call, as a user without a background writer would.
    with capture(model, mode="full") as trace:
        step()
    tensors = {r.key: trace.load(r).contiguous() for r in trace.records if r.stored}
    size_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    tmp = Path(tempfile.mkdtemp(dir=OUT))

    def save() -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / "all.safetensors"))

    # Two traces of the same run, compared; baseline: reading both folders.
    a, b = OUT / "trace_a", OUT / "trace_b"
    for target in (a, b):
        shutil.rmtree(target, ignore_errors=True)
        torch.manual_seed(0)
        with capture(model, mode="full", out=target):
            step()
    files = sorted(p for d in (a, b) for p in d.rglob("*") if p.is_file())
    port, mapping = interleaved_port(model)
    permuted = trace_to(port, x, OUT / "trace_port")
    check = compare_traces(a, permuted, mapping=mapping)
    assert check.verdict in ("identical", "close"), check.summary()
    laid = sum(1 for layer in check.layers if layer.layout)
    files_port = sorted(p for d in (a, permuted) for p in d.rglob("*") if p.is_file())
    # The same compare as a user runs it: the whole command, start-up (torch's import) included.
    map_file = OUT / "port_map.yaml"
    map_file.write_text(mapping.to_yaml())
    cli = [str(Path(sys.executable).with_name("tensorparity")), "compare", str(a), str(permuted),
           "--map", str(map_file)]
    # The cost of the layouts themselves: a trace of the same layout whose every value differs in
    # its last bits (each parameter moved by one ulp), compared element by element like the port.
    noisy_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy_model.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    noisy = trace_to(noisy_model, x, OUT / "trace_noisy")

    # Interleaved rounds: on a shared machine the load drifts between minutes, so each round times
    # every variant back to back and the ratios are taken per round, then their median.
    capture_rows = {"plain": step, "stats": stats_step, "save": save, "full": full_step}
    rounds = interleaved({**(capture_rows if args.only == "all" else {}),
                          "cat": lambda: subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True),
                          "compare": lambda: compare_traces(a, b),
                          "cat_port": lambda: subprocess.run(["cat", *map(str, files_port)], stdout=subprocess.DEVNULL,
                                                             check=True),
                          "compare_port": lambda: compare_traces(a, permuted, mapping=mapping),
                          "compare_noisy": lambda: compare_traces(a, noisy),
                          "command": lambda: subprocess.run(cli, stdout=subprocess.DEVNULL, check=True)},
                         args.repeats)
    shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}

    def ratio(num: str, *den: str) -> float:
        return statistics.median(r[num] / sum(r[d] for d in den) for r in rounds)

    print(f"model: 12-block conformer, batch 4 x 400 frames, d=256; {len(tensors)} tensors, {size_mb:.0f} MB per trace")
    print(f"{args.repeats} interleaved rounds; ratios are medians of per-round ratios")
    print(f"{'what':<34} {'median s':>9} {'ratio':>8}")
    if args.only == "all":
        print(f"{'plain step (fwd+bwd)':<34} {med['plain']:>9.3f}")
        print(f"{'stats capture step':<34} {med['stats']:>9.3f} {ratio('stats', 'plain'):>7.2f}x  (target <= 1.15x)")
        print(f"{'save_file of the same tensors':<34} {med['save']:>9.3f}")
        print(f"{'full capture step (to disk)':<34} {med['full']:>9.3f} {ratio('full', 'plain', 'save'):>7.2f}x  "
              "of plain + save_file (target <= 1.00x)")
    print(f"{'cat both traces':<34} {med['cat']:>9.3f}")
    print(f"{'compare_traces':<34} {med['compare']:>9.3f} {ratio('compare', 'cat'):>7.2f}x  (target <= 2x)")
    print(f"{'cat reference + port traces':<34} {med['cat_port']:>9.3f}")
    print(f"{'compare_traces through layouts':<34} {med['compare_port']:>9.3f} "
          f"{ratio('compare_port', 'cat_port'):>7.2f}x  (target <= 2x; {laid} layers through a layout)")
    print(f"{'compare_traces, last bits differ':<34} {med['compare_noisy']:>9.3f} "
          f"{ratio('compare_noisy', 'cat'):>7.2f}x  (same layout, every value compared)")
    print(f"{'layouts vs same-layout value compare':<34} {'':>9} {ratio('compare_port', 'compare_noisy'):>7.2f}x")
    print(f"{'tensorparity compare --map (command)':<34} {med['command']:>9.3f} {ratio('command', 'cat_port'):>7.2f}x  "
          "(the whole process, torch's import included)")


def trace_to(model: torch.nn.Module, x: torch.Tensor, folder: Path) -> Path:
    """One step of ``model`` captured in full to ``folder`` (replaced)."""
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    with capture(model, mode="full", out=folder):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return folder


def interleaved_port(model: torch.nn.Module) -> tuple[torch.nn.Module, Mapping]:
    """A copy of ``model`` whose feed-forward hidden features are stored interleaved, and the
    mapping from ``model``'s keys to it."""
    two = (("two", 2),)
    mapping = Mapping([Rule("blocks.{i}.{ff}.up.weight", "blocks.{i}.{ff}.up.weight",
                            Rearrange("(two h) c -> (h two) c", two)),
                       Rule("blocks.{i}.{ff}.up.bias", "blocks.{i}.{ff}.up.bias", Rearrange("(two h) -> (h two)", two)),
                       Rule("blocks.{i}.{ff}.down.weight", "blocks.{i}.{ff}.down.weight",
                            Rearrange("o (two h) -> o (h two)", two))])
    port = copy.deepcopy(model)
    port.load_state_dict({k: e.load() for k, e in apply_mapping(model.state_dict(), mapping).checkpoint.items()})
    return port, mapping


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> list[dict[str, float]]:
    """One warm-up call each, then ``repeats`` rounds timing every function once, in a rotating order."""
    for fn in fns.values():
        fn()
    names = list(fns)
    rounds = []
    for i in range(repeats):
        times = {}
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name] = time.perf_counter() - start
        rounds.append(times)
    return rounds


if __name__ == "__main__":
    main()
