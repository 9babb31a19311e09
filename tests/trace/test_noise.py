"""Noise floor: per-layer tolerances from the reference's measured float32-vs-float64 error."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch

from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.examples import port_model, reference_model
from tensorparity.numerics import Tolerance
from tensorparity.trace import capture, compare_traces, replay
from tensorparity.trace.noise import FACTOR, noise_atol, noise_floor

MAP = str(files("tensorparity.examples") / "reference_to_port.yaml")
KEY = "layers.1.ffn.2/0/output"  # the reference's partner of the port's blocks.1.fc2


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tolerance(features: torch.Tensor) -> Tolerance:
    return noise_floor(reference_model(), features)


def run(model: torch.nn.Module, features: torch.Tensor, *, inputs: bool = False) -> Trace:
    with capture(model, inputs=inputs) as trace, torch.no_grad():
        model(features)
    return trace


def buggy_port() -> torch.nn.Module:
    port = port_model()
    with torch.no_grad():
        port.blocks[1].fc2.bias += 1e-3  # a bug of size 1e-3 in one layer
    return port


def test_every_layer_gets_a_measured_tolerance_between_zero_and_the_bug(tolerance: Tolerance) -> None:
    resolved = tolerance.for_key(KEY, torch.float32)
    assert 0 < resolved.atol < 1e-4 and resolved.rtol == 0.0
    assert resolved.source == "override '^layers\\\\.1\\\\.ffn\\\\.2/0/output$'"
    # One per module output and the model's output; names are escaped, never read as regexes.
    assert len(tolerance.overrides) == 28
    assert tolerance.for_key("layersX1Xffn.2/0/output", torch.float32).source == "default"


def test_the_port_passes_and_a_1e_3_bug_fails_with_the_layer_tolerance_stated(
        tolerance: Tolerance, features: torch.Tensor) -> None:
    reference = run(reference_model(), features)
    good = compare_traces(reference, run(port_model(), features), mapping=MAP, tolerance=tolerance)
    assert good.verdict in ("identical", "close"), good.summary()
    bad = compare_traces(reference, run(buggy_port(), features), mapping=MAP, tolerance=tolerance)
    assert bad.verdict == "differs"
    first = bad.first_divergence
    assert (first.layer_a, first.layer_b, first.origin) == ("layers.1.ffn.2", "blocks.1.fc2", "introduced")
    judged = first.forward[0]
    assert not judged.passed and judged.tolerance.source.startswith("override")
    assert 0 < judged.tolerance.atol < 1e-3 <= judged.max_abs * 1.01
    assert f"atol={judged.tolerance.atol:g}" in judged.summary()


def test_replay_with_the_reference_noise_floor_and_with_its_own(tolerance: Tolerance, features: torch.Tensor) -> None:
    reference = run(reference_model(), features, inputs=True)
    for kwargs in ({"tolerance": tolerance}, {"noise_floor": True}):
        assert replay(reference, port_model(), mapping=MAP, **kwargs).verdict in ("identical", "close")
        report = replay(reference, buggy_port(), mapping=MAP, **kwargs)
        assert [x.layer for x in report.culprits] == ["layers.1.ffn.2"]
        out = report.culprits[0].outputs[0]
        assert out.tolerance.source.startswith("override") and 0 < out.tolerance.atol < 1e-3


def test_the_floor_keeps_exact_layers_above_zero() -> None:
    x = torch.tensor([0.5, -2.0, 0.0])
    assert noise_atol(x, x.double()) == pytest.approx(4 * torch.finfo(torch.float32).eps * 2.0)
    assert noise_atol(torch.zeros(3), torch.zeros(3, dtype=torch.float64)) > 0
    x64 = torch.tensor([1.0], dtype=torch.float64) / 3
    err = float((x64.float().double() - x64).abs())
    assert noise_atol(x64.float(), x64, ulps=0) == pytest.approx(FACTOR * err)
