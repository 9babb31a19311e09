"""Every report type implements one :class:`~tensorparity.report.Report` protocol: the same
``to_dict``/``to_json``/``exit_code``/``render(console, *, top)``, plain text without terminal
codes, and HTML for a notebook.

Each report is made the way a user makes it: the public function on tiny real tensors, models,
traces, checkpoints, training runs and loader states.
"""

from __future__ import annotations

import io
import json
import re
from functools import partialmethod
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import nn

import tensorparity
from tensorparity.report import Report, render_report, report_html, report_json, report_text, rich_console

_ANSI = re.compile(r"\x1b\[|\x1b\]")
_VOID = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source", "track", "embed"}


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x)).tanh()


def _traced(model: nn.Module, x: torch.Tensor, **options: Any) -> Any:
    from tensorparity.trace import capture

    with capture(model, **options) as trace:
        model(x).sum().backward()
    return trace


def _ranks(folder: Path, bump: float) -> Path:
    """Two ranks captured as torchrun's RANK/WORLD_SIZE would say, into folder/rank-r; rank 1's
    first weight is ``bump`` off."""
    from tensorparity.trace import capture

    with pytest.MonkeyPatch.context() as mp:
        for rank in (0, 1):
            mp.setenv("RANK", str(rank))
            mp.setenv("WORLD_SIZE", "2")
            torch.manual_seed(0)
            model = Small()
            with torch.no_grad():
                model.fc.weight[0, 0] += bump * rank
            with capture(model, out=folder):
                model(torch.ones(2, 3) * (rank + 1)).sum().backward()
    return folder


def build_reports(tmp: Path) -> dict[str, Any]:
    """One real instance of every report type, by name (some that differ, some that pass)."""
    from tensorparity.checks import load_check
    from tensorparity.dataloader._state import convert_dataloader_state, inspect_dataloader_state
    from tensorparity.examples import old_release, reference_model
    from tensorparity.examples.legacy_loader import run_legacy_training
    from tensorparity.examples.resume_recipes import Forgetful
    from tensorparity.mapping.suggest import suggest_mapping
    from tensorparity.migrate import migrate, plan_migrations
    from tensorparity.trace import capture, compare_traces, replay

    out: dict[str, Any] = {}
    a = {"layers.0.weight": torch.arange(6.0).reshape(2, 3), "layers.0.bias": torch.zeros(3),
         "only_in_a": torch.ones(1), "step": 3}
    b = {"layers.0.weight": torch.arange(6.0).reshape(2, 3) + 0.5, "layers.0.bias": torch.zeros(3).bfloat16(),
         "only_in_b": torch.ones(1), "step": 4}
    out["DiffReport"] = tensorparity.diff(a, b)
    out["LoadCheckReport"] = load_check({"weight": torch.ones(2, 2)}, model=nn.Linear(2, 2))
    out["InspectReport"] = tensorparity.inspect(nn.BatchNorm1d(4))

    torch.manual_seed(0)
    one = Small()
    other = Small()
    other.load_state_dict(one.state_dict())
    with torch.no_grad():
        other.fc.weight[0, 0] += 0.25
    x = torch.ones(2, 3)
    out["TraceReport"] = compare_traces(_traced(one, x), _traced(other, x))
    out["RankedTraceReport"] = compare_traces(_ranks(tmp / "ranks-a", 0.0), _ranks(tmp / "ranks-b", 0.25))

    ref = reference_model()
    features = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))
    with capture(ref, inputs=True) as trace, torch.no_grad():
        ref(features)
    buggy = reference_model()
    buggy.layers[1].norm2.eps = 1e-2
    out["ReplayReport"] = replay(trace, buggy)

    out["ResumeReport"] = tensorparity.resume_check(Forgetful(forget="scheduler"), steps=3, resume_at=1,
                                                    confirm=False)

    old = old_release.write_old_release(tmp / "run_v1.pt")
    out["MigrateReport"] = migrate(old, old_release.SPEC, dry_run=True)
    out["MigrationPlan"] = plan_migrations(tensorparity.open(old), old_release.MIGRATIONS)
    torch.save({"w": torch.ones(2, 3), "note": "hello"}, tmp / "w.pt")
    out["ConvertReport"] = tensorparity.convert(tmp / "w.pt", tmp / "w-copy.pt")

    legacy = run_legacy_training(tmp / "legacy", num_workers=0, stop_epoch=1, stop_step=3)
    out["DataLoaderStateConversion"] = convert_dataloader_state(legacy.folder, tmp / "state.pt")
    out["DataLoaderStateSummary"] = inspect_dataloader_state(legacy.folder)

    out["Suggestion"] = suggest_mapping({"w": torch.arange(6.0).reshape(2, 3), "x": torch.ones(5)},
                                        {"weight": torch.arange(6.0).reshape(3, 2).T.contiguous()})
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_reports(tmp_path_factory.mktemp("reports"))


