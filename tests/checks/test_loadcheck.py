"""tensorparity.checks._loadcheck.load_check: checkpoints written by torch.save and safetensors, loaded into
the bundled reference model and its port, as is and through the bundled mapping, both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tensorparity
from tensorparity.checks._loadcheck import load_check
from tensorparity.errors import SourceNotFoundError, UsageError
from tensorparity.examples import port_model, reference_model
from tensorparity.mapping import MappingError
from tensorparity.numerics import Tolerance

MAP = Path(tensorparity.__file__).parent / "examples" / "reference_to_port.yaml"
REF = "tensorparity.examples:reference_model"
PORT = "tensorparity.examples:port_model"


@pytest.fixture(scope="module")
def ref_state() -> dict[str, torch.Tensor]:
    return reference_model().state_dict()


def save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


def test_reference_checkpoint_loads_into_both_sides(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    ckpt = tmp_path / "ref.safetensors"
    save_file(ref_state, str(ckpt))
    report = load_check(ckpt, model=PORT, reference=REF, mapping=MAP)
    assert report.verdict == "passed" and report.exit_code == 0
    port, ref = report.side("model"), report.side("reference")
    assert port is not None and ref is not None
    assert (port.route, ref.route) == ("a_to_b", "as_is")
    assert port.strict and ref.strict and not port.issues and not ref.issues
    assert (port.expected, port.loaded, ref.expected, ref.loaded) == (31, 31, 39, 39)
    assert port.parameters == ref.parameters == 27_370 and port.trainable == 27_370 and ref.buffers == 16
    assert port.round_trip is not None and port.round_trip.verdict == "identical"
    assert report.cross is not None and report.cross_roles == ("reference", "model")
    assert report.cross.classic_summary().endswith("Value mismatches: 0 → identical")
    assert report.cross.common == 31 and report.cross.mapping is not None
    # feature_mean is a buffer of no well-known name: the file's counts stay elements.
    assert report.checkpoint.elements == 27_386 and report.checkpoint.tensors == 39
    assert report.checkpoint.buffers is None
    assert report.summary() == ("passed: the checkpoint loads strictly into model (PortModel) and reference "
                                "(ReferenceModel), and the loaded weights agree (identical)")


def test_port_checkpoint_loads_into_the_reference_through_the_inverse(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "port.pt", port_model().state_dict())
    reference = reference_model(seed=3)  # other initial values: everything must come from the checkpoint
    report = load_check(ckpt, model=PORT, reference=reference, mapping=MAP)
    assert report.passed, report.summary()
    assert (report.side("model").route, report.side("reference").route) == ("as_is", "b_to_a")
    assert report.side("reference").route_text == "through its inverse (B → A)"
    # The fused qkv was split back into q, k and v inside the reference that was passed in.
    torch.testing.assert_close(reference.layers[1].self_attn.k_proj.weight, reference_model().layers[1].self_attn
                               .k_proj.weight, rtol=0, atol=0)


def test_missing_key_is_reported_on_both_sides(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in ref_state.items() if k != "decoder.bias"}
    report = load_check(save(tmp_path / "m.pt", state), model=PORT, reference=REF, mapping=MAP)
    assert report.exit_code == 1 and report.verdict == "failed"
    port, ref = report.side("model"), report.side("reference")
    assert [(i.key, i.kind, i.model) for i in port.issues] == [("head.bias", "missing", "[10] float32")]
    assert [(i.key, i.kind) for i in ref.issues] == [("decoder.bias", "missing")]
    assert not port.strict and port.loaded == 30 and port.round_trip.passed
    assert "model (PortModel): 1 missing key" in report.summary()


def test_missing_part_of_a_fused_key_names_it(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in ref_state.items() if k != "layers.0.self_attn.k_proj.bias"}
    report = load_check(save(tmp_path / "k.pt", state), model=PORT, mapping=MAP)
    (issue,) = report.side("model").issues
    assert (issue.key, issue.kind) == ("blocks.0.qkv.bias", "missing")
    assert issue.origin == tuple(f"layers.0.self_attn.{p}_proj.bias" for p in "qkv")
    assert issue.note == "not made: layers.0.self_attn.k_proj.bias not in the checkpoint"


def test_extra_key_is_unexpected(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    state = dict(ref_state) | {"aux.scale": torch.ones(10)}
    report = load_check(save(tmp_path / "x.pt", state), model=PORT, reference=REF, mapping=MAP)
    assert report.exit_code == 1
    (port_issue,) = report.side("model").issues
    (ref_issue,) = report.side("reference").issues
    assert (port_issue.key, port_issue.kind, port_issue.note) == ("aux.scale", "unexpected",
                                                                  "no rule of the mapping claims it")
    assert (ref_issue.key, ref_issue.kind, ref_issue.checkpoint) == ("aux.scale", "unexpected", "[10] float32")
    assert report.side("reference").loaded == 39  # everything the model has was loaded


def test_wrong_shape_is_reported_not_raised(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    state = dict(ref_state)
    state["decoder.weight"] = torch.randn(11, 32)
    state["final_norm.weight"] = torch.full((32,), 0.5)
    model = reference_model(seed=7)
    report = load_check(save(tmp_path / "s.pt", state), model=model, reference=PORT, mapping=MAP)
    assert report.exit_code == 1
    (issue,) = report.side("model").issues
    assert (issue.key, issue.kind, issue.checkpoint, issue.model) == ("decoder.weight", "shape", "[11, 32] float32",
                                                                      "[10, 32] float32")
    assert report.side("reference").issues[0].key == "head.weight"
    assert report.side("reference").issues[0].origin == ("decoder.weight",)
    # The rest was loaded: the loadable subset, with strict=False.
    assert torch.equal(model.final_norm.weight, state["final_norm.weight"])
    assert not report.side("model").strict and report.side("model").loaded == 38
    # The refused key is left out of the comparison of the loaded weights; the rest agrees.
    assert report.cross is not None and report.cross.passed and report.cross.common == 30
    assert "2 keys a side refused (shape or dtype) are left out" in report.notes[0]


def test_bf16_checkpoint_is_a_dtype_problem_unless_cast(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    ckpt = tmp_path / "bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in ref_state.items()}, str(ckpt))
    report = load_check(ckpt, model=PORT, reference=REF, mapping=MAP)
    assert report.exit_code == 1
    dtype = report.side("reference").of_kind("dtype")
    assert len(dtype) == 39 and dtype[0].checkpoint.endswith("bfloat16") and dtype[0].model.endswith("float32")
    assert dtype[0].note is None and dtype[0].origin == ()
    assert report.cross is None and "no tensor was loaded into both models" in report.notes[-1]
    assert "39 dtype mismatches" in report.summary()

    model = reference_model(seed=5)
    cast = load_check(ckpt, model=model, reference=PORT, mapping=MAP, cast=True)
    assert cast.passed, cast.summary()
    assert len(cast.side("model").cast) == 39 and len(cast.side("reference").cast) == 31
    assert model.decoder.weight.dtype == torch.float32
    assert torch.equal(model.decoder.weight, ref_state["decoder.weight"].bfloat16().float())


def test_reference_package_not_installed_is_an_error_unless_optional(tmp_path: Path,
                                                                     ref_state: dict[str, torch.Tensor]) -> None:
    from tensorparity._resolve import PackageNotInstalledError

    ckpt = save(tmp_path / "r.pt", ref_state)
    with pytest.raises(PackageNotInstalledError, match="package 'tp_absent_reference_pkg' is not installed"):
        load_check(ckpt, model=PORT, reference="tp_absent_reference_pkg.asr:build", mapping=MAP)
    report = load_check(ckpt, model=PORT, reference="tp_absent_reference_pkg.asr:build", mapping=MAP,
                        reference_optional=True)
    assert report.passed and [s.role for s in report.sides] == ["model"]
    assert report.cross is None
    assert report.not_installed is not None and report.not_installed.package == "tp_absent_reference_pkg"
    assert report.summary().endswith("reference package 'tp_absent_reference_pkg' is not installed; checked the "
                                     "local side only")


def test_loaded_weights_that_differ_fail_the_check(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    """Without strictness a key left out keeps each factory's initial value: the two models part."""
    state = {k: v for k, v in ref_state.items() if k != "decoder.bias"}
    report = load_check(save(tmp_path / "d.pt", state), model=PORT, reference=lambda: reference_model(seed=1),
                        mapping=MAP, strict=False)
    assert report.side("model").passed and report.side("reference").passed
    assert report.cross is not None and not report.cross.passed
    assert [t.key for t in report.cross.mismatches] == ["head.bias"]
    assert report.exit_code == 1 and "loaded weights differ" in report.summary()


