"""inspect of a 2 GB checkpoint (torch zip, safetensors, plain-tar .nemo) against `cat` of the
same file, peak memory, and the bytes touched by loading one tensor.

Run: .venv/bin/python bench/bench_inspect.py [--gb 2] [--repeats 5]
Prints one row per format with medians and ratios; see docs/benchmarks.md for recorded figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import OUT, cat_time  # noqa: E402


def make_state(gb: float) -> dict[str, torch.Tensor]:
    """A transformer-shaped state dict of about ``gb`` GB: big matrices plus small norms."""
    state: dict[str, torch.Tensor] = {}
    per = 2048 * 2560 * 4
    n = max(1, int(gb * 1e9 // per))
    for i in range(n):
        state[f"layers.{i // 4}.mat{i % 4}.weight"] = torch.full((2048, 2560), float(i))
        state[f"layers.{i // 4}.norm{i % 4}.weight"] = torch.ones(2560)
    return state


def build(gb: float) -> dict[str, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    paths = {"torch-zip": OUT / f"big_{gb}.pt", "safetensors": OUT / f"big_{gb}.safetensors",
             "nemo": OUT / f"big_{gb}.nemo"}
    if all(p.exists() for p in paths.values()):
        return paths
    from safetensors.torch import save_file

    state = make_state(gb)
    torch.save(state, paths["torch-zip"])
    save_file(state, str(paths["safetensors"]))
    del state
    config = OUT / "model_config.yaml"
    config.write_text(yaml.safe_dump({"target": "bench.BigModel", "hidden": 2560}))
    with tarfile.open(paths["nemo"], "w:") as tar:  # NeMo's layout: a tar of a folder, arcname "."
        tar.add(config, arcname="./model_config.yaml")
        tar.add(paths["torch-zip"], arcname="./model_weights.ckpt")
    return paths


CHILD = r"""
import json, sys, time, statistics
from pathlib import Path
sys.path.insert(0, {bench!r})
from _util import mapped_rss_kb, reset_peak, status_kb
import tensorparity
path, repeats = Path({path!r}), {repeats}
tensorparity.inspect(path)  # warm-up (imports, page cache of the metadata)
rss0 = status_kb("VmRSS"); reset_peak()
times = []
for _ in range(repeats):
    t = time.perf_counter(); tensorparity.inspect(path); times.append(time.perf_counter() - t)
peak = status_kb("VmHWM") - rss0
# one tensor: how many file pages become resident in this process when it is loaded and read
ckpt = tensorparity.open(path)
entry = max(ckpt.tensors(), key=lambda e: e.nbytes)
f0 = status_kb("RssFile"); a0 = status_kb("RssAnon")
value = entry.load(); checksum = float(value.sum())
touched_kb = mapped_rss_kb(path)  # pages of the checkpoint file resident in this process
print(json.dumps({{"inspect_s": statistics.median(times), "peak_mb": peak / 1024,
                  "process_peak_mb": status_kb("VmHWM") / 1024, "file_touched_mb": touched_kb / 1024,
                  "tensor_mb": entry.nbytes / 2**20, "touched_mb": touched_kb / 1024,
                  "file_mb": path.stat().st_size / 2**20}}))
"""


def measure(path: Path, repeats: int) -> dict[str, float]:
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), path=str(path), repeats=repeats)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    paths = build(args.gb)
    print(f"{'format':<12} {'file MB':>8} {'cat s':>7} {'inspect s':>9} {'ratio':>7} {'added MB':>8} "
          f"{'process MB':>10} {'tensor MB':>9} {'touched MB':>10}")
    for fmt, path in paths.items():
        m = measure(path, args.repeats)
        cat = cat_time(path, repeats=args.repeats)
        ratio = m["inspect_s"] / cat
        print(f"{fmt:<12} {m['file_mb']:>8.0f} {cat:>7.3f} {m['inspect_s']:>9.4f} {ratio:>6.1%} "
              f"{m['peak_mb']:>8.1f} {m['process_peak_mb']:>10.0f} {m['tensor_mb']:>9.1f} {m['file_touched_mb']:>10.1f}")


if __name__ == "__main__":
    main()
