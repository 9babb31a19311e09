"""Load a mapping from YAML (or the dict a YAML file holds), checking everything first.

Every problem (unknown fields, bad templates, bad transform arguments, regexes that do not
compile, rules that claim the same keys) is collected, each with its file, line and rule, and
raised together as one :class:`~tensorparity.mapping.rules.MappingError`. Line numbers come from
the composed YAML node tree, so they point at the exact field.

Transform specs (``{concat: {dim: 0}}``) are turned into objects by a registry of factories;
:func:`register_transform` adds a project's own.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tensorparity.errors import UsageError
from tensorparity.mapping.multi import Chain, Concat, Split
from tensorparity.mapping.rules import Mapping, MappingError, MappingProblem, Rule, _overlaps
from tensorparity.mapping.transforms import (
    Cast,
    Permute,
    Rearrange,
    Reshape,
    Transform,
    TransformSpecError,
    Transpose,
    _args,
    _ints,
    parse_dtype,
)

__all__ = ["load_mapping", "mapping_from_dict", "mapping_from_yaml", "mapping_to_yaml", "register_transform",
           "transform_from_dict", "transform_names"]

TOP_FIELDS = ("version", "name", "description", "prefix_a", "prefix_b", "passthrough", "rules", "ignore_a", "ignore_b")
RULE_FIELDS = ("a", "b", "transform", "regex", "fallback", "note")
Lines = dict[tuple[Any, ...], int]

# --- transform registry --------------------------------------------------------------------------

Factory = Callable[[Any, dict[str, Any]], Transform]


def _rearrange(value: Any, extra: dict[str, Any]) -> Transform:
    if isinstance(value, dict):
        args = _args(value, extra, "pattern", {"pattern", "sizes"})
        sizes = args.get("sizes") or {}
        if not isinstance(sizes, dict):
            raise TransformSpecError(f"rearrange sizes must be a mapping, got {sizes!r}", "write sizes: {h: 32}")
        return Rearrange(args.get("pattern", ""), tuple(sizes.items()))
    return Rearrange(value, tuple(extra.items()))


def _transpose(value: Any, extra: dict[str, Any]) -> Transform:
    dims = _ints(_args(value, extra, "dims", {"dims"}).get("dims", [0, 1]), "transpose dims")
    if len(dims) != 2:
        raise TransformSpecError(f"transpose swaps two dims, got {list(dims)}", "write transpose: [0, 1]")
    return Transpose(*dims)


def _permute(value: Any, extra: dict[str, Any]) -> Transform:
    return Permute(_args(value, extra, "dims", {"dims"}).get("dims", ()))


def _reshape(value: Any, extra: dict[str, Any]) -> Transform:
    args = _args(value, extra, "shape", {"shape", "source_shape"})
    return Reshape(args.get("shape", ()), args.get("source_shape"))


def _concat(value: Any, extra: dict[str, Any]) -> Transform:
    args = _args(value, extra, "dim", {"dim", "sizes"})
    return Concat(args.get("dim", 0), args.get("sizes"))


def _split(value: Any, extra: dict[str, Any]) -> Transform:
    args = _args(value, extra, "sizes", {"dim", "sizes", "parts"})
    return Split(args.get("dim", 0), args.get("sizes"), args.get("parts"))


def _cast(value: Any, extra: dict[str, Any]) -> Transform:
    args = _args(value, extra, "dtype", {"dtype", "from"})
    if "dtype" not in args:
        raise TransformSpecError("cast needs a dtype", "write cast: bfloat16")
    return Cast(parse_dtype(args["dtype"]), parse_dtype(args["from"]) if "from" in args else None)


def _chain(value: Any, extra: dict[str, Any]) -> Transform:
    if extra or not isinstance(value, list):
        raise TransformSpecError("chain takes a list of transforms",
                                 "write chain: [{concat: {dim: 0}}, {transpose: [0, 1]}]")
    return Chain(tuple(transform_from_dict(v) for v in value))


_REGISTRY: dict[str, Factory] = {
    "rearrange": _rearrange, "transpose": _transpose, "permute": _permute, "reshape": _reshape,
    "concat": _concat, "split": _split, "cast": _cast, "chain": _chain,
}


def register_transform(name: str, factory: Factory) -> None:
    """Make ``{name: ...}`` usable in mapping files.

    ``factory(value, extra)`` gets the value under ``name`` and the spec's other keys, and returns
    a :class:`~tensorparity.mapping.transforms.Transform` (or raises ``TransformSpecError``).

    Example:
        >>> register_transform("swap01", lambda value, extra: Transpose(0, 1))
        >>> transform_from_dict({"swap01": None}).describe()
        'transpose dims 0 and 1'
    """
    if not name.isidentifier():
        raise ValueError(f"transform name {name!r} is not an identifier")
    _REGISTRY[name] = factory


def transform_names() -> list[str]:
    """The registered transform names.

    Example:
        >>> "rearrange" in transform_names()
        True
    """
    return sorted(_REGISTRY)


def transform_from_dict(spec: Any) -> Transform:
    """Build a transform from its spec: ``{name: value, **extra}``, or a list (a chain).

    Example:
        >>> transform_from_dict({"rearrange": "(h two d) c -> (h d two) c", "h": 4, "two": 2}).describe()
        "rearrange '(h two d) c -> (h d two) c' (h=4, two=2)"
    """
    if isinstance(spec, Transform):
        return spec
    if isinstance(spec, list):
        return _chain(spec, {})
    if not isinstance(spec, dict) or not spec:
        raise TransformSpecError(f"a transform is a mapping such as {{transpose: [0, 1]}}, got {spec!r}",
                                 f"name one of: {', '.join(transform_names())}")
    names = [k for k in spec if k in _REGISTRY]
    if not names:
        first = str(next(iter(spec)))
        hint = difflib.get_close_matches(first, list(_REGISTRY), n=1)
        raise TransformSpecError(f"unknown transform {first!r}", f"did you mean {hint[0]!r}?" if hint
                                 else f"use one of: {', '.join(transform_names())}")
    if len(names) > 1:
        raise TransformSpecError(f"one transform names several kinds ({', '.join(names)})",
                                 "write several steps as a list (a chain): [{concat: {dim: 0}}, {transpose: [0, 1]}]")
    name = names[0]
    extra = {k: v for k, v in spec.items() if k != name}
    if any(not isinstance(k, str) for k in extra):
        raise TransformSpecError(f"argument names of {name} must be strings", "quote them")
    try:
        return _REGISTRY[name](spec[name], extra)
    except TransformSpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise TransformSpecError(f"{name}: {exc}", f"see the {name} arguments in docs/mapping.md") from None


# --- YAML with line numbers ----------------------------------------------------------------------

def _walk(node: yaml.Node, path: tuple[Any, ...], lines: Lines, dups: list[tuple[tuple[Any, ...], int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key in seen:
                dups.append(((*path, key), line))
            seen.add(key)
            lines.setdefault((*path, key), line)
            _walk(value_node, (*path, key), lines, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, dups)


def _parse(text: str, source: str) -> tuple[Any, Lines, list[MappingProblem]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise MappingError([MappingProblem(f"not valid YAML: {what}", "fix the YAML syntax (quote templates "
                                           "that start with '{')", source, mark.line + 1 if mark else None)],
                           path=source) from None
    lines: Lines = {}
    dups: list[tuple[tuple[Any, ...], int]] = []
    if node is not None:
        lines[()] = node.start_mark.line + 1
        _walk(node, (), lines, dups)
    problems = [MappingProblem(f"field {'.'.join(map(str, p))!r} is given twice", "keep one of them", source, line)
                for p, line in dups]
    return data, lines, problems


def mapping_from_yaml(path: str | Path) -> Mapping:
    """Load a mapping file (see docs/mapping.md for the schema).

    Example:
        >>> from importlib.resources import files
        >>> len(mapping_from_yaml(files("tensorparity.examples") / "reference_to_port.yaml").rules)
        10
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MappingError([MappingProblem("no such mapping file", "check the path", source)], path=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError([MappingProblem(f"cannot read the mapping file ({exc})", "pass a UTF-8 YAML file", source)],
                           path=source) from None
    data, lines, problems = _parse(text, source)
    return _build(data, lines, source, problems)


def mapping_from_dict(data: Any, *, source: str | None = None) -> Mapping:
    """Build a mapping from the structure a mapping file holds; all problems raised together.

    Example:
        >>> mapping_from_dict({"rules": [{"a": "l.{i}.w", "b": "layer{i}.weight"}]}).map_key("l.3.w")
        ['layer3.weight']
    """
    return _build(data, {}, source, [])


def load_mapping(mapping: Mapping | dict[str, Any] | str | Path) -> Mapping:
    """A :class:`Mapping` from a mapping, a dict, or a YAML file's path (what ``--map`` takes).

    Example:
        >>> load_mapping({"prefix_a": "model"}).prefix_a
        'model.'
    """
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, dict):
        return mapping_from_dict(mapping)
    if not isinstance(mapping, (str, os.PathLike)):
        raise UsageError(f"mapping must be a tensorparity.mapping.Mapping or the path of a YAML file, "
                         f"not {type(mapping).__name__}", fix="pass mapping='map.yaml' or Mapping.from_yaml(...)")
    return mapping_from_yaml(mapping)


