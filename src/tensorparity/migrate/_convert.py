"""Convert a checkpoint between formats: streamed, atomic, verified bitwise.

:func:`convert` opens the source lazily, refuses before writing anything what the target format
cannot hold, streams every tensor into a temporary name beside the destination
(:func:`tensorparity._atomic.atomic_output`), re-opens what it wrote, compares every tensor and
value with the source through :func:`tensorparity.diff` in exact mode, and only then renames it
into place. A crash, a full disk or a failed verification leaves the destination as it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partialmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorparity._atomic import atomic_output
from tensorparity._output import refuse_existing, refuse_inputs, write_failure
from tensorparity.checkpoint import Checkpoint, ValueEntry
from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.checkpoint.format_registry import format_names
from tensorparity.checkpoint.nemo import read_config
from tensorparity.checkpoint.write import (
    NEMO_CONFIG_KEY,
    check_writable,
    format_for_path,
    parse_size,
    payload,
    source_metadata,
    write_checkpoint,
)
from tensorparity.checks._diff import diff
from tensorparity.errors import InternalError, UsageError
from tensorparity.mapping import Direction, apply_mapping
from tensorparity.mapping import Mapping as KeyMapping
from tensorparity.numerics import Tolerance
from tensorparity.report import render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._render import human_bytes, printable, rich_header

if TYPE_CHECKING:
    from rich.console import RenderableType

    from tensorparity.checks._diff_report import DiffReport

__all__ = ["SCHEMA", "ConvertReport", "convert", "verify_written"]

SCHEMA = "tensorparity.convert/1"


@dataclass(frozen=True)
class ConvertReport:
    """What :func:`convert` wrote, and how it was verified.

    Attributes:
        source, destination: the two paths.
        source_format: the reader that opened the source (``lightning``, ``safetensors``, ...).
        format: the format written (one of :data:`tensorparity.migrate.FORMATS`).
        tensors, values: how many tensor and non-tensor entries were written.
        nbytes: bytes of tensor data written.
        size_on_disk: bytes the destination occupies (all files of a folder).
        files: the files written, relative to the destination (``["."]`` for one file).
        seconds: wall time of writing and verifying.
        verified: ``True`` when every tensor and value read back bitwise equal to the source;
            ``None`` when verification was turned off.
        verification: the exact-mode :class:`~tensorparity.DiffReport` behind ``verified``.
        notes: what the user should know (what does not travel to this format, ...).
    """

    source: str
    destination: str
    source_format: str
    format: str
    tensors: int
    values: int
    nbytes: int
    size_on_disk: int
    files: tuple[str, ...]
    seconds: float
    verified: bool | None
    verification: DiffReport | None = field(default=None, repr=False, compare=False)
    notes: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return 0

    def summary(self) -> str:
        """One line: what was written and whether it read back identical.

        Example:
            >>> import tempfile, torch
            >>> src = tempfile.mkdtemp() + "/w.pt"; torch.save({"w": torch.ones(2)}, src)
            >>> convert(src, src[:-3] + ".safetensors").summary()
            'converted torch-zip -> safetensors: 1 tensor (8 B), 0 values; verified bitwise'
        """
        check = {True: "verified bitwise", False: "VERIFICATION FAILED", None: "not verified"}[self.verified]
        return (f"converted {self.source_format} -> {self.format}: {self.tensors} tensor{'s' * (self.tensors != 1)} "
                f"({human_bytes(self.nbytes)}), {self.values} value{'s' * (self.values != 1)}; {check}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": SCHEMA}
        for name in ("source", "destination", "source_format", "format", "tensors", "values", "nbytes",
                     "size_on_disk", "seconds", "verified"):
            d[name] = getattr(self, name)
        d["files"] = list(self.files)
        d["notes"] = list(self.notes)
        d["verification"] = self.verification.classic_summary() if self.verification is not None else None
        return d

    to_json = partialmethod(report_json, ensure_ascii=True)  # \u escapes: what convert --json has always printed

    def renderable(self, *, top: int = 10) -> RenderableType:
        """The summary, what was read and written, and the verification (``top`` is ignored:
        nothing is listed)."""
        from rich.console import Group
        from rich.text import Text

        style = "bold green" if self.verified else "bold red" if self.verified is False else "bold yellow"
        rows = [("source", f"{printable(self.source)} ({self.source_format})"),
                ("written", f"{printable(self.destination)} ({self.format}, {len(self.files)} file"
                            f"{'s' * (len(self.files) != 1)}, {human_bytes(self.size_on_disk)} on disk, "
                            f"{self.seconds:.2f} s)")]
        if self.verification is not None:
            rows.append(("verification", self.verification.classic_summary()))
        parts: list[RenderableType] = [Text(printable(self.summary()), style=style), rich_header(rows)]
        parts.extend(Text(f"note: {printable(n)}", style="dim") for n in self.notes)
        return Group(*parts)

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = partialmethod(report_text, width=100, trailing_newline=False)


def _refuse_source(src: Path, dst: Path) -> None:
    refuse_inputs(dst, [src], "the converted checkpoint")


def _disk_usage(dest: Path) -> tuple[int, tuple[str, ...]]:
    if dest.is_file():
        return dest.stat().st_size, (".",)
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), tuple(p.relative_to(dest).as_posix() for p in files)


def _dcp_drops(body: Checkpoint, fmt: str) -> list[str]:
    """Keys DCP cannot keep: empty dicts (its flattening has no leaf for them)."""
    if fmt != "dcp":
        return []
    return [k for k, e in body.items() if isinstance(e, ValueEntry) and isinstance(e.value, Mapping) and not e.value]


def _without(ckpt: Checkpoint, keys: list[str]) -> Checkpoint:
    if not keys:
        return ckpt
    gone = set(keys)
    return Checkpoint(source=ckpt.source, format=ckpt.format, entries={k: e for k, e in ckpt.items() if k not in gone},
                      sections=ckpt.sections, provenance=ckpt.provenance, default_section=ckpt.default_section)


def _notes(src: Checkpoint, fmt: str, weights_only: bool, dropped: list[str], mapped_by: str | None = None,
           direction: str = "a_to_b") -> list[str]:
    notes = [f"keys mapped through {mapped_by!r} ({direction.replace('_', ' ')})"] if mapped_by is not None else []
    if dropped:
        shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        notes.append(f"DCP keeps no empty dicts: {len(dropped)} left out ({shown})")
    if src.format == "nemo" and fmt != "nemo":
        notes.append("the .nemo's model_config.yaml travels as metadata 'nemo.model_config'; its artifacts "
                     "do not (convert back to .nemo from the original to keep them)")
    if weights_only and src.sections:
        notes.append("weights only: the other sections (optimizer, schedulers, loops...) were left out")
    return notes


def verify_written(source: Checkpoint, written: Path) -> DiffReport:
    """Re-open ``written`` and compare it with ``source``: every key, every tensor bitwise.

    Two ``.nemo`` are compared whole (weights, config values, artifact sizes); otherwise the
    weights a writer writes (:func:`~tensorparity.checkpoint.write.payload`) of both sides.

    Example:
        >>> import tempfile, torch
        >>> from tensorparity import open as tp_open
        >>> p = tempfile.mkdtemp() + "/w.pt"; torch.save({"w": torch.ones(1)}, p)
        >>> verify_written(tp_open({"w": torch.ones(1)}), Path(p)).verdict
        'identical'
    """
    with open_checkpoint(written) as back:
        both_nemo = source.format == "nemo" and back.format == "nemo"
        return diff(source if both_nemo else payload(source), back if both_nemo else payload(back),
                    tolerance=Tolerance(exact=True), weights_only=False, include_records=True)


def _check_config(expected: str | None, written: Path) -> None:
    if expected is not None and read_config(written) != expected.encode("utf-8"):
        raise InternalError(f"{written}: the model_config.yaml written is not the one given; nothing was written")


def convert(
    src: str | os.PathLike[str] | Checkpoint,
    dst: str | os.PathLike[str],
    *,
    format: str | None = None,  # noqa: A002 - the CLI's word
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    weights_only: bool = False,
    mapping: KeyMapping | dict[str, Any] | str | os.PathLike[str] | None = None,
    direction: Direction = "a_to_b",
) -> ConvertReport:
    """Rewrite a checkpoint in another format, or through a key mapping into another
    implementation's key space, streaming one tensor at a time, atomically.

    The destination is written under a temporary name beside it, re-opened and compared with the
    source bitwise (every tensor, every value; :func:`tensorparity.diff` in exact mode), and only
    then renamed into place. The source is never overwritten.

    Args:
        src: the checkpoint to convert (anything :func:`tensorparity.open` takes: a path, an
            opened :class:`Checkpoint`, a state dict or a live module).
        dst: the file or folder to write.
        format: one of :data:`tensorparity.migrate.FORMATS`; default: from ``dst``'s suffix
            (``.safetensors``, ``.pt .pth .bin .ckpt``, ``.nemo``; a suffix-less name with
            ``max_shard_size`` is ``safetensors-sharded``).
        max_shard_size: bytes per shard, ``"500MB"`` style, for ``safetensors-sharded``.
        overwrite: replace an existing ``dst`` (never the source, nor a folder holding it).
        verify: re-open and compare bitwise before installing (on by default).
        weights_only: write the model weights alone (a Lightning checkpoint's ``state_dict``,
            keyed as the model names them), e.g. to make a safetensors file of a training checkpoint.
        mapping: a :class:`~tensorparity.mapping.Mapping`, its dict or a YAML file's path: the
            keys are renamed and the tensors transformed (:func:`~tensorparity.mapping.apply_mapping`,
            every mapping problem reported before a byte is written) and the verification compares
            what was written with the mapped source. Its name is recorded in the output's metadata
            (``tensorparity.mapping``) where the format keeps metadata.
        direction: ``a_to_b`` (the mapping's first side is ``src``) or ``b_to_a``.

    Returns:
        A :class:`ConvertReport`.

    Raises:
        UsageError: the destination exists (without ``overwrite``), the format is unknown or cannot hold the source's
            content (every offending key named), or the disk is full; nothing is left behind.
        SourceError: the source cannot be read.
        InternalError: what was written did not read back identical (the destination is untouched).

    Example:
        >>> import tempfile, torch, tensorparity
        >>> d = tempfile.mkdtemp(); torch.save({"w": torch.arange(4.0)}, d + "/w.pt")
        >>> report = convert(d + "/w.pt", d + "/w.safetensors")
        >>> report.verified, report.format, tensorparity.open(d + "/w.safetensors")["w"].load()
        (True, 'safetensors', tensor([0., 1., 2., 3.]))
        >>> _ = convert(d + "/w.pt", d + "/port.pt", mapping={"rules": [{"a": "w", "b": "weight"}]})
        >>> list(tensorparity.open(d + "/port.pt"))
        ['weight']
    """
    start = time.perf_counter()
    dest = Path(dst)
    if isinstance(src, (str, os.PathLike)):
        _refuse_source(Path(src), dest)
    elif isinstance(src, Checkpoint) and Path(src.source).exists():
        _refuse_source(Path(src.source), dest)
    refuse_existing(dest, overwrite)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    opened = open_checkpoint(src)
    try:
        writable = format_names(writable=True)  # asked now: a format registered after import counts
        fmt = format or format_for_path(dest, max_shard_size=limit)
        if fmt is None:
            raise UsageError("cannot tell the output format from the destination's name", path=dest,
                             fix=f"pass --format ({', '.join(writable)}), or name the file .safetensors, .pt or .nemo")
        if fmt not in writable:
            raise UsageError(f"unknown output format {fmt!r}", path=dest, fix=f"use one of {', '.join(writable)}")
        ckpt = opened.weights() if weights_only else opened
        mapped_by: str | None = None
        if mapping is not None:  # every mapping problem is reported here, before a byte is written
            mapped = apply_mapping(ckpt, mapping, direction=direction)
            ckpt, mapped_by = mapped.checkpoint, mapped.mapping.name
        body = payload(ckpt)
        check_writable(body, fmt, dest)  # every problem before a byte is written
        dropped = _dcp_drops(body, fmt)
        metadata = source_metadata(opened)
        metadata.pop("format", None)  # a safetensors header's "pt": the safetensors writers set it themselves
        if mapped_by is not None:
            metadata.update({"tensorparity.mapping": mapped_by, "tensorparity.source": str(opened.source)})
        report: DiffReport | None = None
        try:
            with atomic_output(dest) as tmp:
                write_checkpoint(ckpt, tmp, format=fmt, max_shard_size=limit, metadata=metadata)
                if verify:
                    expected = opened if fmt == "nemo" == opened.format and mapped_by is None else _without(body, dropped)
                    report = verify_written(expected, tmp)
                    if fmt == "nemo":
                        _check_config(metadata.get(NEMO_CONFIG_KEY), tmp)
                    if report.verdict != "identical":
                        raise InternalError(f"{dest}: the converted checkpoint does not read back identical to the "
                                            f"source ({report.classic_summary()}); nothing was written")
        except (OSError, RuntimeError, KeyboardInterrupt) as exc:
            # torch's zip writer (inside DCP's items) reports a failed or short write as a RuntimeError
            raise write_failure(exc, "the converted checkpoint", dest) from None
        size, files = _disk_usage(dest)
        n_tensors = sum(1 for _ in body.tensors())
        return ConvertReport(
            source=str(opened.source), destination=str(dest), source_format=opened.format, format=fmt,
            tensors=n_tensors, values=len(body) - n_tensors - len(dropped),
            nbytes=body.nbytes(), size_on_disk=size, files=files, seconds=time.perf_counter() - start,
            verified=None if report is None else True, verification=report,
            notes=tuple(_notes(opened, fmt, weights_only, dropped, mapped_by, direction)))
    finally:
        if opened is not src:
            opened.close()
