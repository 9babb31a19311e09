"""Rank-aware compare of multi-process traces (``rank-<r>/`` folders written under torchrun):
one rank against another (``A@0 B@1``, ``--rank-a/--rank-b``), every rank of A against the same
rank of B by default (one report, the worst verdict, one exit code, a per-rank table), one trace
against each rank of a data-parallel run (``--each-rank``), and the refusals: ranks missing,
ranks of different world sizes, sides holding different ranks.

The multi-rank traces come from one real ``torchrun`` launch (gloo, 2 CPU ranks, a tiny DDP model,
other data per rank), shared by the module; the malformed ones are assembled from real
single-process captures (``RANK``/``WORLD_SIZE`` set, as torchrun sets them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from _cli_helpers import assert_one_line_error
from torch import nn
from typer.testing import CliRunner

from tensorparity.checkpoint.tracefolder.format import TraceError
from tensorparity.errors import TensorParityError, UsageError
from tensorparity.trace import capture
from tensorparity.trace._compare import compare_traces
from tensorparity.trace._ranked_report import SCHEMA, RankedTraceReport
from tensorparity.trace._trace_report import TraceReport

runner = CliRunner(env={"COLUMNS": "120"})

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.norm(self.fc1(x))))


def data(seed: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
'''

# One DDP training step per trace, every rank capturing its own rank-<r>/ folder:
#   a:    other data on each rank (seed 100 + rank)
#   b:    as a, but rank 1's LayerNorm has eps=0.1 (a plain attribute: DDP does not broadcast it)
#   same: the same data on every rank, parameter gradients recorded too
#   bug:  as same, but rank 1's LayerNorm has eps=0.1 (rank 0's parameter gradients, once all-reduced,
#         differ too where they are recorded final: two failing ranks, the worst is the forward one)
# a and b leave parameter gradients out: after the all-reduce they mix both ranks, so rank 0's
# would differ too wherever they are recorded once final.
DDP_SCRIPT = '''
import os
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tensorparity.trace import capture
from ranknet import Net, data


def step(out, seed, param_grads, eps_on=None):
    torch.manual_seed(0)
    net = Net()
    if dist.get_rank() == eps_on:
        net.norm.eps = 0.1
    model = DDP(net)
    x = data(seed)
    with capture(model, out=out, param_grads=param_grads):
        model(x).sum().backward()


dist.init_process_group("gloo")
rank = dist.get_rank()
root = sys.argv[1]
step(f"{root}/a", 100 + rank, False)
step(f"{root}/b", 100 + rank, False, eps_on=1)
step(f"{root}/same", 100, True)
step(f"{root}/bug", 100, True, eps_on=1)
dist.destroy_process_group()
# gloo's threads can abort the interpreter's teardown (torch: "terminate called without an active
# exception", one run in three here): leave without it, everything written and flushed.
sys.stdout.flush()
os._exit(0)
'''


def app() -> typer.Typer:
    from tensorparity.cli import app as main_app

    return main_app


def invoke(*args: str | Path) -> object:
    return runner.invoke(app(), ["compare", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a``, ``b``, ``same`` (2 ranks each, from torchrun) and ``one`` (one process, rank 0's data)."""
    root = tmp_path_factory.mktemp("ranks")
    (root / "ranknet.py").write_text(MODEL)
    (root / "ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(root / "ddp.py"), str(root)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranknet = _ranknet(root)
    torch.manual_seed(0)
    net = ranknet.Net()
    with capture(net, out=root / "one"):
        net(ranknet.data(100)).sum().backward()
    return root


def _ranknet(root: Path) -> Any:
    sys.path.insert(0, str(root))
    try:
        import ranknet  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(root))
    return ranknet


def test_torchrun_wrote_one_folder_per_rank(runs: Path) -> None:
    for name in ("a", "b", "same", "bug"):
        assert sorted(p.name for p in (runs / name).iterdir()) == ["rank-0", "rank-1"]


# --- one rank against another ---------------------------------------------------------------------

