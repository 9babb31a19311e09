"""Every kind of bad input gets one clear TensorParityError: the file, the key or member, the fix.

Valid files come from the real producers (see ``conftest.py``); the damage is done by hand.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tensorparity
from tensorparity.errors import (
    CorruptCheckpointError,
    SourceNotFoundError,
    TensorParityError,
    UnknownFormatError,
    UnsafeCheckpointError,
)

FORMATS = ["torch-zip", "torch-legacy", "safetensors", "npz", "npz-deflated"]


def _open_and_load(path: Path) -> dict[str, torch.Tensor]:
    ckpt = tensorparity.open(path)
    repr(ckpt)
    return {e.key: e.load() for e in ckpt.tensors()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_fixture_reads_exactly(fmt: str, valid_files: Any) -> None:
    # The baseline for everything below: the undamaged file opens with exactly its tensors.
    good = valid_files[fmt]
    loaded = _open_and_load(good.path)
    assert set(good.tensors) <= set(loaded)
    for key, tensor in good.tensors.items():
        assert torch.equal(loaded[key], tensor), key


# ---------------------------------------------------------------------------------------------
# Truncation at every byte


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_at_every_byte(fmt: str, valid_files: Any, tmp_path: Path, assert_error: Callable[..., None]) -> None:
    good = valid_files[fmt]
    data = good.path.read_bytes()
    assert len(data) < 8192, "keep the fixture small: this test opens it once per byte"
    path = tmp_path / good.path.name
    failures = []
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        try:
            loaded = _open_and_load(path)
        except TensorParityError as exc:
            assert_error(exc, TensorParityError, path=path)
            continue
        except Exception as exc:  # noqa: BLE001 - collected, reported below with the offset
            failures.append(f"{cut}: {type(exc).__name__}: {exc}")
            continue
        # Every format here keeps an index or data at the end: a truncated file must not open.
        failures.append(f"{cut}: opened with {sorted(loaded)}")
    assert not failures, failures[:10]


# ---------------------------------------------------------------------------------------------
# The zip container


def _central_directory(data: bytes) -> int:
    offset = data.find(b"PK\x01\x02")
    assert offset > 0
    return offset


@pytest.mark.parametrize("fmt", ["torch-zip", "npz"])
@pytest.mark.parametrize("damage", ["signature", "compression-method", "version-needed", "encrypted-flag",
                                    "local-header-offset", "utf8-name"])
def test_corrupt_central_directory(fmt: str, damage: str, valid_files: Any, tmp_path: Path,
                                   assert_error: Callable[..., None]) -> None:
    good = valid_files[fmt]
    data = bytearray(good.path.read_bytes())
    cd = _central_directory(data)  # the first member's central-directory record
    if damage == "signature":
        data[cd:cd + 4] = b"PK\x09\x09"
    elif damage == "compression-method":
        data[cd + 10:cd + 12] = struct.pack("<H", 99)
    elif damage == "version-needed":
        data[cd + 6:cd + 8] = struct.pack("<H", 99)
    elif damage == "encrypted-flag":
        data[cd + 8:cd + 10] = struct.pack("<H", struct.unpack("<H", data[cd + 8:cd + 10])[0] | 0x1)
    elif damage == "local-header-offset":
        data[cd + 42:cd + 46] = struct.pack("<I", 7)
    elif damage == "utf8-name":  # flag the name as UTF-8 and make it invalid UTF-8
        data[cd + 8:cd + 10] = struct.pack("<H", struct.unpack("<H", data[cd + 8:cd + 10])[0] | 0x800)
        data[cd + 46] = 0xFF
    path = tmp_path / good.path.name
    path.write_bytes(bytes(data))

    with pytest.raises(TensorParityError) as info:
        _open_and_load(path)

    assert_error(info.value, CorruptCheckpointError, path=path)


def _storage_members(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n for n in zf.namelist() if "/data/" in n]


def test_storage_member_shorter_than_its_tensor(valid_files: Any, tmp_path: Path,
                                                zip_rewriter: Callable[..., Path],
                                                assert_error: Callable[..., None]) -> None:
    good = valid_files["torch-zip"].path
    member = _storage_members(good)[0]
    with zipfile.ZipFile(good) as zf:
        raw = zf.read(member)
    path = zip_rewriter(good, tmp_path / "short.pt", replace={member: raw[:-4]})

    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, CorruptCheckpointError, path=path, key=member, fix="save it again")
    assert f"holds {len(raw) - 4}" in str(info.value)


def test_storage_member_missing(valid_files: Any, tmp_path: Path, assert_error: Callable[..., None]) -> None:
    good = valid_files["torch-zip"].path
    member = _storage_members(good)[0]
    path = tmp_path / "missing.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if info.filename != member:
                zout.writestr(info.filename, zin.read(info))

    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, CorruptCheckpointError, path=path, key=member)


@pytest.mark.parametrize(("size", "stride", "offset", "needs"), [
    ((2, 3), (3, 1), 1, 7),   # the offset pushes the last element past the storage
    ((2, 3), (4, 1), 0, 7),   # a stride reaches past it
    ((7,), (1,), 0, 7),       # simply more elements than stored
    ((10**12,), (1,), 0, 10**12),  # must be refused by arithmetic, never allocated
])
def test_tensor_reaching_past_its_storage(size: tuple[int, ...], stride: tuple[int, ...], offset: int, needs: int,
                                          tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path],
                                          assert_error: Callable[..., None]) -> None:
    body = asm.dict_({"ok": asm.tensor(asm.storage("0", 6), 0, (6,), (1,)),
                      "bad": asm.tensor(asm.storage("0", 6), offset, size, stride)})
    path = torch_zip_writer(tmp_path / "strided.pt", asm.program(body), {"0": bytes(24)})

    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, CorruptCheckpointError, path=path, key="bad", fix="save it again")
    assert f"needs {needs} elements but its storage holds 6" in str(info.value)


@pytest.mark.parametrize("where", ["stride", "offset"])
def test_int64_overflow_in_a_tensor_is_corrupt(where: str, tmp_path: Path, asm: Any,
                                               torch_zip_writer: Callable[..., Path],
                                               assert_error: Callable[..., None]) -> None:
    # An empty tensor skips the extent check; torch would still overflow on 2**70.
    stride, offset = ((2**70, 1), 0) if where == "stride" else ((3, 1), 2**70)
    body = asm.dict_({"bad": asm.tensor(asm.storage("0", 6), offset, (0, 3), stride)})
    path = torch_zip_writer(tmp_path / "overflow.pt", asm.program(body), {"0": bytes(24)})

    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, CorruptCheckpointError, path=path, key="archive/data.pkl")


def _deflated_pickle_bomb(asm: Any) -> bytes:
    padding = bytes(4 << 20)  # 4 MB of zeros: deflate shrinks it about 1000x
    return asm.program(asm.dict_({"pad": pickle.BINBYTES + struct.pack("<I", len(padding)) + padding}))


def test_zip_bomb_in_data_pkl(tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path],
                              zip_rewriter: Callable[..., Path], assert_error: Callable[..., None]) -> None:
    plain = torch_zip_writer(tmp_path / "plain.pt", _deflated_pickle_bomb(asm))
    path = zip_rewriter(plain, tmp_path / "bomb.pt", compression={"archive/data.pkl": zipfile.ZIP_DEFLATED})
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data.pkl")
        assert info.file_size > 1000 * info.compress_size  # really a 1000x bomb

    with pytest.raises(UnsafeCheckpointError) as exc:
        tensorparity.open(path)

    assert_error(exc.value, UnsafeCheckpointError, path=path, key="archive/data.pkl", fix="zip bomb")


def test_zip_bomb_in_a_storage_member(tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path],
                                      zip_rewriter: Callable[..., Path], assert_error: Callable[..., None]) -> None:
    numel = 1 << 20
    body = asm.dict_({"zeros": asm.tensor(asm.storage("0", numel), 0, (numel,), (1,))})
    plain = torch_zip_writer(tmp_path / "plain.pt", asm.program(body), {"0": bytes(4 * numel)})
    path = zip_rewriter(plain, tmp_path / "bomb.pt", compression={"archive/data/0": zipfile.ZIP_DEFLATED})

    with pytest.raises(UnsafeCheckpointError) as exc:
        tensorparity.open(path)  # refused on open, before anything is inflated

    assert_error(exc.value, UnsafeCheckpointError, path=path, key="archive/data/0", fix="zip bomb")


def test_deflated_storage_within_limits_still_loads(tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path],
                                                    zip_rewriter: Callable[..., Path]) -> None:
    values = torch.randn(64)
    body = asm.dict_({"w": asm.tensor(asm.storage("0", 64), 0, (8, 8), (8, 1))})
    plain = torch_zip_writer(tmp_path / "plain.pt", asm.program(body), {"0": values.numpy().tobytes()})
    path = zip_rewriter(plain, tmp_path / "deflated.pt", compression={"archive/data/0": zipfile.ZIP_DEFLATED})

    assert torch.equal(tensorparity.open(path)["w"].load(), values.reshape(8, 8))


def test_savez_compressed_of_zeros_is_not_a_bomb(tmp_path: Path) -> None:
    # Legitimately 1000x smaller than its content: the declared array size bounds what inflates.
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, zeros=np.zeros(1 << 20, dtype=np.float32), ones=np.ones(3))
    ckpt = tensorparity.open(path)
    assert torch.count_nonzero(ckpt["zeros"].load()) == 0
    assert torch.equal(ckpt["ones"].load(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_member_inflating_past_its_array_is_corrupt(compressed: bool, tmp_path: Path,
                                                        assert_error: Callable[..., None]) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, a=np.arange(4, dtype=np.int64))
    with zipfile.ZipFile(good) as zf:
        raw = zf.read("a.npy")
    path = tmp_path / "padded.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as zf:
        zf.writestr("a.npy", raw + bytes(1 << 16))

    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, CorruptCheckpointError, path=path, key="a.npy", fix="numpy.savez")


def test_npz_of_strings_names_the_array(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = tmp_path / "strings.npz"
    np.savez(path, names=np.array(["a", "bc"]), w=np.ones(2))

    with pytest.raises(UnknownFormatError) as info:
        tensorparity.open(path)

    assert_error(info.value, UnknownFormatError, path=path, key="names.npy", fix="numeric arrays")


# ---------------------------------------------------------------------------------------------
# Lying safetensors headers


def _safetensors(path: Path, header: Any, data: bytes, *, declared: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(("name", "header", "data", "key", "words"), [
    ("past-the-end", {"a": F32x2}, bytes(4), "a", "data section has 4 bytes"),  # fix: download it again
    ("overlap", {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "b", "overlap"),
    ("shape-vs-bytes", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "a", "needs 12"),
    ("huge-shape", {"a": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 8]}}, bytes(8), "a", "needs"),
    ("negative-size", {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "a", "shape"),
    ("bad-dtype", {"a": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "a", "unknown dtype"),
    ("dtype-not-a-string", {"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "a",
     "unknown dtype"),
    ("offsets-not-ints", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}}, bytes(8), "a", "data_offsets"),
    ("gap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "a", "unclaimed"),
    ("trailing-bytes", {"a": F32x2}, bytes(12), "a", "after the last tensor"),
    ("description-not-object", {"a": [1, 2]}, bytes(8), "a", "not an object"),
    ("bad-metadata", {"__metadata__": {"k": 1}, "a": F32x2}, bytes(8), None, "__metadata__"),
    ("non-json", b"{not json at all", bytes(8), None, "not valid JSON"),
    ("invalid-utf8", b"{\"a\xff\": 1}", bytes(8), None, "not valid JSON"),
    ("lone-surrogate-name", b'{"a\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8), None,
     "surrogates"),
    ("5000-digit-number", b"{\"a\": " + b"9" * 5000 + b"}", b"", None, "not valid JSON"),
    ("deep-nesting", b"{\"a\": " + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "not valid JSON"),
])
def test_lying_safetensors_header(name: str, header: Any, data: bytes, key: str | None, words: str,
                                  tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = _safetensors(tmp_path / f"{name}.safetensors", header, data)

    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)

    fix = {"past-the-end": "download it again", "bad-dtype": "re-save", "dtype-not-a-string": "re-save"}
    assert_error(info.value, CorruptCheckpointError, path=path, key=key, fix=fix.get(name, "save it again"))
    assert words in str(info.value)


def test_safetensors_header_longer_than_the_file(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = _safetensors(tmp_path / "long.safetensors", {"a": F32x2}, bytes(8), declared=10_000)
    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)
    assert_error(info.value, CorruptCheckpointError, path=path)
    assert "header claims 10000 bytes" in str(info.value)


def test_safetensors_huge_header_length(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = _safetensors(tmp_path / "huge.safetensors", {"a": F32x2}, bytes(8), declared=2**62)
    with pytest.raises(UnsafeCheckpointError) as info:
        tensorparity.open(path)
    assert_error(info.value, UnsafeCheckpointError, path=path)
    assert "limit" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Paths that are not checkpoints


def test_empty_file(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)
    assert_error(info.value, CorruptCheckpointError, path=path, fix="save it again")


def test_folder_without_a_checkpoint(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnknownFormatError) as info:
        tensorparity.open(tmp_path)
    assert_error(info.value, UnknownFormatError, path=tmp_path, fix="pass one file")


def test_missing_path(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(SourceNotFoundError) as info:
        tensorparity.open(path)
    assert_error(info.value, SourceNotFoundError, path=path, fix="check the path")


@pytest.mark.parametrize("head", [b"", b"PK", b"\x80\x04", b"{}", b"\x00" * 8])
def test_random_bytes_are_an_unknown_format(head: bytes, tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(head + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(TensorParityError) as info:
        tensorparity.open(path)
    assert_error(info.value, TensorParityError, path=path)
    assert isinstance(info.value, (UnknownFormatError, CorruptCheckpointError))


def test_legacy_magic_followed_by_garbage(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    # Detected as a pre-1.6 torch file by its first bytes; the reader must still fail cleanly.
    path = tmp_path / "legacy.pt"
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # torch's legacy magic number, no STOP
    path.write_bytes(magic + np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(TensorParityError) as info:
        tensorparity.open(path)
    assert_error(info.value, CorruptCheckpointError, path=path)


def test_plain_pickle_is_not_mistaken_for_torch(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = tmp_path / "plain.pkl.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(UnknownFormatError) as info:
        tensorparity.open(path)
    assert_error(info.value, UnknownFormatError, path=path, fix="torch.save")


def test_fifo_is_refused_without_blocking(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    with pytest.raises(UnknownFormatError) as info:
        tensorparity.open(path)  # reading it would wait forever for a writer
    assert_error(info.value, UnknownFormatError, path=path)
    assert "not a regular file" in str(info.value)


def test_unusable_path_is_not_found(tmp_path: Path, assert_error: Callable[..., None]) -> None:
    path = tmp_path / ("x" * 5000)
    with pytest.raises(SourceNotFoundError) as info:
        tensorparity.open(path)
    assert_error(info.value, SourceNotFoundError, path=path, fix="check the path")


def test_file_removed_after_open_fails_on_load(valid_files: Any, tmp_path: Path,
                                               assert_error: Callable[..., None]) -> None:
    path = tmp_path / "gone.pt"
    shutil.copy(valid_files["torch-zip"].path, path)
    ckpt = tensorparity.open(path)
    os.truncate(path, 0)
    with pytest.raises(CorruptCheckpointError) as info:
        ckpt["model.encoder.weight"].load()
    assert_error(info.value, CorruptCheckpointError, path=path, key="model.encoder.weight")


def test_pickle_nesting_beyond_the_limit_is_corrupt(tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path],
                                                    assert_error: Callable[..., None]) -> None:
    deep = b"".join([pickle.MARK] * 5000) + pickle.EMPTY_LIST + pickle.LIST * 5000
    path = torch_zip_writer(tmp_path / "deep.pt", asm.program(asm.dict_({"deep": deep})))

    with pytest.raises(CorruptCheckpointError) as info:
        tensorparity.open(path)

    assert_error(info.value, CorruptCheckpointError, path=path, key="archive/data.pkl")
    assert "nests" in str(info.value)


def _numpy_array(asm: Any, *, shape: bytes, code: str, raw: bytes, state_len: int = 5) -> bytes:
    """numpy's protocol-2 pickle of an array: _reconstruct, then BUILD with (version, shape, dtype, fortran, data)."""
    dtype = asm.call("numpy", "dtype", asm.str_(code), pickle.NEWFALSE, pickle.NEWTRUE) + asm.tuple_(
        [asm.int_(3), asm.str_("<"), pickle.NONE, pickle.NONE, pickle.NONE, asm.int_(0), asm.int_(0), asm.int_(0)]
    ) + pickle.BUILD
    state = [asm.int_(1), shape, dtype, pickle.NEWFALSE, pickle.BINBYTES + struct.pack("<I", len(raw)) + raw]
    return asm.call("numpy.core.multiarray", "_reconstruct", asm.global_("numpy", "ndarray"),
                    asm.tuple_([asm.int_(0)]), asm.str_("b")) + asm.tuple_(state[:state_len]) + pickle.BUILD