def mapping_to_yaml(mapping: Mapping) -> str:
    """Human-editable YAML, one rule a line, each transform described in a comment.

    Example:
        >>> print(mapping_to_yaml(Mapping([Rule("a.{p}", "b.{p}")], name="demo")), end="")  # doctest: +ELLIPSIS
        # tensorparity mapping: ...
        version: 1
        name: demo
        prefix_a: ''
        prefix_b: ''
        passthrough: true
        rules:
          - {a: 'a.{p}', b: 'b.{p}'}
        ignore_a: []
        ignore_b: []
    """

    def dump(obj: Any, flow: bool | None) -> str:
        return str(yaml.safe_dump(obj, default_flow_style=flow, sort_keys=False, width=10**9)).strip()

    data = mapping.to_dict()
    lines = ["# tensorparity mapping: keys of side A -> keys of side B (docs/mapping.md).",
             "# {name} = one dotted component, {i} = digits, {rest*} = several components.",
             dump({k: data[k] for k in ("version", "name", "description", "prefix_a", "prefix_b", "passthrough")
                   if k in data}, False)]
    lines.append("rules:" if mapping.rules else "rules: []")
    for rule in mapping.rules:
        comment = f"  # {rule.transform.describe()}" if rule.transform is not None else ""
        lines.append(f"  - {dump(rule.to_dict(), True)}{comment}")
    lines.append(dump({k: data[k] for k in ("ignore_a", "ignore_b")}, None))
    return "\n".join(lines) + "\n"