def test_one_rank_against_another_by_suffix_and_by_option(runs: Path) -> None:
    """Rank 0 and rank 1 of one run were fed the same data: the same; of another, other data."""
    same = compare_traces(f"{runs}/same@0", f"{runs}/same@1")
    assert isinstance(same, TraceReport) and same.passed
    assert same.a.source.endswith("rank-0") and same.b.source.endswith("rank-1")
    other = compare_traces(runs / "a", runs / "a", rank_a=0, rank_b=1)
    assert isinstance(other, TraceReport) and other.verdict == "inputs differ"
    assert compare_traces(runs / "a", runs / "b", rank=0).verdict == "identical"  # rank= still means both
    assert compare_traces(runs / "a", f"{runs}/b@1", rank_a=1).verdict == "differs"

    assert invoke(f"{runs}/same@0", f"{runs}/same@1").exit_code == 0  # type: ignore[attr-defined]
    result = invoke(runs / "a", runs / "a", "--rank-a", "0", "--rank-b", "1")
    assert result.exit_code == 1 and "inputs differ" in result.stdout  # type: ignore[attr-defined]
    assert invoke(runs / "a", runs / "b", "--rank", "0").exit_code == 0  # type: ignore[attr-defined]


def test_a_path_that_really_ends_in_at_digits_is_a_path(runs: Path, tmp_path: Path) -> None:
    shutil.copytree(runs / "one", tmp_path / "run@1")
    report = compare_traces(tmp_path / "run@1", runs / "one")
    assert isinstance(report, TraceReport) and report.verdict == "identical"
    with pytest.raises(TraceError, match="no such trace folder"):
        compare_traces(tmp_path / "run@2", runs / "one")  # not there: rank 2 of tmp_path/run, which is not there


def test_a_rank_given_twice_differently_is_refused(runs: Path) -> None:
    with pytest.raises(UsageError) as err:
        compare_traces(f"{runs}/a@0", runs / "b", rank_a=1)
    assert "A@0 and rank_a=1" in err.value.message and "A@N" in (err.value.fix or "")
    assert compare_traces(f"{runs}/a@0", runs / "b", rank_a=0, rank_b=0).passed  # the same twice is fine
    assert_one_line_error(invoke(runs / "a", runs / "b", "--rank", "0", "--rank-b", "1"),
                          "the rank of B is given twice", "fix: pass one rank per side")


# --- every rank -----------------------------------------------------------------------------------

def test_every_rank_against_the_same_rank_by_default(runs: Path) -> None:
    report = compare_traces(runs / "a", runs / "b")
    assert isinstance(report, RankedTraceReport)
    assert (report.pairing, report.world_size, [x.rank for x in report.ranks]) == ("rank by rank", 2, [0, 1])
    assert [x.report.verdict for x in report.ranks] == ["identical", "differs"]
    assert (report.verdict, report.passed, report.exit_code) == ("differs", False, 1)
    assert report.worst.rank == 1 and [x.rank for x in report.failing] == [1]
    first = report[1].first_divergence
    assert first is not None and first.layer_a.endswith("norm") and first.origin == "introduced"
    assert report.first_divergence == first
    assert report[0].a.source.endswith("rank-0") and report[1].b.source.endswith("rank-1")
    assert report.summary().startswith("differs on 1 of 2 ranks (rank 1); rank 1: first divergence forward at ")
    assert report.classic_summary() == "Ranks: 2 / Same: 1 / Different: 1 / Worst: rank 1 → differs"

    same = compare_traces(runs / "a", runs / "a")
    assert isinstance(same, RankedTraceReport)
    assert (same.verdict, same.exit_code, same.summary()) == ("identical", 0, "identical on all 2 ranks")


def test_the_worst_rank_is_the_one_that_differs_earliest(runs: Path) -> None:
    report = compare_traces(runs / "same", runs / "bug")
    assert isinstance(report, RankedTraceReport) and report.verdict == "differs"
    assert report.worst.rank == 1
    first = report.first_divergence
    assert first is not None and first.direction == "forward" and first.layer_a.endswith("norm")
    zero = report[0].first_divergence  # all-reduced gradients: rank 0 differs backward only, if at all
    assert zero is None or zero.direction == "backward"


