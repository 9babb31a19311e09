"""Sequence alignment of two traces' layers by execution order (Needleman–Wunsch, free gaps).

Only layers whose (first) forward outputs have equal shapes and dtypes can pair. Among those the score
prefers (weights in brackets): the same module class [1] or family, e.g. two norms [0.5]; close
output statistics [up to 3: ``3 / (1 + d / 0.01)``, with ``d`` the largest relative difference of
mean, std and norm]; an equal content hash [1]; the same module name [4]; similar last name
components [up to 0.5, difflib's ratio]. Statistics decide between look-alikes (``q_proj`` or
``out_proj``?) while the runs agree; class and shape keep the pairing after they part.

The dynamic programme keeps one int8 move per cell and two rows of scores: one numpy pass per
layer of A, O(n·m) time and n·m bytes.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tensorparity.trace.align import TraceLayer

__all__ = ["align_within_parents", "sequence_align"]

_FAMILIES = (("norm", "norm"), ("linear", "linear"), ("conv", "conv"), ("attention", "attn"), ("attn", "attn"),
             ("embed", "embed"), ("dropout", "dropout"), ("relu", "act"), ("gelu", "act"), ("silu", "act"),
             ("swish", "act"), ("sigmoid", "act"), ("tanh", "act"), ("softmax", "act"), ("act", "act"),
             ("pool", "pool"), ("lstm", "rnn"), ("gru", "rnn"), ("rnn", "rnn"), ("mlp", "mlp"), ("ffn", "mlp"),
             ("feedforward", "mlp"), ("block", "block"), ("layer", "block"))


def _family(cls: str) -> str:
    low = cls.lower()
    return next((fam for word, fam in _FAMILIES if word in low), "")


class _Features:
    """Per-layer numbers for scoring, as arrays; ids come from tables shared by both sides."""

    def __init__(self, layers: Sequence[TraceLayer], ids: dict[Any, int]) -> None:
        def idx(value: Any) -> int:
            return ids.setdefault(value, len(ids))

        outs = [x.outputs for x in layers]
        # The first output decides: an attention returning (output, weights) can pair with one
        # returning the output alone.
        self.sig = np.array([idx(("sig", o[0].shape, o[0].dtype) if o else ("sig",)) for o in outs], dtype=np.int64)
        classes = [x.module_type.rsplit(".", 1)[-1] for x in layers]
        self.cls = np.array([idx(("cls", c)) for c in classes], dtype=np.int64)
        self.fam = np.array([idx(("fam", _family(c))) if _family(c) else -1 for c in classes], dtype=np.int64)
        self.name = np.array([idx(("name", x.module, x.call)) for x in layers], dtype=np.int64)
        self.last = [next((p for p in reversed(x.module.split(".")) if not p.isdigit()), x.module) for x in layers]
        stats = [o[0].stats for o in outs]
        self.mean = np.array([s.mean if s else np.nan for s in stats], dtype=np.float64)
        self.std = np.array([s.std if s else np.nan for s in stats], dtype=np.float64)
        self.norm = np.array([s.norm if s else np.nan for s in stats], dtype=np.float64)
        self.hash = np.array([idx(("hash", s.hash)) if s and s.hash else -1 for s in stats], dtype=np.int64)


def _similarity_table(last_a: list[str], last_b: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarity of the last name components (difflib ratio), per pair of distinct names."""
    ua, ub = sorted(set(last_a)), sorted(set(last_b))
    table = np.array([[difflib.SequenceMatcher(None, x, y).ratio() for y in ub] for x in ua], dtype=np.float64)
    pos_a, pos_b = {n: i for i, n in enumerate(ua)}, {n: i for i, n in enumerate(ub)}
    return (table.reshape(len(ua), len(ub)), np.array([pos_a[n] for n in last_a], dtype=np.int64),
            np.array([pos_b[n] for n in last_b], dtype=np.int64))


