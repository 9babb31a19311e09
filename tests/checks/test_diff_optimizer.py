"""diff pairs an optimizer state keyed by parameter index (optimizer.state_dict(), torch.save) with
one keyed by parameter name (get_state_dict, torch.distributed.checkpoint) through the param
groups, and refuses to guess when they disagree."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from typer.testing import CliRunner

import tensorparity
from tensorparity.cli import app
from tensorparity.numerics import Tolerance


def trained(out: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, out), torch.nn.LayerNorm(out), torch.nn.Linear(out, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).square().sum().backward()
    optim.step()
    return model, optim


def save_dcp(state: dict[str, Any], folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP says it assumes a single process
        dcp.save(state, checkpoint_id=folder)
    return folder


def both(tmp_path: Path, out: int = 3) -> tuple[Path, Path, torch.optim.Optimizer]:
    model, optim = trained(out)
    msd, osd = get_state_dict(model, optim)
    folder = save_dcp({"model": msd, "optim": osd}, tmp_path / "dcp")
    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, tmp_path / "plain.pt")
    return folder, tmp_path / "plain.pt", optim


def test_index_and_name_keyed_states_pair_through_the_param_groups(tmp_path: Path) -> None:
    folder, plain, _ = both(tmp_path)
    report = tensorparity.diff(folder, plain, tolerance=Tolerance(exact=True))
    assert report.verdict == "identical", report.classic_summary()
    assert not report.only_in_a and not report.only_in_b and not report.values
    keys = {t.key for t in report.tensors}
    assert {"optim.state.0.weight.exp_avg", "optim.state.2.bias.exp_avg_sq", "optim.state.1.weight.step"} <= keys
    assert len(keys) == 6 + 6 * 3  # 6 weights, 6 parameters x (step, exp_avg, exp_avg_sq)
    note = next(n for n in report.notes if n.startswith("optimizer state"))
    assert note == ("optimizer state 'optim.state': B's is keyed by parameter index, A's by name; paired through the "
                    "param groups' order (0 ↔ 0.weight, 1 ↔ 0.bias, 2 ↔ 1.weight, … 6 parameters) and compared "
                    "under A's keys")


def test_an_altered_moment_is_named_by_its_parameter(tmp_path: Path) -> None:
    folder, _, optim = both(tmp_path)
    model, _ = trained()
    state = optim.state_dict()
    state["state"][2]["exp_avg"] = state["state"][2]["exp_avg"].clone()
    state["state"][2]["exp_avg"][1] += 1.0  # parameter 2 is 1.weight (the LayerNorm's)
    torch.save({"model": model.state_dict(), "optim": state}, tmp_path / "altered.pt")
    for a, b in ((folder, tmp_path / "altered.pt"), (tmp_path / "altered.pt", folder)):
        report = tensorparity.diff(a, b)
        assert report.verdict == "differs" and not report.only_in_a and not report.only_in_b
        assert [(m.key, m.first_index) for m in report.mismatches] == [("optim.state.1.weight.exp_avg", (1,))]


def test_a_bare_optimizer_state_dict_against_a_dcp_folder(tmp_path: Path) -> None:
    model, optim = trained()
    _, osd = get_state_dict(model, optim)
    folder = save_dcp({"optimizer": osd}, tmp_path / "dcp")
    torch.save(optim.state_dict(), tmp_path / "opt.pt")  # keyed by index, no prefix
    report = tensorparity.diff(tmp_path / "opt.pt", folder, weights_only=False)
    assert report.verdict == "identical" and not report.only_in_a and not report.only_in_b
    assert "optimizer state 'state' and 'optimizer.state': A's is keyed by parameter index" in report.notes[-1]


def test_no_pairing_is_guessed_when_the_shapes_disagree(tmp_path: Path) -> None:
    folder, _, _ = both(tmp_path, out=3)
    model, optim = trained(out=5)  # same number of parameters, other shapes
    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, tmp_path / "other.pt")
    report = tensorparity.diff(folder, tmp_path / "other.pt", weights_only=False)
    note = next(n for n in report.notes if n.startswith("optimizer state"))
    assert "not paired, as optim.state.0 and optim.state.0.weight differ in 'exp_avg' (tensor [5, 4] against " \
           "tensor [3, 4])" in note
    assert len(report.only_in_a) == 18 and len(report.only_in_b) == 18


def test_no_pairing_is_guessed_when_the_counts_disagree(tmp_path: Path) -> None:
    folder, _, _ = both(tmp_path)
    model, _ = trained()
    optim = torch.optim.AdamW(list(model.parameters())[:4], lr=0.01)  # an optimizer over fewer parameters
    model(torch.randn(2, 4)).square().sum().backward()
    optim.step()
    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, tmp_path / "fewer.pt")
    report = tensorparity.diff(folder, tmp_path / "fewer.pt")
    assert any("not paired, as parameters per param group differ ([4] keyed by index, [6] by name)" in n
               for n in report.notes)
    assert len(report.only_in_a) == 18 and len(report.only_in_b) == 12


def test_cli_says_how_it_paired(tmp_path: Path) -> None:
    folder, plain, _ = both(tmp_path)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["diff", "--exact", str(folder), str(plain)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Only in A: 0 / Only in B: 0" in text and "paired through the param groups' order" in text
