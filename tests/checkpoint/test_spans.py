"""spans_equal: two byte ranges of files compared without building tensors, mapped (large spans,
memcmp with the GIL released) or read in chunks (small spans); both answer alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tensorparity.checkpoint import _mapped
from tensorparity.checkpoint._mapped import FIRST_CHUNK, MAP_AT, span_buffer, spans_equal
from tensorparity.checkpoint.tree import ByteSpan
from tensorparity.errors import CorruptCheckpointError


def _pair(tmp_path: Path, size: int, flip: int | None, *, shift: int = 13) -> tuple[ByteSpan, ByteSpan]:
    data = bytearray(os.urandom(size))
    (tmp_path / "a.bin").write_bytes(b"h" * shift + data)
    if flip is not None:
        data[flip] ^= 0x01
    (tmp_path / "b.bin").write_bytes(b"xy" + data + b"tail")
    return ByteSpan(str(tmp_path / "a.bin"), shift, size), ByteSpan(str(tmp_path / "b.bin"), 2, size)


CASES = [(0, "none")] + [(size, flip) for size in (1000, MAP_AT, 3 * MAP_AT + 7)
                          for flip in ("none", "first", "middle", "last")]


@pytest.mark.parametrize(("size", "flip"), CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_mapped_and_read_routes_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, flip: str) -> None:
    where = {"none": None, "first": 0, "middle": size // 2, "last": size - 1}[flip]
    a, b = _pair(tmp_path, size, where)
    expected = where is None
    assert spans_equal(a, b) is expected
    with monkeypatch.context() as m:
        m.setattr(_mapped, "_bytes", None)  # the pure-Python route
        assert spans_equal(a, b) is expected
    assert spans_equal(a, ByteSpan(b.path, b.offset, size + 1)) is False  # lengths differ


def test_a_file_truncated_after_opening_is_named(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, 2 * MAP_AT, None)
    os.truncate(b.path, MAP_AT)
    with pytest.raises(CorruptCheckpointError, match="file ended inside bytes") as info:
        spans_equal(a, b)
    assert str(tmp_path / "b.bin") in str(info.value)


def test_span_buffer_maps_exactly_the_span(tmp_path: Path) -> None:
    a, _ = _pair(tmp_path, MAP_AT + 5, None, shift=70_001)  # not on an allocation boundary
    raw = Path(a.path).read_bytes()[a.offset:a.offset + a.nbytes]
    with span_buffer(a) as view:
        assert bytes(view) == raw and view.readonly


@pytest.mark.parametrize("size", [0, 1, FIRST_CHUNK - 1, FIRST_CHUNK, FIRST_CHUNK + 1, 3 * 4096 + 7, 70_000])
def test_spans_equal_finds_a_difference_anywhere(tmp_path: Path, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"head" + data)
    b.write_bytes(data + b"tail")
    span_a, span_b = ByteSpan(str(a), 4, size), ByteSpan(str(b), 0, size)
    assert spans_equal(span_a, span_b) and spans_equal(span_a, span_b, chunk=4096)
    for at in sorted({0, FIRST_CHUNK - 1, FIRST_CHUNK, size // 2, size - 1}):
        if not 0 <= at < size:
            continue
        changed = bytearray(data)
        changed[at] ^= 1
        b.write_bytes(bytes(changed) + b"tail")
        assert not spans_equal(span_a, span_b), at
        assert not spans_equal(span_a, span_b, chunk=4096), at
    assert not spans_equal(span_a, ByteSpan(str(b), 0, size + 1))


def _carrying(span: ByteSpan) -> ByteSpan:
    """The same span carrying its reader's one mapping of the file (what a trace's shards hand out)."""
    return ByteSpan(span.path, span.offset, span.nbytes, _mapped.MappedFile(Path(span.path)))


@pytest.mark.parametrize(("size", "flip"), CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_spans_carrying_their_mapping_answer_alike(tmp_path: Path, size: int, flip: str) -> None:
    where = {"none": None, "first": 0, "middle": size // 2, "last": size - 1}[flip]
    a, b = _pair(tmp_path, size, where)
    ma, mb = _carrying(a), _carrying(b)
    assert spans_equal(ma, mb) is (where is None)
    assert spans_equal(ma, b) is (where is None)  # one side mapped, the other read: the read route
    with span_buffer(ma) as view:
        assert bytes(view) == Path(a.path).read_bytes()[a.offset:a.offset + size] and view.readonly


def test_views_of_one_mapping_hold_the_file_bytes_wherever_they_start(tmp_path: Path) -> None:
    # Views that start and end anywhere, overlap and repeat read exactly the file's bytes.
    raw = os.urandom(3 * (1 << 20) + 12_345)
    path = tmp_path / "f.bin"
    path.write_bytes(raw)
    mapped = _mapped.MappedFile(path)
    for start, n in [(5, 100), ((1 << 20) - 3, 10), (0, len(raw)), (4096, (1 << 21) + 1), (len(raw) - 1, 1),
                     (7, 0), ((1 << 20) + 1, 2 * (1 << 20))]:
        assert bytes(mapped.view(start, n)) == raw[start:start + n]
    with pytest.raises(CorruptCheckpointError, match="outside the"):
        mapped.view(len(raw) - 1, 2)
    mapped.close()


def test_a_mapped_file_truncated_after_opening_is_named_not_read(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, 2 * MAP_AT, None)
    ma, mb = _carrying(a), _carrying(b)
    assert spans_equal(ma, mb)  # both mapped now
    os.truncate(b.path, MAP_AT)
    with pytest.raises(CorruptCheckpointError, match="file ended inside bytes") as info:
        spans_equal(ma, mb)
    assert str(tmp_path / "b.bin") in str(info.value)
    with pytest.raises(CorruptCheckpointError, match="file ended inside bytes"), span_buffer(mb):
        pass
