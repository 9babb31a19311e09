"""Replay: each module of another implementation called alone on the inputs recorded for its
partner in the reference trace; every layer's own error, free of upstream error."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from tensorparity.checkpoint.tracefolder.format import TraceError
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.cli.replay import replay_command
from tensorparity.examples import port_model, reference_model
from tensorparity.trace import capture, replay

MAP = str(files("tensorparity.examples") / "reference_to_port.yaml")
LEAVES = ["pre_encode", "norm1", "out_proj", "norm2", "ffn.0", "ffn.2", "final_norm", "decoder"]


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(features: torch.Tensor) -> Trace:
    model = reference_model()
    with capture(model, inputs=True) as trace, torch.no_grad():
        model(features)
    return trace


def test_the_reference_replayed_on_itself_is_identical(reference: Trace) -> None:
    report = replay(reference, reference_model())
    assert report.verdict == "identical" and report.exit_code == 0
    assert len(report.layers) == 28 and not report.skipped and not report.culprits


def test_wrong_norm_eps_is_named_as_the_only_layer_with_its_own_error(reference: Trace) -> None:
    buggy = reference_model()
    buggy.layers[1].norm2.eps = 1e-2
    report = replay(reference, buggy)
    assert [x.layer for x in report.culprits] == ["layers.1.norm2"]
    # Its parents differ too, and say which child explains them; leaf-most first.
    assert [(x.layer, x.contains) for x in report.mismatched] == [
        ("layers.1.norm2", ()), ("layers.1", ("layers.1.norm2",)), ("<model>", ("layers.1.norm2", "layers.1"))]
    # Downstream layers (final_norm, decoder) got the reference's inputs: no inherited error.
    assert all(x.passed for x in report.layers if x.layer in ("final_norm", "decoder", "layers.1.ffn.0"))
    assert "own error in layers.1.norm2" in report.summary()
    assert "OWN ERROR" in str(report)


def test_gelu_replaced_by_relu_is_named(reference: Trace) -> None:
    buggy = reference_model()
    buggy.layers[0].ffn[1] = torch.nn.ReLU()
    report = replay(reference, buggy)
    assert [x.layer for x in report.culprits] == ["layers.0.ffn.1"]
    assert report.mismatched[0].module_type == "torch.nn.modules.activation.ReLU"
    assert report.exit_code == 1


def test_the_port_through_the_mapping_matches_on_every_leaf_with_a_partner(reference: Trace) -> None:
    report = replay(reference, port_model(), mapping=MAP)
    assert report.verdict in ("identical", "close"), report.summary()
    replayed = {x.layer: x.module for x in report.layers}
    for i in range(2):
        assert replayed[f"layers.{i}.norm1"] == f"blocks.{i}.attn_norm"
        assert replayed[f"layers.{i}.self_attn.out_proj"] == f"blocks.{i}.proj"
        assert replayed[f"layers.{i}"] == f"blocks.{i}"
    leaves = [x for x in report.layers if any(x.layer.endswith(leaf) for leaf in LEAVES)]
    assert len(leaves) == 13 and all(x.passed for x in leaves)  # 5 per block, front end, final norm, head
    # q, k and v replay together on the fused qkv, compared with their outputs concatenated.
    qkv = {x.layer: x for x in report.layers}["layers.0.self_attn.q_proj + layers.0.self_attn.k_proj + "
                                               "layers.0.self_attn.v_proj"]
    assert qkv.module == "blocks.0.qkv" and qkv.passed and "concatenated" in (qkv.layout or "")
    skipped = {s.layer: s.reason for s in report.skipped}
    assert "no module 'blocks.1.ffn'" in skipped["layers.1.ffn"]


def test_a_bug_in_the_port_is_isolated_through_the_mapping(reference: Trace) -> None:
    port = port_model()
    with torch.no_grad():
        port.blocks[0].proj.weight.copy_(port.blocks[0].proj.weight.T.clone())  # loaded transposed
    report = replay(reference, port, mapping=MAP)
    assert [(x.layer, x.module) for x in report.culprits] == [("layers.0.self_attn.out_proj", "blocks.0.proj")]


def test_a_trace_without_inputs_is_refused_with_the_fix(features: torch.Tensor) -> None:
    model = reference_model()
    with capture(model) as trace, torch.no_grad():
        model(features)
    with pytest.raises(TraceError) as err:
        replay(trace, model)
    assert "holds no module inputs" in str(err.value) and "inputs=True" in err.value.fix


def test_recorded_mode_is_used_and_the_models_own_mode_restored(reference: Trace) -> None:
    model = reference_model().train()  # dropout-free, but the mode must come back
    report = replay(reference, model)
    assert report.verdict == "identical"
    assert all(m.training for m in model.modules())


def test_modules_whose_inputs_were_not_recorded_are_skipped(features: torch.Tensor) -> None:
    model = reference_model()
    with capture(model, inputs=True, mode="window", window=r"^layers\.1") as trace, torch.no_grad():
        model(features)
    report = replay(trace, reference_model())
    skipped = {s.layer: s.reason for s in report.skipped}
    assert "statistics only" in skipped["layers.0.norm1"]
    assert {x.layer for x in report.layers} >= {"layers.1", "layers.1.norm2", "<model>"}


def test_a_trace_written_in_another_process_is_replayed_here(tmp_path: Path) -> None:
    out = tmp_path / "ref"
    done = subprocess.run([sys.executable, "-m", "tensorparity", "capture", "tensorparity.examples:reference_model",
                           "-o", str(out), "--input-spec", "2x16x12:float32", "--inputs", "--seed", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    buggy = reference_model()
    buggy.layers[1].norm2.eps = 1e-2
    report = replay(out, buggy)
    assert [x.layer for x in report.culprits] == ["layers.1.norm2"]
    assert report.reference == str(out)

    app = typer.Typer()
    app.command()(replay_command)
    result = CliRunner().invoke(app, [str(out), "tensorparity.examples:port_model", "--map", MAP, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "tensorparity.trace-replay/1" and data["culprits"] == []
    assert data["verdict"] in ("identical", "close") and len(data["layers"]) == 18  # 16 + the two qkv groups

    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, [str(out), "tensorparity.examples:port_model"])
    # Without the mapping, it is found from the reference's recorded parameters and the model's.
    assert result.exit_code == 0, result.output
    assert "18 layers replayed, 0 differ, 6 skipped" in result.stdout
    assert "found one from the reference's parameters and the model's" in result.stdout

    plain = tmp_path / "plain"  # captured without --inputs: one error line with the fix, exit 2
    done = subprocess.run([sys.executable, "-m", "tensorparity", "capture", "tensorparity.examples:reference_model",
                           "-o", str(plain), "--input-spec", "2x16x12:float32"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = CliRunner().invoke(app, [str(plain), "tensorparity.examples:port_model"])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "fix: capture the reference again with inputs=True" in result.stderr


def test_an_argument_kept_as_text_is_passed_as_none_and_never_makes_a_false_culprit() -> None:
    # Hugging Face GPT-2 with its default use_cache=True hands every attention a DynamicCache: the
    # trace keeps it as its repr, which replay cannot pass again. Replayed on the same model, that
    # must not be an "own error"; a real bug elsewhere is still the only culprit.
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with capture(model, inputs=True) as trace:
        model(input_ids=ids)

    def fresh(bug: bool = False) -> torch.nn.Module:
        torch.manual_seed(0)
        m = GPT2LMHeadModel(cfg).eval()
        if bug:
            with torch.no_grad():
                m.transformer.h[1].attn.c_proj.weight[0] += 0.5
        return m

    same = replay(trace, fresh())
    assert same.verdict == "identical" and not same.culprits, same.summary()
    attn = next(x for x in same.layers if x.layer == "transformer.h.0.attn")
    assert "(a DynamicCache) recorded as text, passed as None" in (attn.adapted or "")
    buggy = replay(trace, fresh(bug=True))
    assert [x.module for x in buggy.culprits] == ["transformer.h.1.attn.c_proj"], buggy.summary()