NAMES = ["DiffReport", "LoadCheckReport", "InspectReport", "TraceReport", "RankedTraceReport", "ReplayReport",
         "ResumeReport", "MigrateReport", "MigrationPlan", "ConvertReport", "DataLoaderStateSummary",
         "DataLoaderStateConversion", "Suggestion"]


class _Balanced(HTMLParser):
    """Fails on an end tag that closes nothing open, or tags left open at the end."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.tags = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags += 1
        if tag not in _VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:] or 'nothing'}"
        self.open.pop()


def test_every_report_type_is_built(reports: dict[str, Any]) -> None:
    assert sorted(reports) == sorted(NAMES)
    assert {name: type(r).__name__ for name, r in reports.items()} == {n: n for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_report_implements_the_protocol(reports: dict[str, Any], name: str) -> None:
    r = reports[name]
    assert isinstance(r, Report)
    assert r.exit_code in (0, 1)

    data = r.to_dict()
    assert isinstance(data, dict) and data["schema"].startswith("tensorparity.")
    assert json.loads(r.to_json()) == json.loads(json.dumps(data))
    assert json.loads(r.to_json(indent=None)) == json.loads(r.to_json())

    text = str(r)
    assert text.strip() and not _ANSI.search(text)

    page = r._repr_html_()
    parser = _Balanced()
    parser.feed(page)
    parser.close()
    assert parser.tags and parser.open in ([], ["html"], ["html", "body"]), parser.open

    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None, force_terminal=False)
    r.render(console, top=1)
    printed = out.getvalue()
    assert printed.strip() and not _ANSI.search(printed)

    # In a rich console as a renderable (what `console.print(report)` and notebooks use).
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(r)
    assert out.getvalue().strip() and not out.getvalue().startswith(name + "(")  # not the dataclass repr


@pytest.mark.parametrize("name", NAMES)
def test_the_shared_implementations_are_bound_not_repeated(reports: dict[str, Any], name: str) -> None:
    members = vars(type(reports[name]))

    def shared(member: str, function: Any) -> bool:
        bound = members[member]
        return bound is function or (isinstance(bound, partialmethod) and bound.func is function)

    assert shared("to_json", report_json) and shared("render", render_report)
    assert shared("__str__", report_text) and shared("_repr_html_", report_html)
    assert shared("__rich_console__", rich_console)


@pytest.mark.parametrize("name", NAMES)
def test_colour_only_in_a_terminal(reports: dict[str, Any], name: str) -> None:
    r = reports[name]
    plain, colour = io.StringIO(), io.StringIO()
    r.render(Console(file=plain, width=120, color_system=None), top=1)
    r.render(Console(file=colour, width=120, color_system="truecolor", force_terminal=True), top=1)
    assert _ANSI.search(colour.getvalue())
    assert re.sub(r"\x1b\[[0-9;]*m", "", colour.getvalue()) == plain.getvalue()


def test_render_prints_the_classic_line_whole_at_any_width(reports: dict[str, Any]) -> None:
    for name in ("DiffReport", "TraceReport", "RankedTraceReport"):
        r = reports[name]
        out = io.StringIO()
        r.render(Console(file=out, width=40, color_system=None), top=1)
        assert r.classic_summary() in out.getvalue().splitlines(), name
        assert r.classic_summary() not in report_text(r, width=40).splitlines()  # text wraps it like any line


def test_exit_codes_say_same_or_differs(reports: dict[str, Any]) -> None:
    codes = {name: r.exit_code for name, r in reports.items()}
    assert codes == {
        "DiffReport": 1, "LoadCheckReport": 1, "InspectReport": 0, "TraceReport": 1, "RankedTraceReport": 1,
        "ReplayReport": 1, "ResumeReport": 1, "MigrateReport": 0, "MigrationPlan": 0, "ConvertReport": 0,
        "DataLoaderStateSummary": 0, "DataLoaderStateConversion": 0, "Suggestion": 1}
    for name, r in reports.items():
        if "exit_code" in r.to_dict():
            assert r.to_dict()["exit_code"] == r.exit_code, name
