"""Load checks in both directions: :func:`load_check`.

The question a port answers before anything else: does this checkpoint load into my model, and
into the reference implementation, with the same values? For each model the checkpoint's weights
(:meth:`Checkpoint.weights`, through the mapping where needed) are checked against
``model.state_dict()`` by name, shape and dtype *before* anything is loaded (so no size-mismatch
traceback), then loaded with ``load_state_dict`` (``strict=True`` when clean, else
``strict=False`` with the loadable subset), then read back: ``state_dict()`` after loading must
equal, bit for bit, what was given. Finally the two loaded state dicts are compared with
:func:`tensorparity.diff`, through the mapping between their key spaces.

Which way the mapping is applied (the route) is decided per model by the keys: each model gets
the checkpoint as is, through the mapping (A → B) or through its inverse (B → A), whichever names
the most of the model's ``state_dict()`` keys (ties: as is, then A → B). With the usual mapping
(A = the reference's keys, B = the model's keys) a reference checkpoint loads into the reference
as is and into the model through the mapping; a checkpoint the model saved loads into the model
as is and into the reference through the inverse.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tensorparity._factory import BuiltModel, build_model
from tensorparity._resolve import PackageNotInstalledError
from tensorparity.checkpoint import Checkpoint, Entry, TensorEntry, ValueEntry
from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.checkpoint._roles import buffer_keys, entry_counts
from tensorparity.checkpoint.module import read_live
from tensorparity.checks._diff import diff
from tensorparity.checks._diff_report import DiffReport, Side
from tensorparity.checks._loadcheck_report import KeyIssue, LoadCheckReport, LoadSide, NotInstalled, Route
from tensorparity.errors import UsageError
from tensorparity.mapping import Mapping, MappingError, apply_mapping, load_mapping
from tensorparity.numerics import Tolerance
from tensorparity.report._render import plural

__all__ = ["load_check"]

_PREFERENCE: dict[Route, int] = {"as_is": 2, "a_to_b": 1, "b_to_a": 0}


def load_check(
    checkpoint: Any,
    /,
    *,
    model: Any,
    reference: Any = None,
    mapping: Mapping | str | os.PathLike[str] | None = None,
    tolerance: Tolerance | None = None,
    strict: bool = True,
    cast: bool = False,
    reference_optional: bool = False,
) -> LoadCheckReport:
    """Load a checkpoint into a model (and a reference) and report how it went.

    The models are loaded in place: a module passed in holds the checkpoint's weights afterwards.

    Args:
        checkpoint: anything :func:`tensorparity.open` takes; its model weights are used
            (a Lightning checkpoint's ``state_dict.`` prefix is removed).
        model: the local model: an ``nn.Module``, a zero-argument callable returning one, or a
            factory string (``pkg.mod:function``, ``pkg.mod:Class``, ``path/to/file.py:function``).
            A string is imported and called: that runs the user's own code, on purpose.
        reference: the reference model, the same way. A factory that cannot be imported is an
            error (a typo must not pass as "checked"), unless ``reference_optional``.
        mapping: a :class:`tensorparity.mapping.Mapping` or a YAML file between the two key
            spaces. It maps the checkpoint's keys to a model's keys where the checkpoint is in
            its side A, and back where it is in side B (see the module docstring for the rule).
        tolerance: how close the two loaded state dicts must be (default: ``torch.testing``'s
            tolerances per dtype). Round trips are always bitwise.
        strict: ``False`` reports missing and unexpected keys without failing the check (as
            ``load_state_dict(strict=False)`` accepts them); shape and dtype problems still fail.
        cast: load tensors whose dtype differs from the model's cast to the model's dtype;
            without it they are not loaded and reported as dtype mismatches.
        reference_optional: when the reference factory's package is not installed, check the
            model alone and say so in the report, instead of raising.

    Raises:
        FactoryError: a factory is malformed, cannot be imported or called, or returns no module.
        SourceError: the checkpoint cannot be opened.
        MappingError: the mapping is invalid or does not fit the checkpoint.
        UsageError: an option has a wrong type.

    Example:
        >>> import torch
        >>> state = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
        >>> report = load_check(state, model=lambda: torch.nn.Linear(2, 3))
        >>> report.verdict, report.side("model").strict
        ('passed', True)
    """
    _check_options(tolerance, strict, cast, mapping)
    key_mapping = load_mapping(mapping) if mapping is not None else None
    tol = tolerance or Tolerance()
    opened = open_checkpoint(checkpoint)  # lazy and cheap: a bad path fails before any model is built
    try:
        built = [("model", build_model(model, role="model"))]
        not_installed = None
        if reference is not None:
            try:
                built.append(("reference", build_model(reference, role="reference")))
            except PackageNotInstalledError as exc:
                if not reference_optional:
                    raise PackageNotInstalledError(exc.package, exc.factory, fix=f"{exc.fix}; or pass "
                                                   "--reference-optional (reference_optional=True) to check the "
                                                   "local side alone") from None
                not_installed = NotInstalled(exc.package, exc.factory)
        weights = opened.weights()
        # Plan every side before loading any: a mapping problem is reported before a model changes.
        plans = [_plan(role, b, weights, key_mapping) for role, b in built]
        sides = tuple(_load(plan, strict=strict, cast=cast) for plan in plans)
        cross, roles, cross_error, cross_notes = _cross(plans, sides, key_mapping, tol)
        notes = [n for plan in plans for n in plan.notes] + cross_notes
        if not_installed:
            notes.append(f"reference package {not_installed.package!r} is not installed; checked the local side only")
        return LoadCheckReport(
            checkpoint=_checkpoint_side(opened, weights), sides=sides, cross=cross, cross_roles=roles,
            mapping=(str(key_mapping.source or "<mapping built in Python>"), key_mapping.name) if key_mapping else None,
            tolerance=tol, cast=cast, strict=strict, not_installed=not_installed, cross_error=cross_error,
            notes=tuple(notes))
    finally:
        if opened is not checkpoint:
            opened.close()


def _check_options(tolerance: Any, strict: Any, cast: Any, mapping: Any) -> None:
    problems = []
    if tolerance is not None and not isinstance(tolerance, Tolerance):
        problems.append(f"tolerance must be a tensorparity.Tolerance, not {type(tolerance).__name__}")
    for name, value in (("strict", strict), ("cast", cast)):
        if not isinstance(value, bool):
            problems.append(f"{name} must be True or False, not {value!r}")
    if mapping is not None and not isinstance(mapping, (str, os.PathLike, Mapping, dict)):
        problems.append(f"mapping must be a tensorparity.mapping.Mapping or a YAML file's path, "
                        f"not {type(mapping).__name__}")
    if problems:
        raise UsageError("; ".join(problems),
                         fix="e.g. load_check('model.pt', model='pkg.mod:make', tolerance=Tolerance(atol=1e-5))")


# ---------------------------------------------------------------------------------------------
# Planning: which route, and what the checkpoint offers the model under it


@dataclass
class _Plan:
    """One model and the checkpoint as it reaches it (``offered``: in the model's key space;
    ``source``: as opened; ``partial``: fused key -> (all its parts, those absent))."""

    role: str
    built: BuiltModel
    route: Route
    offered: Checkpoint
    origins: dict[str, tuple[str, ...]]
    unmapped: tuple[str, ...]
    ignored: tuple[str, ...]
    route_text: str
    notes: list[str]
    source: Checkpoint
    partial: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)


def _score(route: Route, ckpt_keys: set[str], model_keys: list[str], mapping: Mapping | None) -> int:
    """How many of the model's keys the checkpoint supplies along ``route``."""
    if route == "as_is":
        return sum(k in ckpt_keys for k in model_keys)
    assert mapping is not None
    try:
        if route == "a_to_b":
            reached = {t for k in ckpt_keys for t in mapping.map_key(k)}
            return sum(k in reached for k in model_keys)
        # B -> A: a model key of side A is supplied when the mapping sends it to a checkpoint key.
        return sum(any(t in ckpt_keys for t in mapping.map_key(k)) for k in model_keys)
    except MappingError:
        return -1


def _bind_for(mapping: Mapping, model: nn.Module) -> Mapping:
    """The mapping bound to the model's own (side A) shapes, so that its inverse knows concat
    sizes, reshape shapes and dtypes; unbound when the model does not fit side A fully."""
    try:
        return apply_mapping(read_live(model), mapping).mapping
    except MappingError:
        return mapping


def _plan(role: str, built: BuiltModel, weights: Checkpoint, mapping: Mapping | None) -> _Plan:
    model_keys = list(built.model.state_dict().keys())
    routes: list[Route] = ["as_is"] + (["a_to_b", "b_to_a"] if mapping is not None else [])
    keys = set(weights)
    scores = {r: _score(r, keys, model_keys, mapping) for r in routes}
    route = max(routes, key=lambda r: (scores[r], _PREFERENCE[r]))
    notes = []
    if scores[route] == 0 and model_keys:
        why = ("as is or through the mapping: check that the mapping is between these two key spaces"
               if mapping is not None else "if it comes from another implementation, load it through a mapping "
                                           "(--map)")
        notes.append(f"{role}: none of its {len(model_keys):,} state_dict keys is in the checkpoint, {why}")
    if route == "as_is" or mapping is None:
        return _Plan(role, built, "as_is", weights, {}, (), (), "as is", notes, weights)
    used = mapping if route == "a_to_b" else _bind_for(mapping, built.model).inverted()
    partial = _partial_groups(weights, used)
    complete = weights
    if partial:
        # A fused key (concat) whose parts are not all there cannot be made: leave its parts out,
        # and the model reports the fused key missing, naming the absent part.
        drop = {k for sources, _ in partial.values() for k in sources}
        complete = Checkpoint(source=weights.source, format=weights.format, provenance=weights.provenance,
                              entries={k: e for k, e in weights.items() if k not in drop})
    result = apply_mapping(complete, used)
    text = "through the mapping (A → B)" if route == "a_to_b" else "through its inverse (B → A)"
    origins = {k: v for k, v in result.claims.items() if v != (k,)}
    return _Plan(role, built, route, result.checkpoint, origins, result.unmapped, result.ignored, text, notes,
                 weights, partial)


def _partial_groups(ckpt: Checkpoint, used: Mapping) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Target key -> (its source keys, those absent or ignored) for every rule group with several
    sources of which some are not in the checkpoint."""
    out: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for key in ckpt:
        if used.ignored(key) or not key.startswith(used.prefix_a):
            continue
        found = used.claims(key[len(used.prefix_a):])
        if len(found) != 1:
            continue  # several claims: apply_mapping reports it with the rule and line
        i, _, bindings = found[0]
        rule = used.rules[i]
        sources = tuple(used.prefix_a + s for s in rule.sources(bindings))
        absent = tuple(s for s in sources if s not in ckpt or used.ignored(s))
        if len(sources) > 1 and absent:
            for target in rule.targets(bindings):
                out[used.prefix_b + target] = (sources, absent)
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def _describe(value: Any) -> str:
    if isinstance(value, (TensorEntry, torch.Tensor)):
        return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, ValueEntry):
        value = value.value
    return f"a {type(value).__name__} value"


def _cast_entry(entry: TensorEntry, dtype: torch.dtype) -> TensorEntry:
    """The entry as loaded with ``cast``: converted to the model's dtype (no byte span: the
    bytes on disk are not these values)."""
    def load() -> torch.Tensor:
        return entry.load().to(dtype)

    size = torch.empty((), dtype=dtype).element_size()
    return replace(entry, dtype_name=dtype, nbytes=entry.numel * size, _loader=load, _span=None, _verify=None)


def _tied(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each state-dict key whose tensor is also held under other keys (tied weights: GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``), and those other keys.

    Example:
        >>> m = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 4, bias=False)); m[1].weight = m[0].weight
        >>> _tied(m)
        {'0.weight': ('1.weight',), '1.weight': ('0.weight',)}
    """
    by_tensor: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor):
            by_tensor.setdefault(id(value), []).append(key)
    return {k: tuple(o for o in keys if o != k) for keys in by_tensor.values() if len(keys) > 1 for k in keys}


