"""Signatures of tensors and of key names, the pieces :mod:`.suggest` matches with.

Content: a blake2b digest of a tensor's raw bytes (streamed from the file when the tensor lies dense
in it), digests of views (a permutation, a slice, a row permutation, a cast), and float64
statistics (mean, std, min, max, root mean square) for tensors that are close but not equal.
Names: the numeric components of a key (layer indices), its last component, its parent module and
a generalised form, from which :class:`NameAffinity` scores how plausible a pairing of two keys is;
the wrapper prefixes one side puts on every key (:func:`detect_prefixes`); buffers that need no
partner (:func:`buffer_ignores`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from functools import lru_cache

import einops
import torch

from tensorparity.checkpoint import TensorEntry
from tensorparity.checkpoint.tracefolder.stats import tensor_bytes
from tensorparity.checkpoint.tracefolder.stats import tensor_stats as trace_stats
from tensorparity.errors import CorruptCheckpointError

__all__ = ["BUFFERS", "NameAffinity", "buffer_ignores", "detect_prefixes", "entry_digest", "glob_literal", "indices",
           "last", "lower_precision", "ordinal_group", "relative_error", "rope_rows", "stats_distance", "tensor_digest",
           "tensor_stats"]

_READ = 4 << 20  # bytes per read when hashing a file span
_CHUNK = 1 << 20  # elements per float64 chunk for statistics
DIGEST_SIZE = 16


# --- content -------------------------------------------------------------------------------------

def tensor_digest(t: torch.Tensor) -> bytes:
    """A digest of a tensor's elements in C order (dtype and shape are not part of it).

    Example:
        >>> tensor_digest(torch.ones(2, 3)) == tensor_digest(torch.ones(3, 2).T.contiguous().T.reshape(6))
        True
    """
    return hashlib.blake2b(tensor_bytes(t), digest_size=DIGEST_SIZE).digest()


def entry_digest(entry: TensorEntry) -> bytes | None:
    """The :func:`tensor_digest` of an entry, streamed from its file bytes where they lie dense
    (nothing is built but the hash); ``None`` when the tensor has no data (a meta tensor).

    Example:
        >>> import tensorparity
        >>> entry_digest(tensorparity.open({"w": torch.ones(2, 3)})["w"]) == tensor_digest(torch.ones(6))
        True
    """
    span = entry.byte_span()
    if span is not None and span.nbytes == entry.nbytes:
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        with open(span.path, "rb") as f:
            f.seek(span.offset)
            left = span.nbytes
            while left:
                chunk = f.read(min(_READ, left))
                if not chunk:
                    end = span.offset + span.nbytes
                    raise CorruptCheckpointError(f"file ended inside bytes [{span.offset}, {end})", path=span.path,
                                                 key=entry.key, fix="the file was truncated; save it again")
                h.update(chunk)
                left -= len(chunk)
        return h.digest()
    t = entry.load()
    if t.device.type == "meta":
        return None
    return tensor_digest(t)


def lower_precision(a: torch.dtype, b: torch.dtype) -> torch.dtype | None:
    """Of two floating (or two integer) dtypes, the one that holds less; ``None`` when they do not
    compare (float vs int, bool, complex).

    Example:
        >>> lower_precision(torch.float32, torch.bfloat16)
        torch.bfloat16
    """
    if a.is_complex or b.is_complex or torch.bool in (a, b):
        return None
    if a.is_floating_point and b.is_floating_point:
        fa, fb = torch.finfo(a), torch.finfo(b)
        return a if (fa.eps, -fa.bits) > (fb.eps, -fb.bits) else b
    if not a.is_floating_point and not b.is_floating_point:
        return a if torch.iinfo(a).bits < torch.iinfo(b).bits else b
    return None


@lru_cache(maxsize=256)
def rope_rows(n: int, h: int, inverse: bool) -> tuple[str, torch.Tensor] | None:
    """The RoPE head permutation of ``n`` rows with ``h`` heads: ``(pattern, source row of each
    output row)``; ``None`` when it would leave the rows in place (head dim 2) or does not divide.

    HF's Llama converter turns Meta's interleaved rotary pairs into halves,
    ``(h d two) -> (h two d)``; ``inverse`` gives the other way.

    Example:
        >>> rope_rows(8, 1, False)[1].tolist()
        [0, 4, 1, 5, 2, 6, 3, 7]
    """
    if h < 1 or n % (2 * h) or n // (2 * h) < 2:
        return None
    pattern = "(h d two) -> (h two d)" if inverse else "(h two d) -> (h d two)"
    rows = einops.rearrange(torch.arange(n), pattern, h=h, two=2)
    return pattern, rows


def tensor_stats(t: torch.Tensor) -> tuple[float, float, float, float, float]:
    """``(mean, std, min, max, rms)`` of a tensor's finite elements: the trace's statistics
    (:func:`tensorparity.checkpoint.tracefolder.stats.tensor_stats`, the one implementation), as
    the signature a content match compares.

    Example:
        >>> tensor_stats(torch.tensor([1.0, 3.0]))
        (2.0, 1.0, 1.0, 3.0, 2.23606797749979)
    """
    if t.numel() == 0 or t.device.type == "meta":
        return (0.0, 0.0, 0.0, 0.0, 0.0)
    s = trace_stats(t.detach(), with_hash=False)
    finite = s.numel - s.nan - s.inf
    rms = s.norm / math.sqrt(finite) if finite else math.nan
    return s.mean, s.std, s.min, s.max, rms


def stats_distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """How far two statistics signatures are apart, relative to the tensors' spread (0: same).

    Example:
        >>> stats_distance((0.0, 1.0, -2.0, 2.0, 1.0), (0.01, 1.0, -2.0, 2.0, 1.0))
        0.01
    """
    scale = max(a[1], b[1], abs(a[0]), abs(b[0]), 1e-12)
    d = max(abs(x - y) for x, y in zip(a, b)) / scale
    return d if math.isfinite(d) else math.inf


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (L2, float64, a chunk at a time); ``inf`` when shapes differ.

    Example:
        >>> relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])) == 1 / 5 ** 0.5
        True
    """
    if a.shape != b.shape:
        return math.inf
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    num = den = 0.0
    for start in range(0, fa.numel(), _CHUNK):
        ca, cb = fa[start:start + _CHUNK].to(torch.float64), fb[start:start + _CHUNK].to(torch.float64)
        num += float(((ca - cb) ** 2).sum())
        den += float((cb * cb).sum())
    err = math.sqrt(num) / max(math.sqrt(den), 1e-30)
    return err if math.isfinite(err) else math.inf


