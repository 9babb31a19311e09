"""Key templates: a key with placeholders, compiled to a regular expression.

``{name}`` matches one dotted component, ``{i}`` (and ``{j}``, ``{k}``, ``{n}``, ``{layer}``,
``{idx}``, or any ``{name:d}``) matches digits only, ``{name*}`` matches one or more components
(dots included). ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["DIGIT_NAMES", "Template"]

DIGIT_NAMES = frozenset({"i", "j", "k", "n", "layer", "idx"})
_KINDS = {"part": r"[^.]+", "digits": r"\d+", "rest": r".+"}
_SAMPLES = {"part": "x", "digits": "0", "rest": "x.y"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Invalid(ValueError):
    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.message, self.fix = message, fix


@dataclass(frozen=True)
class _Slot:
    name: str
    kind: str


@dataclass(frozen=True)
class Template:
    """A key template such as ``layers.{i}.self_attn.{p}``.

    Example:
        >>> t = Template("layers.{i}.attn.{p}")
        >>> t.match("layers.3.attn.weight")
        {'i': '3', 'p': 'weight'}
        >>> t.format({"i": "0", "p": "bias"})
        'layers.0.attn.bias'
    """

    text: str
    slots: dict[str, str] = field(init=False, compare=False, repr=False)
    _parts: tuple[str | _Slot, ...] = field(init=False, compare=False, repr=False)
    _regex: re.Pattern[str] = field(init=False, compare=False, repr=False)
    _prefix: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        parts = _parse_template(self.text)
        slots: dict[str, str] = {}
        for p in parts:
            if isinstance(p, _Slot):
                if p.name in slots:
                    raise _Invalid(f"placeholder {{{p.name}}} appears twice in {self.text!r}",
                                   "use each placeholder once per template")
                slots[p.name] = p.kind
        regex = "".join(re.escape(p) if isinstance(p, str) else f"(?P<{p.name}>{_KINDS[p.kind]})" for p in parts)
        object.__setattr__(self, "slots", slots)
        object.__setattr__(self, "_parts", parts)
        object.__setattr__(self, "_regex", re.compile(regex, re.DOTALL))
        object.__setattr__(self, "_prefix", parts[0] if parts and isinstance(parts[0], str) else "")

    def match(self, key: str) -> dict[str, str] | None:
        """The placeholder values when ``key`` fits the template, else ``None``."""
        if not key.startswith(self._prefix):
            return None
        m = self._regex.fullmatch(key)
        return m.groupdict() if m else None

    def format(self, values: dict[str, str]) -> str:
        """The key this template names for the given placeholder values."""
        return "".join(p if isinstance(p, str) else values[p.name] for p in self._parts)

    def sample(self) -> str:
        """One key the template matches (used to find rules that overlap)."""
        return self.format({name: _SAMPLES[kind] for name, kind in self.slots.items()})


def _parse_template(text: str) -> tuple[str | _Slot, ...]:
    if not isinstance(text, str) or not text:
        raise _Invalid(f"a key template must be a non-empty string, got {text!r}",
                       "write the key, e.g. layers.{i}.weight")
    parts: list[str | _Slot] = []
    literal, i = "", 0
    while i < len(text):
        c = text[i]
        if text.startswith("{{", i) or text.startswith("}}", i):
            literal, i = literal + c, i + 2
            continue
        if c == "}":
            raise _Invalid(f"unmatched '}}' in template {text!r}", "write '}}' for a literal brace")
        if c != "{":
            literal, i = literal + c, i + 1
            continue
        end = text.find("}", i)
        if end < 0:
            raise _Invalid(f"unclosed '{{' in template {text!r}", "close the placeholder, e.g. {i}")
        inner = text[i + 1:end]
        name, _, spec = inner.partition(":")
        kind = "part"
        if name.endswith("*") and not spec:
            name, kind = name[:-1], "rest"
        elif spec == "d" or (not spec and name in DIGIT_NAMES):
            kind = "digits"
        elif spec:
            raise _Invalid(f"placeholder {{{inner}}} in {text!r} has an unknown spec {spec!r}",
                           "use {name} (one component), {name:d} (digits) or {name*} (several components)")
        if not _NAME.fullmatch(name):
            raise _Invalid(f"placeholder {{{inner}}} in {text!r} is not a name",
                           "name placeholders like Python variables: {i}, {proj}, {rest*}")
        if not literal and parts and isinstance(parts[-1], _Slot):
            raise _Invalid(f"placeholders {{{parts[-1].name}}} and {{{name}}} touch in {text!r}, so the split "
                           "between them is ambiguous", "put a literal (such as '.') between them")
        if literal:
            parts.append(literal)
            literal = ""
        parts.append(_Slot(name, kind))
        i = end + 1
    if literal:
        parts.append(literal)
    return tuple(parts)
