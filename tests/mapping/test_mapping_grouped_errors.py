"""A templated rule whose transform does not fit is one problem, not one per layer: the first
key named, the others summarised, every key kept in ``MappingProblem.keys``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tensorparity.cli import app
from tensorparity.mapping import Mapping, MappingError, Rule, apply_mapping
from _cli_helpers import assert_one_line_error

RULE = Rule("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight",
            {"rearrange": "(h two d) c -> (h d two) c", "h": 5, "two": 2})
KEYS = [f"layers.{i}.attention.wq.weight" for i in range(8)]


def test_the_same_einops_error_for_every_layer_is_one_problem() -> None:
    with pytest.raises(MappingError) as info:
        apply_mapping({k: torch.zeros(12, 4) for k in KEYS}, Mapping([RULE]))
    (problem,) = info.value.problems
    assert problem.keys == tuple(KEYS)  # all of them, for code and --json
    assert problem.rule == 0
    text = str(problem)
    assert ("does not fit 'layers.0.attention.wq.weight' [12, 4] float32: can't divide axis of "
            "length 12 in chunks of 10 (the same for layers.1, layers.2, … layers.7 (8 in all))") in text
    assert "Error while processing" not in text and "torch.Size" not in text  # einops' preamble repeats the rest
    assert "correct the transform's dims/axis sizes" in text
    assert len(text) < 300, len(text)


def test_layers_that_fail_differently_stay_apart() -> None:
    state = {k: torch.zeros(12 if i < 5 else 14, 4) for i, k in enumerate(KEYS)}
    with pytest.raises(MappingError) as info:
        apply_mapping(state, Mapping([RULE]))
    first, second = info.value.problems
    assert first.keys == tuple(KEYS[:5]) and "(the same for layers.1, layers.2, … layers.4 (5 in all))" in first.message
    assert second.keys == tuple(KEYS[5:]) and "'layers.5.attention.wq.weight' [14, 4] float32" in second.message
    assert "(the same for layers.6, layers.7 (3 in all))" in second.message


def test_a_single_failure_names_its_rule_as_before() -> None:
    with pytest.raises(MappingError) as info:
        apply_mapping({KEYS[0]: torch.zeros(12, 4)}, Mapping([RULE]))
    (problem,) = info.value.problems
    assert problem.keys == (KEYS[0],) and "the same for" not in problem.message
    assert problem.rule_text is not None and "layers.{i}.attention.wq.weight" in str(problem)


def test_the_cli_error_is_one_readable_line(tmp_path: Path) -> None:
    a = {k: torch.zeros(12, 4) for k in [f"layers.{i}.attention.wq.weight" for i in range(32)]}
    b = {f"model.layers.{i}.self_attn.q_proj.weight": torch.zeros(12, 4) for i in range(32)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    (tmp_path / "m.yaml").write_text(
        "rules:\n  - a: layers.{i}.attention.wq.weight\n    b: model.layers.{i}.self_attn.q_proj.weight\n"
        "    transform: {rearrange: '(h two d) c -> (h d two) c', h: 5, two: 2}\n")
    result = CliRunner(env={"COLUMNS": "60"}).invoke(
        app, ["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--map", str(tmp_path / "m.yaml")])
    line = assert_one_line_error(result, "1 problem in the mapping", "'layers.0.attention.wq.weight' [12, 4]",
                                 "the same for layers.1, layers.2, … layers.31 (32 in all)")
    assert line.count("does not fit") == 1
    assert len(line) < 370 + 2 * len(str(tmp_path / "m.yaml")), line  # the file is named twice (head and rule)
