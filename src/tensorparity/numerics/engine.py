"""The streaming comparison engine every feature uses: pairs of lazy entries in, records out.

Identical tensors are recognised from their file bytes (``pread`` + memcmp) without building a
tensor; the rest are loaded (memory-mapped where the format allows) and compared by value.

Tensors are loaded (memory-mapped where the format allows) one pair at a time per worker,
compared, and released, so peak memory is bounded by a few of the largest tensors, not by the
checkpoint. Workers are threads: torch's kernels release the GIL, so both cores work.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tensorparity._dtypes import dtype_info
from tensorparity.checkpoint._mapped import span_buffer, spans_equal
from tensorparity.checkpoint.tree import TensorEntry
from tensorparity.numerics.gathered import Gather
from tensorparity.numerics.metrics import buffers_comparable, compare_buffers, compare_tensors, first_outside
from tensorparity.numerics.results import TensorComparison
from tensorparity.numerics.tolerance import ResolvedTolerance, Tolerance

if TYPE_CHECKING:
    import torch

__all__ = ["Loadable", "Pair", "any_outside", "compare_pair", "compare_pairs"]


class Loadable(Protocol):
    """Anything with ``load() -> Tensor``: a TensorEntry, or a mapped entry. The first entry of a
    pair may also have ``load_view() -> Tensor | Gather``: the same values, a reordering not yet
    applied (compared in place, see :func:`~tensorparity.numerics.compare_tensors`)."""

    def load(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Pair:
    """Two entries to compare: ``a`` under ``key``, ``b`` under ``key_b`` (when it differs);
    ``tolerance``, when given, judges this pair instead of the run's. ``run``, when given, is the
    pair's own comparison (called on a worker with the run's tolerance, e.g. one that tries a
    reordering first and falls back on :func:`compare_pair`)."""

    key: str
    a: Loadable
    b: Loadable
    key_b: str | None = None
    tolerance: Tolerance | None = None
    run: Callable[[Tolerance], TensorComparison] | None = None


def _on_disk(pair: Pair, tolerance: Tolerance) -> TensorComparison | None:
    """Compare two entries from their file bytes, without building tensors (or importing torch).

    Identical bytes make an "identical" record; float32/float64 bytes that differ go through the
    C kernel (:func:`compare_buffers`), the same arithmetic as the tensor route. ``None`` where
    the bytes cannot decide (no byte span, dtypes or shapes differ, NaN != NaN asked for, a NaN
    or an Inf among the values): the caller compares tensors.
    """
    a, b = pair.a, pair.b
    if not (isinstance(a, TensorEntry) and isinstance(b, TensorEntry)):
        return None
    if a.dtype_name != b.dtype_name or a.shape != b.shape:
        return None
    tol = tolerance.for_key(pair.key, a.dtype_name, b.dtype_name)
    info = dtype_info(a.dtype_name)
    if not tol.equal_nan and (info.is_floating_point or info.is_complex):
        return None  # NaN != NaN must look at values
    span_a, span_b = a.byte_span(), b.byte_span()
    if span_a is None or span_b is None:
        return None
    if spans_equal(span_a, span_b):
        return TensorComparison(key=pair.key, key_b=pair.key_b, passed=True, status="identical",
                                shape_a=a.shape, shape_b=b.shape, dtype_a=a.dtype_name, dtype_b=b.dtype_name,
                                tolerance=tol, numel=a.numel)
    if tol.exact or not buffers_comparable(a.dtype_name):
        return None
    span_a, span_b = _value_spans(a, b)  # checked as load() checks them (a trace's checksums)
    if span_a is None or span_b is None:
        return None
    with span_buffer(span_a) as buf_a, span_buffer(span_b) as buf_b:
        return compare_buffers(pair.key, buf_a, buf_b, shape=a.shape, dtype=a.dtype_name, tolerance=tol,
                               key_b=pair.key_b)


_WORKER = threading.local()


def _start_worker(counter: Iterator[int]) -> None:
    _WORKER.b_first = next(counter) % 2 == 1


def _value_spans(a: TensorEntry, b: TensorEntry) -> tuple[Any, Any]:
    """Both entries' value spans, B's checked first on every other worker (see :func:`_run`)."""
    if getattr(_WORKER, "b_first", False):
        try:
            span_b = b.value_span()
        except Exception:
            a.value_span()  # A's error, if both fail, is the one raised
            raise
        return a.value_span(), span_b
    return a.value_span(), b.value_span()


def _load_a(pair: Pair) -> torch.Tensor | Gather:
    view = getattr(pair.a, "load_view", None)
    return view() if callable(view) else pair.a.load()


def any_outside(pair: Pair, tolerance: Tolerance | ResolvedTolerance, limit: int = -1) -> bool | None:
    """Whether some element of ``pair`` lies outside the tolerance, both its values finite: then
    the pair's comparison fails, known without measuring it (the scan stops at the first such
    element; atol raised by ``ulps`` as the comparison raises it). ``False``: none does. ``None``:
    this cannot say (no kernel, not float32/float64, dtypes or shapes differ, a NaN or an Inf met
    first, another statistic than elementwise). ``limit >= 0``: only the first ``limit`` elements,
    at the atol not raised (a guess of what the comparison will say, reading little)."""
    a, b = pair.a, pair.b
    if not (isinstance(a, TensorEntry) and isinstance(b, TensorEntry)):
        return None
    if a.dtype_name != b.dtype_name or a.shape != b.shape or not buffers_comparable(a.dtype_name):
        return None
    tol = tolerance if isinstance(tolerance, ResolvedTolerance) else tolerance.for_key(pair.key, a.dtype_name,
                                                                                         b.dtype_name)
    if tol.exact or tol.statistic != "elementwise":
        return None
    span_a, span_b = _value_spans(a, b)
    if span_a is None or span_b is None:
        return None
    with span_buffer(span_a) as buf_a, span_buffer(span_b) as buf_b:
        return first_outside(buf_a, buf_b, a.dtype_name, tol, limit, scaled=limit < 0)


def compare_pair(pair: Pair, tolerance: Tolerance) -> TensorComparison:
    """One pair compared on the calling thread, as :func:`compare_pairs` compares each."""
    return _run(pair, tolerance)


def _run(pair: Pair, tolerance: Tolerance) -> TensorComparison:
    if pair.run is not None:
        return pair.run(tolerance)
    tolerance = pair.tolerance or tolerance
    fast = _on_disk(pair, tolerance)
    if fast is not None:
        return fast
    if getattr(_WORKER, "b_first", False):
        # Every other worker loads B first: where a load first checks a file (a trace's shard
        # checksum), two workers reaching new files together check A's and B's side by side
        # instead of one waiting for the other. A's error, if both fail, is still the one raised.
        try:
            b = pair.b.load()
        except Exception:
            _load_a(pair)
            raise
        a = _load_a(pair)
    else:
        a = _load_a(pair)
        b = pair.b.load()
    return compare_tensors(pair.key, a, b, tolerance, key_b=pair.key_b)


def compare_pairs(
    pairs: Iterable[Pair],
    tolerance: Tolerance | None = None,
    *,
    workers: int | None = None,
    on_result: Callable[[TensorComparison], None] | None = None,
) -> Iterator[TensorComparison]:
    """Compare pairs of lazy entries, yielding records in the order the pairs came.

    At most ``workers`` pairs are worked on at once, so at most that many pairs of tensors are
    held; the pairs iterable is read a bounded window ahead.

    Example:
        >>> import torch, tensorparity
        >>> a = tensorparity.open({"w": torch.ones(2)}); b = tensorparity.open({"w": torch.ones(2)})
        >>> [r.status for r in compare_pairs([Pair("w", a["w"], b["w"])])]
        ['identical']
    """
    tol = tolerance or Tolerance()
    n = workers or min(2, os.cpu_count() or 1)
    if n <= 1:
        for pair in pairs:
            result = _run(pair, tol)
            if on_result:
                on_result(result)
            yield result
        return
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="tensorparity-compare", initializer=_start_worker,
                            initargs=(itertools.count(),)) as pool:
        pending: deque[Future[tuple[list[TensorComparison], BaseException | None]]] = deque()
        # A window wider than the pool keeps both workers busy while the pair at the head (a
        # large mismatching tensor) is still being measured. Only the `n` tasks being worked
        # on hold tensors; finished ones wait as small records.
        window = 8 * n
        for task in _tasks(pairs):
            pending.append(pool.submit(_run_task, task, tol))
            if len(pending) >= window:
                yield from _results(pending.popleft(), on_result)
        while pending:
            yield from _results(pending.popleft(), on_result)


SMALL = 256 << 10  # bytes: a pair this small costs less to compare than to hand to a thread
BATCH_BYTES = 1 << 20  # small pairs handed over together, up to this many bytes of A's side
BATCH_PAIRS = 32  # and this many pairs (the input is still read only a bounded window ahead)


def _tasks(pairs: Iterable[Pair]) -> Iterator[list[Pair]]:
    """The pairs in order, consecutive small ones in batches: each hand-over to a thread (a queue,
    two wake-ups, a future) costs about what comparing a bias does, and a model has hundreds."""
    batch: list[Pair] = []
    held = 0
    for pair in pairs:
        size = pair.a.nbytes if pair.run is None and isinstance(pair.a, TensorEntry) else SMALL
        if size < SMALL:
            batch.append(pair)
            held += size
            if held >= BATCH_BYTES or len(batch) >= BATCH_PAIRS:
                yield batch
                batch, held = [], 0
            continue
        if batch:
            yield batch
            batch, held = [], 0
        yield [pair]
    if batch:
        yield batch


def _run_task(task: list[Pair], tolerance: Tolerance) -> tuple[list[TensorComparison], BaseException | None]:
    """A task's records, and the error that stopped it (the records before it stand)."""
    done: list[TensorComparison] = []
    for pair in task:
        try:
            done.append(_run(pair, tolerance))
        except BaseException as exc:  # noqa: BLE001 - raised by the consumer after the records before it
            return done, exc
    return done, None


def _results(future: Future[tuple[list[TensorComparison], BaseException | None]],
             on_result: Callable[[TensorComparison], None] | None) -> Iterator[TensorComparison]:
    done, error = future.result()
    for result in done:
        if on_result:
            on_result(result)
        yield result
    if error is not None:
        raise error
