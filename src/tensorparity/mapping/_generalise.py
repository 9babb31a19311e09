"""Turn pairs of keys into mapping rules a human can read: templates over layer indices.

Each pair is generalised every way its numeric components allow (``layers.3.ffn.0.weight`` ->
``blocks.3.fc1.weight`` may be ``layers.{i}.ffn.0.weight`` or ``layers.0.ffn.{i}.weight``); the
way most pairs share wins, and pairs that agree on (templates, transform) become one rule when
that rule claims exactly their keys on both sides and nothing else (:func:`generalise`). Rules
that differ only in their last component (``weight``/``bias``) merge into one with ``{p}``.
Everything else stays an explicit rule. :func:`build_mapping` then applies the mapping to A's
metadata and spells out (or drops) any rule that does not do what its pairs say.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tensorparity.checkpoint import Checkpoint
from tensorparity.mapping.apply import MappedResult, apply_mapping
from tensorparity.mapping.rules import Mapping, MappingError, Rule
from tensorparity.mapping.templates import Template
from tensorparity.mapping.transforms import Transform

__all__ = ["Draft", "Pair", "build_mapping", "generalise", "literal", "literal_drafts", "transform_sig"]


class Pair(Protocol):
    """What :func:`generalise` needs of a pair (bare keys): :class:`~._content.Match` has it."""

    @property
    def a(self) -> tuple[str, ...]: ...
    @property
    def b(self) -> tuple[str, ...]: ...
    @property
    def transform(self) -> Transform | None: ...
    @property
    def confidence(self) -> str: ...
    @property
    def note(self) -> str: ...


_SLOTS = ("i", "j")
_MAX_NUMERIC = 4  # numeric components of a key considered for placeholders
_MAX_WAYS = 8  # ways to place the placeholders in the other keys of a pair


@dataclass
class Draft:
    """A rule being built: its templates, transform, and the pairs it stands for."""

    a: tuple[str, ...]
    b: tuple[str, ...]
    transform: Transform | None
    members: list[Pair] = field(default_factory=list)

    @property
    def templated(self) -> bool:
        return any(_has_slot(t) for t in self.a)


def literal(key: str) -> str:
    """A key as a template that matches only itself."""
    return key.replace("{", "{{").replace("}", "}}")


def _has_slot(template: str) -> bool:
    return "{" in template.replace("{{", "").replace("}}", "")


def transform_sig(t: Transform | None) -> str:
    return "" if t is None else json.dumps(t.to_dict(), sort_keys=True, default=str)


def literal_drafts(members: Iterable[Pair]) -> list[Draft]:
    return [Draft(tuple(map(literal, m.a)), tuple(map(literal, m.b)), m.transform, [m]) for m in members]


def _ways(m: Pair) -> list[tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]]:
    """Every way to generalise one pair: ``(a templates, b templates, positions in its first key)``."""
    keys = [k.split(".") for k in m.a + m.b]
    n_a = len(m.a)
    out: list[tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]] = [
        (tuple(map(literal, m.a)), tuple(map(literal, m.b)), ())]
    numeric = [p for p, c in enumerate(keys[0]) if c.isdigit()][:_MAX_NUMERIC]
    for r in (1, 2):
        for chosen in itertools.combinations(numeric, r):
            values = [keys[0][p] for p in chosen]
            per_key: list[list[tuple[int, ...]]] = [[chosen]]
            for parts in keys[1:]:
                where = [[q for q, c in enumerate(parts) if c == v] for v in values]
                per_key.append([c for c in itertools.product(*where) if len(set(c)) == r])
            for combo in itertools.islice(itertools.product(*per_key), _MAX_WAYS):
                templates = []
                for parts, spots in zip(keys, combo):
                    named = [literal(c) for c in parts]
                    for slot, q in zip(_SLOTS, spots):
                        named[q] = "{" + slot + "}"
                    templates.append(".".join(named))
                out.append((tuple(templates[:n_a]), tuple(templates[n_a:]), chosen))
    return out


class _Claims:
    """Which keys of a side a set of templates claims (keys bucketed by their number of dots)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.buckets: dict[int, list[str]] = defaultdict(list)
        for k in keys:
            self.buckets[k.count(".")].append(k)

    def __call__(self, templates: Sequence[str]) -> set[str]:
        hits: set[str] = set()
        for text in templates:
            t = Template(text)
            hits.update(k for k in self.buckets.get(text.count("."), ()) if t.match(k) is not None)
        return hits


