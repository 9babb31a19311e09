"""Shared fixtures for the checkpoint tests.

Valid files come from the real producers (``torch.save``, ``safetensors.torch.save_file``,
``numpy.savez``); only the malicious and corrupt variants are hand-made bytes, built with the
helpers below (a tiny pickle assembler and a torch-zip writer that uses :mod:`zipfile`).
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tensorparity.errors import TensorParityError


@dataclass(frozen=True)
class ValidFile:
    """A small file written by a real producer, and the tensors a reader must find in it."""

    path: Path
    format: str
    tensors: dict[str, torch.Tensor]


def _state_dict() -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("encoder.weight", torch.randn(4, 3, generator=gen)),
            ("encoder.bias", torch.randn(4, generator=gen)),
            ("steps", torch.arange(5, dtype=torch.int64)),
            ("half", torch.randn(3, generator=gen).to(torch.bfloat16)),
            ("mask", torch.tensor([True, False, True])),
        ]
    )


@pytest.fixture(scope="session")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ValidFile]:
    """One small valid file per format: ``torch-zip``, ``torch-legacy``, ``safetensors``, ``npz``, ``npz-deflated``."""
    root = tmp_path_factory.mktemp("valid")
    sd = _state_dict()
    files: dict[str, ValidFile] = {}

    pt = root / "model.pt"
    # A training checkpoint as people write them: weights, a strided view, optimizer-ish values.
    transposed = sd["encoder.weight"].t()
    torch.save({"model": sd, "transposed": transposed, "epoch": 3, "optimizer": {"lr": 0.1, "betas": (0.9, 0.99)}}, pt)
    files["torch-zip"] = ValidFile(pt, "torch-zip", {**{f"model.{k}": v for k, v in sd.items()}, "transposed": transposed})

    legacy = root / "legacy.pt"
    torch.save({"model": sd, "transposed": transposed, "epoch": 3}, legacy, _use_new_zipfile_serialization=False)
    files["torch-legacy"] = ValidFile(legacy, "torch-legacy", files["torch-zip"].tensors)

    st = root / "model.safetensors"
    save_file(dict(sd), st, metadata={"format": "pt"})
    files["safetensors"] = ValidFile(st, "safetensors", dict(sd))

    arrays = {"w": sd["encoder.weight"].numpy(), "ids": np.arange(6, dtype=np.int32).reshape(2, 3),
              "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))}
    expected = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    npz = root / "arrays.npz"
    np.savez(npz, **arrays)
    files["npz"] = ValidFile(npz, "npz", expected)
    deflated = root / "deflated.npz"
    np.savez_compressed(deflated, **arrays)
    files["npz-deflated"] = ValidFile(deflated, "npz", expected)
    return files


# ---------------------------------------------------------------------------------------------
# Error checks


def check_error(exc: BaseException, kind: type[TensorParityError], *, path: Path | str,
                key: str | None = None, fix: str | None = None) -> None:
    """Assert the house rules for a user-facing error: type, one line, file, key and fix named."""
    assert isinstance(exc, kind), f"expected {kind.__name__}, got {type(exc).__name__}: {exc}"
    text = str(exc)
    assert "\n" not in text, text
    assert str(path) in text, f"{path} not named in: {text}"
    if key is not None:
        assert f"[{key}]" in text, f"key {key!r} not named in: {text}"
    assert "; fix: " in text and text.split("; fix: ", 1)[1].strip(), f"no fix in: {text}"
    if fix is not None:
        assert fix in text.split("; fix: ", 1)[1], f"fix {fix!r} not in: {text}"


@pytest.fixture(scope="session")
def assert_error() -> Callable[..., None]:
    """:func:`check_error`, as a fixture: ``assert_error(exc, CorruptCheckpointError, path=p, key=k)``."""
    return check_error


def exercise(ckpt: Any) -> list[torch.Tensor]:
    """Touch everything a user might: every entry, its repr, every tensor's data and repr."""
    loaded = []
    repr(ckpt)
    for key in ckpt:
        repr(ckpt[key])
    for info in ckpt.placeholders:
        str(info)
    for entry in ckpt.tensors():
        t = entry.load()
        assert tuple(t.shape) == entry.shape and t.dtype == entry.dtype, entry
        loaded.append(t)
    return loaded


