"""Keyword inputs: ``--input-spec NAME=SPEC`` (NeMo models take keywords only), mixed with
positional specs, recorded in the trace so that replay and compare feed the same call; and the
one-line error, naming forward's parameters, when a model refuses positional inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.cli import app
from tensorparity.errors import UsageError
from tensorparity.trace.seed import InputSpec, build_inputs, input_hash

runner = CliRunner(env={"COLUMNS": "160"})

MODELS = '''
import torch
from torch import nn


class KwOnly(nn.Module):
    """An ASR-shaped model whose forward takes keywords only."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 4)

    def forward(self, *, input_signal, input_signal_length):
        mask = torch.arange(input_signal.shape[-1])[None, :] < input_signal_length[:, None]
        return self.proj((input_signal * mask).reshape(input_signal.shape[0], -1, 16)).mean(1)


class Typed(KwOnly):
    """NeMo's typed methods: forward's parameters may be positional, but its wrapper refuses them."""

    def __call__(self, *args, **kwargs):
        if args:
            raise TypeError("All arguments must be passed by kwarg only for typed methods")
        return super().__call__(**kwargs)

    def forward(self, input_signal=None, input_signal_length=None):
        return super().forward(input_signal=input_signal, input_signal_length=input_signal_length)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 2)

    def forward(self, x, *, mask, scale=1.0):
        return self.proj(x * mask) * scale


