"""Suggest a mapping between two checkpoints from their tensors' content: :func:`suggest_mapping`.

Keys that match by name (after a wrapper prefix such as ``state_dict.``, ``model.`` or
``module.`` that one side has on every key) are paired directly. The rest find partners by
content (:mod:`._content`): identical bytes, permuted dims, concatenations (fused ``qkv``),
the RoPE head permutation, a dtype cast, and last statistics (low confidence). The pairs are
generalised into templates over layer indices (:mod:`._generalise`) and checked by applying
the mapping to A's metadata; the result is a :class:`Suggestion` whose YAML
(:meth:`Suggestion.to_yaml`) loads with :meth:`Mapping.from_yaml`.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partialmethod
from typing import TYPE_CHECKING, Any, Literal

from tensorparity.checkpoint import Checkpoint, TensorEntry, open_owned
from tensorparity.errors import UsageError
from tensorparity.mapping._content import ContentMatcher, Match, Tick
from tensorparity.mapping._generalise import Draft, build_mapping, generalise
from tensorparity.mapping._signatures import NameAffinity, buffer_ignores, detect_prefixes, glob_literal
from tensorparity.mapping.loader import mapping_to_yaml
from tensorparity.mapping.rules import Mapping
from tensorparity.mapping.transforms import Transform
from tensorparity.report import render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._render import fold_count, printable, rich_titled_table

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["SCHEMA", "SuggestedPair", "Suggestion", "detect_prefixes", "suggest_mapping"]

SCHEMA = "tensorparity.suggest/1"
Method = Literal["name", "identical", "reshape", "transpose", "permute", "concat", "split", "rope", "cast",
                 "statistics"]
Confidence = Literal["high", "medium", "low"]
_METHOD_WORDS = {"name": "by name", "identical": "identical bytes", "reshape": "reshaped", "transpose": "transposed",
                 "permute": "permuted", "concat": "concatenated", "split": "split", "rope": "RoPE-permuted",
                 "cast": "cast", "statistics": "by statistics"}

_PROGRESS_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class SuggestedPair:
    """Keys of A that are keys of B, how that was found, and how sure it is.

    Attributes:
        a_keys, b_keys: full keys; several on one side are a concat (A) or a split (B).
        transform: what turns A's tensors into B's (``None``: the same tensor).
        method: ``name``, ``identical``, ``reshape``, ``transpose``, ``permute``, ``concat``,
            ``split``, ``rope``, ``cast`` or ``statistics``.
        confidence: ``high`` (the content proves it), ``medium`` (the content matches, but
            several tensors share it and names chose), ``low`` (close, not equal: statistics).
        note: why, in words.
    """

    a_keys: tuple[str, ...]
    b_keys: tuple[str, ...]
    transform: Transform | None
    method: Method | str
    confidence: Confidence | str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"a": list(self.a_keys), "b": list(self.b_keys),
                "transform": self.transform.to_dict() if self.transform is not None else None,
                "describe": self.transform.describe() if self.transform is not None else "same tensor",
                "method": self.method, "confidence": self.confidence, "note": self.note}


@dataclass(frozen=True)
class Suggestion:
    """A suggested mapping from A's keys to B's, with the evidence for each pair.

    Attributes:
        mapping: the suggested :class:`Mapping` (keys paired by name pass through unchanged).
        pairs: every pair found, name matches first.
        unmatched_a, unmatched_b: keys with no partner (buffers without one are ignored instead).
        ignored_a, ignored_b: buffers without a partner (``num_batches_tracked``), in the
            mapping's ``ignore_a``/``ignore_b``.
        source_a, source_b, keys_a, keys_b: what was compared.
        rule_notes, rule_confidence: per rule of ``mapping``, comments for humans and the lowest
            confidence among its pairs.
        weights_only: the selection it was made with; diff must select the same keys.
    """

    mapping: Mapping
    pairs: tuple[SuggestedPair, ...]
    unmatched_a: tuple[str, ...]
    unmatched_b: tuple[str, ...]
    ignored_a: tuple[str, ...] = ()
    ignored_b: tuple[str, ...] = ()
    source_a: str = ""
    source_b: str = ""
    keys_a: int = 0
    keys_b: int = 0
    rule_notes: tuple[tuple[str, ...], ...] = ()
    rule_confidence: tuple[str, ...] = ()
    weights_only: bool | None = None
    details: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def complete(self) -> bool:
        """Every key of both sides has a partner (or is a buffer without one, ignored)."""
        return not self.unmatched_a and not self.unmatched_b

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 complete, 1 some keys are unmatched."""
        return 0 if self.complete else 1

    def counts(self) -> dict[str, int]:
        """Pairs per method, in the order the methods are tried."""
        found = Counter(p.method for p in self.pairs)
        return {m: found[m] for m in _METHOD_WORDS if found[m]}

    def summary(self) -> str:
        """One line: pairs by method, rules, unmatched keys.

        Example:
            >>> import torch
            >>> suggest_mapping({"w": torch.ones(2)}, {"weight": torch.ones(2)}).summary()
            '1 pair (1 identical bytes) in 1 rule; every key has a partner'
        """
        n = len(self.pairs)
        how = ", ".join(f"{c} {_METHOD_WORDS[m]}" for m, c in self.counts().items())
        rules = len(self.mapping.rules)
        text = f"{n} pair{'s' if n != 1 else ''} ({how or 'none'}) in {rules} rule{'s' if rules != 1 else ''}"
        low = sum(1 for p in self.pairs if p.confidence == "low")
        text += f", {low} of low confidence" if low else ""
        if self.complete:
            return text + "; every key has a partner"
        return text + f"; unmatched: {len(self.unmatched_a)} of A, {len(self.unmatched_b)} of B"

    def to_yaml(self) -> str:
        """The mapping as YAML (:func:`~tensorparity.mapping.loader.mapping_to_yaml`), with
        comments: what was compared, confidence where it is not high, and the unmatched keys."""
        out = [f"# Suggested by tensorparity from tensor content: {printable(self.summary())}.",
               f"# Review it, then: tensorparity diff A B{self._selection()} --map THIS_FILE",
               f"# A: {printable(self.source_a)} ({self.keys_a} keys)",
               f"# B: {printable(self.source_b)} ({self.keys_b} keys)"]
        rule, in_rules = -1, False
        for line in mapping_to_yaml(self.mapping).splitlines():
            if line.startswith("rules:"):
                in_rules = True
            elif in_rules and line.startswith("  - "):
                rule += 1
                notes = self.rule_notes[rule] if rule < len(self.rule_notes) else ()
                out += [f"  # {printable(n)}" for n in notes]
            elif not line.startswith(" "):
                in_rules = False
            out.append(line)
        for side, keys, what in (("A", self.unmatched_a, "they keep their names and show as only in A"),
                                 ("B", self.unmatched_b, "they show as only in B")):
            if keys:
                out.append(f"# Unmatched keys of {side} (no partner found; {what}):")
                out += [f"#   {printable(k)}  {self.details.get(k, '')}".rstrip() for k in keys[:500]]
                out += [f"#   {fold_count(500, len(keys), '--json lists them')}"] if len(keys) > 500 else []
        return "\n".join(out) + "\n"

    def _selection(self) -> str:
        return {None: "", True: " --weights-only", False: " --all-keys"}[self.weights_only]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (schema ``tensorparity.suggest/1``)."""
        return {"schema": SCHEMA, "summary": self.summary(), "complete": self.complete,
                "weights_only": self.weights_only, "a": {"source": self.source_a, "keys": self.keys_a},
                "b": {"source": self.source_b, "keys": self.keys_b}, "counts": self.counts(),
                "pairs": [p.to_dict() for p in self.pairs],
                "unmatched_a": [{"key": k, "what": self.details.get(k, "")} for k in self.unmatched_a],
                "unmatched_b": [{"key": k, "what": self.details.get(k, "")} for k in self.unmatched_b],
                "ignored_a": list(self.ignored_a), "ignored_b": list(self.ignored_b),
                "mapping": self.mapping.to_dict(), "yaml": self.to_yaml()}

    to_json = partialmethod(report_json, ensure_ascii=True)  # \u escapes: what map suggest --json has always printed

    def renderable(self, *, top: int = 10) -> RenderableType:
        """A rich renderable: summary, the rules (with their confidence), the unmatched keys."""
        from rich.console import Group
        from rich.text import Text

        parts: list[RenderableType] = [
            Text(f"Suggested mapping: {printable(self.source_a)} -> {printable(self.source_b)}", style="bold"),
            Text(self.summary(), style="green" if self.complete else "yellow")]
        rows = []
        for n, r in enumerate(self.mapping.rules):
            conf = self.rule_confidence[n] if n < len(self.rule_confidence) else "high"
            rows.append([printable(", ".join(r.a)), printable(", ".join(r.b)),
                         r.transform.describe() if r.transform is not None else "rename", conf])
        if rows:
            parts += rich_titled_table(f"Rules ({len(rows)})", ["A", "B", "transform", "confidence"], rows[:top],
                                       total=len(rows), hint="the YAML lists them all", left=("A", "B", "transform"))
        for side, keys in (("A", self.unmatched_a), ("B", self.unmatched_b)):
            if keys:
                shown = [[printable(k), self.details.get(k, "")] for k in keys[:top]]
                parts += rich_titled_table(f"Unmatched keys of {side} ({len(keys)})", ["key", "shape / dtype"], shown,
                                           total=len(keys), hint="the YAML lists them", left=("key", "shape / dtype"))
        return Group(*parts)

    rich = renderable  # its older name
    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = partialmethod(report_text, width=100)


def suggest_mapping(a: Any, b: Any, /, *, weights_only: bool | None = None, progress: bool | None = None) -> Suggestion:
    """Suggest the mapping from A's keys to B's, from names and tensor content.

    Args:
        a, b: anything :func:`tensorparity.open` takes (paths in any format, modules, state
            dicts, checkpoints; those passed in are left open).
        weights_only: as for :func:`tensorparity.diff`: ``None`` compares a sectioned side's
            model weights with a bare state dict; ``True`` both sides' weights; ``False`` all keys.
        progress: a progress bar on stderr; ``None``: when stderr is a terminal and over 256 MB
            are to be matched by content.

    Returns:
        A :class:`Suggestion`: the mapping, every pair with its method and confidence, and the
        keys left without a partner.

    Raises:
        UsageError: an option has a wrong value.
        SourceError: a checkpoint cannot be opened or read.

    Example:
        >>> import torch
        >>> a = {"enc.0.w": torch.arange(6.).view(2, 3), "enc.1.w": torch.ones(3, 2)}
        >>> b = {"layers.0.weight": torch.arange(6.).view(2, 3).T, "layers.1.weight": torch.ones(3, 2).T}
        >>> s = suggest_mapping(a, b)
        >>> [r.to_dict() for r in s.mapping.rules], s.complete
        ([{'a': 'enc.{i}.w', 'b': 'layers.{i}.weight', 'transform': {'transpose': [0, 1]}}], True)
    """
    if weights_only not in (None, True, False) or progress not in (None, True, False):
        raise UsageError(f"weights_only and progress take None, True or False, not {weights_only!r} and {progress!r}",
                         fix="e.g. suggest_mapping(a, b, weights_only=True)")
    owned: list[Checkpoint] = []
    try:
        ckpt_a, ckpt_b = (open_owned(x, owned) for x in (a, b))
        side_a, side_b = _select(ckpt_a, ckpt_b, weights_only)
        return _suggest(side_a, side_b, progress, weights_only)
    finally:
        for ckpt in owned:
            ckpt.close()


def _select(a: Checkpoint, b: Checkpoint, weights_only: bool | None) -> tuple[Checkpoint, Checkpoint]:
    """The keys :func:`tensorparity.diff` compares with the same ``weights_only``, so the mapping fits them."""
    if weights_only is True:
        return a.weights(), b.weights()
    if weights_only is False or bool(a.sections) == bool(b.sections):
        return a, b
    return (a.weights(), b) if a.sections else (a, b.weights())


# --- the suggestion --------------------------------------------------------------------------------

# Pairs the keys that names left by content: (pool of A, pool of B, names, progress) -> matches.
Finder = Callable[[list[TensorEntry], list[TensorEntry], NameAffinity, "Tick | None"], list[Match]]


def _by_content(pool_a: list[TensorEntry], pool_b: list[TensorEntry], names: NameAffinity,
                tick: Tick | None) -> list[Match]:
    return ContentMatcher(pool_a, pool_b, names, tick).run()


def _suggest(side_a: Checkpoint, side_b: Checkpoint, progress: bool | None, weights_only: bool | None,
             find: Finder = _by_content) -> Suggestion:
    prefix_a, prefix_b = detect_prefixes(list(side_a), list(side_b))
    bare_a = {k[len(prefix_a):]: side_a[k] for k in side_a}
    bare_b = {k[len(prefix_b):]: side_b[k] for k in side_b}
    order_a = {k: n for n, k in enumerate(bare_a)}
    names = NameAffinity()
    named: list[Match] = []
    for key, ea in bare_a.items():
        eb = bare_b.get(key)
        if eb is None or isinstance(ea, TensorEntry) != isinstance(eb, TensorEntry):
            continue
        if isinstance(ea, TensorEntry) and isinstance(eb, TensorEntry) and ea.shape != eb.shape:
            continue  # same name, other layout: content decides (a transposed Conv1D)
        named.append(Match((key,), (key,), None, "name", "high"))
        names.learn((key,), (key,))
    taken_a = {m.a[0] for m in named}
    # The content matcher works on bare keys (the prefix says nothing about a tensor).
    pool_a = [replace(e, key=k) for k, e in bare_a.items() if k not in taken_a and isinstance(e, TensorEntry)]
    pool_b = [replace(e, key=k) for k, e in bare_b.items() if k not in taken_a and isinstance(e, TensorEntry)]
    with _progress(progress, sum(e.nbytes for e in pool_a + pool_b)) as tick:
        found = find(pool_a, pool_b, names, tick)
    paired_a = taken_a | {k for m in found for k in m.a}
    paired_b = taken_a | {k for m in found for k in m.b}
    left_a = [k for k in bare_a if k not in paired_a]
    left_b = [k for k in bare_b if k not in paired_b]
    ignore_a, ignored_a = buffer_ignores(left_a, paired_a)
    ignore_b, ignored_b = buffer_ignores(left_b, paired_b)
    # A key of A without a partner keeps its name (passthrough); if a rule makes a key of that
    # name, the two would collide: leave the stray key out (it is still listed as unmatched).
    made = {k for m in found for k in m.b}
    collide = [k for k in left_a if k in made and k not in ignored_a]
    ignore_a += [glob_literal(k) for k in collide]
    drafts = generalise(found, list(bare_a), list(bare_b), order_a)
    mapping, drafts, dropped = build_mapping(drafts, side_a, side_b, prefix_a, prefix_b, ignore_a, ignore_b)
    if dropped:
        found = [m for m in found if m not in dropped]
        left_a += [k for m in dropped for k in m.a]
        left_b += [k for m in dropped for k in m.b]
    pairs = [SuggestedPair(tuple(prefix_a + k for k in m.a), tuple(prefix_b + k for k in m.b), m.transform, m.method,
                           m.confidence, m.note) for m in named + sorted(found, key=lambda m: order_a[m.a[0]])]
    notes = [_rule_comments(d) for d in drafts]
    confidence = [min((m.confidence for m in d.members), key=("low", "medium", "high").index) for d in drafts]
    details = {**{prefix_a + k: _describe(bare_a[k]) for k in left_a}, **{prefix_b + k: _describe(bare_b[k])
                                                                           for k in left_b}}
    for k in collide:
        details[prefix_a + k] += " (in ignore_a: a rule makes B's key of this name)"
    return Suggestion(
        mapping=mapping, pairs=tuple(pairs),
        unmatched_a=tuple(prefix_a + k for k in left_a if k not in ignored_a),
        unmatched_b=tuple(prefix_b + k for k in left_b if k not in ignored_b),
        ignored_a=tuple(prefix_a + k for k in ignored_a), ignored_b=tuple(prefix_b + k for k in ignored_b),
        source_a=str(side_a.source), source_b=str(side_b.source), keys_a=len(side_a), keys_b=len(side_b),
        rule_notes=tuple(notes), rule_confidence=tuple(confidence), weights_only=weights_only, details=details)


def _describe(entry: Any) -> str:
    if isinstance(entry, TensorEntry):
        return f"{list(entry.shape)} {str(entry.dtype).removeprefix('torch.')}"
    return f"a {type(entry.value).__name__} value"


def _rule_comments(d: Draft) -> tuple[str, ...]:
    low = [m for m in d.members if m.confidence == "low"]
    medium = [m for m in d.members if m.confidence == "medium"]
    out = []
    if low:
        out.append(f"LOW CONFIDENCE ({len(low)} of {len(d.members)} pair(s)): {low[0].note}; check before use")
    if medium:
        out.append(f"medium confidence: {medium[0].note}")
    notes = {m.note for m in d.members if m.confidence == "high" and m.note}
    out += sorted(notes)[:1]
    return tuple(out)


@contextmanager
def _progress(enabled: bool | None, total_bytes: int) -> Iterator[Tick | None]:
    show = enabled if enabled is not None else (sys.stderr.isatty() and total_bytes > _PROGRESS_BYTES)
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    # On a terminal the bar goes away when done; asked for elsewhere (a log), its last state stays.
    bar = Progress(TextColumn("matching by content: {task.description}"), BarColumn(), MofNCompleteColumn(),
                   console=console, transient=console.is_terminal)
    tasks: dict[str, Any] = {}

    def tick(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done + 1)

    with bar:
        yield tick

