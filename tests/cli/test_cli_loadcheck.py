"""`tensorparity load-check`: exit codes (0 passed, 1 key/shape/dtype/value problem, 2 error), the
bundled reference and port with the bundled mapping, --json, --cast, file factories and the
one-line error contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import tensorparity
from tensorparity.cli import app
from tensorparity.examples import reference_model

from _cli_helpers import assert_one_line_error
from _cli_helpers import assert_one_line_error

runner = CliRunner(env={"COLUMNS": "160"})
MAP = Path(tensorparity.__file__).parent / "examples" / "reference_to_port.yaml"
REF = "tensorparity.examples:reference_model"
PORT = "tensorparity.examples:port_model"


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, ["load-check", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return reference_model().state_dict()


@pytest.fixture
def ckpt(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "reference.pt"
    torch.save(state, path)
    return path


def test_reference_checkpoint_into_port_and_reference_exits_0(ckpt: Path) -> None:
    result = invoke(ckpt, PORT, "--reference", REF, "--map", MAP)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("passed: the checkpoint loads strictly into model (PortModel) and reference "
                          "(ReferenceModel), and the loaded weights agree (identical)")
    assert "through the mapping (A → B)" in out and "as is" in out
    assert "27,370 (27,370 trainable)" in out
    assert "Common keys: 31 / Only in A: 0 / Only in B: 0 / Shape mismatches: 0 / Value mismatches: 0 → identical" in out
    assert result.stderr == ""


def test_missing_key_exits_1_and_names_it(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "missing.pt"
    torch.save({k: v for k, v in state.items() if k != "final_norm.bias"}, path)
    result = invoke(path, PORT, "--reference", REF, "--map", MAP)
    assert result.exit_code == 1
    out = result.stdout
    assert out.startswith("failed: model (PortModel): 1 missing key; reference (ReferenceModel): 1 missing key")
    assert "model: Missing keys: the model has them, the checkpoint does not (1)" in out
    assert "norm.bias" in out and "final_norm.bias" in out


def test_no_strict_accepts_missing_keys(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "missing.pt"
    torch.save({k: v for k, v in state.items() if k != "final_norm.bias"}, path)
    result = invoke(path, REF, "--no-strict")
    assert result.exit_code == 0, result.output
    assert "strict=False (38 of 39 keys)" in result.stdout and "--no-strict" in result.stdout


def test_extra_key_is_unexpected(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "extra.safetensors"
    save_file(dict(state) | {"aux.scale": torch.ones(4)}, str(path))
    result = invoke(path, REF)
    assert result.exit_code == 1
    assert "model: Unexpected keys: the checkpoint has them, the model does not (1)" in result.stdout
    assert "aux.scale" in result.stdout


def test_wrong_shape_is_reported_without_a_traceback(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "shape.pt"
    torch.save(dict(state) | {"decoder.weight": torch.zeros(12, 32)}, path)
    result = invoke(path, PORT, "--reference", REF, "--map", MAP)
    assert result.exit_code == 1
    out = result.stdout
    assert "Shape mismatches, never broadcast (not loaded)" in out and "[12, 32] float32" in out and "[10, 32] float32" in out
    assert "size mismatch" not in result.output and "Traceback" not in result.output


def test_bf16_checkpoint_needs_cast(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in state.items()}, str(path))
    plain = invoke(path, PORT, "--reference", REF, "--map", MAP)
    assert plain.exit_code == 1
    assert "31 dtype mismatches" in plain.stdout and "39 dtype mismatches" in plain.stdout
    assert "--cast loads them cast to the model's dtype" in plain.stdout
    cast = invoke(path, PORT, "--reference", REF, "--map", MAP, "--cast")
    assert cast.exit_code == 0, cast.output
    assert "options     --cast" in cast.stdout


def test_a_reference_that_cannot_be_imported_is_an_error(ckpt: Path) -> None:
    # a typo in the reference (tensorparty) must not pass as "checked"
    result = invoke(ckpt, PORT, "--reference", "tensorparty.examples:reference_model", "--map", MAP)
    assert_one_line_error(result, "package 'tensorparty' is not installed", "fix:", "--reference-optional")
    as_json = invoke(ckpt, PORT, "--reference", "tensorparty.examples:reference_model", "--json")
    assert as_json.exit_code == 2
    doc = json.loads(as_json.stdout)
    assert doc["schema"] == "tensorparity.error/1" and doc["exit_code"] == 2 and "tensorparty" in doc["error"]


def test_reference_not_installed_checks_the_local_side_when_optional(ckpt: Path) -> None:
    result = invoke(ckpt, PORT, "--reference", "tp_absent_nemo_like.collections.asr:build", "--map", MAP,
                    "--reference-optional")
    assert result.exit_code == 0, result.output
    assert ("reference package 'tp_absent_nemo_like' is not installed; checked the local side only"
            in result.stdout)
    assert "Loaded weights" not in result.stdout  # no second side to compare with


def test_factory_from_a_file(tmp_path: Path, ckpt: Path) -> None:
    factory = tmp_path / "make.py"
    factory.write_text("from tensorparity.examples import PortModel\n\ndef make():\n    return PortModel()\n")
    result = invoke(ckpt, f"{factory}:make", "--reference", REF, "--map", MAP)
    assert result.exit_code == 0, result.output
    assert f"{factory}:make" in result.stdout


def test_malformed_factory_is_a_one_line_error(ckpt: Path) -> None:
    result = invoke(ckpt, "tensorparity.examples")
    assert_one_line_error(result, "error: factory 'tensorparity.examples' has no ':'",
                          "fix: write 'package.module:function'")


def test_factory_returning_a_state_dict_is_a_one_line_error(tmp_path: Path, ckpt: Path) -> None:
    factory = tmp_path / "wrong.py"
    factory.write_text("from tensorparity.examples import reference_model\n\n"
                       "def make():\n    return reference_model().state_dict()\n")
    assert_one_line_error(invoke(ckpt, f"{factory}:make"),
                          "returned an object of type OrderedDict, not a torch.nn.Module", "fix: make the factory return the model")


def test_reference_factory_that_raises_is_an_error_not_a_skip(tmp_path: Path, ckpt: Path) -> None:
    factory = tmp_path / "boom.py"
    factory.write_text("def make():\n    raise RuntimeError('no GPU found')\n")
    assert_one_line_error(invoke(ckpt, REF, "--reference", f"{factory}:make"),
                          "the reference factory", "RuntimeError: no GPU found", "fix: fix the error")


def test_unreadable_checkpoint_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    assert_one_line_error(invoke(bad, REF), "garbage.pt", "unrecognised file format", "fix:")


def test_json_output(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "j.pt"
    torch.save({k: v for k, v in state.items() if k != "decoder.bias"}, path)
    result = invoke(path, PORT, "--reference", REF, "--map", MAP, "--json", "--atol", "1e-6")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["schema"] == "tensorparity.load-check/1" and data["verdict"] == "failed"
    assert data["tolerance"]["atol"] == 1e-6
    assert [i["key"] for i in data["sides"][0]["issues"]] == ["head.bias"]
    assert data["sides"][1]["route"] == "as_is" and data["cross"]["verdict"] == "identical"


def test_bad_options_exit_2(ckpt: Path) -> None:
    assert_one_line_error(invoke(ckpt, REF, "--exact", "--atol", "1e-3"), "--exact compares bytes")
    assert_one_line_error(invoke(ckpt, REF, "--top", "-1"), "--top must be 0 or more")