def generalise(matches: Sequence[Pair], keys_a: Iterable[str], keys_b: Iterable[str],
               order_a: dict[str, int]) -> list[Draft]:
    """Drafts for ``matches`` (bare keys), templated where that claims exactly their keys.

    Example:
        >>> from tensorparity.mapping._content import Match
        >>> ms = [Match((f"l.{i}.w",), (f"b.{i}.w",), None, "identical", "high") for i in range(3)]
        >>> [(d.a, d.b) for d in generalise(ms, [m.a[0] for m in ms], [m.b[0] for m in ms], {})]
        [(('l.{i}.w',), ('b.{i}.w',))]
    """
    claims_a, claims_b = _Claims(keys_a), _Claims(keys_b)
    ways = [_ways(m) for m in matches]
    support: Counter[tuple[tuple[str, ...], tuple[str, ...], str]] = Counter()
    for m, w in zip(matches, ways):
        support.update({(a, b, transform_sig(m.transform)) for a, b, _ in w})
    groups: dict[tuple[tuple[str, ...], tuple[str, ...], str], list[Pair]] = {}
    for m, w in zip(matches, ways):
        sig_of = {id(x): (x[0], x[1], transform_sig(m.transform)) for x in w}
        best = max(w, key=lambda x: (support[sig_of[id(x)]], len(x[2]), tuple(-p for p in x[2])))
        groups.setdefault(sig_of[id(best)], []).append(m)
    drafts: list[Draft] = []
    for (a, b, _), members in groups.items():
        draft = Draft(a, b, members[0].transform, members)
        if draft.templated and _exact(draft, claims_a, claims_b):
            drafts.append(draft)
        else:
            drafts.extend(literal_drafts(members))
    drafts = _merge_suffix(drafts, claims_a, claims_b)
    return sorted(drafts, key=lambda d: min(order_a.get(k, 0) for m in d.members for k in m.a))


def _exact(d: Draft, claims_a: _Claims, claims_b: _Claims) -> bool:
    """The draft's templates claim exactly its members' keys, on both sides."""
    want_a = {k for m in d.members for k in m.a}
    want_b = {k for m in d.members for k in m.b}
    return claims_a(d.a) == want_a and claims_b(d.b) == want_b


def _merge_suffix(drafts: list[Draft], claims_a: _Claims, claims_b: _Claims) -> list[Draft]:
    """Drafts that differ only in one shared last component (``weight``/``bias``) -> one ``{p}`` draft."""
    groups: dict[tuple[tuple[str, ...], tuple[str, ...], str], list[int]] = defaultdict(list)
    for n, d in enumerate(drafts):
        ends = {t.rpartition(".")[2] for t in d.a + d.b}
        if len(ends) != 1 or any("." not in t for t in d.a + d.b) or "{" in next(iter(ends)) or "}" in next(iter(ends)):
            continue
        stems = (tuple(t.rpartition(".")[0] for t in d.a), tuple(t.rpartition(".")[0] for t in d.b))
        groups[(*stems, transform_sig(d.transform))].append(n)
    replaced: dict[int, Draft | None] = {}
    for (stem_a, stem_b, _), ns in groups.items():
        if len(ns) < 2:
            continue
        members = [m for n in ns for m in drafts[n].members]
        merged = Draft(tuple(s + ".{p}" for s in stem_a), tuple(s + ".{p}" for s in stem_b), drafts[ns[0]].transform,
                       members)
        if _exact(merged, claims_a, claims_b):
            replaced.update({n: None for n in ns})
            replaced[ns[0]] = merged
    return [replaced.get(n, d) for n, d in enumerate(drafts) if replaced.get(n, d) is not None]  # type: ignore[misc]


# --- checking ----------------------------------------------------------------------------------------

def _rule(d: Draft) -> Rule:
    return Rule(d.a, d.b, d.transform)


def build_mapping(drafts: list[Draft], side_a: Checkpoint, side_b: Checkpoint, prefix_a: str, prefix_b: str,
           ignore_a: list[str], ignore_b: list[str]) -> tuple[Mapping, list[Draft], list[Pair]]:
    """The mapping, checked by applying it to A's metadata: a templated rule that does not do
    what its pairs say becomes explicit rules; an explicit rule that fails is dropped (its keys
    are then reported unmatched). Each round removes a template or a rule, so this ends."""
    dropped: list[Pair] = []
    while True:
        rules, bad = [], set()
        for n, d in enumerate(drafts):
            try:
                rules.append(_rule(d))
            except MappingError:
                bad.add(n)
        if not bad:
            try:
                mapping = Mapping(tuple(rules), tuple(ignore_a), tuple(ignore_b), prefix_a, prefix_b, True, "suggested")
                result = apply_mapping(side_a, mapping)
            except MappingError as exc:
                bad = {p.rule for p in exc.problems if p.rule is not None and p.rule < len(drafts)}
                bad = bad or {n for n, d in enumerate(drafts) if d.templated} or set(range(len(drafts)))
            else:
                bad = {n for n, d in enumerate(drafts) if not _made(d, result, side_b, prefix_a, prefix_b)}
                result.checkpoint.close()
                if not bad:
                    return mapping, drafts, dropped
        drafts, lost = _explicit(drafts, bad)
        dropped += lost


def _made(d: Draft, result: MappedResult, side_b: Checkpoint, prefix_a: str, prefix_b: str) -> bool:
    """Whether the applied mapping makes each of the draft's B keys from its A keys, in B's shape."""
    for m in d.members:
        for kb in m.b:
            made = result.checkpoint.get(prefix_b + kb)
            if (result.claims.get(prefix_b + kb) != tuple(prefix_a + k for k in m.a) or made is None
                    or getattr(made, "shape", None) != getattr(side_b[prefix_b + kb], "shape", None)):
                return False
    return True


def _explicit(drafts: list[Draft], bad: set[int]) -> tuple[list[Draft], list[Pair]]:
    """Templated drafts in ``bad`` become one explicit draft per pair; explicit ones are dropped."""
    out: list[Draft] = []
    lost: list[Pair] = []
    for n, d in enumerate(drafts):
        if n not in bad:
            out.append(d)
        elif d.templated or len(d.members) > 1:
            out.extend(literal_drafts(d.members))
        else:
            lost.extend(d.members)
    return out, lost
