"""Trace folders (``tensorparity capture``) opened as a :class:`Checkpoint`.

Every stored tensor becomes a :class:`TensorEntry` under its record key
(``module/call/kind[/path]``, e.g. ``layers.0.ffn/0/output``), in execution order; non-tensor
outputs become :class:`ValueEntry`. Stored parameters (records of kind ``param``) are listed
under ``param.`` and their ``state_dict`` key instead (``param.layers.0.ffn.0.weight``), and
``param`` is the checkpoint's ``model`` section: ``ckpt.weights()`` is the state dict the run
used, so ``tensorparity diff TRACE model.pt`` compares a trace's weights with a checkpoint and
``tensorparity map suggest TRACE_A TRACE_B --weights-only`` pairs two traces' weights. (A model
whose own sub-module is called ``param`` gets ``_param.``.) Records kept as statistics only
(stats mode, outside a window) are not entries; a note counts them. A multi-process trace
(``rank-<r>/`` folders) lists every rank's entries under ``rank-<r>/``. The manifest, shards and
checksums are validated as by :meth:`tensorparity.trace.Trace.open`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tensorparity.checkpoint.tracefolder.format import CAPTURING, rank_folders
from tensorparity.checkpoint.tracefolder.reader import Trace, param_name
from tensorparity.checkpoint.tree import Checkpoint, Entry, ValueEntry, flatten

__all__ = ["is_trace_dir", "param_prefix", "read_trace_dir"]

_SHARD = re.compile(r"shard-\d{5,}\.safetensors")
_RANK = re.compile(r"rank-\d+")


def _has_trace_schema(manifest: Path) -> bool:
    try:
        with open(manifest, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    # The writer puts "schema" first; a peek at the head is enough to recognise the file.
    return b'"schema"' in head and b"tensorparity.trace/" in head


def is_trace_dir(path: Path) -> bool:
    """Whether a folder is a trace, complete or not (shards without a manifest count: opening
    such a folder must say the capture did not finish, not read one shard as a checkpoint).

    Example:
        >>> import tempfile, pathlib
        >>> is_trace_dir(pathlib.Path(tempfile.mkdtemp()))
        False
    """
    return _is_trace_folder(path, ranks=True)


def _is_trace_folder(path: Path, *, ranks: bool) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if CAPTURING in names or any(_SHARD.fullmatch(n) for n in names):
        return True
    if "manifest.json" in names and _has_trace_schema(path / "manifest.json"):
        return True
    return ranks and any(_RANK.fullmatch(n) and _is_trace_folder(path / n, ranks=False) for n in names)


def param_prefix(modules: set[str]) -> str:
    """``param``, or ``_param`` (and so on) where a module path would fall inside it.

    Example:
        >>> param_prefix({"", "layers.0"}), param_prefix({"param.fc"})
        ('param', '_param')
    """
    prefix = "param"
    while any(m == prefix or m.startswith(prefix + ".") for m in modules):
        prefix = "_" + prefix
    return prefix


def _entries(trace: object, prefix: str) -> tuple[dict[str, Entry], int, str]:
    assert isinstance(trace, Trace)
    params = prefix + param_prefix({r.module for r in trace.records if r.kind != "param"})
    lazies = {}
    values: dict[str, Entry] = {}
    stats_only = 0
    order: dict[str, int] = {}
    for i, record in enumerate(trace.records):
        key = prefix + record.key
        if record.kind == "param":
            key = f"{params}.{param_name(record)}"
        order[key] = i
        if record.stored:
            lazies[key] = trace.lazy(record)
        elif not record.is_tensor:
            values[key] = ValueEntry(key, record.value)
        else:
            stats_only += 1
    tensors = flatten(lazies)  # a flat mapping: flatten keeps every key as it is, dots and all
    merged: dict[str, Entry] = {**tensors, **values}
    return {k: merged[k] for k in sorted(merged, key=order.__getitem__)}, stats_only, params


def read_trace_dir(path: Path) -> Checkpoint:
    """Open a trace folder as a :class:`Checkpoint` keyed by record key.

    Example:
        >>> import tempfile, torch, tensorparity.trace as tt
        >>> folder = tempfile.mkdtemp() + "/trace"
        >>> model = torch.nn.Linear(2, 2)
        >>> with tt.capture(model, out=folder):
        ...     _ = model(torch.ones(1, 2))
        >>> ckpt = read_trace_dir(Path(folder))
        >>> list(ckpt)
        ['<model>/0/model_input/0', '<model>/0/model_output', 'param.weight', 'param.bias']
        >>> list(ckpt.weights())
        ['weight', 'bias']
    """
    path = Path(path)
    ranks = rank_folders(path) if not (path / "manifest.json").exists() else {}
    traces = {f"rank-{r}/": Trace.open(folder) for r, folder in ranks.items()} if ranks else {"": Trace.open(path)}
    entries: dict[str, Entry] = {}
    sections: dict[str, str] = {}
    stats_only = 0
    for prefix, trace in traces.items():
        got, n, params = _entries(trace, prefix)
        entries.update(got)
        sections[params] = "model"
        stats_only += n
    first = next(iter(traces.values()))
    provenance = dict(first.provenance)
    provenance["framework"] = "tensorparity trace"
    provenance["records"] = sum(len(t.records) for t in traces.values())
    if ranks:
        provenance["ranks"] = list(ranks)
    notes = []
    if stats_only:
        notes.append(f"{stats_only} records hold statistics only (mode {first.mode}) and are not listed; "
                     f"read them with tensorparity.trace.Trace.open")
    closers = [t.close for t in traces.values()]
    return Checkpoint(source=str(path), format="trace", entries=entries, sections=sections, provenance=provenance,
                      notes=notes, closers=closers)