def _check(plan: _Plan, expected: dict[str, Any], cast: bool,
           tied: dict[str, tuple[str, ...]]) -> tuple[dict[str, Entry], list[KeyIssue], list[str], list[str]]:
    """Names, shapes and dtypes against the model: the entries to offer, the issues, the cast keys,
    and the keys absent but tied to a key that is offered (they load through it)."""
    offer: dict[str, Entry] = {}
    issues: list[KeyIssue] = []
    casts: list[str] = []
    through_tie: list[str] = []
    ckpt = plan.offered
    for key, want in expected.items():
        origin = plan.origins.get(key, ())
        if key not in ckpt:
            if any(other in ckpt for other in tied.get(key, ())):
                through_tie.append(key)  # save_pretrained stores a tied tensor once
                continue
            issues.append(_missing(plan, key, want))
            continue
        entry = ckpt[key]
        if not isinstance(want, torch.Tensor):  # extra state: whatever the module's set_extra_state takes
            offer[key] = entry
        elif not isinstance(entry, TensorEntry):
            issues.append(KeyIssue(key, "kind", _describe(entry), _describe(want), origin))
        elif tuple(entry.shape) != tuple(want.shape):
            issues.append(KeyIssue(key, "shape", _describe(entry), _describe(want), origin))
        elif entry.dtype != want.dtype and not cast:
            issues.append(KeyIssue(key, "dtype", _describe(entry), _describe(want), origin))
        elif entry.dtype != want.dtype:
            offer[key] = _cast_entry(entry, want.dtype)
            casts.append(key)
        else:
            offer[key] = entry
    for key, entry in ckpt.items():
        if key not in expected:
            # Offered all the same: a load_state_dict pre-hook may rename legacy keys.
            offer[key] = entry
    return offer, issues, casts, through_tie