# --- validation ----------------------------------------------------------------------------------

def _unknown(field: str, allowed: tuple[str, ...]) -> str:
    hint = difflib.get_close_matches(field, allowed, n=1)
    return f"did you mean {hint[0]!r}?" if hint else f"use only {', '.join(allowed)}"


def _build(data: Any, lines: Lines, source: str | None, problems: list[MappingProblem]) -> Mapping:
    def at(*path: Any) -> int | None:
        for n in range(len(path), -1, -1):
            if path[:n] in lines:
                return lines[path[:n]]
        return None

    def problem(message: str, fix: str, *path: Any, rule: int | None = None, text: str | None = None) -> None:
        problems.append(MappingProblem(message, fix, source, at(*path), rule, text))

    if data is None:
        data = {}
    if not isinstance(data, dict):
        problem(f"a mapping file holds a mapping of fields, got {type(data).__name__}",
                "start with `version: 1` and `rules:` (see docs/mapping.md)")
        raise MappingError(problems, path=source)
    for key in data:
        if key not in TOP_FIELDS:
            problem(f"unknown field {key!r}", _unknown(str(key), TOP_FIELDS), key)
    if data.get("version", 1) != 1:
        problem(f"version {data['version']!r} is not supported", "write version: 1", "version")
    options: dict[str, Any] = {}
    for key in ("name", "description", "prefix_a", "prefix_b"):
        value = data.get(key, "mapping" if key == "name" else "")
        if value is None or not isinstance(value, str):
            problem(f"{key} must be a string, got {value!r}", f"quote the {key}", key)
        else:
            options[key] = value
    passthrough = data.get("passthrough", True)
    if not isinstance(passthrough, bool):
        problem(f"passthrough must be true or false, got {passthrough!r}", "write passthrough: true", "passthrough")
    for key in ("ignore_a", "ignore_b"):
        value = data.get(key) or []
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
            problem(f"{key} must be a list of glob patterns, got {value!r}", f"write {key}: ['*.num_batches_tracked']",
                    key)
        else:
            options[key] = tuple(value)

    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        problem(f"rules must be a list, got {type(raw_rules).__name__}", "write each rule as `- {a: ..., b: ...}`",
                "rules")
        raw_rules = []
    rules: list[Rule] = []
    indices: list[int] = []
    for i, raw in enumerate(raw_rules):
        rule = _rule(raw, i, problem, at("rules", i))
        if rule is not None:
            rules.append(rule)
            indices.append(i)
    problems.extend(_overlaps(rules, indices, source))
    if problems:
        raise MappingError(sorted(problems, key=lambda p: p.line or 0), path=source)  # stable: file order
    return Mapping(tuple(rules), options["ignore_a"], options["ignore_b"], options["prefix_a"], options["prefix_b"],
                   passthrough, options["name"], source, options["description"])


