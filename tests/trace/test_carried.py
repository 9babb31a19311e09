"""An activation between two reordered layers is compared through its sibling's reordering
(``_reordered.plan_carries``). On traces on disk the job first reads a few plain elements to
guess which comparison stands and measures that one first; whichever it measures first, the
record is the one the plain-then-reordered order gives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tensorparity
from tensorparity.numerics import Pair, Tolerance, compare_pairs
from tensorparity.trace import _reordered, capture, compare_traces
from tensorparity.trace._jobs import Job
from tensorparity.trace._layout import Gathered

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from test_layouts import interleaved_feed_forward  # noqa: E402

INDEX = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # interleave two halves of eight features


def _job(tmp_path: Path, a: torch.Tensor, b: torch.Tensor, tolerance: Tolerance | None) -> tuple[Job, list]:
    save_file({"x": a.contiguous()}, str(tmp_path / "a.safetensors"))
    save_file({"x": b.contiguous()}, str(tmp_path / "b.safetensors"))
    ea = tensorparity.open(tmp_path / "a.safetensors")["x"]
    eb = tensorparity.open(tmp_path / "b.safetensors")["x"]
    job = Job("forward", 0, "act.output", "act.output", ea, eb, None, None, tolerance=tolerance)  # type: ignore[arg-type]
    tries = [("up", Pair("act.output (features reordered as up's)", Gathered((ea,), -1, INDEX), eb, None, tolerance))]
    return job, tries


def _plain(job: Job, tol: Tolerance):
    return next(compare_pairs([Pair(job.key, job.a, job.b, None, job.tolerance)], tol, workers=1))


def _order(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    measured: list[str] = []
    real = _reordered.compare_pair

    def spy(pair: Pair, tol: Tolerance):
        measured.append("reordered" if "reordered" in pair.key else "plain")
        return real(pair, tol)

    monkeypatch.setattr(_reordered, "compare_pair", spy)
    return measured


def test_values_in_the_sibling_order_are_measured_reordered_first_and_carried(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    a = torch.randn(600, 8)
    job, tries = _job(tmp_path, a, a[:, INDEX], None)
    measured = _order(monkeypatch)
    found = _reordered._carried(job, tries, Tolerance())
    assert found.passed and found.key.endswith("(features reordered as up's)") and job.carried_by == "up"
    assert measured == ["reordered"]  # the plain comparison only scanned to its first failing element
    assert not _plain(job, Tolerance()).passed


def test_a_plain_comparison_that_passes_stands_even_when_its_first_elements_looked_reordered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Features equal along the reordering's cycles (it maps the tensor onto itself) and B off by 1% of max|b|:
    # outside the plain atol (the probe says "measure the reordered one first"), inside the atol
    # raised to ulps of max|b|. Both comparisons pass, so the plain one stands, as it would have.
    torch.manual_seed(0)
    half = torch.randn(600, 4)
    a = half[:, [0, 1, 1, 2, 1, 2, 2, 3]].clone()  # cycles (1 4 2) and (3 5 6) of INDEX
    assert torch.equal(a[:, INDEX], a)
    b = a + 0.01 * a.abs().max()
    tol = Tolerance(atol=1e-6, rtol=0.0, ulps=1e6)
    job, tries = _job(tmp_path, a, b, tol)
    measured = _order(monkeypatch)
    found = _reordered._carried(job, tries, Tolerance())
    assert measured == ["reordered", "plain"]
    plain = _plain(job, Tolerance())
    assert found == plain and found.passed and job.carried_by is None


def test_when_neither_passes_the_plain_comparison_stands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    a = torch.randn(600, 8)
    b = a[:, INDEX] + 1.0
    job, tries = _job(tmp_path, a, b, None)
    measured = _order(monkeypatch)
    found = _reordered._carried(job, tries, Tolerance())
    assert measured == ["reordered", "plain"]
    assert found == _plain(job, Tolerance()) and not found.passed and job.carried_by is None


def test_a_plain_comparison_whose_first_elements_agree_is_measured_first(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    a = torch.randn(600, 8)
    job, tries = _job(tmp_path, a, a.clone(), None)
    measured = _order(monkeypatch)
    found = _reordered._carried(job, tries, Tolerance())
    assert measured == ["plain"] and found.status == "identical" and job.carried_by is None


@pytest.mark.parametrize("act", [nn.SiLU, nn.GELU])
def test_traces_on_disk_report_what_traces_in_memory_report(tmp_path: Path, act: type[nn.Module]) -> None:
    """The whole compare: SiLU between reordered layers is carried, GELU (a planted bug) is the
    first divergence, from folders (probe first) exactly as from memory (plain first)."""
    a, b, mapping = interleaved_feed_forward(act)
    x = torch.randn(3, 16, 16)
    reports = []
    for where in ("memory", "disk"):
        traces = []
        for name, model in (("a", a), ("b", b)):
            out = tmp_path / f"{name}.trace" if where == "disk" else None
            torch.manual_seed(1)
            model.zero_grad(set_to_none=True)
            with capture(model, mode="full", out=out) as t:
                model(x).sum().backward()
            traces.append(out if out is not None else t)
        reports.append(compare_traces(traces[0], traces[1], mapping=mapping).to_dict())
    memory, disk = reports
    for report in (memory, disk):
        for key in ("a", "b"):
            report.pop(key, None)
    assert memory == disk
    act_layer = next(x for x in disk["layers"] if x["layer_a"] == "act")
    if act is nn.SiLU:
        assert disk["verdict"] in ("identical", "close") and act_layer["layout"].startswith("features reordered as up's")
    else:
        assert disk["first_divergence"]["layer_a"] == "act"


def test_a_split_group_against_a_fused_module_is_judged_by_the_loosest_tolerance_of_its_parts(tmp_path: Path) -> None:
    """A's q, k and v joined against B's fused qkv, each part with its own tolerance (a measured
    noise floor per record): the loosest judges the joined comparison, from folders (parts
    located in their shards) as from memory (parts held as records)."""
    from test_layouts import Fused, Split3

    from tensorparity.mapping import Concat, Mapping, Rule, apply_mapping

    torch.manual_seed(0)
    a, b = Split3(), Fused()
    d = a.q.weight.shape[0]
    mapping = Mapping([Rule(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}", Concat(0)), Rule("out.{p}", "out.{p}")])
    b.load_state_dict({k: e.load() for k, e in apply_mapping(a.state_dict(), mapping).checkpoint.items()})
    x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(1))
    tol = Tolerance(overrides=tuple((f"^{part}/", Tolerance(atol=atol, rtol=0.0))
                                    for part, atol in (("q", 0.1), ("k", 0.25), ("v", 0.05))))
    atols = {}
    for where in ("memory", "disk"):
        traces = []
        for name, model in (("a", a), ("b", b)):
            out = tmp_path / f"{name}.trace" if where == "disk" else None
            with capture(model, out=out) as t:
                model(x).pow(2).mean().backward()
            traces.append(out if out is not None else t)
        report = compare_traces(traces[0], traces[1], mapping=mapping, tolerance=tol)
        assert report.verdict in ("identical", "close"), report.summary()
        joined = next(layer for layer in report.layers if layer.layer_b == "qkv")
        atols[where] = [r.tolerance.atol for r in joined.forward]
    assert atols["memory"] == atols["disk"] == [0.25]
