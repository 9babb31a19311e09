"""spans_equal: two file byte ranges compared with pread, a small first read, then chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorparity.checkpoint._mapped import FIRST_CHUNK, spans_equal
from tensorparity.checkpoint.tree import ByteSpan


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
