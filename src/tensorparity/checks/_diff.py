"""Checkpoint vs checkpoint: :func:`diff`.

Both sides are opened lazily with :func:`tensorparity.open`; with a mapping, A is translated into
B's key space first. Keys are paired by name, section by section; tensor pairs stream through the
one comparison engine (:func:`tensorparity.numerics.compare_pairs`), so memory stays bounded by a
few tensors whatever the checkpoints' size. Non-tensor values (hyper-parameters, versions,
config) are compared by value. Before pairing, tensorparity's own migration records are left out
(unless asked for) and an optimizer state keyed by parameter index is paired with one keyed by
name through the param groups (:mod:`tensorparity.checks._diff_sides`).
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensorparity.checkpoint import Checkpoint, Entry, TensorEntry, open_owned
from tensorparity.checkpoint._inspect import KeyInfo, key_pattern
from tensorparity.checkpoint.safe_pickle import Placeholder
from tensorparity.checkpoint.tree import LazyTensor
from tensorparity.checks._diff_report import DiffReport, MappingInfo, SectionDiff, Side, ValueDifference
from tensorparity.checks._diff_sides import leave_out_records, pair_optimizer_states
from tensorparity.errors import UsageError
from tensorparity.numerics import Pair, TensorComparison, Tolerance, compare_pairs
from tensorparity.report._render import short_repr

if TYPE_CHECKING:
    from tensorparity.mapping import Mapping as KeyMapping

__all__ = ["PROGRESS_THRESHOLD", "diff"]

PROGRESS_THRESHOLD = 256 * 1024 * 1024  # bytes: below this a diff is over before a bar is worth drawing
_MAX_VALUE_DEPTH = 100


def diff(
    a: Any,
    b: Any,
    /,
    *,
    mapping: KeyMapping | str | os.PathLike[str] | None = None,
    tolerance: Tolerance | None = None,
    include: str | None = None,
    exclude: str | None = None,
    weights_only: bool | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    include_records: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
) -> DiffReport:
    """Compare two checkpoints key by key and return a :class:`DiffReport`.

    Args:
        a, b: anything :func:`tensorparity.open` takes: paths in any format, ``nn.Module``\\ s,
            state dicts, :class:`Checkpoint`\\ s (those passed in are left open).
        mapping: a :class:`tensorparity.mapping.Mapping`, or the path of its YAML file; A is
            translated into B's key space through it before keys are paired.
        tolerance: how close is close enough (default: ``torch.testing`` tolerances per dtype).
        atol, rtol: shorthand for ``tolerance=Tolerance(atol=..., rtol=...)`` (not with
            ``tolerance``).
        include, exclude: regular expressions on A's keys (``re.search``); only keys ``include``
            matches and ``exclude`` does not are compared. Without a mapping, B's keys are
            filtered the same way; with one, B keeps the keys A's kept keys map to, plus those
            of its own that no key of A maps to and that pass the filters.
        weights_only: ``None`` (auto): when one side is a bare state dict and the other has
            sections (Lightning, NeMo, a training checkpoint), compare the sectioned side's model
            weights only (:meth:`Checkpoint.weights`); ``True``: both sides' weights only;
            ``False``: every key.
        workers: comparison threads (default: up to 2).
        progress: draw a progress bar (bytes compared) on stderr; ``None``: when stderr is a
            terminal and more than 256 MB are to be compared.
        include_records: compare tensorparity's own migration records too
            (``tensorparity_migrations``); by default they are left out, with a note.

    Without a mapping, an optimizer state keyed by parameter index on one side and by name on
    the other (``optimizer.state_dict()`` against DCP's ``get_state_dict``) is paired through the
    param groups' order and compared under the name-keyed side's keys; a note says how, or why not.

    Raises:
        UsageError: a filter is not a valid regular expression, an option has a wrong type, or
            the filters leave nothing to compare.
        SourceError: a checkpoint cannot be opened or read.
        MappingError: the mapping file is invalid or does not fit A.

    Example:
        >>> import torch, tensorparity
        >>> a = {"w": torch.tensor([1.0, 2.0]), "lr": 0.1}
        >>> b = {"w": torch.tensor([1.0, 2.5]), "lr": 0.1}
        >>> report = tensorparity.diff(a, b)
        >>> report.verdict, report.mismatches[0].first_index, report.exit_code
        ('differs', (1,), 1)
    """
    keep = _KeyFilter(key_pattern("include", include), key_pattern("exclude", exclude))
    if atol is not None or rtol is not None:
        if tolerance is not None:
            raise UsageError("give atol/rtol or tolerance, not both",
                             fix="put them in the Tolerance: Tolerance(atol=..., rtol=...)")
        tolerance = Tolerance(atol=atol, rtol=rtol)
    _check_options(tolerance, weights_only, workers, progress, include_records)
    key_mapping = None
    if mapping is not None:
        from tensorparity.mapping import load_mapping  # lazy: mapping (and torch) load only for a diff with --map

        key_mapping = load_mapping(mapping)
    tol = tolerance or Tolerance()
    owned: list[Checkpoint] = []
    try:
        ckpt_a, ckpt_b = open_owned(a, owned), open_owned(b, owned)
        side_a, side_b, selected_a, selected_b, notes = _select(ckpt_a, ckpt_b, weights_only)
        if not include_records:
            side_a, side_b, left_out = leave_out_records(side_a, side_b)
            notes += left_out
        if key_mapping is None:
            side_a, side_b, paired = pair_optimizer_states(side_a, side_b)
            notes += paired
        info: MappingInfo | None = None
        origins: dict[str, tuple[str, ...]] = {}  # compared key -> A's keys it was made from
        unmapped: dict[str, tuple[Entry, str]] = {}  # A's keys no rule claimed -> (entry, section)
        if key_mapping is None:
            keys_a = [k for k in side_a if keep((k,))]
            keys_b = [k for k in side_b if keep((k,))]
        else:
            side_a, keys_a, keys_b, origins, unmapped, info = _through_mapping(side_a, side_b, key_mapping, keep)
            selected_a = (f"{selected_a}; " if selected_a else "") + "counted as mapped into B's keys"
            if unmapped:
                notes.append(f"{len(unmapped)} of A's keys are claimed by no rule of the mapping; they are listed "
                             f"as only in A")
        if keep.active and not keys_a and not keys_b and not unmapped and (len(side_a) or len(side_b)):
            raise UsageError(f"the key filters leave nothing to compare (include={include!r}, exclude={exclude!r})",
                             fix="loosen them; `tensorparity inspect A` lists A's keys")
        found = _compare(side_a, side_b, keys_a, keys_b, tol, extra_a=unmapped, workers=workers, progress=progress)
        hint = _prefix_hint(keys_a, keys_b) if found["common"] == 0 else None
        return DiffReport(
            a=_side(ckpt_a, [side_a[k] for k in keys_a] + [e for e, _ in unmapped.values()], selected_a,
                    trainable=not keep.active and selected_a is None),
            b=_side(ckpt_b, [side_b[k] for k in keys_b], selected_b, trainable=not keep.active and selected_b is None),
            tolerance=tol, sections=found["sections"], tensors=found["tensors"],
            tensor_sections=found["tensor_sections"], values=found["values"], mapping=info,
            origins={k: origins[k] for k in keys_a if origins.get(k, (k,)) != (k,)},
            include=include, exclude=exclude, notes=tuple(notes + ([hint] if hint else [])))
    finally:
        for ckpt in owned:
            ckpt.close()


class _KeyFilter:
    """include/exclude on A's keys; a compared key made from several of A's keys is kept when
    ``include`` matches any of them and ``exclude`` none."""

    def __init__(self, include: re.Pattern[str] | None, exclude: re.Pattern[str] | None) -> None:
        self.include, self.exclude = include, exclude
        self.active = include is not None or exclude is not None

    def __call__(self, keys: Sequence[str]) -> bool:
        return (self.include is None or any(self.include.search(k) for k in keys)) and (
            self.exclude is None or not any(self.exclude.search(k) for k in keys))


# ---------------------------------------------------------------------------------------------
# Options


def _check_options(tolerance: Any, weights_only: Any, workers: Any, progress: Any, include_records: Any) -> None:
    problems = []
    if tolerance is not None and not isinstance(tolerance, Tolerance):
        problems.append(f"tolerance must be a tensorparity.Tolerance, not {type(tolerance).__name__}")
    if weights_only not in (None, True, False):
        problems.append(f"weights_only must be None, True or False, not {weights_only!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        problems.append(f"workers must be a positive integer, not {workers!r}")
    if progress not in (None, True, False):
        problems.append(f"progress must be None, True or False, not {progress!r}")
    if include_records not in (True, False):
        problems.append(f"include_records must be True or False, not {include_records!r}")
    if problems:
        raise UsageError("; ".join(problems), fix="e.g. diff(a, b, tolerance=Tolerance(atol=1e-4), workers=2)")


# ---------------------------------------------------------------------------------------------
# What is compared


def _describe_weights(ckpt: Checkpoint) -> str:
    prefixes = [p for p, name in ckpt.sections.items() if name == "model"]
    if len(prefixes) == 1:
        return f"model weights only, prefix '{prefixes[0]}.' removed"
    return "model weights only"


def _select(a: Checkpoint, b: Checkpoint, weights_only: bool | None) -> tuple[
        Checkpoint, Checkpoint, str | None, str | None, list[str]]:
    """Apply ``weights_only``: the two checkpoints to compare, what was selected, and notes."""
    notes: list[str] = []
    if weights_only is False:
        return a, b, None, None, notes
    if weights_only is True:
        sel_a = _describe_weights(a) if a.sections else None
        sel_b = _describe_weights(b) if b.sections else None
        return a.weights(), b.weights(), sel_a, sel_b, notes
    if bool(a.sections) == bool(b.sections):
        return a, b, None, None, notes
    sectioned, bare = ("A", "B") if a.sections else ("B", "A")
    ckpt = a if a.sections else b
    notes.append(f"{sectioned} is a {ckpt.format} checkpoint with sections and {bare} a bare state dict: "
                 f"compared {sectioned}'s model weights with {bare} (--all-keys / weights_only=False compares "
                 f"every key)")
    if a.sections:
        return a.weights(), b, _describe_weights(a), None, notes
    return a, b.weights(), None, _describe_weights(b), notes


def _through_mapping(a: Checkpoint, b: Checkpoint, key_mapping: KeyMapping, keep: _KeyFilter) -> tuple[
        Checkpoint, list[str], list[str], dict[str, tuple[str, ...]], dict[str, tuple[Entry, str]], MappingInfo]:
    """Translate A into B's key space and filter both sides: the mapped A, the keys of each side
    to compare, each mapped key's origins in A, A's unmapped keys, and what the mapping did."""
    from tensorparity.mapping import apply_mapping  # lazy: mapping (and torch) load only for a diff with --map

    result = apply_mapping(a, key_mapping, direction="a_to_b")
    mapped, origins = result.checkpoint, dict(result.claims)
    unmapped = {k: (a[k], a.section_of(k)) for k in result.unmapped if keep((k,))}
    keys_a = [k for k in mapped if keep(origins.get(k, (k,)))]
    kept, ignored_b = set(keys_a), [k for k in b if _ignored_b(key_mapping, k)]
    skip = set(ignored_b)
    # B keeps what A's kept keys map to, and its own keys no key of A maps to that pass the filter.
    keys_b = [k for k in b if k not in skip and ((k in kept) if k in mapped else keep((k,)))]
    info = MappingInfo(source=str(key_mapping.source or "<mapping built in Python>"), name=key_mapping.name,
                       rules=len(key_mapping.rules), unmapped=tuple(unmapped), ignored_a=tuple(result.ignored),
                       ignored_b=tuple(ignored_b), passed_through=tuple(result.passed_through))
    return mapped, keys_a, keys_b, origins, unmapped, info


def _ignored_b(key_mapping: KeyMapping, key: str) -> bool:
    """Whether the mapping's ``ignore_b`` globs match a key of B (with or without ``prefix_b``)."""
    bare = key[len(key_mapping.prefix_b):] if key.startswith(key_mapping.prefix_b) else key
    return any(fnmatch.fnmatchcase(key, g) or fnmatch.fnmatchcase(bare, g) for g in key_mapping.ignore_b)


# ---------------------------------------------------------------------------------------------
# Comparing


@dataclass
class _Counts:
    """One section's tallies while comparing."""

    common: int = 0
    only_a: list[KeyInfo] = field(default_factory=list)
    only_b: list[KeyInfo] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    dtype: int = 0
    values: int = 0
    params_a: int = 0
    params_b: int = 0

    def record(self, name: str) -> SectionDiff:
        n = self.status.get
        return SectionDiff(name, self.common, tuple(self.only_a), tuple(self.only_b), n("identical", 0), n("close", 0),
                           n("shape", 0), self.dtype, n("mismatch", 0), self.values, self.params_a, self.params_b)


def _compare(a: Checkpoint, b: Checkpoint, keys_a: list[str], keys_b: list[str], tol: Tolerance, *,
             extra_a: dict[str, tuple[Entry, str]], workers: int | None, progress: bool | None) -> dict[str, Any]:
    """Pair the keys, compare, and count per section. ``extra_a``: A's keys a mapping left
    unmapped, with their sections, listed as only in A."""
    in_a, in_b = set(keys_a), set(keys_b)
    # A common key takes A's section, unless only B knows sections (A came through a mapping).
    by_b = not a.sections and bool(b.sections)
    section = {k: b.section_of(k) if by_b and k in in_b else a.section_of(k) for k in keys_a}
    section.update({k: b.section_of(k) for k in keys_b if k not in in_a})
    per: dict[str, _Counts] = {}
    rows = [(k, a[k], section[k]) for k in keys_a] + [(k, e, name) for k, (e, name) in extra_a.items()]
    for k, entry, name in rows:
        counts = per.setdefault(name, _Counts())
        counts.params_a += entry.numel if isinstance(entry, TensorEntry) else 0
        if k in in_b and k not in extra_a:
            counts.common += 1
        else:
            counts.only_a.append(_key_info(k, name, entry))
    for k in keys_b:
        entry, counts = b[k], per.setdefault(section[k], _Counts())
        counts.params_b += entry.numel if isinstance(entry, TensorEntry) else 0
        if k not in in_a:
            counts.only_b.append(_key_info(k, section[k], entry))

    pairs: list[Pair] = []
    values: list[ValueDifference] = []
    for k in (k for k in keys_a if k in in_b):
        ea, eb = a[k], b[k]
        if isinstance(ea, TensorEntry) and isinstance(eb, TensorEntry):
            pairs.append(Pair(k, ea, eb))
            continue
        if isinstance(ea, TensorEntry) or isinstance(eb, TensorEntry):
            values.append(ValueDifference(k, section[k], _entry_text(ea), _entry_text(eb), "kind"))
        elif kind := _value_difference(ea.value, eb.value):
            values.append(ValueDifference(k, section[k], _entry_text(ea), _entry_text(eb), kind))
        else:
            continue
        per[section[k]].values += 1
    tensors = _run(pairs, tol, workers=workers, progress=progress)
    for t in tensors:
        counts = per[section[t.key]]
        counts.status[t.status] = counts.status.get(t.status, 0) + 1
        counts.dtype += t.dtype_differs
    return {"common": sum(c.common for c in per.values()), "sections": tuple(c.record(n) for n, c in per.items()),
            "tensors": tuple(tensors), "tensor_sections": tuple(section[t.key] for t in tensors),
            "values": tuple(values)}


def _run(pairs: Sequence[Pair], tol: Tolerance, *, workers: int | None,
         progress: bool | None) -> list[TensorComparison]:
    """Stream the pairs through the engine, with a bar of bytes compared when asked for."""
    size = {p.key: _nbytes(p.a) + _nbytes(p.b) for p in pairs}
    total = sum(size.values())
    show = progress if progress is not None else (sys.stderr.isatty() and total > PROGRESS_THRESHOLD)
    if not show:
        return list(compare_pairs(pairs, tol, workers=workers))
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(TextColumn("comparing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    with bar:
        task = bar.add_task("compare", total=total)

        def advance(result: TensorComparison) -> None:
            bar.advance(task, size.get(result.key, 0))

        return list(compare_pairs(pairs, tol, workers=workers, on_result=advance))


def _nbytes(entry: Any) -> int:
    n = getattr(entry, "nbytes", 0)
    return n if isinstance(n, int) else 0


def _value_difference(a: Any, b: Any) -> str | None:
    """``None`` when two non-tensor values are the same; ``"type"`` or ``"value"`` otherwise."""
    if type(a) is not type(b) and not (isinstance(a, Placeholder) and isinstance(b, Placeholder)):
        return "type" if _same(a, b, 0, strict_types=False) else "value"
    return None if _same(a, b, 0, strict_types=True) else "value"


def _same(a: Any, b: Any, depth: int, *, strict_types: bool) -> bool:
    """Deep equality of checkpoint values: NaN equals NaN, placeholders compare by the call they
    recorded, tensors inside values by shape and dtype (their data is compared as entries)."""
    if depth > _MAX_VALUE_DEPTH:
        return short_repr(a, 10_000) == short_repr(b, 10_000)
    if isinstance(a, Placeholder) or isinstance(b, Placeholder):
        if not (isinstance(a, Placeholder) and isinstance(b, Placeholder)) or a.name != b.name:
            return False
        return all(_same(x, y, depth + 1, strict_types=strict_types) for x, y in
                   ((a.args, b.args), (a.kwargs, b.kwargs), (a.state, b.state), (a.items, b.items),
                    (a.listitems, b.listitems)))
    if strict_types and type(a) is not type(b):
        return False
    if isinstance(a, (LazyTensor, TensorEntry)) or isinstance(b, (LazyTensor, TensorEntry)):
        return (getattr(a, "shape", None), getattr(a, "dtype", None)) == (getattr(b, "shape", None),
                                                                          getattr(b, "dtype", None))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], depth + 1, strict_types=strict_types) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, depth + 1, strict_types=strict_types)
                                        for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - arrays and odd objects: fall back to their reprs
        return short_repr(a, 10_000) == short_repr(b, 10_000)


