"""Apply a mapping to a checkpoint: a lazy checkpoint in the other key space, or a converted file.

Planning reads metadata only. Every key is claimed by at most one rule, every rule's transform
runs once on ``meta`` tensors to learn the output shapes, and every problem (a key two rules
claim, a key two rules produce, a missing partner of a concat, a pattern that does not fit a
shape) is raised together before any tensor is read. The result's tensor entries stay lazy:
loading one loads its source entries and applies the transform.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from tensorparity.checkpoint import Checkpoint, Entry, PlaceholderInfo, TensorEntry, ValueEntry
from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.errors import UsageError
from tensorparity.mapping.loader import load_mapping
from tensorparity.mapping.rules import Bindings, Mapping, MappingError, MappingProblem, Rule
from tensorparity.mapping.transforms import Transform

__all__ = ["MappedResult", "apply_mapping", "convert"]

Direction = Literal["a_to_b", "b_to_a"]
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class MappedResult:
    """What applying a mapping gave.

    Attributes:
        checkpoint: the source's entries in the other key space (tensors still lazy).
        mapping: the mapping as applied (inverted for ``b_to_a``), bound to the source: its
            transforms record concat sizes, reshape shapes and cast dtypes, so it inverts. Rule
            groups whose transforms learned different things (a reshape of weight and bias)
            get one literal rule each.
        direction: ``a_to_b`` or ``b_to_a``.
        claims: target key -> the source key(s) it was made from.
        rule_of: target key -> index in ``mapping.rules`` of the rule that made it (``None``:
            passed through).
        unmapped: source keys no rule claimed (and not passed through), or outside the prefix.
        ignored: source keys an ignore pattern matched.
        passed_through: source keys that kept their name because no rule claimed them.
        unused_rules: indices of rules of the mapping given that claimed no key (often a typo).
    """

    checkpoint: Checkpoint
    mapping: Mapping
    direction: Direction
    claims: dict[str, tuple[str, ...]]
    rule_of: dict[str, int | None]
    unmapped: tuple[str, ...]
    ignored: tuple[str, ...]
    passed_through: tuple[str, ...]
    unused_rules: tuple[int, ...] = ()

    def summary(self) -> str:
        """One line: how many keys were mapped, transformed, passed through, left out.

        Example:
            >>> import torch
            >>> from tensorparity.mapping import Mapping, Rule
            >>> apply_mapping({"a": torch.ones(1), "b": torch.ones(1)}, Mapping([Rule("a", "x")])).summary()
            '2 keys -> 2: 1 renamed, 0 transformed, 1 passed through, 0 ignored, 0 unmapped'
        """
        transformed = sum(1 for i in self.rule_of.values()
                          if i is not None and self.mapping.rules[i].transform is not None)
        renamed = sum(1 for i in self.rule_of.values() if i is not None) - transformed
        sources = len(self.ignored) + len(self.unmapped) + len({s for srcs in self.claims.values() for s in srcs})
        text = (f"{sources} keys -> {len(self.claims)}: {renamed} renamed, {transformed} transformed, "
                f"{len(self.passed_through)} passed through, {len(self.ignored)} ignored, "
                f"{len(self.unmapped)} unmapped")
        if self.unused_rules:
            text += f"; rules that matched nothing: {', '.join(f'rules[{i}]' for i in self.unused_rules)}"
        return text


def _fold(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


_EINOPS_PREAMBLE = re.compile(r'^Error while processing [\w-]+ pattern "[^"]*"\. Input tensor shape: .*?\. '
                              r"(?:Additional info: \{[^}]*\}\. )?(?:Shape mismatch, )?")


def _einops_reason(text: str) -> str:
    """einops' error without what the message says already (the pattern, the shape, the sizes).

    Example:
        >>> _einops_reason('Error while processing rearrange-reduction pattern "(h d) c -> h d c". '
        ...                "Input tensor shape: torch.Size([12, 4]). Additional info: {'h': 5}. "
        ...                "Shape mismatch, can't divide axis of length 12 in chunks of 5")
        "can't divide axis of length 12 in chunks of 5"
    """
    text = " ".join(text.split())
    return _fold(_EINOPS_PREAMBLE.sub("", text) or text)


def _others(keys: Sequence[str]) -> str:
    """The keys after the first, each cut after the first component where it differs from the
    first: ``layers.1, layers.2, … layers.7 (8 in all)``.

    Example:
        >>> _others([f"layers.{i}.attn.w" for i in range(8)])
        'layers.1, layers.2, … layers.7 (8 in all)'
    """
    head = keys[0].split(".")

    def short(key: str) -> str:
        parts = key.split(".")
        j = next((j for j, (x, y) in enumerate(zip(parts, head)) if x != y), min(len(parts), len(head)))
        return ".".join(parts[:j + 1])

    def natural(key: str) -> list[tuple[int, int | str]]:  # layers.2 before layers.10
        return [(0, int(p)) if p.isascii() and p.isdigit() else (1, p) for p in key.split(".")]

    rest = [short(k) for k in sorted(keys[1:], key=natural)]
    shown = ", ".join(rest) if len(rest) <= 3 else f"{rest[0]}, {rest[1]}, … {rest[-1]}"
    return f"{shown} ({len(keys)} in all)"


def _describe(e: Entry) -> str:
    if isinstance(e, TensorEntry):
        return f"{e.key!r} {list(e.shape)} {str(e.dtype).removeprefix('torch.')}"
    return f"{e.key!r} (a {type(e.value).__name__} value)"


def _transformed_loader(sources: tuple[TensorEntry, ...], transform: Transform,
                        index: int) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        return transform.apply([e.load() for e in sources])[index]

    return load


class _Planner:
    """Walks the source keys once; collects entries, claims and every problem."""

    def __init__(self, ckpt: Checkpoint, mapping: Mapping) -> None:
        self.ckpt, self.m = ckpt, mapping
        self.problems: list[MappingProblem] = []
        self.repeats: dict[tuple[Any, ...], int] = {}  # what makes problems the same -> the first's index
        self.keys_of: dict[int, list[str]] = {}
        self.entries: dict[str, Entry] = {}
        self.claims: dict[str, tuple[str, ...]] = {}
        self.rule_of: dict[str, int | None] = {}
        self.unmapped: list[str] = []
        self.ignored: list[str] = []
        self.passed: list[str] = []
        self.bound: dict[int, dict[Transform, list[Bindings]]] = {}
        self.group_of: dict[str, Bindings] = {}

    def problem(self, message: str, fix: str, rule: int | None = None, *, key: str | None = None,
                same: tuple[Any, ...] | None = None) -> None:
        """Record a problem. Problems of one rule that are ``same`` but for their ``key`` (one per
        layer of a templated rule) become one, naming the first key and the others it repeats for."""
        if same is not None and key is not None:
            first = self.repeats.setdefault((rule, *same), len(self.problems))
            self.keys_of.setdefault(first, []).append(key)
            if first != len(self.problems):
                return
        r = self.m.rules[rule] if rule is not None else None
        self.problems.append(MappingProblem(message, fix, self.m.source, r.line if r else None, rule,
                                            r.short() if r else None))

    def grouped_problems(self) -> list[MappingProblem]:
        """The problems, each repeated one once: ``<message> (the same for layers.1, layers.2, …
        layers.31 (32 in all))``, the rule's template left out (the key says which it is), every
        key in ``MappingProblem.keys``."""
        out = list(self.problems)
        for i, keys in self.keys_of.items():
            p = out[i]
            out[i] = (replace(p, keys=tuple(keys)) if len(keys) == 1 else
                      replace(p, message=f"{p.message} (the same for {_others(keys)})", rule_text=None,
                              keys=tuple(keys)))
        return out

    def run(self) -> None:
        m = self.m
        groups: dict[tuple[int, Bindings], dict[int, str]] = {}
        order: list[tuple[int, Bindings] | str] = []
        for key in self.ckpt:
            if m.ignored(key):
                self.ignored.append(key)
            elif not key.startswith(m.prefix_a):
                self.unmapped.append(key)
            else:
                found = m.claims(key[len(m.prefix_a):])
                if len(found) > 1:
                    names = sorted({f"rules[{i}]" for i, _, _ in found})
                    self.problem(f"key {key!r} is claimed by {' and '.join(names)}" if len(names) > 1 else
                                 f"key {key!r} fits several a keys of {names[0]}",
                                 "make the templates disjoint, or mark the general rule `fallback: true`",
                                 found[-1][0], key=key, same=("claimed", tuple(names)))
                elif found:
                    i, pos, bindings = found[0]
                    if (i, bindings) not in groups:
                        groups[(i, bindings)] = {}
                        order.append((i, bindings))
                    groups[(i, bindings)][pos] = key
                elif m.passthrough:
                    order.append(key)
                else:
                    self.unmapped.append(key)
        for item in order:
            if isinstance(item, str):
                self.emit((m.prefix_b + item[len(m.prefix_a):],), (self.ckpt[item],), None, None)
            else:
                self.group(item[0], item[1], groups[item])

    def group(self, i: int, bindings: Bindings, members: dict[int, str]) -> None:
        m, rule = self.m, self.m.rules[i]
        sources = [m.prefix_a + s for s in rule.sources(bindings)]
        missing = [s for pos, s in enumerate(sources) if pos not in members]
        if missing:
            have = members[min(members)]
            why = "is ignored" if any(s in self.ckpt for s in missing) else "is not in the checkpoint"
            self.problem(f"{have!r} needs its partner(s) {', '.join(map(repr, missing))}, which {why}",
                         "check the rule's a keys, or ignore the whole group", i, key=have,
                         same=("partner", min(members), tuple(p for p in range(len(sources)) if p not in members), why))
            return
        entries = tuple(self.ckpt[s] for s in sources)
        targets = tuple(m.prefix_b + t for t in rule.targets(bindings))
        self.emit(targets, entries, i, rule, bindings)

    def emit(self, targets: tuple[str, ...], entries: tuple[Entry, ...], i: int | None,
             rule: Rule | None = None, bindings: Bindings = ()) -> None:
        for t in targets:
            if t in self.claims:
                before = self.rule_of[t]
                who = f"rules[{before}]" if before is not None else "passing through unchanged"
                now = f"rules[{i}]" if i is not None else "passing through unchanged"
                self.problem(f"{t!r} is produced twice: by {who} from {', '.join(map(repr, self.claims[t]))} and by "
                             f"{now} from {', '.join(repr(e.key) for e in entries)}",
                             "rename one of them, or ignore one source key", i if i is not None else before)
                return
        src_keys = tuple(e.key for e in entries)
        if i is None:
            self.passed.extend(src_keys)
        if rule is None or rule.transform is None:
            for t, e in zip(targets, entries):
                self.entries[t] = _renamed(t, e)
        else:
            assert i is not None
            built = self.transformed(targets, entries, i, rule.transform)
            if built is None:
                return
            self.bound.setdefault(i, {}).setdefault(built, []).append(bindings)
        for t in targets:
            self.claims[t] = src_keys
            self.rule_of[t] = i
            self.group_of[t] = bindings

    def transformed(self, targets: tuple[str, ...], entries: tuple[Entry, ...], i: int,
                    transform: Transform) -> Transform | None:
        values = [e for e in entries if not isinstance(e, TensorEntry)]
        if values:
            self.problem(f"the transform needs tensors, but {_describe(values[0])} is not one",
                         "drop the transform from this rule, or ignore the key", i, key=values[0].key,
                         same=("values", type(values[0].value).__name__))
            return None
        tensors: tuple[TensorEntry, ...] = entries  # type: ignore[assignment]
        metas = [torch.empty(e.shape, dtype=e.dtype, device="meta") for e in tensors]
        try:
            bound = transform.bind(metas)
            outs = bound.apply(metas)
        except Exception as exc:  # noqa: BLE001 - einops/torch say precisely what does not fit
            shapes = ", ".join(_describe(e) for e in tensors)
            why = _einops_reason(str(exc))
            self.problem(f"{transform.describe()} does not fit {shapes}: {why}",
                         "correct the transform's dims/axis sizes, or narrow the rule's keys", i,
                         key=tensors[0].key, same=("fit", tuple((e.shape, e.dtype) for e in tensors), why))
            return None
        if len(outs) != len(targets):
            self.problem(f"{transform.describe()} made {len(outs)} tensor(s) for {len(targets)} b key(s)",
                         "give the transform as many outputs as b keys", i, key=tensors[0].key,
                         same=("outputs", len(outs), len(targets)))
            return None
        first = tensors[0]
        where = f"{bound.describe()} of {', '.join(e.key for e in tensors)}"
        for j, (t, out) in enumerate(zip(targets, outs)):
            self.entries[t] = TensorEntry(t, tuple(out.shape), out.dtype, out.numel() * out.element_size(), where,
                                          _transformed_loader(tensors, bound, j), first.requires_grad,
                                          first.is_parameter, first.note)
        return bound

    def bound_mapping(self) -> tuple[Mapping, dict[str, int | None]]:
        """The mapping with what its transforms learned from this checkpoint, and ``rule_of``
        pointing into it."""
        rules: list[Rule] = []
        moved: dict[tuple[int, Bindings], int] = {}
        index: dict[int, int] = {}
        for i, rule in enumerate(self.m.rules):
            seen = self.bound.get(i)
            if not seen or len(seen) == 1:
                index[i] = len(rules)
                rules.append(rule if not seen else Rule(rule.a, rule.b, next(iter(seen)), rule.regex, rule.fallback,
                                                        rule.line, rule.note))
                continue
            # Groups learned different things (a reshape of weight and of bias): one literal rule per group.
            for transform, all_bindings in seen.items():
                for b in all_bindings:
                    moved[(i, b)] = len(rules)
                    rules.append(Rule(tuple(map(_literal, rule.sources(b))), tuple(map(_literal, rule.targets(b))),
                                      transform, False, rule.fallback, rule.line, rule.note))
        rule_of = {t: None if i is None else moved.get((i, self.group_of[t]), index.get(i, i))
                   for t, i in self.rule_of.items()}
        return self.m.with_rules(rules), rule_of


def _literal(key: str) -> str:
    return key.replace("{", "{{").replace("}", "}}")


def _renamed(key: str, e: Entry) -> Entry:
    if isinstance(e, ValueEntry):
        return ValueEntry(key, e.value)
    # The same bytes under another key: where they lie (and the check before reading them) stays.
    return replace(e, key=key)


def _sections(ckpt: Checkpoint, claims: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Re-derive sections for the new keys: the shortest prefixes whose keys share one section."""
    if not ckpt.sections:
        return {}
    of = {t: ckpt.section_of(src[0]) for t, src in claims.items()}
    out: dict[str, str] = {}

    def assign(keys: Sequence[str], depth: int) -> None:
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(".".join(k.split(".")[:depth]), []).append(k)
        for prefix, ks in groups.items():
            names = {of[k] for k in ks}
            if len(names) == 1 or all(k.count(".") < depth for k in ks):
                out[prefix] = of[ks[0]]
            else:
                assign(ks, depth + 1)

    assign(list(of), 1)
    return out