def test_cli_every_rank_prints_the_table_then_the_worst_rank(runs: Path) -> None:
    result = invoke(runs / "a", runs / "b")
    out = result.stdout  # type: ignore[attr-defined]
    assert result.exit_code == 1, out  # type: ignore[attr-defined]
    lines = out.splitlines()
    table = lines.index(next(line for line in lines if line.startswith("rank  verdict")))
    assert lines[table + 2].split() == ["0", "identical", "0"]
    row = lines[table + 3].split()
    assert row[:2] == ["1", "differs"] and row[3:5] == ["forward", "at"] and row[5].endswith("norm")
    assert "Ranks: 2 / Same: 1 / Different: 1 / Worst: rank 1 → differs" in lines
    assert "rank 1 (the worst) in full:" in lines
    assert any(line.startswith("First divergence (forward): ") for line in lines[table:])
    assert any("rank-1" in line for line in lines if line.startswith("A "))  # the worst rank's own report
    assert invoke(runs / "a", runs / "a").exit_code == 0  # type: ignore[attr-defined]


def test_json_holds_every_rank_report(runs: Path) -> None:
    result = invoke(runs / "a", runs / "b", "--json")
    assert result.exit_code == 1  # type: ignore[attr-defined]
    doc = json.loads(result.stdout)  # type: ignore[attr-defined]  # one document, nothing else
    assert (doc["schema"], doc["verdict"], doc["exit_code"], doc["worst_rank"], doc["failing_ranks"]) == (
        SCHEMA, "differs", 1, 1, [1])
    assert doc["pairing"] == "rank by rank" and doc["world_size"] == 2
    assert [(r["rank"], r["rank_a"], r["rank_b"], r["verdict"]) for r in doc["ranks"]] == [
        (0, 0, 0, "identical"), (1, 1, 1, "differs")]
    assert all(r["report"]["schema"] == "tensorparity.trace-compare/1" for r in doc["ranks"])
    assert doc["ranks"][1]["report"]["first_divergence"]["layer_a"].endswith("norm")
    assert doc["ranks"][1]["mismatched"] == doc["ranks"][1]["report"]["counts"]["mismatched"] > 0


def test_ranked_report_in_a_notebook_and_as_html(runs: Path, tmp_path: Path) -> None:
    report = compare_traces(runs / "a", runs / "b")
    assert isinstance(report, RankedTraceReport)
    assert repr(report).startswith("<RankedTraceReport ") and "Worst: rank 1 → differs" in repr(report)
    text = str(report)
    assert "Per rank (2)" in text and "rank 1 (the worst) in full:" in text and "First divergence" in text
    page = report._repr_html_()
    assert page.startswith("<!DOCTYPE html>") and "Per rank (2)" in page and "<td>differs</td>" in page
    assert page.index("Per rank") < page.index("Relative error per layer")  # the table above the worst rank
    result = invoke(runs / "a", runs / "b", "--html", tmp_path / "r.html")
    assert result.exit_code == 1  # type: ignore[attr-defined]
    assert "Per rank (2)" in (tmp_path / "r.html").read_text(encoding="utf-8")


# --- one trace against each rank --------------------------------------------------------------------

