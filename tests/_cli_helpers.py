"""Assertions shared by the CLI tests (tests/ is on sys.path through pytest's `pythonpath`)."""

from __future__ import annotations


def assert_one_line_error(result: object, *needles: str) -> str:
    """An error exit: code 2, nothing on stdout, one stderr line holding every needle, no traceback."""
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    assert result.stdout == ""  # type: ignore[attr-defined]
    lines = result.stderr.splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in result.stderr  # type: ignore[attr-defined]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
