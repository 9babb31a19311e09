"""Property-based fuzzing: mutated checkpoints either open correctly or raise TensorParityError.

Valid files of the single-file formats (torch zip, legacy torch, safetensors, npz) are mutated
by hypothesis: bytes flipped, overwritten, inserted, deleted, truncated. Mutating a zip's raw
bytes mostly trips its CRC checks, so two more properties mutate what is *inside* the archive
(the pickle, the ``.npy`` header) and re-zip it with valid checksums, and one rewrites the
safetensors JSON header with arbitrary JSON. Whatever comes out, ``open()``, ``repr()`` and
loading every tensor must either succeed with tensors of the declared shape and dtype, or raise
a one-line TensorParityError naming the file: no other exception type, no crash, no hang.

Bounded for CI: derandomized, no example database, about a minute on two cores in all. For a
longer hunt with fresh random inputs: ``TENSORPARITY_FUZZ_EXAMPLES=20000 pytest tests/checkpoint/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tensorparity
from tensorparity.errors import TensorParityError

_HUNT = int(os.environ.get("TENSORPARITY_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_HUNT or 1500,
    deadline=None,
    derandomize=not _HUNT,  # CI: the same examples on every run, so a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

_BOUNDARY = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]

# (kind, position, argument); positions are taken modulo the length of the bytes they mutate.
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 2**20), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**20), st.integers(1, 32)),
    st.tuples(st.just("int32"), st.integers(0, 2**20), st.sampled_from(_BOUNDARY[:8])),
    st.tuples(st.just("int64"), st.integers(0, 2**20), st.sampled_from(_BOUNDARY)),
    st.tuples(st.just("truncate"), st.integers(0, 2**20), st.just(0)),
)
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)

# Opcodes and fragments that steer a mutated pickle somewhere interesting.
PICKLE_PIECES = st.sampled_from([
    pickle.MARK, pickle.STOP, pickle.POP, pickle.DUP, pickle.TUPLE, pickle.LIST, pickle.DICT, pickle.REDUCE,
    pickle.BUILD, pickle.APPEND, pickle.SETITEM, pickle.SETITEMS, pickle.NEWOBJ, pickle.BINPERSID,
    pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.NONE, pickle.NEWTRUE, pickle.TUPLE2,
    pickle.BINGET + b"\x01", pickle.BINPUT + b"\x02", pickle.LONG_BINPUT + b"\xff\xff\xff\x7f",
    pickle.BININT + b"\xff\xff\xff\x7f", pickle.LONG1 + b"\x09" + b"\xff" * 8 + b"\x01",
    pickle.BINUNICODE + b"\x01\x00\x00\x000", pickle.BYTEARRAY8 + b"\xff" * 8,
    pickle.GLOBAL + b"torch\nFloatStorage\n", pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n",
    pickle.GLOBAL + b"collections\nOrderedDict\n", pickle.GLOBAL + b"os\nsystem\n",
    pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n", pickle.GLOBAL + b"torch\nSize\n",
])


def mutate(data: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    out = bytearray(data)
    for kind, pos, arg in mutations:
        if not out:
            break
        i = pos % len(out)
        if kind == "flip":
            out[i] ^= 1 << arg
        elif kind == "set":
            out[i] = arg
        elif kind == "insert":
            out[i:i] = arg
        elif kind == "delete":
            del out[i:i + arg]
        elif kind == "int32":
            out[i:i + 4] = struct.pack("<I", arg)
        elif kind == "int64":
            out[i:i + 8] = struct.pack("<Q", arg)
        elif kind == "truncate":
            del out[i:]
    return bytes(out)


def check(path: Path) -> None:
    """Open, print and load everything; only a well-formed TensorParityError may escape."""
    try:
        ckpt = tensorparity.open(path)
        repr(ckpt)
        for key in ckpt:
            repr(ckpt[key])
        for entry in ckpt.tensors():
            tensor = entry.load()
            assert tuple(tensor.shape) == entry.shape and tensor.dtype == entry.dtype, entry
        ckpt.close()
        event("opened and loaded")
    except TensorParityError as exc:
        event(type(exc).__name__)  # --hypothesis-show-statistics shows how often each outcome came
        text = str(exc)
        assert "\n" not in text and str(path) in text and "; fix: " in text, text


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _members(path: Path) -> dict[str, tuple[bytes, int]]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: (zf.read(i), i.compress_type) for i in zf.infolist()}


def _zip(path: Path, members: dict[str, tuple[bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, (data, compression) in members.items():
            zf.writestr(name, data, compress_type=compression)
    return path


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "safetensors", "npz", "npz-deflated"])
@FUZZ
@given(mutations=MUTATIONS)
def test_mutated_file_bytes(fmt: str, mutations: list[tuple[str, int, Any]], valid_files: Any, fuzz_dir: Path) -> None:
    good = valid_files[fmt]
    path = fuzz_dir / f"bytes-{good.path.name}"
    path.write_bytes(mutate(good.path.read_bytes(), mutations))
    check(path)


@FUZZ
@given(mutations=MUTATIONS, pieces=st.lists(st.tuples(st.integers(0, 2**20), PICKLE_PIECES), max_size=3))
def test_mutated_pickle_inside_a_valid_zip(mutations: list[tuple[str, int, Any]], pieces: list[tuple[int, bytes]],
                                           valid_files: Any, fuzz_dir: Path) -> None:
    members = _members(valid_files["torch-zip"].path)
    name = next(n for n in members if n.endswith("/data.pkl"))
    data = bytearray(mutate(members[name][0], mutations))
    for pos, piece in pieces:
        at = pos % (len(data) + 1)
        data[at:at] = piece
    members[name] = (bytes(data), zipfile.ZIP_STORED)
    check(_zip(fuzz_dir / "pickle.pt", members))


@pytest.mark.parametrize("fmt", ["npz", "npz-deflated"])
@FUZZ
@given(mutations=MUTATIONS, member=st.integers(0, 2))
def test_mutated_npy_member_inside_a_valid_zip(fmt: str, mutations: list[tuple[str, int, Any]], member: int,
                                               valid_files: Any, fuzz_dir: Path) -> None:
    members = _members(valid_files[fmt].path)
    name = sorted(members)[member % len(members)]
    raw, compression = members[name]
    header_len = min(len(raw), 128)  # aim at the header: the array data has no structure to break
    members[name] = (mutate(raw[:header_len], mutations) + raw[header_len:], compression)
    check(_zip(fuzz_dir / f"npy-{valid_files[fmt].path.name}", members))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(data=st.data())
def test_rewritten_safetensors_header(data: st.DataObject, valid_files: Any, fuzz_dir: Path) -> None:
    raw = valid_files["safetensors"].path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    name = data.draw(st.sampled_from(sorted(header)))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    value = data.draw(JSON | st.lists(st.integers(-3, 2**66), max_size=3) | st.sampled_from(["F32", "BF16", "U64", "Q4", "a\ud800"]))
    if field is None:
        header[name] = value
    elif isinstance(header[name], dict):
        header[name][field] = value
    text = json.dumps(header).encode()
    body = body[: data.draw(st.integers(0, len(body)))] if data.draw(st.booleans()) else body
    path = fuzz_dir / "header.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    check(path)