class Inner(nn.Module):
    """Its own forward takes the input; a sub-layer is called wrongly (a bug in the model)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 2)

    def forward(self, x):
        return self.proj(x, x)


def kw_only():
    torch.manual_seed(0)
    return KwOnly()


def typed():
    torch.manual_seed(0)
    return Typed()


def mixed():
    torch.manual_seed(0)
    return Mixed()


def inner():
    return Inner()
'''


@pytest.fixture()
def models(tmp_path: Path) -> str:
    path = tmp_path / "kwmodels.py"
    path.write_text(MODELS)
    return str(path)


def capture(*args: str | Path) -> object:
    return runner.invoke(app, ["capture", *(str(a) for a in args)])


def test_a_named_spec_is_a_keyword_and_reads_back_as_written() -> None:
    spec = InputSpec.parse("input_signal=2x1600:float32:lengths", seed=4)
    assert (spec.name, spec.lengths_name, spec.shape, spec.seed) == ("input_signal", "input_signal_length", (2, 1600), 4)
    assert str(spec) == "input_signal=2x1600:float32:lengths=input_signal_length:seed=4"
    assert InputSpec.parse(str(spec)) == spec
    renamed = InputSpec.parse("audio_signal=2x80x50:lengths=length")
    assert (renamed.name, renamed.lengths_name) == ("audio_signal", "length")
    positional = InputSpec.parse("2x80x50:lengths=length")
    assert (positional.name, positional.lengths_name) == (None, "length")
    assert InputSpec.parse(str(positional)) == positional
    # The same numbers as the positional spec: the name decides where they go, not what they are.
    x, n = spec.build()
    y, m = InputSpec.parse("2x1600:float32:lengths", seed=4).build()
    assert torch.equal(x, y) and torch.equal(n, m)


def test_build_inputs_places_positional_and_keyword_inputs() -> None:
    specs = [InputSpec.parse(t) for t in ("2x4:float32", "mask=2x4:bool", "2x6:lengths", "a=2x8:lengths=a_len")]
    args, kwargs = build_inputs(specs)
    assert [tuple(a.shape) for a in args] == [(2, 4), (2, 6), (2,)]
    assert sorted(kwargs) == ["a", "a_len", "mask"] and kwargs["mask"].dtype == torch.bool
    assert kwargs["a_len"].dtype == torch.int64 and int(kwargs["a_len"][0]) == 8


@pytest.mark.parametrize(("texts", "needle"), [
    (["x=2x3", "x=2x4"], "pass the keyword argument(s) x more than once"),
    (["a=2x8:lengths", "a_length=2x3"], "pass the keyword argument(s) a_length more than once"),
])
def test_a_keyword_given_twice_is_refused(texts: list[str], needle: str) -> None:
    with pytest.raises(UsageError, match="fix: give each keyword once") as info:
        build_inputs([InputSpec.parse(t) for t in texts])
    assert needle in str(info.value)


@pytest.mark.parametrize(("text", "needle"), [
    ("input-signal=2x3", "'input-signal' is not a Python parameter name (the keyword before '=')"),
    ("class=2x3", "'class' is not a Python parameter name"),
    ("=2x3", "'' is not a Python parameter name"),
    ("x=2x3:lengths=9n", "'9n' is not a Python parameter name (the keyword after 'lengths=')"),
    ("x=abc", "'abc' is not a shape like 2x16x20"),
])
def test_bad_keyword_specs(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        InputSpec.parse(text)
    assert needle in str(info.value) and "NAME=SPEC for a keyword argument" in info.value.fix


@pytest.mark.parametrize("factory", ["kw_only", "typed"])
def test_a_model_that_takes_keywords_only_says_how_to_name_them(models: str, factory: str, tmp_path: Path) -> None:
    result = capture(f"{models}:{factory}", "-o", tmp_path / "t", "--input-spec", "2x64:float32:lengths")
    takes = "(*, input_signal, input_signal_length)" if factory == "kw_only" else "(input_signal, input_signal_length)"
    why = ("too many positional arguments (2 positional, 0 keyword)" if factory == "kw_only"
           else "All arguments must be passed by kwarg only for typed methods")
    assert_one_line_error(result, f"refuses its input as given: {why}; its forward takes {takes}",
                          "fix: pass keyword inputs with --input-spec NAME=SPEC (repeatable, e.g. --input-spec "
                          "input_signal=SHAPE:DTYPE", "or --input module:function returning a dict")
    assert not (tmp_path / "t").exists()


def test_a_missing_keyword_is_named_too(models: str, tmp_path: Path) -> None:
    result = capture(f"{models}:mixed", "-o", tmp_path / "t", "--input-spec", "2x4")
    assert_one_line_error(result, "missing a required argument: 'mask' (1 positional, 0 keyword); its forward takes "
                                  "(x, *, mask, scale)", "--input-spec NAME=SPEC")


def test_a_type_error_inside_the_model_is_not_blamed_on_the_input(models: str, tmp_path: Path) -> None:
    line = assert_one_line_error(capture(f"{models}:inner", "-o", tmp_path / "t", "--input-spec", "2x4"),
                                 "the model raised TypeError during forward")
    assert "--input-spec NAME=SPEC" not in line


@pytest.mark.parametrize("factory", ["kw_only", "typed"])
def test_keyword_inputs_are_recorded_and_replayed(models: str, factory: str, tmp_path: Path) -> None:
    out = tmp_path / "t"
    result = capture(f"{models}:{factory}", "-o", out, "--inputs", "--seed", "2",
                     "--input-spec", "input_signal=2x64:float32:lengths")
    assert result.exit_code == 0, result.output
    spec = "input_signal=2x64:float32:lengths=input_signal_length:seed=2"
    x, n = InputSpec.parse(spec).build()
    assert f"  input: {spec} (hash {input_hash(input_signal=x, input_signal_length=n)})" in result.stdout
    trace = Trace.open(out)
    assert trace.provenance["input_spec"] == [spec]
    args, kwargs = trace.inputs()
    assert args == () and torch.equal(kwargs["input_signal"], x) and torch.equal(kwargs["input_signal_length"], n)
    replayed = runner.invoke(app, ["replay", str(out), f"{models}:{factory}"])
    assert replayed.exit_code == 0, replayed.output
    assert "identical; 2 layers replayed, 0 differ, 0 skipped" in " ".join(replayed.stdout.split())
    compared = runner.invoke(app, ["compare", str(out), f"{models}:{factory}"])
    assert compared.exit_code == 0, compared.output


def test_positional_and_keyword_specs_mix(models: str, tmp_path: Path) -> None:
    result = capture(f"{models}:mixed", "-o", tmp_path / "t", "--input-spec", "mask=2x4:bool",
                     "--input-spec", "2x4:float32")
    assert result.exit_code == 0, result.output
    trace = Trace.open(tmp_path / "t")
    assert trace.provenance["input_spec"] == ["mask=2x4:bool:seed=0", "2x4:float32:seed=0"]
    args, kwargs = trace.inputs()
    assert len(args) == 1 and sorted(kwargs) == ["mask"] and kwargs["mask"].dtype == torch.bool