@pytest.mark.parametrize("case", ["good", "short-state", "huge-shape", "empty-dtype-code", "object-dtype", "bad-code",
                                  "wrong-byte-count", "scalar-wrong-bytes", "omegaconf-list-state", "path-of-ints"])
def test_known_types_with_malformed_state(case: str, tmp_path: Path, asm: Any, torch_zip_writer: Callable[..., Path],
                                          assert_error: Callable[..., None]) -> None:
    f8 = struct.pack("<2d", 1.5, 2.5)
    two = asm.tuple_([asm.int_(2)])
    value = {
        "good": _numpy_array(asm, shape=two, code="f8", raw=f8),
        "short-state": _numpy_array(asm, shape=two, code="f8", raw=f8, state_len=3),
        "huge-shape": _numpy_array(asm, shape=asm.tuple_([asm.int_(2**40)] * 3), code="f8", raw=f8),
        "empty-dtype-code": _numpy_array(asm, shape=two, code="", raw=f8),
        "object-dtype": _numpy_array(asm, shape=two, code="O", raw=f8),
        "bad-code": _numpy_array(asm, shape=two, code="f3", raw=f8),
        "wrong-byte-count": _numpy_array(asm, shape=two, code="f8", raw=f8[:-1]),
        "scalar-wrong-bytes": asm.call("numpy.core.multiarray", "scalar",
                                       asm.call("numpy", "dtype", asm.str_("f8"), pickle.NEWFALSE, pickle.NEWTRUE),
                                       pickle.SHORT_BINBYTES + b"\x03abc"),
        "omegaconf-list-state": asm.call("omegaconf.dictconfig", "DictConfig", ) + asm.list_([asm.int_(1)]) + pickle.BUILD,
        "path-of-ints": asm.call("pathlib", "PosixPath", asm.int_(1), asm.int_(2)),
    }[case]
    path = torch_zip_writer(tmp_path / f"{case}.pt", asm.program(asm.dict_({"value": value})))

    try:
        ckpt = tensorparity.open(path)
    except TensorParityError as exc:
        assert case not in ("good", "omegaconf-list-state", "path-of-ints"), exc
        assert_error(exc, CorruptCheckpointError, path=path, key="archive/data.pkl", fix="save")
        return
    assert case in ("good", "omegaconf-list-state", "path-of-ints"), f"{case} opened: {dict(ckpt)}"
    if case == "good":
        assert torch.equal(ckpt["value"].load(), torch.tensor([1.5, 2.5], dtype=torch.float64))
    elif case == "path-of-ints":
        assert [p.name for p in ckpt.placeholders] == ["pathlib.PosixPath"]
