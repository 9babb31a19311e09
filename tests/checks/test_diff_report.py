"""DiffReport: the record, its strict JSON (schema tensorparity.diff/1), and its rich and HTML
renderings (summary first, worst first, long lists folded)."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from tensorparity.checks import diff
from tensorparity.checks._diff_report import SCHEMA, DiffReport
from tensorparity.numerics import Tolerance


def _no_constants(name: str) -> None:
    raise AssertionError(f"non-strict JSON constant {name}")


def broken_copy(state: dict[str, torch.Tensor], how: dict[str, float]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` where each key in ``how`` has that fraction of its elements moved by 1."""
    out = dict(state)
    for key, frac in how.items():
        t = state[key].clone()
        n = max(1, int(t.numel() * frac))
        t.view(-1)[:n] += 1.0
        out[key] = t
    return out


@pytest.fixture
def messy(tmp_path: Path) -> DiffReport:
    """Every kind of difference at once, between a torch.save file and a safetensors file."""
    torch.manual_seed(0)
    a = {f"layers.{i}.w": torch.randn(10, 10) for i in range(20)}
    a["zero"] = torch.tensor([0.0, 0.0, 1e-3, 0.0])
    a["shape"] = torch.ones(2, 3)
    a["nan"] = torch.tensor([1.0, math.nan, 3.0])
    a["extra_a.w"] = torch.ones(1)
    b = broken_copy(a, {"layers.3.w": 0.5, "layers.7.w": 0.01})
    b["layers.9.w"] = a["layers.9.w"].clone()
    b["layers.9.w"][:5] += 3.0  # the same fraction as layers.3, a larger error: listed before it
    b["zero"] = torch.zeros(4)  # b == 0 where a differs: no rtol can pass it
    b["shape"] = torch.ones(3, 2)
    b["nan"] = torch.tensor([math.nan, 2.0, 3.0])
    del b["extra_a.w"]
    b.update({f"extra_b.{i}.w": torch.ones(2) for i in range(30)})
    torch.save(a, tmp_path / "a.pt")
    save_file(b, str(tmp_path / "b.safetensors"))
    return diff(tmp_path / "a.pt", tmp_path / "b.safetensors")


def test_json_is_strict_and_versioned(messy: DiffReport) -> None:
    text = messy.to_json()
    data = json.loads(text, parse_constant=_no_constants)
    assert data["schema"] == SCHEMA == "tensorparity.diff/1"
    assert data["verdict"] == "differs" and data["passed"] is False and data["exit_code"] == 1
    assert data["classic_summary"] == messy.classic_summary()
    assert data["counts"] == {"common": 23, "only_in_a": 1, "only_in_b": 30, "tensors": 23, "identical": 17,
                              "close": 0, "shape_mismatches": 1, "dtype_mismatches": 0,
                              "tensor_value_mismatches": 5, "value_differences": 0, "value_mismatches": 5}
    assert data["tolerance"]["description"] == "atol=dtype default, rtol=dtype default, statistic=elementwise"
    assert data["tolerance"]["atol"] is None and data["tolerance"]["overrides"] == []
    zero = next(t for t in data["tensors"] if t["key"] == "zero")
    assert zero["required_rtol"] == "inf"  # JSON has no inf: written as a string
    assert zero["tolerance"]["description"] == "atol=1e-05, rtol=1.3e-06"
    nan = next(t for t in data["tensors"] if t["key"] == "nan")
    assert nan["nan_agree"] is False and nan["first_index"] == [0]
    (section,) = data["sections"]
    assert [k["key"] for k in section["only_in_a"]] == ["extra_a.w"] and len(section["only_in_b"]) == 30
    assert section["only_in_b"][0] == {"key": "extra_b.0.w", "section": "model", "kind": "tensor",
                                       "shape": [2], "dtype": "float32", "bytes": 8}
    assert data["a"]["format"] == "torch-zip" and data["b"]["tensors"] == 53


