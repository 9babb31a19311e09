"""How :func:`tensorparity.diff` prepares two sides before pairing keys by name.

Two things make equal checkpoints look different key by key, and are settled here:

* tensorparity's own migration record (``tensorparity_migrations``, or the key earlier versions
  wrote into a ``.nemo``'s config) is not part of the model; it is left out unless asked for.
* An optimizer's state keyed by parameter index (``optimizer.state_dict()``: ``state.0.exp_avg``,
  ``param_groups[*].params == [0, 1, ...]``) and one keyed by parameter name
  (``torch.distributed.checkpoint.state_dict.get_state_dict``: ``state.0.weight.exp_avg``,
  ``param_groups[*].params == ["0.weight", ...]`` in ``named_parameters`` order) are paired
  position by position through the two sides' param groups. Nothing is guessed: when the groups'
  sizes, the states' fields or their shapes disagree, the keys stay as they are and a note says why.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from tensorparity.checkpoint import Checkpoint, Entry, TensorEntry, ValueEntry
from tensorparity.checkpoint.layout import RECORD_KEY

__all__ = ["RECORD_KEYS", "leave_out_records", "pair_optimizer_states"]

RECORD_KEYS = (RECORD_KEY, "model_config." + RECORD_KEY)  # the second: a .nemo migrated by earlier versions
_GROUP = re.compile(r"(?:(?P<prefix>.+)\.)?param_groups\.(?P<group>\d+)\.params")
_SHOWN = 3  # pairs named in the note


def _rebuilt(ckpt: Checkpoint, entries: dict[str, Entry]) -> Checkpoint:
    return Checkpoint(source=ckpt.source, format=ckpt.format, entries=entries, sections=ckpt.sections,
                      provenance=ckpt.provenance, notes=ckpt.notes, default_section=ckpt.default_section,
                      placeholders=[p for p in ckpt.placeholders if p.key in entries], structure=ckpt.structure)


def leave_out_records(a: Checkpoint, b: Checkpoint) -> tuple[Checkpoint, Checkpoint, list[str]]:
    """Both sides without tensorparity's migration records, and a note naming where one was.

    Example:
        >>> import torch, tensorparity
        >>> a = tensorparity.open({"w": torch.ones(1), "tensorparity_migrations": "{}"})
        >>> _, _, notes = leave_out_records(a, tensorparity.open({"w": torch.ones(1)}))
        >>> notes
        ["tensorparity's migration record in A left out (--include-records / include_records=True compares it)"]
    """
    where = [name for name, ckpt in (("A", a), ("B", b)) if any(k in ckpt for k in RECORD_KEYS)]
    if not where:
        return a, b, []
    a, b = (_rebuilt(c, {k: e for k, e in c.items() if k not in RECORD_KEYS}) if name in where else c
            for name, c in (("A", a), ("B", b)))
    return a, b, [f"tensorparity's migration record in {' and '.join(where)} left out "
                  "(--include-records / include_records=True compares it)"]


def _roots(ckpt: Checkpoint) -> dict[str, list[list[Any]]]:
    """Optimizer state dicts in ``ckpt``: prefix -> each param group's ``params`` list."""
    found: dict[str, dict[int, list[Any]]] = {}
    for key, entry in ckpt.items():
        m = _GROUP.fullmatch(key)
        if m and isinstance(entry, ValueEntry) and isinstance(entry.value, (list, tuple)):
            found.setdefault(m["prefix"] or "", {})[int(m["group"])] = list(entry.value)
    return {p: [g[i] for i in range(len(g))] for p, g in found.items() if sorted(g) == list(range(len(g)))}


def _keyed_by(groups: list[list[Any]]) -> str | None:
    params = [p for g in groups for p in g]
    if params and all(isinstance(p, int) and not isinstance(p, bool) for p in params):
        return "index"
    if params and all(isinstance(p, str) for p in params):
        return "name"
    return None


def _signature(entry: Entry) -> str:
    return f"tensor {list(entry.shape)}" if isinstance(entry, TensorEntry) else "a value"


def _states(ckpt: Checkpoint, head: str, params: list[Any]) -> dict[str, dict[str, str]] | str:
    """``param -> {field: signature}`` of the state under ``head`` (``optim.state.``), or why not."""
    names = sorted((str(p) for p in params), key=len, reverse=True)  # the longest name that fits
    out: dict[str, dict[str, str]] = {str(p): {} for p in params}
    for key, entry in ckpt.items():
        if not key.startswith(head):
            continue
        rest = key[len(head):]
        param = next((n for n in names if rest.startswith(n + ".")), None)
        if param is None:
            return f"{key} belongs to no parameter of the param groups"
        out[param][rest[len(param) + 1:]] = _signature(entry)
    return out


def _dot(prefix: str) -> str:
    return f"{prefix}." if prefix else ""