@pytest.fixture(scope="session")
def touch_all() -> Callable[[Any], list[torch.Tensor]]:
    """:func:`exercise`, as a fixture."""
    return exercise


# ---------------------------------------------------------------------------------------------
# Hand-made pickles and torch zips (malicious and corrupt inputs only)


class Asm:
    """Tiny pickle assembler: each method returns the opcode bytes for one value or step.

    Example: ``Asm.dict_({"a": Asm.int_(1)})`` is the pickle text of ``{"a": 1}`` without PROTO/STOP.
    """

    @staticmethod
    def str_(text: str) -> bytes:
        raw = text.encode("utf-8")
        return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw

    @staticmethod
    def int_(value: int) -> bytes:
        if 0 <= value < 2**31:
            return pickle.BININT + struct.pack("<i", value)
        raw = pickle.encode_long(value)
        return pickle.LONG1 + bytes([len(raw)]) + raw

    @staticmethod
    def global_(module: str, name: str) -> bytes:
        return pickle.GLOBAL + f"{module}\n{name}\n".encode()

    @staticmethod
    def tuple_(items: Iterable[bytes]) -> bytes:
        return pickle.MARK + b"".join(items) + pickle.TUPLE

    @staticmethod
    def list_(items: Iterable[bytes]) -> bytes:
        return pickle.MARK + b"".join(items) + pickle.LIST

    @staticmethod
    def dict_(items: dict[str, bytes]) -> bytes:
        return pickle.MARK + b"".join(Asm.str_(k) + v for k, v in items.items()) + pickle.DICT

    @staticmethod
    def call(module: str, name: str, *args: bytes) -> bytes:
        """``module.name(*args)`` via GLOBAL + REDUCE."""
        return Asm.global_(module, name) + Asm.tuple_(args) + pickle.REDUCE

    @staticmethod
    def storage(key: str, numel: int, storage_type: str = "FloatStorage") -> bytes:
        """A torch persistent id for ``data/<key>``."""
        pid = Asm.tuple_([Asm.str_("storage"), Asm.global_("torch", storage_type), Asm.str_(key),
                          Asm.str_("cpu"), Asm.int_(numel)])
        return pid + pickle.BINPERSID

    @staticmethod
    def tensor(storage: bytes, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
        """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
        return Asm.call("torch._utils", "_rebuild_tensor_v2", storage, Asm.int_(offset),
                        Asm.tuple_(Asm.int_(s) for s in size), Asm.tuple_(Asm.int_(s) for s in stride),
                        pickle.NEWFALSE, Asm.call("collections", "OrderedDict"))

    @staticmethod
    def program(body: bytes) -> bytes:
        return pickle.PROTO + b"\x02" + body + pickle.STOP


def write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None, *,
                    record: str = "archive", compression: int = zipfile.ZIP_STORED,
                    extra: dict[str, bytes] | None = None) -> Path:
    """Write a torch.save-shaped zip holding ``data_pkl`` and raw storages ``data/<key>``."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr(f"{record}/data.pkl", data_pkl)
        zf.writestr(f"{record}/byteorder", b"little")
        for key, raw in (storages or {}).items():
            zf.writestr(f"{record}/data/{key}", raw)
        for name, raw in (extra or {}).items():
            zf.writestr(f"{record}/{name}", raw)
        zf.writestr(f"{record}/version", b"3\n")
    return path


def rewrite_zip(src: Path, dst: Path, *, replace: dict[str, bytes] | None = None,
                compression: dict[str, int] | None = None) -> Path:
    """Copy a zip member by member, replacing some members' bytes or compression."""
    replace, compression = replace or {}, compression or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = replace.get(info.filename, zin.read(info))
            zout.writestr(info.filename, data, compress_type=compression.get(info.filename, zipfile.ZIP_STORED))
    return dst


@pytest.fixture(scope="session")
def asm() -> type[Asm]:
    """The pickle assembler :class:`Asm`."""
    return Asm


@pytest.fixture(scope="session")
def torch_zip_writer() -> Callable[..., Path]:
    """:func:`write_torch_zip`, as a fixture."""
    return write_torch_zip


@pytest.fixture(scope="session")
def zip_rewriter() -> Callable[..., Path]:
    """:func:`rewrite_zip`, as a fixture."""
    return rewrite_zip
