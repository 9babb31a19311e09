"""The data model of a mapping between two key spaces: :class:`Mapping`, :class:`Rule`, and
:class:`MappingError`, which reports every problem of a mapping at once.

Rules name keys with templates (:mod:`.templates`: ``layers.{i}.attn.{p}``). A rule with
``regex: true`` holds a Python regular expression (matched against the whole key) and a
replacement using ``\\1`` / ``\\g<name>``; such a rule maps one way only.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorparity.errors import UsageError
from tensorparity.mapping.templates import Template, _Invalid
from tensorparity.mapping.transforms import Transform, TransformSpecError

if TYPE_CHECKING:
    from tensorparity.checkpoint import Checkpoint

__all__ = ["Mapping", "MappingError", "MappingProblem", "Rule"]

Bindings = tuple[tuple[str, str], ...]


# --- problems ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MappingProblem:
    """One thing wrong with a mapping: what, where (file, line, rule) and how to fix it."""

    message: str
    fix: str
    source: str | None = None
    line: int | None = None
    rule: int | None = None  # index into Mapping.rules, shown as rules[i]
    rule_text: str | None = None
    keys: tuple[str, ...] = ()  # every key a repeated problem was found at (one per layer), the first named

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.source, self.line) if p is not None)
        if self.rule is not None:
            where = f"{where}: rules[{self.rule}]" if where else f"rules[{self.rule}]"
            if self.rule_text:
                where += f" ({self.rule_text})"
        text = f"{where}: {self.message}" if where else self.message
        return " ".join(f"{text}; fix: {self.fix}".split())


class MappingError(UsageError):
    """A mapping is wrong; ``problems`` lists everything found, each with its file, line and fix.

    Unlike other errors its text has one line per problem, so a mapping is fixed in one pass.

    Example:
        >>> problem = MappingProblem("unknown field 'trasform'", "write transform", "m.yaml", 4, 0)
        >>> err = MappingError([problem], path="m.yaml")
        >>> print(err)
        m.yaml: 1 problem in the mapping, nothing was compared
          - m.yaml:4: rules[0]: unknown field 'trasform'; fix: write transform
    """

    def __init__(self, problems: Sequence[MappingProblem], *, path: str | Path | None = None) -> None:
        self.problems = tuple(problems)
        n = len(self.problems)
        fix = self.problems[0].fix if n == 1 else "fix each problem listed"
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in the mapping, nothing was compared",
                         path=path, fix=fix)

    def _render(self) -> str:
        head = f"{self.path}: {self.message}" if self.path else self.message
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


# --- rules ---------------------------------------------------------------------------------------

def _keys(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class Rule:
    """Keys ``a`` of side A become keys ``b`` of side B, through an optional transform.

    Several keys on a side mean a concat (A) or a split (B); ``transform`` may also be given as
    its spec (``{"concat": {"dim": 0}}``). ``fallback`` rules only take keys no other rule takes;
    ``line`` is where the rule was written (for messages); ``note`` is free text for humans.

    Example:
        >>> from tensorparity.mapping import Concat
        >>> r = Rule(["l.{i}.q.{p}", "l.{i}.k.{p}"], "l.{i}.qk.{p}", Concat(0))
        >>> r.targets(r.match("l.0.k.bias")[0][1])
        ('l.0.qk.bias',)
    """

    a: tuple[str, ...]
    b: tuple[str, ...]
    transform: Transform | None = None
    regex: bool = False
    fallback: bool = False
    line: int | None = field(default=None, compare=False)
    note: str | None = field(default=None, compare=False)
    _a: tuple[Template, ...] = field(init=False, compare=False, repr=False, default=())
    _b: tuple[Template, ...] = field(init=False, compare=False, repr=False, default=())
    _re: re.Pattern[str] | None = field(init=False, compare=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if isinstance(self.transform, (dict, list)):  # a spec, as a YAML file would give it
            from tensorparity.mapping.loader import transform_from_dict  # lazy: sugar over a module built on Mapping

            try:
                object.__setattr__(self, "transform", transform_from_dict(self.transform))
            except TransformSpecError as exc:
                raise MappingError([MappingProblem(exc.message, exc.fix, line=self.line)]) from None
        object.__setattr__(self, "a", _keys(self.a))
        object.__setattr__(self, "b", _keys(self.b))
        problems = [MappingProblem(e.message, e.fix, line=self.line, rule_text=self.short()) for e in self._compile()]
        if problems:
            raise MappingError(problems)

    def _compile(self) -> list[_Invalid]:
        errors: list[_Invalid] = []
        if not self.a or not self.b:
            return [_Invalid("a rule needs at least one key on each side", "give both a and b")]
        if self.regex:
            return self._compile_regex()
        templates: dict[str, list[Template]] = {"a": [], "b": []}
        for side in ("a", "b"):
            for text in getattr(self, side):
                try:
                    templates[side].append(Template(text))
                except _Invalid as exc:
                    errors.append(exc)
        if errors:
            return errors
        ta, tb = templates["a"], templates["b"]
        first = ta[0]
        for t in ta[1:] + tb:
            if t.slots != first.slots:
                errors.append(_Invalid(
                    f"placeholders of {t.text!r} ({_slots(t)}) differ from those of {first.text!r} ({_slots(first)})",
                    "use the same placeholders, of the same kind, in every key of the rule"))
        if len(set(self.a)) != len(self.a) or len(set(self.b)) != len(self.b):
            errors.append(_Invalid("a key appears twice on one side", "list each key once"))
        object.__setattr__(self, "_a", tuple(ta))
        object.__setattr__(self, "_b", tuple(tb))
        return errors + self._fit()

    def _compile_regex(self) -> list[_Invalid]:
        if len(self.a) != 1 or len(self.b) != 1:
            return [_Invalid("a regex rule maps one key to one key", "write a template rule for concat/split")]
        try:
            pattern = re.compile(self.a[0])
        except re.error as exc:
            return [_Invalid(f"regex {self.a[0]!r} does not compile: {exc}", "fix the regular expression")]
        errors = []
        for ref in re.findall(r"\\(\d+)|\\g<(\w+)>", self.b[0]):
            num, name = ref
            ok = int(num) <= pattern.groups if num else (name in pattern.groupindex or
                                                        (name.isdigit() and int(name) <= pattern.groups))
            if not ok:
                errors.append(_Invalid(f"replacement {self.b[0]!r} refers to group {num or name}, which "
                                       f"{self.a[0]!r} does not have", "refer only to the regex's groups"))
        object.__setattr__(self, "_re", pattern)
        return errors + self._fit()

    def _fit(self) -> list[_Invalid]:
        if self.transform is None:
            if len(self.a) != len(self.b):
                return [_Invalid(f"{len(self.a)} a key(s) and {len(self.b)} b key(s) need a transform",
                                 "add transform: {concat: {dim: 0}} (several a keys) or "
                                 "{split: {dim: 0}} (several b keys)")]
            return []
        try:
            object.__setattr__(self, "transform", self.transform.fit(len(self.a), len(self.b)))
        except TransformSpecError as exc:
            return [_Invalid(exc.message, exc.fix)]
        return []

    # Matching
    def match(self, key: str) -> list[tuple[int, Bindings]]:
        """``(position in a, bindings)`` for each a key of this rule that ``key`` fits."""
        if self._re is not None:
            return [(0, (("", key),))] if self._re.fullmatch(key) else []
        out = []
        for pos, t in enumerate(self._a):
            values = t.match(key)
            if values is not None:
                out.append((pos, tuple(sorted(values.items()))))
        return out

    def sources(self, bindings: Bindings) -> tuple[str, ...]:
        """The a keys of the group these bindings name."""
        if self._re is not None:
            return (bindings[0][1],)
        return tuple(t.format(dict(bindings)) for t in self._a)

    def targets(self, bindings: Bindings) -> tuple[str, ...]:
        """The b keys of the group these bindings name."""
        if self._re is not None:
            m = self._re.fullmatch(bindings[0][1])
            assert m is not None
            return (m.expand(self.b[0]),)
        return tuple(t.format(dict(bindings)) for t in self._b)

    def inverted(self) -> Rule:
        """The rule from B to A; raises ``TransformSpecError`` when it has no inverse."""
        if self.regex:
            raise TransformSpecError("a regex rule maps one way only",
                                     "write it as a template rule ({name} placeholders), which inverts")
        transform = self.transform.inverse() if self.transform is not None else None
        return Rule(self.b, self.a, transform, False, self.fallback, self.line, self.note)

    @property
    def lossy(self) -> bool:
        return self.transform is not None and self.transform.lossy

    def short(self) -> str:
        a = self.a[0] + (f" +{len(self.a) - 1}" if len(self.a) > 1 else "")
        b = self.b[0] + (f" +{len(self.b) - 1}" if len(self.b) > 1 else "")
        return f"{a} -> {b}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"a": self.a[0] if len(self.a) == 1 else list(self.a),
                               "b": self.b[0] if len(self.b) == 1 else list(self.b)}
        if self.transform is not None:
            out["transform"] = self.transform.to_dict()
        if self.regex:
            out["regex"] = True
        if self.fallback:
            out["fallback"] = True
        if self.note:
            out["note"] = self.note
        return out


def _slots(t: Template) -> str:
    marks = {"rest": "*", "digits": ":d", "part": ""}
    return ", ".join(f"{{{n}{marks[k]}}}" for n, k in t.slots.items()) or "none"


# --- mapping -------------------------------------------------------------------------------------

def _prefix(value: str) -> str:
    return value + "." if value and not value.endswith(".") else value


def _overlaps(rules: Sequence[Rule], indices: Sequence[int], source: str | None) -> list[MappingProblem]:
    """Pairs of rules that claim (side a) or produce (side b) one key: a sample key of one rule's
    template fits the other rule. Found here, before any checkpoint is seen."""
    problems, seen = [], set()
    for side, verb in (("a", "claim"), ("b", "produce")):
        for x, rx in enumerate(rules):
            for t in (rx._a if side == "a" else rx._b):
                sample = t.sample()
                for y, ry in enumerate(rules):
                    if y == x or ry.fallback != rx.fallback or (min(x, y), max(x, y)) in seen:
                        continue
                    hit = (bool(ry.match(sample)) if side == "a"
                           else any(t2.match(sample) is not None for t2 in ry._b))
                    if hit:
                        seen.add((min(x, y), max(x, y)))  # one problem per pair is enough
                        later = rules[max(x, y)]
                        problems.append(MappingProblem(
                            f"rules[{indices[min(x, y)]}] and rules[{indices[max(x, y)]}] both {verb} keys "
                            f"such as {sample!r}",
                            "make the templates disjoint (spell out the differing part), or mark the more "
                            "general rule `fallback: true`", source, later.line, indices[max(x, y)], later.short()))
    return problems


@dataclass(frozen=True)
class Mapping:
    """A mapping from the keys of side A to those of side B, loadable from YAML.

    Attributes:
        rules: the rename/transform rules; a key may be claimed by one rule only.
        ignore_a, ignore_b: glob patterns (``*.num_batches_tracked``) of keys to leave out.
        prefix_a, prefix_b: keys of that side start with this dotted prefix; it is stripped
            before the rules and added after (``state_dict.`` of a Lightning checkpoint).
        passthrough: keys no rule claims keep their name (else they are reported unmapped).
        name: shown in reports and recorded in converted checkpoints.
        source: the file the mapping came from.
        description: free text for humans.

    Example:
        >>> m = Mapping([Rule("model.layers.{i}.{p*}", "layers.{i}.{p*}")], prefix_a="state_dict")
        >>> m.map_key("state_dict.model.layers.2.attn.weight"), m.inverted().map_key("layers.0.w")
        (['layers.2.attn.weight'], ['state_dict.model.layers.0.w'])
    """

    rules: tuple[Rule, ...] = ()
    ignore_a: tuple[str, ...] = ()
    ignore_b: tuple[str, ...] = ()
    prefix_a: str = ""
    prefix_b: str = ""
    passthrough: bool = True
    name: str = "mapping"
    source: str | None = field(default=None, compare=False)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        for side in ("ignore_a", "ignore_b"):
            object.__setattr__(self, side, _keys(getattr(self, side)))
        object.__setattr__(self, "prefix_a", _prefix(self.prefix_a))
        object.__setattr__(self, "prefix_b", _prefix(self.prefix_b))
        problems = _overlaps(self.rules, range(len(self.rules)), self.source)
        if problems:
            raise MappingError(problems, path=self.source)

    # Loading and saving
    @classmethod
    def from_yaml(cls, path: str | Path) -> Mapping:
        """Load a mapping file; every problem in it is reported at once (:class:`MappingError`).

        Example:
            >>> from importlib.resources import files
            >>> Mapping.from_yaml(files("tensorparity.examples") / "reference_to_port.yaml").name
            'reference-to-port'
        """
        from tensorparity.mapping.loader import mapping_from_yaml  # lazy: sugar over a module built on Mapping

        return mapping_from_yaml(path)

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> Mapping:
        """Build a mapping from the structure a YAML file holds.

        Example:
            >>> Mapping.from_dict({"rules": [{"a": "w", "b": "weight"}]}).map_key("w")
            ['weight']
        """
        from tensorparity.mapping.loader import mapping_from_dict  # lazy: sugar over a module built on Mapping

        return mapping_from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The structure :meth:`from_dict` reads back."""
        out = {"version": 1, "name": self.name, "description": self.description, "prefix_a": self.prefix_a,
               "prefix_b": self.prefix_b, "passthrough": self.passthrough, "rules": [r.to_dict() for r in self.rules],
               "ignore_a": list(self.ignore_a), "ignore_b": list(self.ignore_b)}
        if not self.description:
            del out["description"]
        return out

    def to_yaml(self) -> str:
        """Human-editable YAML, one rule a line, that :meth:`from_yaml` reads back equal.

        Example:
            >>> m = Mapping([Rule("a.{p}", "b.{p}")], name="demo")
            >>> Mapping.from_dict(__import__("yaml").safe_load(m.to_yaml())) == m
            True
        """
        from tensorparity.mapping.loader import mapping_to_yaml  # lazy: sugar over a module built on Mapping

        return mapping_to_yaml(self)

    # Using
    def inverted(self) -> Mapping:
        """The mapping from B to A. Raises :class:`MappingError` naming every rule without an inverse.

        Example:
            >>> Mapping([Rule("x.{p}", "y.{p}")], ignore_a=["*.tmp"]).inverted().ignore_b
            ('*.tmp',)
        """
        rules, problems = [], []
        for i, rule in enumerate(self.rules):
            try:
                rules.append(rule.inverted())
            except (TransformSpecError, MappingError) as exc:
                msg, fix = (exc.message, exc.fix) if isinstance(exc, TransformSpecError) else (str(exc), "")
                problems.append(MappingProblem(f"has no inverse: {msg}", fix or "see the rule", self.source,
                                               rule.line, i, rule.short()))
        if problems:
            raise MappingError(problems, path=self.source)
        inverse = "inverse of "
        name = self.name.removeprefix(inverse) if self.name.startswith(inverse) else inverse + self.name
        return Mapping(tuple(rules), self.ignore_b, self.ignore_a, self.prefix_b, self.prefix_a, self.passthrough,
                       name, self.source, self.description)

    def ignored(self, key: str, side: str = "a") -> bool:
        """Whether a key of side ``a`` (or ``b``) is ignored; globs match it with or without the prefix.

        Example:
            >>> Mapping(ignore_b=["*.inv_freq"], prefix_b="model").ignored("model.rope.inv_freq", side="b")
            True
        """
        prefix, globs = (self.prefix_a, self.ignore_a) if side == "a" else (self.prefix_b, self.ignore_b)
        bare = key.removeprefix(prefix) if prefix else key
        return any(fnmatch.fnmatchcase(key, g) or fnmatch.fnmatchcase(bare, g) for g in globs)

    def claims(self, bare_key: str) -> list[tuple[int, int, Bindings]]:
        """``(rule index, position, bindings)`` of every rule claiming a key (prefix stripped).

        Fallback rules are asked only when no other rule claims the key.
        """
        for fallback in (False, True):
            found = [(i, pos, b) for i, r in enumerate(self.rules) if r.fallback == fallback
                     for pos, b in r.match(bare_key)]
            if found:
                return found
        return []

    def map_key(self, key: str) -> list[str]:
        """The B keys an A key goes to (several for a split, none when ignored or unmapped).

        Example:
            >>> Mapping([Rule("q.{p}", "attn.q.{p}")], passthrough=False).map_key("k.weight")
            []
        """
        if self.ignored(key) or not key.startswith(self.prefix_a):
            return []
        bare = key[len(self.prefix_a):]
        found = self.claims(bare)
        if len(found) > 1:
            rules = sorted({i for i, _, _ in found})
            raise MappingError([MappingProblem(
                f"key {key!r} is claimed by rules {', '.join(f'rules[{i}]' for i in rules)}",
                "make the templates disjoint, or mark the general rule `fallback: true`",
                self.source, self.rules[rules[-1]].line, rules[-1], self.rules[rules[-1]].short())], path=self.source)
        if found:
            i, _, bindings = found[0]
            return [self.prefix_b + t for t in self.rules[i].targets(bindings)]
        return [self.prefix_b + bare] if self.passthrough else []

    def bind(self, ckpt: Checkpoint) -> Mapping:
        """Record what inverting needs (concat sizes, reshape source shapes, cast dtypes) from a
        checkpoint of side A; metadata only, no tensor is read.

        Example:
            >>> import torch, tensorparity
            >>> from tensorparity.mapping import Concat
            >>> m = Mapping([Rule(["q", "k"], "qk", Concat(0))])
            >>> m.bind(tensorparity.open({"q": torch.zeros(4, 2), "k": torch.zeros(2, 2)})).rules[0].transform
            Concat(dim=0, sizes=(4, 2))
        """
        from tensorparity.mapping.apply import apply_mapping  # lazy: sugar over a module built on Mapping

        return apply_mapping(ckpt, self).mapping

    @property
    def lossy(self) -> bool:
        """Whether a round trip A -> B -> A may change values (a narrowing cast)."""
        return any(r.lossy for r in self.rules)

    def with_rules(self, rules: Iterable[Rule]) -> Mapping:
        """A copy with other rules."""
        return replace(self, rules=tuple(rules))