def _missing(plan: _Plan, key: str, want: Any) -> KeyIssue:
    if key in plan.partial:
        sources, absent = plan.partial[key]
        return KeyIssue(key, "missing", None, _describe(want), sources,
                        f"not made: {', '.join(absent)} not in the checkpoint")
    return KeyIssue(key, "missing", None, _describe(want))


def _materialise(entry: Entry) -> Any:
    return entry.load() if isinstance(entry, TensorEntry) else entry.value


def _load(plan: _Plan, *, strict: bool, cast: bool) -> LoadSide:
    model = plan.built.model
    expected = model.state_dict()
    tied = _tied(model)
    offer, issues, casts, through_tie = _check(plan, expected, cast, tied)
    for key in through_tie:
        partner = next(o for o in tied[key] if o in plan.offered)
        plan.notes.append(f"{plan.role}: {key} is tied to {partner} (the same tensor): it is loaded through it, "
                          "as save_pretrained stores a tied tensor once")
    by_name = [k for k in offer if k not in expected]
    clean = not issues and not by_name and not plan.unmapped
    error: str | None = None
    missing: list[str] = []
    unexpected: list[str] = []
    # Each entry reads itself (memory-mapped where the format allows, so no copy is made before
    # load_state_dict copies into the parameters); only mapped or cast tensors are built in memory.
    state = {k: _materialise(e) for k, e in offer.items()}
    try:
        result = model.load_state_dict(state, strict=clean and not through_tie)
        missing = [k for k in result.missing_keys if k not in through_tie]
        unexpected = list(result.unexpected_keys)
    except Exception as exc:  # noqa: BLE001 - the user's module (hooks, custom loading): one line
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        unexpected = by_name
    del state
    skipped, missing_set, unexpected_set = {i.key for i in issues}, set(missing), set(unexpected)
    # torch's own answer is authoritative for names (a pre-hook may have renamed keys).
    issues = [i for i in issues if i.kind != "missing" or i.key in missing_set or error is not None]
    issues += [_missing(plan, k, expected[k]) for k in missing if k not in skipped and k in expected]
    for k in unexpected:
        issues.append(KeyIssue(k, "unexpected", _describe(plan.offered[k]) if k in plan.offered else None, None,
                               plan.origins.get(k, ())))
    for k in plan.unmapped:
        issues.append(KeyIssue(k, "unexpected", _describe(plan.source[k]), None, (),
                               "no rule of the mapping claims it"))
    order = {k: n for n, k in enumerate(expected)}
    issues.sort(key=lambda i: (i.kind == "unexpected", order.get(i.key, len(order))))
    loaded_keys = [k for k in offer if k in expected and k not in unexpected_set] if error is None else []
    round_trip = _round_trip(plan, offer, model, loaded_keys) if error is None and loaded_keys else None
    parameters = list(model.parameters())
    return LoadSide(
        role=plan.role, factory=plan.built.factory, model_class=plan.built.model_class, route=plan.route,
        route_text=plan.route_text, expected=len(expected), offered=len(plan.offered) + len(plan.unmapped),
        loaded=len(loaded_keys), strict=clean and error is None, issues=tuple(issues), cast=tuple(casts),
        ignored=plan.ignored, parameters=sum(p.numel() for p in parameters),
        trainable=sum(p.numel() for p in parameters if p.requires_grad),
        buffers=sum(b.numel() for b in model.buffers()), round_trip=round_trip, error=error,
        require_strict=strict)


