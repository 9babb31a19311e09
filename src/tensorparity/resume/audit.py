"""The component audit: a resumed run's state against the uninterrupted run's at the same step,
named in the user's words.

Both states (:func:`tensorparity.resume.state.capture`) are compared with
:func:`tensorparity.diff` — the one comparison loop — and every differing key is assigned to its
component (``optimizer``, ``rng.torch``, ``extras.ema``, ...). Each component that differs
becomes one :class:`~tensorparity.resume._resume_report.Finding` whose message says what was lost and what
it will change: "optimizer state was not restored: exp_avg, exp_avg_sq and step of 16 parameters
are missing", "torch CPU RNG state differs: dropout masks will change", "scheduler last_epoch is
0, expected 4", "load_state_dict(strict=False) skipped 2 keys ...".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tensorparity.checks._diff import diff
from tensorparity.checks._diff_report import DiffReport
from tensorparity.numerics import Tolerance
from tensorparity.report._render import distinct, plural
from tensorparity.resume._resume_report import Divergence, Finding, StepRow
from tensorparity.resume.state import component_of

__all__ = ["audit", "divergence", "state_diff"]

_ORDER = ("model", "buffers", "mode", "optimizer", "scheduler", "scaler", "extras", "grads", "data", "rng")
_MAX_KEYS = 10


def state_diff(reference: Any, resumed: Any, *, tolerance: Tolerance, exclude: str | None = None) -> DiffReport:
    """Compare two captured states (paths or dicts) key by key, every section but the keys
    ``exclude`` matches (``re.search``)."""
    return diff(reference, resumed, tolerance=tolerance, weights_only=False,
                exclude=r"^format$" + (f"|{exclude}" if exclude else ""))


@dataclass
class _Delta:
    """What differs inside one component: tensors outside tolerance, other values, keys only the
    uninterrupted run has (``missing``) or only the resumed run has (``extra``)."""

    tensors: list[str] = field(default_factory=list)
    scalars: set[str] = field(default_factory=set)  # of ``tensors``: 0-d or 1-element (counters)
    same: list[str] = field(default_factory=list)  # tensors within tolerance
    values: dict[str, tuple[str, str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    compared: int = 0

    def keys(self) -> list[str]:
        return [*self.tensors, *self.values, *self.missing, *self.extra]


def _deltas(report: DiffReport) -> dict[str, _Delta]:
    out: dict[str, _Delta] = {}
    for t in report.tensors:
        d = out.setdefault(component_of(t.key), _Delta())
        d.compared += 1
        if t.passed:
            d.same.append(t.key)
        else:
            d.tensors.append(t.key)
            if t.numel <= 1:
                d.scalars.add(t.key)
    for v in report.values:
        out.setdefault(component_of(v.key), _Delta()).values[v.key] = (v.a, v.b)
    for k in report.only_in_a:
        out.setdefault(component_of(k.key), _Delta()).missing.append(k.key)
    for k in report.only_in_b:
        out.setdefault(component_of(k.key), _Delta()).extra.append(k.key)
    return {c: d for c, d in out.items() if d.keys()}


def _names(items: Sequence[str]) -> str:
    items = list(dict.fromkeys(items))
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _strip(key: str, component: str) -> str:
    return key[len(component) + 1:] if key.startswith(component + ".") else key


def _optimizer(d: _Delta, restored: bool) -> str:
    missing: dict[str, set[str]] = {}
    differs: dict[str, set[str]] = {}
    groups: list[tuple[str, str, str, str]] = []  # (group, hyper-parameter, resumed, uninterrupted)
    for key in (*d.missing, *d.tensors, *d.values):
        parts = key.split(".")
        if len(parts) >= 4 and parts[1] == "state":  # state.<parameter: an index or a dotted name>.<field>
            (missing if key in d.missing else differs).setdefault(parts[-1], set()).add(".".join(parts[2:-1]))
        elif len(parts) >= 4 and parts[1] == "param_groups" and key in d.values:
            a, b = _value(d, key)  # type: ignore[misc]
            groups.append((parts[2], ".".join(parts[3:]), b, a))
    said = [f"param group {g} {name} is {b}, expected {a}" for g, name, b, a in groups]
    if groups and not missing and not differs and restored:
        return _optimizer_groups(d, groups, said)
    details = []
    if missing:
        n = len(set().union(*missing.values()))
        details.append(f"{_names(sorted(missing))} of {plural(n, 'parameter')} {'is' if len(missing) == 1 else 'are'} "
                       f"missing (it starts from scratch)")
    for name in sorted(differs, key=lambda s: -len(differs[s])):
        details.append(f"{name} of {plural(len(differs[name]), 'parameter')} differs")
    details += said
    if not details:
        details.append(f"{plural(len(d.keys()), 'key')} differ (first: {_strip(d.keys()[0], 'optimizer')})")
    return ("optimizer state was not restored: " if restored else "optimizer state differs: ") + "; ".join(details)


def _optimizer_groups(d: _Delta, groups: Sequence[tuple[str, str, str, str]], said: Sequence[str]) -> str:
    """Only ``param_groups`` differ, every moment matches: the state was loaded, and its
    hyper-parameters were set again afterwards (a config applied after ``optimizer.load_state_dict``,
    which restores moments and hyper-parameters together)."""
    moments: dict[str, set[str]] = {}
    for key in d.same:
        parts = key.split(".")
        if len(parts) >= 4 and parts[1] == "state":
            moments.setdefault(parts[-1], set()).add(".".join(parts[2:-1]))
    names = _names(sorted({name for _, name, _, _ in groups}))
    fix = (f"fix: load the optimizer state after the config sets {names}, or do not overwrite param_groups after "
           f"optimizer.load_state_dict")
    if not moments:  # an optimizer without per-parameter state (plain SGD): nothing else to compare
        return (f"optimizer param_groups hyper-parameters differ: {'; '.join(said)} (optimizer.load_state_dict "
                f"restores them, so they were set after the load or never loaded); {fix}")
    n = len(set().union(*moments.values()))
    return (f"optimizer moments were restored ({_names(sorted(moments))} of {plural(n, 'parameter')} match the "
            f"uninterrupted run), but its param_groups hyper-parameters differ: {'; '.join(said)} "
            f"(optimizer.load_state_dict restores both, so they were set after the load); {fix}")


def _number(text: str) -> str:
    """``'0.0006000000000000001'`` -> ``'0.0006'``: values come as reprs; numbers read better short."""
    try:
        value = float(text)
    except ValueError:
        return text
    return text if text.lstrip("-").isdigit() else f"{value:.6g}"


def _value(d: _Delta, key: str) -> tuple[str, str] | None:
    pair = d.values.get(key)
    return (_number(pair[0]), _number(pair[1])) if pair else None


def _scheduler(d: _Delta, restored: bool) -> str:
    last = _value(d, "scheduler.last_epoch")
    if last is not None:
        text = f"scheduler last_epoch is {last[1]}, expected {last[0]}"
        return text + (": the scheduler was not restored, so the learning-rate schedule restarts" if restored else "")
    first = d.keys()[0]
    pair = _value(d, first)
    what = f"{_strip(first, 'scheduler')} is {pair[1]}, expected {pair[0]}" if pair else _strip(first, "scheduler")
    return f"scheduler {'was not restored' if restored else 'differs'}: {what}"


def _tensor_count(d: _Delta, label: str, component: str) -> str:
    n = len(set(d.tensors) | set(d.missing) | set(d.values))
    total = max(d.compared + len(d.missing), n)
    # Name a weight rather than a counter (an EMA's n_averaged, a norm's num_batches_tracked).
    tensors = [k for k in d.tensors if k not in d.scalars] or d.tensors
    first = _strip((tensors or d.missing or list(d.values) or d.extra)[0], component)
    return f"{n} of {plural(total, label)} differ (first: {first})"


def _few(keys: Sequence[str], n: int = 3) -> str:
    return _names(list(keys)[:n]) + (" ..." if len(keys) > n else "")


def _model(d: _Delta, restored: bool, load_calls: Sequence[Mapping[str, Any]]) -> str:
    calls = [c for c in load_calls if c.get("owner") == "model"]
    skipped = {k for c in calls for k in c.get("missing", ())}
    unexpected = [k for c in calls for k in c.get("unexpected", ())]
    differing = {_strip(k, "model") for k in (*d.tensors, *d.values, *d.missing)}
    lost = sorted(differing & skipped)
    if not (restored and lost):
        counted = _tensor_count(d, "tensor", "model")
        return f"model weights were not restored: {counted}" if restored else f"model weights: {counted}"
    # Whether load() changed a skipped key is known when the leg hashed the model around the
    # load (tensorparity's own loop; not a framework's).
    known = bool(calls) and all("rebuilt" in c for c in calls)
    rebuilt = {k for c in calls for k in c.get("rebuilt", ())}
    reset = [k for k in lost if k in rebuilt]
    kept = [k for k in lost if k not in rebuilt]
    said = []
    if reset:
        frozen = {k for c in calls for k in c.get("frozen", ())}
        one = len(reset) == 1
        text = (f"load_state_dict(strict=False) skipped {plural(len(reset), 'key')} the checkpoint does not hold, and "
                f"load() re-initialised {'it' if one else 'them'} differently ({_few(reset)}): "
                f"{'it no longer holds the value' if one else 'they no longer hold the values'} build() gave "
                f"{'it' if one else 'them'}")
        if frozen.issuperset(reset):
            text += f", which the uninterrupted run still has ({'it is' if one else 'they are'} frozen: never trained)"
        else:
            text += ", nor the uninterrupted run's"
        loaded = list(dict.fromkeys(k for c in calls for k in c.get("loaded", ())))
        trainable = {k for c in calls for k in c.get("trainable", ())}
        if loaded and trainable.issuperset(loaded) and frozen.issuperset(reset):
            adapter = plural(len(loaded), "trainable (adapter) weight")
            text += f"; the checkpoint holds only the {adapter} ({_few(loaded)})"
        elif loaded:
            text += f"; the checkpoint holds {plural(len(loaded), 'key')} of the model ({_few(loaded)})"
        said.append(text)
    if kept:
        why = "they keep their freshly built values" if known else "the checkpoint does not hold them"
        said.append(f"load_state_dict(strict=False) skipped {plural(len(kept), 'key')} that "
                    f"{'differs' if len(kept) == 1 else 'differ'} from the uninterrupted run ({_few(kept)}): {why}")
    if unexpected:
        said.append(f"the checkpoint's {_few(unexpected)} matched no key of the model (unexpected)")
    if reset:
        said.append("fix: save and load the base weights too, or re-create them in load() from the same seed as "
                    "build()")
    return "; ".join(said)


def _extras(component: str, d: _Delta, restored: bool, meta: Mapping[str, Any]) -> str:
    name = component.partition(".")[2]
    cls = str(meta.get("extras", {}).get(name, ""))
    if any(k.startswith(f"{component}.{kind}") for k in d.keys()
           for kind in ("torch_generator", "numpy_random_state", "numpy_generator", "python_random")):
        return f"the RNG in extras '{name}' ({cls}) differs: what it draws will change"
    ema = "ema" in name.lower() or "ema" in cls.lower() or cls == "AveragedModel"
    subject = f"EMA weights (extras '{name}')" if ema else f"extras '{name}' ({cls})"
    counted = _tensor_count(d, "tensor" if d.tensors else "key", component)
    return f"{subject} {'were' if ema else 'was'} not restored: {counted}" if restored else f"{subject}: {counted}"


def _buffers(d: _Delta, restored: bool) -> str:
    """Buffers registered with ``persistent=False``: ``state_dict()`` leaves them out, so no
    checkpoint built from it holds them."""
    names = list(dict.fromkeys(_strip(k, "buffers") for k in (*d.tensors, *d.values, *d.missing, *d.extra)))
    one = len(names) == 1
    what = (f"non-persistent buffer{'' if one else 's'} {_few(names, 5)} {'differs' if one else 'differ'} from the "
            f"uninterrupted run's")
    if d.missing or d.extra:
        what += f" ({_names([_strip(k, 'buffers') for k in (*d.missing, *d.extra)][:3])} present in one run only)"
    if not restored:
        return what
    return (f"{what}: registered with persistent=False, {'it is' if one else 'they are'} not saved in state_dict(), "
            f"so the checkpoint does not hold {'it' if one else 'them'} and the resumed run starts from the freshly "
            f"built value{'' if one else 's'}; fix: register {'it' if one else 'them'} with persistent=True, or "
            f"recompute {'it' if one else 'them'} in load()")


def _data(d: _Delta, restored: bool, rows: Sequence[StepRow]) -> str:
    def got(field_: str) -> tuple[str, str] | None:
        return _value(d, f"data.progress.{field_}")

    epoch, batch = got("epoch"), got("batch_in_epoch")
    loader = [k for k in d.keys() if k.startswith("data.loader.")]
    yielded = _value(d, "data.loader._num_yielded")
    if epoch and not batch and epoch[1] != "0":
        text = (f"the epoch counter is {epoch[1]}, expected {epoch[0]}, at the same position in the data: what is "
                f"keyed on the epoch (epoch-wise schedulers, max_epochs, sampler.set_epoch) will differ")
    elif epoch or batch:
        got_parts = [f"{name} {pair[1]}" for name, pair in (("epoch", epoch), ("batch", batch)) if pair]
        exp_parts = [f"{name} {pair[0]}" for name, pair in (("epoch", epoch), ("batch", batch)) if pair]
        restart = (batch is None or batch[1] == "0") and (epoch is None or epoch[1] == "0")
        head = ("data loader restarted from the " + ("epoch start" if epoch is None else "first epoch")) if restart \
            else "data position differs"
        text = f"{head} ({', '.join(got_parts)} instead of {', '.join(exp_parts)})"
    elif yielded is not None and yielded[1] == "0":
        text = f"the stateful data loader restarted from the epoch start (0 batches yielded; expected {yielded[0]})"
    elif loader:
        text = f"the data loader's state differs ({_names([_strip(k, 'data.loader') for k in loader[:3]])})"
    elif _value(d, "data.progress.lightning_batch_idx"):
        a, b = _value(d, "data.progress.lightning_batch_idx")  # type: ignore[misc]
        text = (f"Lightning's batch_idx for the next batch is {b}, expected {a}: its loop counters disagree with "
                "the data")
    elif _value(d, "data.progress.step"):
        a, b = _value(d, "data.progress.step")  # type: ignore[misc]
        text = f"the step counter is {b}, expected {a}"
    elif any(k.startswith("data.progress.epoch_rng") for k in d.keys()):
        text = "the RNG states the epoch's shuffle was drawn from differ: the rest of the epoch is shuffled differently"
    elif any(k.startswith("data.generators") for k in d.keys()):
        text = "the data loader's own generator differs: its next shuffle will change"
    else:
        text = f"the data position differs ({_names([_strip(k, 'data') for k in d.keys()[:3]])})"
    if restored:
        bad = next((r for r in rows if not r.batch_same), None)
        if bad is not None:
            text += f": the batch at step {bad.step} differs"
            if bad.batch_b_from is not None:
                text += f" (it is the batch of step {bad.batch_b_from})"
    return text


def _rng(kind: str, meta: Mapping[str, Any]) -> str:
    if kind == "torch":
        what = [w for w, used in (("dropout masks", meta.get("dropout")),
                                  ("the next epoch's shuffle", meta.get("global_shuffle"))) if used]
        return "torch CPU RNG state differs: " + (
            f"{' and '.join(what)} will change" if what
            else "whatever draws from torch's global generator (shuffling, augmentation, dropout) will change")
    if kind == "cuda":
        return "CUDA RNG state differs: dropout masks and random ops on the GPU will change"
    if kind == "numpy":
        return "numpy global RNG state differs: whatever the data pipeline draws from np.random will change"
    return "python random state differs: whatever the data pipeline draws from the random module will change"


def _message(component: str, d: _Delta, *, at: int, restored: bool, meta: Mapping[str, Any],
             load_calls: Sequence[Mapping[str, Any]], rows: Sequence[StepRow], accumulate: int) -> str:
    if component == "optimizer":
        return _optimizer(d, restored)
    if component == "scheduler":
        return _scheduler(d, restored)
    if component == "model":
        return _model(d, restored, load_calls)
    if component == "buffers":
        return _buffers(d, restored)
    if component.startswith("extras."):
        return _extras(component, d, restored, meta)
    if component == "data":
        return _data(d, restored, rows)
    if component.startswith("rng."):
        return _rng(component.partition(".")[2], meta)
    if component == "mode":
        pair = _value(d, "mode.training")
        mode = "train" if pair and pair[1] == "True" else "eval"
        return (f"the model is in {mode} mode, the uninterrupted run's in {'eval' if mode == 'train' else 'train'} "
                f"mode: dropout and batch-norm behave differently")
    if component == "grads":
        done = at % accumulate if accumulate > 1 else 0
        n = len(set(d.tensors) | set(d.missing))
        verb = "are missing" if d.missing and not d.tensors else "differ"
        return (f"accumulated gradients {'were not restored' if restored else 'differ'}: resumed inside an "
                f"accumulation group ({done} of {accumulate} micro-batches done), {plural(n, 'gradient')} {verb}")
    if component == "scaler":
        pair = _value(d, "scaler.scale")
        what = f"scale is {pair[1]}, expected {pair[0]}" if pair else _tensor_count(d, "key", "scaler")
        return f"grad scaler state {'was not restored' if restored else 'differs'}: {what}"
    return f"{component} differs: {_tensor_count(d, 'key', component)}"


def audit(report: DiffReport, *, at: int, when: Literal["load", "end"] = "load", meta: Mapping[str, Any] | None = None,
          load_calls: Sequence[Mapping[str, Any]] = (), rows: Sequence[StepRow] = (),
          accumulate: int = 1) -> tuple[tuple[Finding, ...], tuple[str, ...]]:
    """Name every component that differs between the uninterrupted run's state (A) and the
    resumed run's (B) at step ``at``.

    Args:
        report: :func:`state_diff` of the two states.
        at: the step both states belong to.
        when: ``load`` (right after loading: "was not restored") or ``end``.
        meta: what the leg knew about its objects (dropout, extras' classes).
        load_calls: the non-strict ``load_state_dict`` calls of the recipe's ``load``.
        rows: the resumed steps, to say which batch differs.
        accumulate: micro-batches per optimizer step.

    Returns:
        The findings, and notes (a non-strict load that skipped keys which hold the right values
        anyway: an adapter-only checkpoint).

    Example:
        >>> import torch
        >>> from tensorparity.numerics import Tolerance
        >>> a = {"scheduler": {"last_epoch": 4}, "rng": {"torch": torch.tensor([1, 2], dtype=torch.uint8)}}
        >>> b = {"scheduler": {"last_epoch": 0}, "rng": {"torch": torch.tensor([1, 3], dtype=torch.uint8)}}
        >>> findings, _ = audit(state_diff(a, b, tolerance=Tolerance(exact=True)), at=4)
        >>> [f.component for f in findings]
        ['scheduler', 'rng.torch']
        >>> findings[0].message
        'scheduler last_epoch is 0, expected 4: the scheduler was not restored, so the learning-rate schedule restarts'
    """
    meta = meta or {}
    deltas = _deltas(report)
    order = {c: i for i, c in enumerate(_ORDER)}
    findings = []
    for component in sorted(deltas, key=lambda c: (order.get(c.partition(".")[0], 99), c)):
        d = deltas[component]
        message = _message(component, d, at=at, restored=when == "load", meta=meta, load_calls=load_calls,
                           rows=rows, accumulate=accumulate)
        if when == "end":
            message = f"after step {at}, {message}"
        keys = d.keys()
        findings.append(Finding(component, message, at, when, tuple(keys[:_MAX_KEYS]), len(keys)))
    notes = []
    if when == "load":
        harmless = sorted({k for c in load_calls if c.get("owner") == "model" for k in c.get("missing", ())}
                          - {_strip(k, "model") for k in deltas.get("model", _Delta()).keys()})
        if harmless:
            notes.append(f"load_state_dict(strict=False) skipped {plural(len(harmless), 'key')} the checkpoint does "
                         f"not hold (e.g. {harmless[0]}); they equal the uninterrupted run's, so nothing was lost")
    return tuple(findings), tuple(notes)


def divergence(rows: Sequence[StepRow], end: Sequence[Finding], *, stop: int) -> Divergence | None:
    """The first step that differs (or the end state when every step matches); ``None`` when
    the resumed run matches.

    Example:
        >>> divergence([], [], stop=8) is None
        True
    """
    for r in rows:
        if r.match:
            continue
        what = r.differences()
        bits = []
        if "batch" in what:
            bits.append("the batch" + (f" (the resumed run got step {r.batch_b_from}'s)" if r.batch_b_from else ""))
        if "loss" in what and r.loss_a is not None and r.loss_b is not None:
            a, b = distinct(r.loss_a, r.loss_b)
            bits.append(f"loss {a} vs {b}")
        if "grad norm" in what and r.grad_a is not None and r.grad_b is not None:
            a, b = distinct(r.grad_a, r.grad_b)
            bits.append(f"grad norm {a} vs {b}")
        if "parameters" in what:
            first = r.params_differing[0] if r.params_differing else "?"
            bits.append(f"{r.n_params_differing} of {r.n_params} model tensors differ after the step (first: {first})")
        return Divergence(r.step, what, r.params_differing[0] if r.params_differing else None,
                          f"step {r.step} differs first: {', '.join(bits) or ', '.join(what)}")
    if end:
        f = end[0]
        return Divergence(None, ("final state",), f.keys[0] if f.keys else None,
                          f"every step matches, but the state after step {stop} differs "
                          f"({', '.join(e.component for e in end)})")
    return None