def _rule(raw: Any, i: int, problem: Callable[..., None], line: int | None) -> Rule | None:
    if not isinstance(raw, dict):
        problem(f"a rule is a mapping with a and b, got {raw!r}", "write `- {a: old.key, b: new.key}`", "rules", i,
                rule=i)
        return None
    text = f"{_first(raw.get('a'))} -> {_first(raw.get('b'))}"
    ok = True

    def bad(message: str, fix: str, field: str | None = None) -> None:
        nonlocal ok
        ok = False
        problem(message, fix, "rules", i, *((field,) if field else ()), rule=i, text=text)

    for key in raw:
        if key not in RULE_FIELDS:
            bad(f"unknown field {key!r}", _unknown(str(key), RULE_FIELDS), key)
    for side in ("a", "b"):
        value = raw.get(side)
        if value is None:
            bad(f"the rule has no {side}", f"give {side}: the key (or list of keys) of side {side.upper()}")
        elif not (isinstance(value, str) or (isinstance(value, list) and value
                                             and all(isinstance(v, str) for v in value))):
            bad(f"{side} must be a key template or a list of them, got {value!r}", "quote the template", side)
    if not isinstance(raw.get("note", ""), str):
        bad(f"note must be text, got {raw['note']!r}", "quote the note", "note")
    for flag in ("regex", "fallback"):
        if not isinstance(raw.get(flag, False), bool):
            bad(f"{flag} must be true or false, got {raw[flag]!r}", f"write {flag}: true", flag)
    transform = None
    if raw.get("transform") is not None:
        try:
            transform = transform_from_dict(raw["transform"])
        except TransformSpecError as exc:
            bad(f"transform: {exc.message}", exc.fix, "transform")
    if not ok:
        return None
    try:
        return Rule(raw["a"], raw["b"], transform, raw.get("regex", False), raw.get("fallback", False), line,
                    raw.get("note"))
    except MappingError as exc:
        for p in exc.problems:
            bad(p.message, p.fix)
        return None


def _first(value: Any) -> str:
    if isinstance(value, list) and value:
        return f"{value[0]} +{len(value) - 1}" if len(value) > 1 else str(value[0])
    return str(value)