def _score_row(fa: _Features, i: int, fb: _Features, sim: np.ndarray) -> np.ndarray:
    """Scores of A's layer ``i`` against every layer of B; ``-inf`` where outputs differ in shape."""
    score = np.where(fb.sig == fa.sig[i], 1.0, -np.inf)
    score += np.where(fb.cls == fa.cls[i], 1.0, np.where((fb.fam == fa.fam[i]) & (fb.fam >= 0), 0.5, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.abs(fa.std[i]) + np.abs(fb.std) + 1e-30
        dist = np.maximum.reduce([np.abs(fa.mean[i] - fb.mean) / spread, np.abs(fa.std[i] - fb.std) / spread,
                                  np.abs(fa.norm[i] - fb.norm) / (np.abs(fa.norm[i]) + np.abs(fb.norm) + 1e-30)])
    score += np.nan_to_num(3.0 / (1.0 + dist / 0.01), nan=0.0)
    score += np.where((fb.hash == fa.hash[i]) & (fb.hash >= 0), 1.0, 0.0)
    score += np.where(fb.name == fa.name[i], 4.0, 0.0)
    return score + 0.5 * sim


def sequence_align(a: Sequence[TraceLayer], b: Sequence[TraceLayer]) -> list[tuple[int, int, float]]:
    """Needleman–Wunsch over two sequences of layers with free gaps: the order-preserving pairing
    of largest total score. Returns ``(i, j, score)`` for each pair, in order.

    Example:
        >>> from tensorparity.trace.align import TraceLayer
        >>> from tensorparity.checkpoint.tracefolder.records import TraceRecord
        >>> def layer(i, m, shape):
        ...     r = TraceRecord(i, m, 0, "Linear", "output", "", shape, "float32", "cpu", None, False)
        ...     return TraceLayer(m, 0, "Linear", (r,), i)
        >>> a = [layer(0, "x", (2,)), layer(1, "y", (3,)), layer(2, "z", (2,))]
        >>> b = [layer(0, "p", (3,)), layer(1, "q", (2,))]
        >>> [(i, j) for i, j, _ in sequence_align(a, b)]
        [(1, 0), (2, 1)]
    """
    n, m = len(a), len(b)
    if not n or not m:
        return []
    ids: dict[Any, int] = {}
    fa, fb = _Features(a, ids), _Features(b, ids)
    table, pos_a, pos_b = _similarity_table(fa.last, fb.last)
    # ptr: 0 match, 1 skip A's layer, 2 skip B's layer. One int8 per cell; two rows of scores.
    ptr = np.empty((n, m), dtype=np.int8)
    prev = np.zeros(m + 1, dtype=np.float64)
    for i in range(n):
        diag = prev[:-1] + _score_row(fa, i, fb, table[pos_a[i]][pos_b])
        up = prev[1:]
        # Skipping B's layers costs nothing, so a row is the running maximum of its best moves.
        row = np.maximum.accumulate(np.maximum(diag, up))
        ptr[i] = np.where(diag == row, 0, np.where(up == row, 1, 2))
        prev[1:] = row
    out = []
    i, j = n, m
    while i > 0 and j > 0:
        move = ptr[i - 1, j - 1]
        if move == 0:
            row_score = _score_row(fa, i - 1, fb, table[pos_a[i - 1]][pos_b])
            out.append((i - 1, j - 1, float(row_score[j - 1])))
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def _nearest(module: str, anchors: dict[str, str]) -> str | None:
    """The closest strict ancestor of ``module`` among ``anchors`` ("" is the whole model)."""
    parts = module.split(".")
    for k in range(len(parts) - 1, -1, -1):
        head = ".".join(parts[:k])
        if head in anchors:
            return head
    return None


def align_within_parents(pairs: Sequence[tuple[TraceLayer, TraceLayer]], left_a: Sequence[TraceLayer],
                         left_b: Sequence[TraceLayer]) -> list[tuple[TraceLayer, TraceLayer, float]]:
    """Pair the layers a name-based alignment left over, each inside its nearest paired parent.

    A mapping written for parameter keys names no parameter-free module (an activation, a
    dropout, an attention wrapper whose projections are fused): such a layer is paired by
    execution order with the left-over layers of its partner's parent only, so the fill-in
    can never cross a layer the names already paired.

    Example:
        >>> from tensorparity.trace.align import group_layers
        >>> from tensorparity.checkpoint.tracefolder.records import TraceRecord
        >>> def rec(i, m, t):
        ...     return TraceRecord(i, m, 0, t, "output", "", (2, 4), "float32", "cpu", None, False)
        >>> a = group_layers([rec(0, "mlp.fc", "Linear"), rec(1, "mlp.act_fn", "SiLU"), rec(2, "mlp", "MLP")])
        >>> b = group_layers([rec(0, "ffn.fc", "Linear"), rec(1, "ffn.act", "SiLU"), rec(2, "ffn", "MLP")])
        >>> [(x.module, y.module) for x, y, _ in align_within_parents([(a[2], b[2])], [a[1]], [b[1]])]
        [('mlp.act_fn', 'ffn.act')]
    """
    anchors_a = {x.module: y.module for x, y in pairs if x.call == 0 and y.call == 0}
    anchors_b = set(anchors_a.values())
    groups: dict[tuple[str, str], tuple[list[TraceLayer], list[TraceLayer]]] = {}
    for layer in left_a:
        parent = _nearest(layer.module, anchors_a) if layer.module and layer.outputs else None
        if parent is not None:
            groups.setdefault((parent, anchors_a[parent]), ([], []))[0].append(layer)
    by_b = {b: key for key in groups for b in [key[1]]}
    for layer in left_b:
        parent = _nearest(layer.module, dict.fromkeys(anchors_b, "")) if layer.module and layer.outputs else None
        if parent is not None and parent in by_b:
            groups[by_b[parent]][1].append(layer)
    found = []
    for seq_a, seq_b in groups.values():
        if seq_a and seq_b:
            found += [(seq_a[i], seq_b[j], score) for i, j, score in sequence_align(seq_a, seq_b)]
    return found