def _round_trip(plan: _Plan, offer: dict[str, Entry], model: nn.Module, keys: list[str]) -> Any:
    """``state_dict()`` after loading against what was given, bitwise: catches tied weights
    given two values, buffers a module rewrites on load, silent casts."""
    now = model.state_dict()
    tensors = [k for k in keys if isinstance(offer[k], TensorEntry) and isinstance(now.get(k), torch.Tensor)]
    given = Checkpoint(source=f"{plan.offered.source} ({plan.route_text})", format=plan.offered.format,
                       entries={k: offer[k] for k in tensors})
    held = read_live({k: now[k] for k in tensors}, name=f"{plan.role} after load_state_dict")
    return diff(given, held, tolerance=Tolerance(exact=True), weights_only=False)


# ---------------------------------------------------------------------------------------------
# The two loaded models compared


def _space(route: Route, other: Route) -> str:
    """The mapping side (``a``/``b``) a model's keys are in, or ``ckpt`` when it took the
    checkpoint as is and nothing says which side that is."""
    if route != "as_is":
        return "b" if route == "a_to_b" else "a"
    return {"a_to_b": "a", "b_to_a": "b"}.get(other, "ckpt")


def _cross(plans: list[_Plan], sides: tuple[LoadSide, ...], mapping: Mapping | None,
           tol: Tolerance) -> tuple[DiffReport | None, tuple[str, str] | None, str | None, list[str]]:
    """The two models' state dicts after loading, compared: every key, including those the
    checkpoint did not provide (each factory's own values: two models that will compute
    different functions), except those a side refused (shape, dtype): already failures, and their
    values say nothing. Returns the report, the roles of A and B, an error, notes."""
    if len(plans) < 2:
        return None, None, None, []
    local, ref = plans[0], plans[1]
    space_l, space_r = _space(local.route, ref.route), _space(ref.route, local.route)
    use = mapping if mapping is not None and space_l != space_r else None
    # A is the side the mapping starts from; without one, the reference (then "reference vs model").
    (a, side_a), (b, side_b) = ((local, sides[0]), (ref, sides[1])) if use is not None and space_l == "a" \
        else ((ref, sides[1]), (local, sides[0]))
    live = {p.role: read_live(p.built.model, name=f"{p.role} ({p.built.model_class.rsplit('.', 1)[-1]})")
            for p in plans}
    refused_a, refused_b = _refused(side_a), _refused(side_b)
    leave_out = set(refused_a) | set(refused_b)
    if use is not None and refused_b:
        # A key of A goes when it feeds a refused key of B (the parts of a fused qkv).
        leave_out |= {k for k in live[a.role] if any(t in refused_b for t in use.map_key(k))}
    exclude = "^(?:" + "|".join(re.escape(k) for k in sorted(leave_out)) + ")$" if leave_out else None
    notes = [f"{plural(len(refused_a) + len(refused_b), 'key')} a side refused (shape or dtype) "
             f"{'is' if len(refused_a) + len(refused_b) == 1 else 'are'} left out of the comparison of the loaded "
             f"weights"] if leave_out else []
    try:
        report = diff(live[a.role], live[b.role], mapping=use, tolerance=tol, exclude=exclude, weights_only=False)
    except MappingError as exc:
        return None, (a.role, b.role), f"the mapping does not fit the loaded state dicts: {exc}", notes
    except UsageError:  # the exclusions leave nothing: nothing was loaded on both sides
        return None, (a.role, b.role), None, ["no tensor was loaded into both models: the loaded weights were not "
                                              "compared"]
    if any(i.kind == "missing" for side in sides for i in side.issues):
        notes.append("keys the checkpoint does not provide keep each factory's own values, and are compared too: "
                     "two models that differ there compute different functions")
    if exclude is not None:  # say what was left out, not the regular expression that did it
        report = replace(report, exclude=f"{plural(len(leave_out), 'key')} refused by a side")
    return report, (a.role, b.role), None, notes