# --- names ---------------------------------------------------------------------------------------

_TOKENS = re.compile(r"[._]")


@lru_cache(maxsize=1 << 16)
def _parts(key: str) -> tuple[str, ...]:
    return tuple(key.split("."))


def indices(key: str) -> tuple[str, ...]:
    """The numeric components of a key: its layer (and expert, head...) indices.

    Example:
        >>> indices("model.layers.3.mlp.experts.7.w1")
        ('3', '7')
    """
    return tuple(c for c in _parts(key) if c.isdigit())


def last(key: str) -> str:
    """The last dotted component (``weight``, ``bias``, ...)."""
    return key.rpartition(".")[2]


def ordinal_group(key: str) -> tuple[tuple[str, ...], str]:
    """Keys that differ only in their module's name share this; their order in the checkpoint
    (module definition order) pairs them when content cannot (LayerNorms that are all ones)."""
    return indices(key), last(key)


@lru_cache(maxsize=1 << 16)
def _features(key: str) -> tuple[str, str, frozenset[str]]:
    parts = _parts(key)
    general = ".".join("#" if c.isdigit() else c for c in parts)
    tokens = frozenset(t for t in _TOKENS.split(key) if t and not t.isdigit())
    return key.rpartition(".")[0], general, tokens


class NameAffinity:
    """How plausible it is that key ``a`` of side A and key ``b`` of side B are one weight.

    Scores, strongest first: the pair has the generalised form of a pair already made (layer 3
    pairs like layer 0 did); their parent modules are already paired (a bias follows its
    weight); same layer indices; same last component; shared name tokens. It learns from every
    pair made, so unambiguous pairs resolve the ambiguous ones (tensors with equal content).

    Example:
        >>> n = NameAffinity()
        >>> n.learn(("layers.0.norm1.weight",), ("blocks.0.attn_norm.weight",))
        >>> a = "layers.0.norm1.bias"
        >>> n.score(a, "blocks.0.attn_norm.bias") > n.score(a, "blocks.0.x.bias")
        True
    """

    def __init__(self) -> None:
        self.forms: set[tuple[str, str]] = set()
        self.parents: set[tuple[str, str]] = set()

    def learn(self, a_keys: Iterable[str], b_keys: Iterable[str]) -> None:
        b_keys = tuple(b_keys)
        for a in a_keys:
            pa, ga, _ = _features(a)
            for b in b_keys:
                pb, gb, _ = _features(b)
                self.forms.add((ga, gb))
                if last(a) == last(b):
                    self.parents.add((pa, pb))

    def score(self, a: str, b: str) -> float:
        pa, ga, ta = _features(a)
        pb, gb, tb = _features(b)
        s = 1000.0 if (ga, gb) in self.forms else 0.0
        s += 500.0 if (pa, pb) in self.parents else 0.0
        s += 100.0 if indices(a) == indices(b) else 0.0
        s += 50.0 if last(a) == last(b) else 0.0
        return s + 10.0 * len(ta & tb) / max(len(ta | tb), 1)