def test_worst_first_then_folded(messy: DiffReport) -> None:
    worst = [t.key for t in messy.mismatches]
    assert worst == ["nan", "layers.9.w", "layers.3.w", "zero", "layers.7.w"]  # fraction, then max abs
    out = io.StringIO()
    messy.render(Console(file=out, width=120, color_system=None), top=2)
    text = out.getvalue()
    assert text.startswith("A ") and "torch-zip" in text.split("\nB ")[0]
    assert messy.classic_summary() + "\n" in text
    assert text.index(messy.classic_summary()) < text.index("Sections")  # the summary before any detail
    assert text.index("Value mismatches, worst first (5)") < text.index("Shape mismatches, never broadcast")
    assert "… and 3 more (--top N shows more, --json lists all)" in text
    assert text.index("nan  [3] float32") < text.index("layers.9.w  [10, 10] float32")
    assert "layers.7.w  [10, 10]" not in text  # folded away
    assert "NaN 1 vs 1, different places" in text and "none (NaN/Inf places differ)" in text
    # The key tree folds the run, although safetensors stores keys in string order (0, 1, 10, ...).
    assert "Only in B (30)" in text and "└── {0..29}.w  ×30 [2] float32" in text
    assert "Every tensor would pass" not in text  # not with shapes and NaN places differing


def test_default_rendering_and_str(messy: DiffReport) -> None:
    text = str(messy)
    assert messy.classic_summary() in text and "… and 3 more" not in text  # top=10 shows all 5
    assert "first at [0, 0]: A" in text and "passes with atol ≥" in text
    assert "Shape mismatches, never broadcast (1)" in text and "[2, 3]" in text and "[3, 2]" in text
    assert repr(messy).startswith("<DiffReport ") and "→ differs>" in repr(messy)
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(messy)  # __rich_console__
    assert messy.classic_summary() in console.file.getvalue()  # type: ignore[attr-defined]


def test_html_is_escaped_and_self_contained() -> None:
    report = diff({"<script>.w": torch.ones(2), "x": torch.ones(1)},
                  {"<script>.w": torch.zeros(2), "x\x1b[31m": 1})
    page = report._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "\x1b" not in page and "\\x1b[31m" in page
    assert page.startswith("<div class='tp-diff'><style>") and "<script" not in page.replace("&lt;script", "")
    assert "Value mismatches, worst first (1)" in page and "Only in B" in page


def test_close_and_exact_wordings(tmp_path: Path) -> None:
    a = {"w": torch.linspace(0, 1, 64), "same": torch.ones(3)}
    b = {"w": a["w"].to(torch.float64), "same": torch.ones(3)}
    close = diff(a, b)
    assert close.verdict == "close" and close.exit_code == 0 and close.passed
    text = str(close)
    assert "Within tolerance, not bitwise identical, largest error first (1)" in text
    assert re.search(r"^w +0 +0 +1\.000000 +0 +0 *$", text, re.M)  # no tolerance needed: equal values
    assert "Dtype differences (1), values compared after promotion: float32 → float64 ×1" in text
    exact = diff(a, b, tolerance=Tolerance(exact=True))
    assert exact.verdict == "differs" and "any non-exact tolerance (equal values)" in str(exact)
    assert exact.required_atol is None


def test_required_atol_says_what_would_pass() -> None:
    a = {"w": torch.zeros(4), "v": torch.ones(4)}
    b = {"w": torch.tensor([0.0, 0.25, 0.0, 0.0]), "v": torch.ones(4)}
    report = diff(a, b)
    assert report.required_atol == pytest.approx(0.25, rel=1e-5)
    assert "Every tensor would pass with --atol 0.25" in str(report)
    assert diff(a, b, tolerance=Tolerance(atol=0.25)).verdict == "close"


def test_sections_and_parameter_counts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {"model.w": torch.randn(3, 3)}
    a = {"epoch": 1, "global_step": 4, "pytorch-lightning_version": "2.4.0", "state_dict": state,
         "hyper_parameters": {"lr": 0.1}}
    b = {**a, "hyper_parameters": {"lr": 0.2}, "epoch": 2}
    report = diff(a, b)
    by_name = {s.name: s for s in report.sections}
    assert by_name["model"].parameters_a == by_name["model"].parameters_b == 9
    assert by_name["hyper_parameters"].value_differences == 1 and by_name["meta"].value_differences == 1
    live = diff(torch.nn.Linear(3, 2), torch.nn.Linear(3, 2))
    assert live.a.trainable == 8 and live.a.parameters == 8
    assert "8 trainable" in str(live)