def test_one_process_against_each_rank(runs: Path) -> None:
    """The one-process run on rank 0's data: every rank of ``same`` computed the same; of ``a``,
    rank 1 was fed other data, and is named."""
    same = compare_traces(runs / "one", runs / "same", each_rank=True)
    assert isinstance(same, RankedTraceReport) and same.pairing == "each rank of B"
    assert same.passed and [x.rank_b for x in same.ranks] == [0, 1] and {x.rank_a for x in same.ranks} == {None}
    other = compare_traces(runs / "one", runs / "a", each_rank=True)
    assert isinstance(other, RankedTraceReport)
    assert [x.report.verdict for x in other.ranks] == ["identical", "inputs differ"]
    assert (other.verdict, other.exit_code, other.worst.rank) == ("inputs differ", 1, 1)
    assert other.summary().startswith("inputs differ on 1 of 2 ranks of B (rank 1)")
    flipped = compare_traces(runs / "same", runs / "one", each_rank=True)  # the one trace on either side
    assert isinstance(flipped, RankedTraceReport) and flipped.pairing == "each rank of A" and flipped.passed
    picked = compare_traces(runs / "a", f"{runs}/b@1", each_rank=True)  # a chosen rank is one trace
    assert isinstance(picked, RankedTraceReport)
    assert [x.report.verdict for x in picked.ranks] == ["inputs differ", "differs"]

    result = invoke(runs / "one", runs / "a", "--each-rank")
    out = result.stdout  # type: ignore[attr-defined]
    assert result.exit_code == 1 and "rank of B  verdict" in out, out  # type: ignore[attr-defined]
    assert "A against rank 1 of B (the worst) in full:" in out
    assert invoke(runs / "one", runs / "same", "--each-rank").exit_code == 0  # type: ignore[attr-defined]


def test_a_live_model_against_each_rank(runs: Path) -> None:
    """A live model runs on each rank's recorded input: the same model, the same on every rank;
    one with rank 1's LayerNorm epsilon, the same on rank 1 of ``bug`` only in the forward pass."""
    ranknet = _ranknet(runs)
    torch.manual_seed(0)
    report = compare_traces(ranknet.Net(), runs / "same", each_rank=True)
    assert isinstance(report, RankedTraceReport) and report.a == "<live Net>" and report.pairing == "each rank of B"
    assert report.passed and len(report.ranks) == 2
    torch.manual_seed(0)
    wrong = ranknet.Net()
    wrong.norm.eps = 0.1
    other = compare_traces(wrong, runs / "a", each_rank=True)
    assert isinstance(other, RankedTraceReport) and [x.report.verdict for x in other.ranks] == ["differs", "differs"]
    first = other[1].first_divergence
    assert first is not None and first.direction == "forward" and first.layer_a.endswith("norm")


def test_one_trace_against_ranks_needs_each_rank(runs: Path) -> None:
    with pytest.raises(UsageError) as err:
        compare_traces(runs / "one", runs / "a")
    assert err.value.message == "B holds 2 ranks (0, 1) and A is one trace"
    assert "--each-rank" in (err.value.fix or "") and "B@N" in (err.value.fix or "")
    assert_one_line_error(invoke(runs / "a", runs / "one"), "A holds 2 ranks (0, 1) and B is one trace",
                          "fix: pass --each-rank")
    assert_one_line_error(invoke(runs / "a", runs / "b", "--each-rank"), "both A and B hold ranks",
                          "fix: drop --each-rank")
    assert_one_line_error(invoke(runs / "one", runs / "one", "--each-rank"), "neither A nor B holds ranks",
                          "fix: drop --each-rank")


# --- malformed multi-rank traces (assembled from real single-process captures) ----------------------

class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).tanh()