# --- prefixes and buffers ------------------------------------------------------------------------

# Buffers a model recomputes or counts; without a partner they are ignored, not reported.
BUFFERS = frozenset({"num_batches_tracked", "inv_freq", "position_ids", "masked_bias", "_extra_state", "freqs_cis"})
# Wrappers that prefix every key: Lightning, training scripts, DDP/DataParallel, torch.compile.
_WRAPPERS = ("state_dict", "model", "module", "_orig_mod", "net", "network")


def _common(keys: list[str]) -> list[str]:
    """The leading components every key shares (never a whole key)."""
    if not keys:
        return []
    parts = [k.split(".")[:-1] for k in keys]
    out = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        out.append(column[0])
    return out[:4]


def detect_prefixes(keys_a: list[str], keys_b: list[str]) -> tuple[str, str]:
    """The prefixes (``prefix_a``, ``prefix_b``) to strip so that the most keys match by name.

    Only leading components present on every key of a side are candidates. When no key matches
    however they are cut, wrapper prefixes (``state_dict``, ``model``, ``module``, ...) that one
    side has on every key are stripped anyway, so that templates start at the model.

    Example:
        >>> detect_prefixes(["module.enc.w", "module.dec.w"], ["enc.w", "dec.w"])
        ('module.', '')
    """
    ca, cb = _common(keys_a), _common(keys_b)
    best = (-1, 0, "", "")
    for i in range(len(ca) + 1):
        pa = "".join(c + "." for c in ca[:i])
        bare_a = {k[len(pa):] for k in keys_a}
        for j in range(len(cb) + 1):
            pb = "".join(c + "." for c in cb[:j])
            n = sum(1 for k in keys_b if k[len(pb):] in bare_a)
            best = max(best, (n, -(i + j), pa, pb))
    if best[0] > 0:
        return best[2], best[3]
    strip = []
    for mine, other in ((ca, cb), (cb, ca)):
        n = 0
        while n < len(mine) and mine[n] in _WRAPPERS and other[:n + 1] != mine[:n + 1]:
            n += 1
        strip.append("".join(c + "." for c in mine[:n]))
    return strip[0], strip[1]


def glob_literal(key: str) -> str:
    """A glob that matches only ``key`` (``*``, ``?``, ``[`` escaped)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in key)


def buffer_ignores(unmatched: list[str], paired: set[str]) -> tuple[list[str], list[str]]:
    """Globs for buffers without a partner, and the keys they cover: ``*.num_batches_tracked``
    when no key of that name found a partner, else the keys themselves."""
    globs, covered = [], []
    for name in sorted({last(k) for k in unmatched if last(k) in BUFFERS}):
        keys = [k for k in unmatched if last(k) == name]
        if any(last(k) == name for k in paired):
            globs += [glob_literal(k) for k in keys]
        else:
            globs += [f"*.{name}"] if any(k != name for k in keys) else []
            globs += [name] if name in keys else []
        covered += keys
    return globs, covered
