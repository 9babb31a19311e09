"""Reading executes nothing: malicious pickles either open with inert placeholders or are refused.

Every payload here would create a marker file if any part of it ran; the marker is checked after
``open()``, after walking every entry, and after loading and printing every tensor.
"""

from __future__ import annotations

import builtins
import copyreg
import os
import pickle
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import tensorparity
from tensorparity.errors import CorruptCheckpointError, TensorParityError, UnsafeCheckpointError


class Payload:
    """An object whose unpickling calls ``func(*args)``: the classic ``__reduce__`` gadget."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def _open_safely(path: Path, marker: Path, touch_all: Callable[[Any], Any]) -> Any:
    """Open and exercise ``path``; return the checkpoint or the TensorParityError it raised."""
    try:
        ckpt = tensorparity.open(path)
    except TensorParityError as exc:
        assert not marker.exists(), "payload ran during open()"
        return exc
    assert not marker.exists(), "payload ran during open()"
    for key in ckpt:
        ckpt[key]
    assert not marker.exists(), "payload ran while walking entries"
    for tensor in touch_all(ckpt):
        repr(tensor)
    ckpt.close()
    time.sleep(0.05)  # a spawned process (Popen) would need a moment to create the marker
    assert not marker.exists(), "payload ran while loading tensors"
    return ckpt


def _payloads(marker: Path) -> dict[str, tuple[Payload, set[str]]]:
    """name -> (payload, the placeholder names it may be recorded as)."""
    m = str(marker)
    return {
        "os.system": (Payload(os.system, f"touch {m}"), {"posix.system", "os.system", "nt.system"}),
        "eval": (Payload(builtins.eval, f"open({m!r}, 'w')"), {"builtins.eval"}),
        "exec": (Payload(builtins.exec, f"open({m!r}, 'w').close()"), {"builtins.exec"}),
        "subprocess.Popen": (Payload(subprocess.Popen, ["touch", m]), {"subprocess.Popen"}),
        "__import__": (Payload(builtins.__import__, "os"), {"builtins.__import__"}),
        # copyreg._reconstructor(cls, base, state) calls base.__init__(obj, state): Popen runs.
        "copyreg._reconstructor": (Payload(copyreg._reconstructor, subprocess.Popen, subprocess.Popen, ["touch", m]),
                                   {"copyreg._reconstructor"}),
    }


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("name", list(_payloads(Path("x"))))
def test_reduce_payload_is_a_placeholder_and_never_runs(name: str, container: str, tmp_path: Path,
                                                        touch_all: Callable[[Any], Any]) -> None:
    marker = tmp_path / "MARKER"
    payload, names = _payloads(marker)[name]
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    path = tmp_path / "evil.pt"
    torch.save({"model": {"weight": weight}, "evil": payload, "nested": [{"deeper": payload}]}, path,
               _use_new_zipfile_serialization=container == "zip")

    ckpt = _open_safely(path, marker, touch_all)

    assert not isinstance(ckpt, BaseException), ckpt
    assert torch.equal(ckpt["model.weight"].load(), weight)
    recorded = {p.name for p in ckpt.placeholders}
    assert recorded & names, recorded
    assert {p.key for p in ckpt.placeholders} >= {"evil", "nested.0.deeper"}
    assert ckpt["evil"].not_executed
    assert "not executed" in repr(ckpt)


def test_rebuild_tensor_with_a_malicious_storage_is_refused(tmp_path: Path, touch_all: Callable[[Any], Any],
                                                            assert_error: Callable[..., None]) -> None:
    marker = tmp_path / "MARKER"
    evil_storage = Payload(os.system, f"touch {marker}")
    rebuild = Payload(torch._utils._rebuild_tensor_v2, evil_storage, 0, (3,), (1,), False, {})
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "t": rebuild}, path)

    result = _open_safely(path, marker, touch_all)

    assert_error(result, CorruptCheckpointError, path=path, fix="save")
    assert "non-storage" in str(result)


def test_rebuild_tensor_claiming_more_than_its_storage_is_refused(
        tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path], assert_error: Callable[..., None]) -> None:
    # 10**12 elements over a 4-element storage: must be refused by the size check, not allocated.
    body = asm.dict_({"huge": asm.tensor(asm.storage("0", 4), 0, (10**12,), (1,))})
    path = torch_zip_writer(tmp_path / "huge.pt", asm.program(body), {"0": bytes(16)})

    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, CorruptCheckpointError, path=path, key="huge", fix="save it again")
    assert "storage holds 4" in str(info.value)


def _opcode_programs(asm: Any, marker: Path) -> dict[str, bytes]:
    """One pickle per opcode that names a global, each a call of os.system('touch MARKER')."""
    cmd = asm.str_(f"touch {marker}")
    chain = asm.call(
        "builtins", "getattr", asm.call("builtins", "__import__", asm.str_("os")), asm.str_("system"),
    ) + asm.tuple_([cmd]) + pickle.REDUCE
    return {
        "GLOBAL": asm.global_("os", "system") + asm.tuple_([cmd]) + pickle.REDUCE,
        "STACK_GLOBAL": asm.str_("os") + asm.str_("system") + pickle.STACK_GLOBAL + asm.tuple_([cmd]) + pickle.REDUCE,
        "INST": pickle.MARK + cmd + pickle.INST + b"os\nsystem\n",
        "OBJ": pickle.MARK + asm.global_("os", "system") + cmd + pickle.OBJ,
        "NEWOBJ": asm.global_("os", "system") + asm.tuple_([cmd]) + pickle.NEWOBJ,
        "NEWOBJ_EX": asm.global_("os", "system") + asm.tuple_([cmd]) + pickle.EMPTY_DICT + pickle.NEWOBJ_EX,
        "EXT1": pickle.EXT1 + bytes([0xF3]) + asm.tuple_([cmd]) + pickle.REDUCE,
        "getattr-chain": chain,
        "reconstructor": asm.call("copyreg", "_reconstructor", asm.global_("subprocess", "Popen"),
                                  asm.global_("subprocess", "Popen"),
                                  asm.list_([asm.str_("touch"), asm.str_(str(marker))])),
        "eval-in-build": asm.global_("builtins", "eval") + pickle.EMPTY_TUPLE + pickle.REDUCE
        + asm.str_(f"open({str(marker)!r}, 'w')") + pickle.BUILD,
    }


@pytest.fixture
def ext_code_for_os_system() -> Any:
    """Register extension code 0xF3 -> os.system for the EXT1 case, as a hostile environment might."""
    copyreg.add_extension("os", "system", 0xF3)
    yield
    copyreg.remove_extension("os", "system", 0xF3)


@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1",
                                    "getattr-chain", "reconstructor", "eval-in-build"])
def test_hand_built_opcodes_never_run(opcode: str, tmp_path: Path, asm: Any, ext_code_for_os_system: Any,
                                      torch_zip_writer: Callable[..., Path], touch_all: Callable[[Any], Any],
                                      assert_error: Callable[..., None]) -> None:
    marker = tmp_path / "MARKER"
    weight = asm.tensor(asm.storage("0", 3), 0, (3,), (1,))
    body = asm.dict_({"weight": weight, "evil": _opcode_programs(asm, marker)[opcode]})
    path = torch_zip_writer(tmp_path / "evil.pt", asm.program(body), {"0": torch.arange(3.0).numpy().tobytes()})

    result = _open_safely(path, marker, touch_all)

    assert not isinstance(result, BaseException), result
    assert torch.equal(result["weight"].load(), torch.arange(3.0))
    names = {p.name for p in result.placeholders}
    expected = {"eval-in-build": "builtins.eval", "reconstructor": "copyreg._reconstructor",
                # the call of what getattr returned, recorded with getattr(__import__('os'), 'system') inside
                "getattr-chain": "builtins.getattr(...)"}.get(opcode, "os.system")
    assert expected in names, names
    if opcode == "getattr-chain":
        call = result["evil"].value
        assert call.args[0].name == "builtins.getattr" and call.args[0].args[0].name == "builtins.__import__"


def test_unregistered_extension_code_is_corrupt_not_a_crash(tmp_path: Path, asm: Any,
                                                            torch_zip_writer: Callable[..., Path],
                                                            assert_error: Callable[..., None]) -> None:
    body = asm.dict_({"evil": pickle.EXT2 + (0x7FF1).to_bytes(2, "little")})
    path = torch_zip_writer(tmp_path / "ext.pt", asm.program(body))

    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, CorruptCheckpointError, path=path)


@pytest.mark.parametrize("target", [("torch._utils", "_rebuild_tensor_v2", "__defaults__"),
                                    ("torch", "FloatStorage", "dtype"),
                                    ("torch.nn.parameter", "Parameter", "__repr__"),
                                    ("torch", "Tensor", "add"),
                                    ("collections", "defaultdict", "__kwdefaults__")])
@pytest.mark.parametrize("state_form", ["dict", "slots"])
def test_build_cannot_modify_what_the_unpickler_trusts(target: tuple[str, str, str], state_form: str,
                                                        tmp_path: Path, asm: Any, valid_files: Any,
                                                        torch_zip_writer: Callable[..., Path],
                                                        assert_error: Callable[..., None]) -> None:
    # BUILD on a global sets attributes on it; on a shared object that would change how this
    # process reads every later file (or patch torch itself).
    module, name, attr = target
    state = pickle.EMPTY_DICT + asm.str_(attr) + pickle.NONE + pickle.SETITEM
    if state_form == "slots":
        state = pickle.NONE + state + pickle.TUPLE2
    body = asm.dict_({"x": asm.global_(module, name) + state + pickle.BUILD})
    path = torch_zip_writer(tmp_path / "build.pt", asm.program(body))

    with pytest.raises(TensorParityError) as info:
        tensorparity.open(path)

    assert_error(info.value, TensorParityError, path=path)
    assert torch.nn.Parameter.__repr__ is not None and callable(torch.Tensor.add)
    good = valid_files["torch-zip"]
    ckpt = tensorparity.open(good.path)  # the next file still reads exactly
    for key, tensor in good.tensors.items():
        assert torch.equal(ckpt[key].load(), tensor), key


def test_millions_of_globals_are_refused(tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path],
                                         assert_error: Callable[..., None]) -> None:
    # Each distinct global becomes a placeholder class: bound how many one pickle may name.
    names = b"".join(asm.global_("m", f"g{i}") + pickle.POP for i in range(20_000))
    path = torch_zip_writer(tmp_path / "globals.pt", asm.program(names + asm.dict_({})))

    with pytest.raises(UnsafeCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, UnsafeCheckpointError, path=path, key="archive/data.pkl", fix="re-save")


def test_billion_laughs_is_refused_quickly(tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path],
                                           assert_error: Callable[..., None]) -> None:
    # 40 levels, each a list holding the previous level 10 times through the memo: 10**40 nodes.
    body = pickle.MARK + asm.str_("lol") + pickle.LIST + pickle.BINPUT + bytes([0]) + pickle.POP
    for level in range(1, 40):
        body += pickle.MARK + (pickle.BINGET + bytes([level - 1])) * 10 + pickle.LIST + pickle.BINPUT + bytes([level])
        body += pickle.POP if level < 39 else b""
    path = torch_zip_writer(tmp_path / "lol.pt", asm.program(asm.dict_({"bomb": body})))

    started = time.perf_counter()
    with pytest.raises(UnsafeCheckpointError) as info:
        tensorparity.open(path)

    assert time.perf_counter() - started < 20
    assert "billion laughs" in str(info.value)
    assert_error(info.value, UnsafeCheckpointError, path=path, fix="re-save")


def test_allocating_builtins_are_refused(tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path],
                                         assert_error: Callable[..., None]) -> None:
    # bytearray(n) and torch.Tensor(n) would allocate n bytes/elements from a 20-byte pickle.
    for module, name in [("builtins", "bytearray"), ("__builtin__", "bytearray"), ("torch", "Tensor")]:
        body = asm.dict_({"big": asm.call(module, name, asm.int_(2**40))})
        path = torch_zip_writer(tmp_path / f"{name}.pt", asm.program(body))
        with pytest.raises(CorruptCheckpointError) as info:
            tensorparity.open(path)
        assert_error(info.value, CorruptCheckpointError, path=path)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_archive_is_refused(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), path)

    with pytest.raises(UnsafeCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, UnsafeCheckpointError, path=path, fix="state_dict")
    assert "TorchScript" in str(info.value)


class UnknownThing:
    """A class of the user's own code: a reader must not import or run it."""

    def __init__(self) -> None:
        self.threshold = 0.5
        self.buffer = torch.full((2,), 7.0)


def test_legitimate_model_with_one_unknown_class_opens(tmp_path: Path, touch_all: Callable[[Any], Any]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "extra": UnknownThing(), "epoch": 2}, path)

    ckpt = tensorparity.open(path)
    touch_all(ckpt)

    for key, tensor in model.state_dict().items():
        assert torch.equal(ckpt[f"state_dict.{key}"].load(), tensor), key
    assert [p.name for p in ckpt.placeholders] == [f"{__name__}.UnknownThing"]
    assert ckpt["epoch"].value == 2
    # The tensor inside the unknown object is still found and readable.
    inner = [e for e in ckpt.tensors() if e.key.startswith("extra.")]
    assert len(inner) == 1 and torch.equal(inner[0].load(), torch.full((2,), 7.0))