def _capture_ranks(folder: Path, ranks: dict[int, int], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Capture rank r (as torchrun's RANK/WORLD_SIZE would say) into folder/rank-r, for r: world."""
    for rank, world in ranks.items():
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        torch.manual_seed(0)
        model = Small()
        with capture(model, out=folder):
            model(torch.ones(2, 3) * (rank + 1)).sum().backward()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    return folder


def test_missing_ranks_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = _capture_ranks(tmp_path / "full", {0: 3, 1: 3, 2: 3}, monkeypatch)
    holed = tmp_path / "holed"
    shutil.copytree(full, holed)
    shutil.rmtree(holed / "rank-1")
    assert compare_traces(full, full).passed  # three complete ranks
    with pytest.raises(TraceError) as err:
        compare_traces(full, holed)
    assert err.value.message == "trace B was captured on 3 ranks but rank 1 is missing (it holds rank 0, 2)"
    assert err.value.path == str(holed)
    assert err.value.fix == ("copy rank-1/ from the capture that wrote the others (each rank writes its own "
                             "folder), or compare one rank with B@N")
    assert compare_traces(full, holed, rank=2).passed  # one rank of it still compares
    assert_one_line_error(invoke(holed, full), "trace A was captured on 3 ranks but rank 1 is missing",
                          "fix: copy rank-1/")


def test_ranks_of_different_world_sizes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _capture_ranks(tmp_path / "good", {0: 2, 1: 2}, monkeypatch)
    mixed = _capture_ranks(tmp_path / "mixed", {0: 2, 1: 3}, monkeypatch)
    with pytest.raises(TraceError) as err:
        compare_traces(mixed, good)
    assert err.value.message == "trace A's ranks come from captures of different world sizes (rank 0: 2, rank 1: 3)"
    assert "one capture together" in (err.value.fix or "")
    assert_one_line_error(invoke(good, mixed), "trace B's ranks come from captures of different world sizes",
                          "fix: put the rank-<r> folders of one capture together")


def test_every_problem_of_both_sides_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mixed = _capture_ranks(tmp_path / "mixed", {0: 2, 1: 3}, monkeypatch)
    holed = _capture_ranks(tmp_path / "holed", {0: 3, 2: 3}, monkeypatch)
    with pytest.raises(TensorParityError) as err:
        compare_traces(mixed, holed)
    assert "trace A's ranks come from captures of different world sizes" in err.value.message
    assert "trace B was captured on 3 ranks but rank 1 is missing" in err.value.message
    assert "one capture together" in (err.value.fix or "") and "copy rank-1/" in (err.value.fix or "")


def test_different_rank_counts_are_refused(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    three = _capture_ranks(tmp_path / "three", {0: 3, 1: 3, 2: 3}, monkeypatch)
    with pytest.raises(UsageError) as err:
        compare_traces(three, runs / "a")
    assert err.value.message == ("A holds 3 ranks (0, 1, 2) and B holds 2 (0, 1): rank by rank needs the same "
                                 "ranks on both sides")
    assert "A@N B@M" in (err.value.fix or "")
    assert_one_line_error(invoke(runs / "a", three), "A holds 2 ranks (0, 1) and B holds 3 (0, 1, 2)",
                          "fix: compare one rank of each (A@N B@M, --rank-a/--rank-b)")
    result = invoke(runs / "a", three, "--json")
    assert result.exit_code == 2  # type: ignore[attr-defined]
    doc = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert doc["schema"] == "tensorparity.error/1" and "B holds 3" in doc["error"]


def test_noise_floor_of_a_multi_rank_trace_takes_every_ranks_floor(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorparity.trace import capture_run
    from tensorparity.trace.noise import recorded_noise_floor_of

    folder = tmp_path / "nf"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        capture_run("tensorparity.examples:reference_model", folder, input_spec=[f"2x16x12:float32:seed={rank}"],
                    noise_floor=True)
    # each rank checks its own folder only (rank 1 starts while rank 0's is there), and never
    # writes over its own previous one
    with pytest.raises(UsageError, match="rank 1's folder already exists"):
        capture_run("tensorparity.examples:reference_model", folder, input_spec=["2x16x12:float32"], overwrite=True)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    per_rank = [dict((p, t.atol) for p, t in recorded_noise_floor_of(folder, r).overrides) for r in (0, 1)]
    merged = dict((p, t.atol) for p, t in recorded_noise_floor_of(folder).overrides)
    assert merged.keys() == per_rank[0].keys() == per_rank[1].keys()
    assert all(merged[k] == max(per_rank[0][k], per_rank[1][k]) for k in merged)
    assert any(per_rank[0][k] != per_rank[1][k] for k in merged)  # the ranks' own data: their own noise
    result = invoke(folder, folder, "--noise-floor")
    assert result.exit_code == 0, result.output
    assert "per-key override" in result.stdout