def apply_mapping(ckpt: Checkpoint | Any, mapping: Mapping | dict[str, Any] | str | Path, *,
                  direction: Direction = "a_to_b") -> MappedResult:
    """Apply a mapping to a checkpoint: its entries, renamed and transformed into the other key space.

    Nothing is read but metadata: tensor entries of the result load their source entries and
    apply the transform when loaded. Every problem is raised together as one :class:`MappingError`.

    Args:
        ckpt: a :class:`Checkpoint`, or anything :func:`tensorparity.open` accepts.
        mapping: a :class:`Mapping`, its dict, or a YAML file's path.
        direction: ``a_to_b``, or ``b_to_a`` to apply the inverted mapping to a side-B checkpoint.

    Example:
        >>> import torch
        >>> from tensorparity.mapping import Mapping, Rule
        >>> m = Mapping([Rule(["q.w", "k.w"], "qk.w", {"concat": {"dim": 0}})])
        >>> r = apply_mapping({"q.w": torch.ones(2, 3), "k.w": torch.zeros(1, 3), "b": torch.ones(1)}, m)
        >>> r.checkpoint["qk.w"].shape, r.claims["qk.w"], r.passed_through
        ((3, 3), ('q.w', 'k.w'), ('b',))
    """
    if direction not in ("a_to_b", "b_to_a"):
        raise UsageError(f"unknown direction {direction!r}", fix="use 'a_to_b' or 'b_to_a'")
    mapping = load_mapping(mapping)
    used = mapping if direction == "a_to_b" else mapping.inverted()
    opened = open_checkpoint(ckpt)
    planner = _Planner(opened, used)
    planner.run()
    if planner.problems:
        raise MappingError(planner.grouped_problems(), path=used.source)
    rename: dict[str, str] = {}
    for target, sources in planner.claims.items():
        for s in sources:
            rename.setdefault(s, target)
    placeholders = [PlaceholderInfo(rename.get(p.key, p.key), p.name, p.call) for p in opened.placeholders]
    result = Checkpoint(
        source=opened.source, format=opened.format, entries=planner.entries,
        sections=_sections(opened, planner.claims), provenance={**opened.provenance, "mapping": used.name},
        placeholders=placeholders,
        notes=[*opened.notes, f"keys mapped by {used.name!r} ({direction.replace('_', ' ')})"],
        closers=[] if opened is ckpt else [opened.close], default_section=opened.default_section,
        structure=opened.structure)
    used_rules = set(planner.rule_of.values())
    unused = tuple(i for i in range(len(used.rules)) if i not in used_rules)
    bound, rule_of = planner.bound_mapping()
    return MappedResult(result, bound, direction, planner.claims, rule_of,
                        tuple(planner.unmapped), tuple(planner.ignored), tuple(planner.passed), unused)