def _pair(index: Checkpoint, named: Checkpoint, prefix_i: str, prefix_n: str, gi: list[list[Any]],
          gn: list[list[Any]]) -> dict[str, str] | str:
    """``{index key: name key}`` for the index side, or why they cannot be paired."""
    if [len(g) for g in gi] != [len(g) for g in gn]:
        return (f"parameters per param group differ ({[len(g) for g in gi]} keyed by index, "
                f"{[len(g) for g in gn]} by name)")
    head_i, head = f"{_dot(prefix_i)}state.", f"{_dot(prefix_n)}state."
    order_i, order_n = [p for g in gi for p in g], [p for g in gn for p in g]
    if len(set(order_i)) != len(order_i) or len(set(order_n)) != len(order_n):
        return "a parameter appears twice in the param groups"
    states_i, states_n = _states(index, head_i, order_i), _states(named, head, order_n)
    for found in (states_i, states_n):
        if isinstance(found, str):
            return found
    assert isinstance(states_i, dict) and isinstance(states_n, dict)
    renames: dict[str, str] = {}
    for i, n in zip(order_i, order_n, strict=True):
        si, sn = states_i[str(i)], states_n[n]
        if si != sn:
            diff = sorted(set(si.items()) ^ set(sn.items()))
            field = diff[0][0]
            return (f"{head_i}{i} and {head}{n} differ in '{field}' ({si.get(field, 'missing')} against "
                    f"{sn.get(field, 'missing')})")
        renames.update({f"{head_i}{i}.{f}": f"{head}{n}.{f}" for f in si})
    if prefix_i != prefix_n:  # the param groups' own keys move under the other prefix too
        groups = f"{_dot(prefix_i)}param_groups."
        renames.update({k: _dot(prefix_n) + k[len(_dot(prefix_i)):] for k in index if k.startswith(groups)})
    return renames


def _matches(roots_a: dict[str, list[list[Any]]], roots_b: dict[str, list[list[Any]]]) -> list[tuple[str, str]]:
    """Optimizers to pair, ``(prefix in A, prefix in B)``: those at one prefix keyed the two ways;
    else, when each side holds exactly one optimizer, keyed the two ways, those two."""
    def opposite(pa: str, pb: str) -> bool:
        return {_keyed_by(roots_a[pa]), _keyed_by(roots_b[pb])} == {"index", "name"}

    same = [(p, p) for p in sorted(roots_a.keys() & roots_b.keys()) if opposite(p, p)]
    if same or len(roots_a) != 1 or len(roots_b) != 1:
        return same
    (pa,), (pb,) = roots_a, roots_b
    return [(pa, pb)] if opposite(pa, pb) else []


def pair_optimizer_states(a: Checkpoint, b: Checkpoint) -> tuple[Checkpoint, Checkpoint, list[str]]:
    """Rename the index-keyed side's optimizer state into the name-keyed side's keys, where the
    two sides hold one optimizer at the same prefix keyed the two ways; a note per optimizer.

    Example:
        >>> import torch, tensorparity
        >>> a = tensorparity.open({"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"params": [0]}]})
        >>> b = tensorparity.open({"state": {"w": {"exp_avg": torch.ones(2)}}, "param_groups": [{"params": ["w"]}]})
        >>> a2, b2, notes = pair_optimizer_states(a, b)
        >>> sorted(a2) == sorted(b2), notes[0][:60]
        (True, "optimizer state 'state': A's is keyed by parameter index, B'")
    """
    roots_a, roots_b = _roots(a), _roots(b)
    notes: list[str] = []
    for pa, pb in _matches(roots_a, roots_b):
        a_indexed = _keyed_by(roots_a[pa]) == "index"
        index, named = (a, b) if a_indexed else (b, a)
        prefix_i, prefix_n = (pa, pb) if a_indexed else (pb, pa)
        gi, gn = (roots_a[pa], roots_b[pb]) if a_indexed else (roots_b[pb], roots_a[pa])
        where = f"'{_dot(prefix_i)}state'" + ("" if pa == pb else f" and '{_dot(prefix_n)}state'")
        side_i, side_n = ("A", "B") if a_indexed else ("B", "A")
        renames = _pair(index, named, prefix_i, prefix_n, gi, gn)
        if isinstance(renames, str):
            notes.append(f"optimizer state {where}: {side_i}'s is keyed by parameter index, {side_n}'s by name; "
                         f"not paired, as {renames}; their keys are listed as only in A / only in B")
            continue
        head = f"{_dot(prefix_i)}param_groups."
        entries: dict[str, Entry] = {}
        for key, entry in index.items():
            new = renames.get(key, key)
            if _GROUP.fullmatch(key) and key.startswith(head) and isinstance(entry, ValueEntry):
                entry = replace(entry, value=list(gn[int(key[len(head):].split(".")[0])]))
            entries[new] = entry if new == key else replace(entry, key=new)
        renamed = _rebuilt(index, entries)
        a, b = (renamed, b) if a_indexed else (a, renamed)
        order_i, order_n = [p for g in gi for p in g], [p for g in gn for p in g]
        shown = ", ".join(f"{i} ↔ {n}" for i, n in list(zip(order_i, order_n))[:_SHOWN])
        more = f", … {len(order_i)} parameters" if len(order_i) > _SHOWN else ""
        notes.append(f"optimizer state {where}: {side_i}'s is keyed by parameter index, {side_n}'s by name; paired "
                     f"through the param groups' order ({shown}{more}) and compared under {side_n}'s keys")
    return a, b, notes
