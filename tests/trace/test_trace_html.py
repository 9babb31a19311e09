"""The HTML layer-parity report: one well-formed, self-contained page (no network references), the
first divergence named and marked, one SVG with a series per direction, every trace string
escaped; the port's switchable bugs; ``tensorparity compare --html``."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tensorparity.errors import UsageError
from tensorparity.examples import port_model, reference_model
from tensorparity.trace import Trace, capture, compare_traces
from tensorparity.trace._trace_report import TraceReport
from tensorparity.trace._trace_report_html import render_trace_html

MAP = str(files("tensorparity.examples") / "reference_to_port.yaml")
VOID = {"meta", "input", "br", "hr", "img", "link", "col", "area", "base", "source", "wbr", "track", "embed"}
SVG_VOID = {"rect", "line", "polyline", "path", "circle"}  # written self-closing (``<.../>``) or closed


class _Checker(HTMLParser):
    """Parses a page and checks every element is closed in order; collects tags and attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == [], (checker.errors, checker.stack)
    return checker


def run(model: nn.Module, x: torch.Tensor) -> Trace:
    with capture(model) as trace:
        model(x).sum().backward()
    return trace


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(features: torch.Tensor) -> Trace:
    return run(reference_model(), features)


@pytest.fixture(scope="module")
def buggy(reference: Trace, features: torch.Tensor) -> TraceReport:
    return compare_traces(reference, run(port_model(bug="norm_eps"), features), mapping=MAP)


def test_page_is_well_formed_offline_and_names_the_first_divergence(buggy: TraceReport) -> None:
    page = render_trace_html(buggy)
    assert page.startswith("<!DOCTYPE html>")
    checker = parse(page)
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    # Nothing loaded from elsewhere: no src/href attributes at all.
    assert not [(t, a) for t, a in checker.tags if "src" in a or "href" in a]
    first = buggy.first_divergence
    assert first is not None and (first.layer_a, first.layer_b) == ("layers.1.norm2", "blocks.1.mlp_norm")
    text = "".join(checker.text)
    assert "first divergence: layers.1.norm2" in text  # the marker in the plot
    assert "First divergence (forward): layers.1.norm2 → blocks.1.mlp_norm" in text
    assert buggy.verdict == "differs" and ">differs</span>" in page
    # One SVG, one polyline per series (forward, backward) plus the tolerance line.
    assert [t for t, _ in checker.tags].count("svg") == 1
    series = sorted(a["class"] or "" for t, a in checker.tags if t == "polyline")
    assert series == ["series-backward", "series-forward", "series-tolerance"]
    # A point per aligned layer and direction, each with its layer's name.
    assert [t for t, _ in checker.tags].count("circle") == 2 * len(buggy.layers)
    # The table: a row per aligned layer, the mismatched ones marked, the first one highlighted.
    rows = [a for t, a in checker.tags if t == "tr" and "data-name" in a]
    assert len(rows) == len(buggy.layers)
    assert sum("diff" in (a["class"] or "") for a in rows) == len(buggy.mismatched)
    assert [a["data-name"] for a in rows if "first" in (a["class"] or "")] == ["layers.1.norm2 blocks.1.mlp_norm"]
    assert "introduced" in text and 'id="filter"' in page


def test_plot_puts_the_first_divergence_above_the_tolerance(buggy: TraceReport) -> None:
    """The forward series crosses the tolerance line where the bug is and lies on the floor before."""
    checker = parse(render_trace_html(buggy))
    lines = {a["class"]: [tuple(map(float, p.split(","))) for p in (a["points"] or "").split()]
             for t, a in checker.tags if t == "polyline"}
    fwd, tol = lines["series-forward"], dict(lines["series-tolerance"])
    i = buggy.layers.index(buggy.first_divergence)  # type: ignore[arg-type]
    x, y = fwd[i]
    assert y < tol[x]  # SVG y grows downwards: above the line
    floor = max(py for _, py in fwd)
    assert all(py == floor for _, py in fwd[:i])  # identical before the bug: error 0 on the floor


def test_matching_port_has_no_divergence_marker(reference: Trace, features: torch.Tensor) -> None:
    report = compare_traces(reference, run(port_model(), features), mapping=MAP)
    page = render_trace_html(report)
    parse(page)
    assert report.passed and report.first_divergence is None
    assert "first divergence" not in page.lower() and 'class="verdict ok"' in page


def test_layer_names_from_the_model_are_escaped(features: torch.Tensor) -> None:
    evil = '<script>alert("x")</script>'

    def model(scale: float) -> nn.Module:
        m = nn.Sequential()
        m.add_module("fc", nn.Linear(4, 4))
        m.add_module(evil, nn.Linear(4, 2))
        torch.manual_seed(0)
        for p in m.parameters():
            nn.init.normal_(p)
        with torch.no_grad():
            m[1].weight.mul_(scale)
        return m

    x = torch.ones(3, 4)
    report = compare_traces(run(model(1.0), x), run(model(1.5), x))
    assert report.first_divergence is not None and report.first_divergence.layer_a == evil
    page = render_trace_html(report)
    checker = parse(page)
    assert evil not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert [t for t, _ in checker.tags].count("script") == 1  # only the filter's own script
    assert evil in "".join(checker.text)  # shown to the reader as text


def test_port_bugs_diverge_where_they_are_injected(reference: Trace, features: torch.Tensor) -> None:
    report = compare_traces(reference, run(port_model(bug="gelu_tanh"), features), mapping=MAP)
    first = report.first_divergence
    # The GELU is a function call inside blocks.0: the first module to return something else is fc2.
    assert first is not None and first.layer_b == "blocks.0.fc2" and first.origin == "introduced"
    assert port_model(bug="norm_eps").blocks[1].mlp_norm.eps == 1e-3
    with pytest.raises(UsageError) as exc:
        port_model(bug="nope")
    assert "gelu_tanh" in exc.value.fix and "norm_eps" in exc.value.fix


def test_cli_compare_writes_the_html_report(tmp_path: Path, features: torch.Tensor) -> None:
    from tensorparity.cli import app

    for name, model in (("ref", reference_model()), ("port", port_model(bug="norm_eps"))):
        with capture(model, out=tmp_path / name):
            model(features).sum().backward()
    out = tmp_path / "report.html"
    result = CliRunner(env={"COLUMNS": "160"}).invoke(
        app, ["compare", str(tmp_path / "ref"), str(tmp_path / "port"), "--map", MAP, "--html", str(out), "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["first_divergence"]["layer_b"] == "blocks.1.mlp_norm"  # stdout: JSON only
    page = out.read_text(encoding="utf-8")
    parse(page)
    assert "blocks.1.mlp_norm" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["port", "ref", "report.html"]  # no temp file left
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "ref"), str(tmp_path / "port"),
                                      "--html", str(tmp_path / "missing" / "r.html")])
    assert result.exit_code == 2 and "the output folder does not exist" in result.output
    # an existing file is never replaced without --overwrite (it was: a user lost a checkpoint so)
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "ref"), str(tmp_path / "port"), "--html", str(out)])
    assert result.exit_code == 2 and "the output file exists" in result.output and "--overwrite" in result.output