def _entry_text(entry: Entry) -> str:
    if isinstance(entry, TensorEntry):
        return f"tensor {list(entry.shape)} {str(entry.dtype).removeprefix('torch.')}"
    value = entry.value
    if isinstance(value, Placeholder) and value.state is not None:  # a dataclass config: its fields
        return short_repr(value, 100) + " with state " + short_repr(value.state, 200)
    return short_repr(value, 200)


def _key_info(key: str, section: str, entry: Any) -> KeyInfo:
    if isinstance(entry, TensorEntry):
        return KeyInfo(key, section, "tensor", tuple(entry.shape), str(entry.dtype).removeprefix("torch."),
                       entry.nbytes, note=entry.note)
    return KeyInfo(key, section, "value", value=short_repr(entry.value))


def _side(ckpt: Checkpoint, entries: list[Entry], selected: str | None, *, trainable: bool) -> Side:
    tensors = [e for e in entries if isinstance(e, TensorEntry)]
    n_trainable = ckpt.provenance.get("trainable_parameters") if trainable else None
    return Side(source=str(ckpt.source), format=ckpt.format, selected=selected, keys=len(entries),
                tensors=len(tensors), parameters=sum(e.numel for e in tensors), bytes=sum(e.nbytes for e in tensors),
                trainable=n_trainable if isinstance(n_trainable, int) and not isinstance(n_trainable, bool) else None)


def _prefix_hint(keys_a: list[str], keys_b: list[str]) -> str | None:
    """When no key matches, say whether removing one leading component of one side's keys would
    make them match (``state_dict.``, ``model.``, ``module.``): the usual cause."""
    best: tuple[int, str, str] = (0, "", "")
    for side, keys, other in (("A", keys_a, set(keys_b)), ("B", keys_b, set(keys_a))):
        counts: dict[str, int] = {}
        for k in keys:
            prefix, _, rest = k.partition(".")
            if rest in other:
                counts[prefix] = counts.get(prefix, 0) + 1
        for prefix, n in counts.items():
            best = max(best, (n, side, prefix))
    n, side, prefix = best
    if not n:
        return ("no key is common to both sides: if they are two implementations of one model, compare "
                "through a mapping that translates A's keys into B's (--map)") if keys_a and keys_b else None
    return (f"no key matches, but {n} of {side}'s keys would without their prefix '{prefix}.': compare through a "
            f"mapping that strips it (--map), or with --weights-only if it is a checkpoint's weights section")
