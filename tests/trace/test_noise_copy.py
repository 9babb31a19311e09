"""The float64 second instance the noise floor runs: made without ``copy.deepcopy``, so that a
model holding an attribute that refuses deep copies (every NeMo model, through wrapt's
ObjectProxy) can be measured, and the original is left exactly as it was."""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tensorparity.examples import port_model, reference_model
from tensorparity.trace import capture, replay
from tensorparity.trace.noise import double_copy, noise_atols, noise_floor

MAP = str(files("tensorparity.examples") / "reference_to_port.yaml")
REFUSES = '''
class Refuses:
    """What wrapt.ObjectProxy does to copy.deepcopy."""

    def __deepcopy__(self, memo):
        raise NotImplementedError("object proxy must define __deepcopy__()")
'''
exec(REFUSES)  # the class the CLI factory below defines too


def with_proxy(model: nn.Module) -> nn.Module:
    model.cfg = Refuses()  # type: ignore[name-defined] # noqa: F821
    next(iter(model.children())).tokenizer = Refuses()  # type: ignore[name-defined] # noqa: F821
    return model


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))


def snapshot(model: nn.Module) -> dict[str, tuple[nn.Parameter | torch.Tensor, torch.Tensor]]:
    return {n: (t, t.detach().clone()) for n, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_unchanged(model: nn.Module, before: dict[str, tuple[nn.Parameter | torch.Tensor, torch.Tensor]]) -> None:
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == before.keys()
    for name, (obj, value) in before.items():
        assert now[name] is obj and now[name].dtype == value.dtype  # the same objects, same dtype
        assert torch.equal(now[name].detach().reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), name


def test_a_model_refusing_deepcopy_gets_a_noise_floor_and_stays_float32(features: torch.Tensor) -> None:
    model = with_proxy(reference_model())
    with pytest.raises(NotImplementedError, match="object proxy must define __deepcopy__"):
        copy.deepcopy(model)
    before = snapshot(model)
    tol = noise_floor(model, features)
    assert 0 < tol.for_key("layers.1.norm2/0/output", torch.float32).atol < 1e-4
    atols = noise_atols(model, features, loss=lambda out: out.sum())
    assert any("/param_grad/" in k for k in atols)
    assert_unchanged(model, before)
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    assert atols == noise_atols(reference_model(), features, loss=lambda out: out.sum())  # same as without the proxy


def test_replay_with_its_own_noise_floor_on_a_model_refusing_deepcopy(features: torch.Tensor) -> None:
    reference = reference_model()
    with capture(reference, inputs=True) as trace, torch.no_grad():
        reference(features)
    port = with_proxy(port_model())
    before = snapshot(port)
    report = replay(trace, port, mapping=MAP, noise_floor=True)
    assert report.verdict in ("identical", "close"), report.summary()
    assert_unchanged(port, before)


def test_cli_capture_noise_floor_on_a_model_refusing_deepcopy(tmp_path: Path) -> None:
    from tensorparity.cli import app

    (tmp_path / "proxied.py").write_text(REFUSES + "\nfrom tensorparity.examples import reference_model\n\n"
                                         "def build():\n    m = reference_model()\n    m.cfg = Refuses()\n"
                                         "    return m\n")
    out = tmp_path / "ref"
    done = CliRunner().invoke(app, ["capture", f"{tmp_path / 'proxied.py'}:build", "-o", str(out),
                                    "--input-spec", "2x16x12:float32", "--noise-floor"])
    assert done.exit_code == 0, done.output
    floor = json.loads((out / "manifest.json").read_text())["provenance"]["noise_floor"]
    assert 0 < floor["atols"]["layers.1.norm2/0/output"] < 1e-4


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())
        self.again = self.block  # one module used twice
        self.head = nn.Linear(4, 4)
        self.head.weight = self.embed.weight  # tied weights
        self.proxy = Refuses()  # type: ignore[name-defined] # noqa: F821

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.again(self.block(self.embed(x))))


def test_the_copy_is_float64_shares_what_the_original_shares_and_matches_double() -> None:
    model = Tied().train()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    calls: list[str] = []
    model.block.register_forward_hook(lambda *args: calls.append("hook"))
    before = snapshot(model)
    twin = double_copy(model)
    assert twin is not model and twin.block is twin.again and twin.block is not model.block
    assert twin.head.weight is twin.embed.weight and twin.head.weight is not model.embed.weight
    assert twin.proxy is model.proxy  # non-tensor attributes are shared, never copied
    assert all(p.dtype == torch.float64 and p.grad is None for p in twin.parameters())
    assert twin.block[1].num_batches_tracked.dtype == torch.int64 and twin.training and twin.block[1].training
    calls.clear()
    out = twin(x.double())
    assert calls == []  # the original's hooks stay on the original
    del model.proxy  # only to build the reference: model.double() of a deep copy
    expected = copy.deepcopy(model).double()(x.double())
    assert torch.equal(out, expected)
    out.sum().backward()
    assert_unchanged(model, before)  # BatchNorm's running statistics and counter too: the copy's own
    assert all(p.dtype == torch.float32 and torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    calls.clear()
    model(x)
    assert calls == ["hook", "hook"]  # still registered: once per use of the shared block


def test_a_method_bound_as_an_attribute_is_bound_to_the_copy() -> None:
    model = nn.Linear(3, 2)
    model.forward = model.forward  # what patching libraries leave in the instance's __dict__
    twin = double_copy(model)
    assert twin.forward.__self__ is twin
    assert twin(torch.ones(1, 3, dtype=torch.float64)).dtype == torch.float64


def test_rebuild_loads_the_state_into_a_fresh_instance(features: torch.Tensor) -> None:
    model = with_proxy(reference_model(seed=3)).eval()
    twin = double_copy(model, rebuild=reference_model)
    assert not twin.training and all(p.dtype == torch.float64 for p in twin.parameters())
    assert torch.equal(twin(features.double()), double_copy(model)(features.double()))


def test_a_real_wrapt_proxy(features: torch.Tensor) -> None:
    wrapt = pytest.importorskip("wrapt")
    model = reference_model()
    model.cfg = wrapt.ObjectProxy({"hidden": 8})
    with pytest.raises(NotImplementedError):
        copy.deepcopy(model)
    assert double_copy(model).cfg is model.cfg
    assert 0 < noise_floor(model, features).for_key("layers.1.norm2/0/output", torch.float32).atol < 1e-4
