"""``tensorparity inspect`` and ``diff`` of files read metadata and bytes without importing torch.

Each command runs in a fresh interpreter where importing torch fails (a meta-path finder refuses
it), and must print exactly what the same command prints with torch available. The files are
written by the real producers (``torch.save``, ``safetensors``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# Runs the CLI with torch refused; prints whether any torch module was loaded, last, on stderr.
_BLOCKED = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is refused in this test")
sys.meta_path.insert(0, _NoTorch())
from tensorparity.cli import main
try:
    main(sys.argv[1:])
finally:
    print("torch-loaded", any(m.split(".")[0] == "torch" for m in sys.modules), file=sys.stderr)
"""
_PLAIN = "import sys\nfrom tensorparity.cli import main\nmain(sys.argv[1:])\n"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=gen),
        "layers.0.attn.weight": torch.randn(16, 16, generator=gen),
        "layers.0.norm.weight": torch.ones(16),
        "layers.0.scale": torch.randn(16, generator=gen, dtype=torch.float64),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
        "half.weight": torch.randn(8, 8, generator=gen).to(torch.bfloat16),
    }


def _changed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in state.items()}
    out["layers.0.attn.weight"][3, 5] += 1e-3  # float32: through the kernel on file bytes
    out["layers.0.scale"][7] *= 1.0 + 1e-12  # float64, within tolerance
    out["embed.weight"] += 1e-7 * torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torch-free")
    a, b = _state(), _changed(_state())
    paths = {}
    for name, state in (("a", a), ("a_copy", a), ("b", b)):
        paths[f"{name}.safetensors"] = root / f"{name}.safetensors"
        save_file(state, paths[f"{name}.safetensors"])
        paths[f"{name}.pt"] = root / f"{name}.pt"
        torch.save({"model": state, "epoch": 3, "dtype": torch.bfloat16}, paths[f"{name}.pt"])
    return paths


@pytest.mark.parametrize("ext", ["safetensors", "pt"])
@pytest.mark.parametrize("args", [
    ["inspect", "{a}", "--json"],
    ["inspect", "{a}"],
    ["diff", "{a}", "{a_copy}", "--json"],
    ["diff", "{a}", "{b}", "--json"],
    ["diff", "{a}", "{b}"],
    ["diff", "{a}", "{b}", "--atol", "1e-2", "--json"],
], ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_inspect_and_diff_of_files_run_without_torch(files: dict[str, Path], ext: str, args: list[str]) -> None:
    argv = [arg.format(a=files[f"a.{ext}"], a_copy=files[f"a_copy.{ext}"], b=files[f"b.{ext}"]) for arg in args]
    free = _run(_BLOCKED, *argv)
    assert free.stderr.strip().splitlines()[-1] == "torch-loaded False", free.stderr
    plain = _run(_PLAIN, *argv)
    assert free.returncode == plain.returncode, (free.stderr, plain.stderr)
    assert free.stdout == plain.stdout
    if args[0] == "diff" and "{b}" in args:
        assert free.returncode == (0 if "--atol" in args else 1)
        if "--json" in args:
            report = json.loads(free.stdout)
            counts = report["counts"]
            assert counts["identical"] >= 3 and counts["close"] + counts["tensor_value_mismatches"] == 3, counts


def test_a_nan_still_compares_by_value_with_torch_loaded_when_needed(tmp_path: Path) -> None:
    """What the bytes cannot decide (a NaN) loads torch and is compared as tensors."""
    a = {"w": torch.tensor([1.0, float("nan"), 3.0])}
    b = {"w": torch.tensor([1.0, float("nan"), 3.5])}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    plain = _run(_PLAIN, "diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--json")
    assert plain.returncode == 1, plain.stderr
    record = json.loads(plain.stdout)["tensors"][0]
    assert record["status"] == "mismatch" and record["n_mismatch"] == 1 and record["nan_a"] == 1, record