def _refused(side: LoadSide) -> list[str]:
    return [i.key for i in side.issues if i.kind in ("shape", "dtype", "kind")]


def _checkpoint_side(opened: Checkpoint, weights: Checkpoint) -> Side:
    tensors = list(weights.tensors())
    selected = None
    if opened.sections:
        prefixes = [p for p, name in opened.sections.items() if name == "model"]
        selected = (f"model weights only, prefix '{prefixes[0]}.' removed" if len(prefixes) == 1
                    else "model weights only")
    trainable = opened.provenance.get("trainable_parameters")
    if not isinstance(trainable, int) or isinstance(trainable, bool):
        trainable = None
    # Buffers by name (BatchNorm statistics, classes a .nemo config names), keyed as in the weights.
    named = buffer_keys(opened)
    prefixes = [p for p, name in opened.sections.items() if name == "model"]
    if len(prefixes) == 1:
        named = {k.removeprefix(prefixes[0] + "."): why for k, why in named.items()}
    counts = entry_counts(tensors, named, trainable=trainable)
    return Side(source=str(opened.source), format=opened.format, selected=selected, keys=len(weights),
                tensors=len(tensors), parameters=counts.elements, bytes=sum(e.nbytes for e in tensors),
                trainable=counts.trainable, buffers=counts.buffers)
