"""Every report at any width: numbers never broken, keys wrapped only between their dotted
components, nothing cut with an ellipsis, tables too wide for the console shown row by row.

Each report is rendered at 40, 60, 80, 100 and 200 columns and compared with the same report at
2,000 columns (where nothing wraps): every number and every word of a key in the narrow rendering
must be one of the wide rendering's. A number folded in two (``0.000781`` + ``3``) or a key cut
inside a component (``self_a`` + ``ttn``) leaves a fragment that the wide rendering never shows.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

from tensorparity.checkpoint import inspect
from tensorparity.checks import diff
from tensorparity.cli import app
from tensorparity.examples import port_model, reference_model
from tensorparity.numerics import Tolerance
from tensorparity.report._render import rich_titled_table
from tensorparity.resume._resume_report import Divergence, Finding, ResumeLeg, ResumeReport, Segment, StepRow
from tensorparity.trace import capture
from tensorparity.trace._compare import compare_traces
from tensorparity.trace import replay

WIDTHS = (40, 60, 80, 100, 200)
MAP = str(files("tensorparity.examples") / "reference_to_port.yaml")
# A number (0.0007813, 1.3e-06, 27,386 is two) or a name's word; dots between digits stay inside.
_TOKEN = re.compile(r"\d+(?:\.\d+)*(?:e[+-]?\d+)?|[A-Za-z_][A-Za-z0-9_]*")


def render(report: Any, width: int, **kw: Any) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None, highlight=False)
    report.render(console, **kw)
    return console.file.getvalue()  # type: ignore[attr-defined]


def tokens(text: str) -> set[str]:
    return set(_TOKEN.findall(text))


def assert_fits(narrow: str, wide: str, width: int, *, whole: tuple[str, ...] = (), one_line: str = "") -> None:
    """``narrow`` shows nothing ``wide`` does not: no fragment of a number or of a key's
    component, no ellipsis, no line wider than ``width`` (but ``one_line``, printed unwrapped on
    purpose); each of ``whole`` on one line."""
    fragments = tokens(narrow) - tokens(wide)
    assert not fragments, f"broken at width {width}: {sorted(fragments)[:10]}\n{narrow}"
    assert "…" not in narrow, narrow
    lines = narrow.splitlines()
    assert all(len(line.rstrip()) <= width for line in lines if line.strip() != one_line), narrow
    for text in whole:
        assert any(text in line for line in lines), f"{text!r} is not on one line at width {width}:\n{narrow}"


@pytest.fixture(scope="module")
def traces() -> tuple[Any, Any]:
    x = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))
    port = port_model()
    with torch.no_grad():
        port.blocks[0].proj.weight.mul_(1.0001)  # a small error: numbers like 4.011e-05 in every table

    def run(model: torch.nn.Module) -> Any:
        with capture(model, inputs=True) as trace, torch.no_grad():
            model(x)
        return trace

    return run(reference_model()), run(port)


def test_a_number_cut_by_a_narrow_column_is_a_fragment_the_check_sees() -> None:
    # The check itself: rich's own folding (what the reports did before) fails it.
    from rich.table import Table

    def table(width: int) -> str:
        t = Table("key", "max abs")
        t.add_row("layers.0.self_attn.q_proj.weight", "0.0007813")
        console = Console(width=width, file=io.StringIO(), color_system=None)
        console.print(t)
        return console.file.getvalue()  # type: ignore[attr-defined]

    with pytest.raises(AssertionError, match="broken at width 24"):
        assert_fits(table(24), table(2000), 24)


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect(width: int) -> None:
    state = reference_model().state_dict()
    state["model.encoder.layers.0.self_attention.linear_qkv.layer_norm_weight"] = torch.ones(3)
    r = inspect(state)
    wide = render(r, 2000)
    assert_fits(render(r, width), wide, width, whole=("27,389",))


@pytest.mark.parametrize("width", WIDTHS)
def test_diff(width: int) -> None:
    a = reference_model().state_dict()
    b = dict(a)
    b["layers.0.self_attn.q_proj.weight"] = a["layers.0.self_attn.q_proj.weight"] * 1.0001
    b["layers.1.ffn.0.bias"] = a["layers.1.ffn.0.bias"] + 2e-7  # within tolerance: the "close" table
    b["decoder.weight"] = a["decoder.weight"].T.contiguous()  # a shape mismatch
    r = diff(a, b)
    assert r.mismatches and r.close_tensors and r.shape_mismatches
    numbers = (f"{r.mismatches[0].max_abs:.4g}",)
    narrow, wide = render(r, width, top=50), render(r, 2000, top=50)
    assert_fits(narrow, wide, width, whole=numbers, one_line=r.classic_summary())


@pytest.mark.parametrize("width", WIDTHS)
def test_trace_compare(traces: tuple[Any, Any], width: int) -> None:
    r = compare_traces(*traces, mapping=MAP)
    assert r.mismatched
    numbers = tuple(f"{x.max_abs:.4g}" for x in r.mismatched)
    narrow, wide = render(r, width, top=50), render(r, 2000, top=50)
    assert_fits(narrow, wide, width, whole=numbers, one_line=r.classic_summary())
    if width == 40:  # too narrow for the mismatched layers' table: one block per layer
        assert f"  max abs: {numbers[0]}" in narrow.splitlines()
    if width == 200:
        assert any(line.split() == ["#", "layer", "fwd", "bwd", "max", "abs", "shape", "origin"]
                   for line in narrow.splitlines())


@pytest.mark.parametrize("width", WIDTHS)
def test_replay(traces: tuple[Any, Any], width: int) -> None:
    port = port_model()
    with torch.no_grad():
        port.blocks[0].proj.weight.mul_(1.0001)
    r = replay(traces[0], port, mapping=MAP)
    assert r.culprits
    numbers = tuple(f"{x.max_abs:.3g}" for x in r.mismatched)
    narrow, wide = render(r, width, top=50), render(r, 2000, top=50)
    assert_fits(narrow, wide, width, whole=numbers)
    if width >= 100:  # the names whole, never cut to "layers.0.self_attn…"
        assert any("layers.0.self_attn.out_proj" in line and "blocks.0.proj" in line for line in narrow.splitlines())


def _resume_report() -> ResumeReport:
    def row(step: int, loss_b: float) -> StepRow:
        return StepRow(step, 0, step - 1, 0, step - 1, 0.6931471805599453 / step, loss_b, 1.0, 1.0, 1e-3, 1e-3,
                       True, loss_b == 0.6931471805599453 / step, True, loss_b == 0.6931471805599453 / step)

    rows = (row(3, 0.6931471805599453 / 3), row(4, 0.17328679513998632 + 3e-9), row(5, 0.1386295))
    finding = Finding("optimizer", "optimizer state was not restored: exp_avg, exp_avg_sq of "
                      "model.encoder.layers.0.self_attention.linear_qkv.weight", 2)
    seg = Segment(2, 5, rows, (finding,), (), Divergence(4, ("loss",), "model.encoder.layers.0.weight",
                                                              "step 4: loss 0.1732868 vs 0.1732868"))
    return ResumeReport("tests.recipes:TinyRecipe", 5, (ResumeLeg((2,), (seg,)),), Tolerance(exact=True))


@pytest.mark.parametrize("width", WIDTHS)
def test_resume(width: int) -> None:
    r = _resume_report()
    narrow, wide = render(r, width), render(r, 2000)
    assert_fits(narrow, wide, width, whole=("0.1732868", "0.231049"))


@pytest.mark.parametrize("width", (24, 40))
def test_a_table_too_narrow_folds_to_one_block_per_row(width: int) -> None:
    from rich.console import Group

    rows = [["model.decoder.layers.11.cross_attention.linear_proj.weight", "0.0007813", "1.526e-05", "[4096, 4096]"],
            ["model.decoder.layers.12.cross_attention.linear_proj.weight", "0.0001221", "3.052e-05", "[4096, 4096]"]]
    group = Group(*rich_titled_table("Close (2)", ["key", "max abs", "max rel", "shape"], rows))
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(group)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert "  max abs: 0.0007813" in lines and "  shape: [4096, 4096]" in lines
    assert all(len(line) <= width for line in lines)
    wide = Console(width=2000, file=io.StringIO(), color_system=None)
    wide.print(group)
    assert_fits("\n".join(lines), wide.file.getvalue(), width)  # type: ignore[attr-defined]


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    a = {f"model.decoder.layers.{i}.self_attention.linear_qkv.weight": torch.randn(8, 8) for i in range(3)}
    b = dict(a)
    key = "model.decoder.layers.1.self_attention.linear_qkv.weight"
    b[key] = a[key].clone()
    b[key][0, :3] += torch.tensor([7.813e-4, 1e-3, 2e-3])
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors"


def test_cli_at_60_columns_and_piped(checkpoints: tuple[Path, Path]) -> None:
    args = ["diff", str(checkpoints[0]), str(checkpoints[1])]
    wide = CliRunner(env={"COLUMNS": "2000"}).invoke(app, args)
    at60 = CliRunner(env={"COLUMNS": "60"}).invoke(app, args)
    assert wide.exit_code == at60.exit_code == 1, at60.output
    classic = next(line for line in wide.stdout.splitlines() if line.startswith("Common keys"))
    assert_fits(at60.stdout, wide.stdout, 60, whole=("0.002",), one_line=classic)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("COLUMNS", "LINES")}
    piped = subprocess.run([sys.executable, "-m", "tensorparity", *args], capture_output=True, text=True, env=env,
                           timeout=120)
    assert piped.returncode == 1, piped.stderr
    assert_fits(piped.stdout, wide.stdout, 80, whole=("0.002",), one_line=classic)