def test_tied_weights_given_two_values_fail_the_round_trip() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(4, 3)
            self.head = nn.Linear(3, 4, bias=False)
            self.head.weight = self.embed.weight

    state = {"embed.weight": torch.randn(4, 3), "head.weight": torch.randn(4, 3)}
    report = load_check(state, model=Tied)
    side = report.side("model")
    assert side.strict and not side.issues and side.parameters == 12
    assert side.round_trip is not None and [t.key for t in side.round_trip.mismatches] == ["embed.weight"]
    assert report.exit_code == 1


def test_a_module_that_raises_while_loading_is_reported() -> None:
    class Picky(nn.Linear):
        def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
            raise ValueError("checkpoint version 1 is not supported")

    report = load_check({"weight": torch.ones(2, 2), "bias": torch.ones(2)}, model=lambda: Picky(2, 2))
    side = report.side("model")
    assert side.error == "ValueError: checkpoint version 1 is not supported" and not side.strict
    assert report.exit_code == 1


def test_lightning_checkpoint_weights_are_loaded(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    ckpt = save(tmp_path / "run.ckpt", {"epoch": 1, "global_step": 3, "pytorch-lightning_version": "2.4.0",
                                        "state_dict": dict(ref_state), "hyper_parameters": {"lr": 0.1}})
    report = load_check(ckpt, model=REF)
    assert report.passed and report.side("model").loaded == 39
    assert report.checkpoint.selected == "model weights only, prefix 'state_dict.' removed"


def test_json_is_versioned_and_strict(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in ref_state.items() if k != "decoder.bias"}
    data = json.loads(load_check(save(tmp_path / "j.pt", state), model=PORT, reference=REF, mapping=MAP).to_json())
    assert data["schema"] == "tensorparity.load-check/1" and data["exit_code"] == 1
    assert [s["role"] for s in data["sides"]] == ["model", "reference"]
    assert data["sides"][0]["issues"][0] == {"key": "head.bias", "kind": "missing", "checkpoint": None,
                                             "model": "[10] float32", "origin": [], "note": None}
    assert data["cross"]["schema"] == "tensorparity.diff/1" and data["cross"]["verdict"] == "identical"
    assert data["cross_roles"] == {"a": "reference", "b": "model"}


def test_rendering_puts_the_verdict_first(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    state = dict(ref_state)
    state["decoder.weight"] = torch.randn(11, 32)
    text = str(load_check(save(tmp_path / "r.pt", state), model=PORT, reference=REF, mapping=MAP))
    assert text.startswith("failed: model (PortModel): 1 shape mismatch")
    assert "model: Shape mismatches, never broadcast (not loaded) (1)" in text and "head.weight" in text and "[11, 32] float32" in text
    assert "Traceback" not in text and "size mismatch" not in text


def test_bad_inputs_raise_tensorparity_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        load_check(tmp_path / "absent.pt", model=REF)
    with pytest.raises(UsageError) as info:
        load_check({"w": torch.ones(1)}, model=REF, tolerance=1e-3)  # type: ignore[arg-type]
    assert "tolerance must be a tensorparity.Tolerance" in str(info.value) and info.value.fix
    bad_map = tmp_path / "bad.yaml"
    bad_map.write_text("rules:\n  - {a: 'x.{i}', b: 'y', colour: red}\n")
    with pytest.raises(MappingError):
        load_check({"w": torch.ones(1)}, model=REF, mapping=bad_map)


def test_tolerance_is_used_for_the_loaded_weights(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    report = load_check(save(tmp_path / "t.pt", ref_state), model=PORT, reference=REF, mapping=MAP,
                        tolerance=Tolerance(exact=True))
    assert report.passed and report.cross.tolerance.exact
