"""Reproducible runs: seed everything, build inputs from a spec, hash what a model was fed.

Two environments compare layer by layer only if they compute on the same input with the same
random streams. :func:`seed_everything` seeds Python, numpy and torch (CUDA included) and turns
on deterministic algorithms; :func:`reproducible` does it for a block and restores everything
afterwards. :class:`InputSpec` builds an input from a short text (``"2x16000:float32:lengths"``,
or ``"input_signal=2x16000:float32:lengths"`` for keyword arguments) the same way everywhere,
independent of the global random state; :func:`build_inputs` turns several into a model call's
``(args, kwargs)``; :func:`input_hash` fingerprints
a model call's inputs so that a trace can prove which input it was captured on.
"""

from __future__ import annotations

import hashlib
import keyword
import os
import random
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import numpy as np
import torch

from tensorparity._version import __version__
from tensorparity.errors import UsageError

__all__ = ["InputSpec", "RandomState", "build_inputs", "current_seed", "environment", "input_hash", "reproducible",
           "seed_everything"]

_MAX_SEED = 2**32 - 1  # numpy's limit; python and torch accept it too
_current_seed: int | None = None


@dataclass(frozen=True)
class RandomState:
    """Everything :func:`seed_everything` changes, as it was before: call :meth:`restore`."""

    python: Any
    numpy: Any
    torch: torch.Tensor
    cuda: list[torch.Tensor] | None
    deterministic: bool
    warn_only: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    cublas_config: str | None
    seed: int | None

    def restore(self) -> None:
        """Put the random generators and determinism switches back as they were."""
        global _current_seed
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.cublas_config is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = self.cublas_config
        _current_seed = self.seed


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise UsageError(f"seed must be an integer from 0 to {_MAX_SEED}, not {seed!r}", fix="pass e.g. seed=0")
    return seed


def seed_everything(seed: int, *, deterministic: bool = True) -> RandomState:
    """Seed Python's ``random``, numpy, torch and CUDA, and switch on deterministic algorithms.

    ``torch.use_deterministic_algorithms(True, warn_only=True)`` makes torch pick deterministic
    kernels and warn (not fail) where none exists; cuDNN is made deterministic and its autotuner
    switched off; ``CUBLAS_WORKSPACE_CONFIG`` is set for deterministic cuBLAS (it only takes effect
    if CUDA was not initialised yet). ``PYTHONHASHSEED`` cannot be changed in a running process.

    Args:
        seed: 0 to 2**32 - 1.
        deterministic: also switch on the deterministic-algorithm settings.

    Returns:
        The state before seeding; ``state.restore()`` puts it back.

    Example:
        >>> state = seed_everything(0)
        >>> a = torch.rand(2)
        >>> _ = seed_everything(0); torch.equal(a, torch.rand(2))
        True
        >>> state.restore()
    """
    global _current_seed
    seed = _check_seed(seed)
    # CUDA states are saved only when CUDA is already up: querying them would initialise it.
    cuda_up = torch.cuda.is_available() and torch.cuda.is_initialized()
    state = RandomState(
        python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if cuda_up else None,
        deterministic=torch.are_deterministic_algorithms_enabled(),
        warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn_deterministic=torch.backends.cudnn.deterministic, cudnn_benchmark=torch.backends.cudnn.benchmark,
        cublas_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"), seed=_current_seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too (lazily when CUDA is not up yet)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _current_seed = seed
    return state


def current_seed() -> int | None:
    """The seed of the innermost :func:`seed_everything` still in effect (recorded in traces)."""
    return _current_seed


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where a run happens: package versions, platform, CUDA, the seed and determinism switches.

    Example:
        >>> sorted(environment())[:4]
        ['cuda', 'deterministic', 'numpy', 'platform']
    """
    import platform

    import safetensors

    env: dict[str, Any] = {
        "tensorparity": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "numpy": np.__version__, "safetensors": safetensors.__version__, "platform": sys.platform,
        "cuda": torch.version.cuda, "seed": _current_seed,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if device is not None and torch.device(device).type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


@contextmanager
def reproducible(seed: int, *, deterministic: bool = True) -> Iterator[int]:
    """Seed everything for a block, then restore every generator and switch as it was.

    Example:
        >>> with reproducible(3):
        ...     a = torch.rand(1)
        >>> with reproducible(3):
        ...     torch.equal(a, torch.rand(1))
        True
    """
    state = seed_everything(seed, deterministic=deterministic)
    try:
        yield seed
    finally:
        state.restore()


_SPEC_FIX = ("write SHAPE[:DTYPE][:OPTION...], e.g. '2x16x20:float32', '2x16000:float32:lengths' or "
             "'2x12:int64:high=32000' (options: lengths, lengths=NAME, seed=N, high=N), and NAME=SPEC for a "
             "keyword argument, e.g. 'input_signal=2x16000:float32:lengths'")


def _check_name(text: str, name: str, what: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"input spec {text!r}: {name!r} is not a Python parameter name ({what})", fix=_SPEC_FIX)
    return name
_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}
_DTYPES.update({"double": torch.float64, "float": torch.float32, "half": torch.float16, "long": torch.int64,
                "int": torch.int32})


@dataclass(frozen=True)
class InputSpec:
    """An input built deterministically from its shape, dtype and seed, whatever the global RNG.

    Floating inputs are standard normal, drawn in float32 and then cast (so a float64 replay sees
    the very same numbers); integer inputs are uniform in ``[0, high)``; bool inputs random bits.
    With ``lengths``, a padded batch is built: per-sample lengths along the last dimension (the
    first sample full length, the others between half and full length), with the padding zeroed,
    and :meth:`build` returns ``(tensor, lengths)``.

    A spec with a ``name`` is a keyword argument (``NAME=SPEC``); its lengths, if any, are the
    keyword ``lengths_name`` (``lengths=NAME`` in the text; ``<name>_length`` by default, NeMo's
    ``input_signal`` / ``input_signal_length``). A positional spec's lengths are the next
    positional argument unless ``lengths=NAME`` makes them a keyword.

    Attributes:
        shape: e.g. ``(2, 16000)`` for a batch of 2 clips of 16000 audio samples.
        dtype: the tensor's dtype.
        seed: seeds the input's own generator.
        lengths: also build int64 lengths of shape ``(batch,)``.
        high: exclusive upper bound for integer inputs (e.g. the vocabulary size).
        name: the keyword argument this input is passed as (``None``: positional).
        lengths_name: the keyword argument the lengths are passed as (``None``: positional).

    Example:
        >>> x, lengths = InputSpec.parse("2x16000:float32:lengths").build()
        >>> tuple(x.shape), lengths.tolist()[0]
        ((2, 16000), 16000)
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    seed: int = 0
    lengths: bool = False
    high: int | None = None
    name: str | None = None
    lengths_name: str | None = None

    def __post_init__(self) -> None:
        if self.lengths and self.name is not None and self.lengths_name is None:
            object.__setattr__(self, "lengths_name", f"{self.name}_length")
        for label, value in (("name", self.name), ("lengths_name", self.lengths_name)):
            if value is not None:
                _check_name(str(self), value, label)
        if self.lengths_name is not None and not self.lengths:
            raise UsageError(f"input {self.name or 'spec'}: lengths_name {self.lengths_name!r} without lengths",
                             fix="set lengths=True too (':lengths=NAME' in a spec)")
        if not self.shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in self.shape):
            raise UsageError(f"input shape {self.shape!r} must be one or more positive sizes", fix=_SPEC_FIX)
        if self.dtype not in _DTYPES.values():
            raise UsageError(f"input dtype {self.dtype} is not supported", fix="use one of " + ", ".join(sorted(_DTYPES)))
        _check_seed(self.seed)
        is_int = not (self.dtype.is_floating_point or self.dtype == torch.bool)
        if is_int and (self.high is None or self.high <= 0):
            raise UsageError(f"an {str(self.dtype).removeprefix('torch.')} input needs a value range",
                             fix="add ':high=N' (values are drawn from 0 to N-1, e.g. N = the vocabulary size)")
        if self.lengths and len(self.shape) < 2:
            raise UsageError("an input with lengths needs a batch dimension and a time dimension",
                             fix="give a shape like 2x16000 (batch x samples)")

    @classmethod
    def parse(cls, text: str, *, seed: int = 0) -> InputSpec:
        """Read ``[NAME=]SHAPE[:DTYPE][:OPTION...]``; ``seed`` applies unless the text says ``seed=N``.

        Example:
            >>> InputSpec.parse("2x12:int64:high=100:seed=4")
            InputSpec(shape=(2, 12), dtype=torch.int64, seed=4, lengths=False, high=100, name=None, lengths_name=None)
            >>> str(InputSpec.parse("input_signal=2x16000:float32:lengths"))
            'input_signal=2x16000:float32:lengths=input_signal_length:seed=0'
        """
        parts = [p.strip() for p in str(text).strip().split(":")]
        name: str | None = None
        if "=" in parts[0]:
            name, _, parts[0] = (p.strip() for p in parts[0].partition("="))
            _check_name(text, name, "the keyword before '='")
        if not re.fullmatch(r"\d+(x\d+)*", parts[0]):
            raise UsageError(f"input spec {text!r}: {parts[0]!r} is not a shape like 2x16x20", fix=_SPEC_FIX)
        shape = tuple(int(s) for s in parts[0].split("x"))
        dtype, lengths, high, lengths_name = torch.float32, False, None, None
        for i, part in enumerate(parts[1:]):
            option, eq, value = part.partition("=")
            if i == 0 and not eq and part in _DTYPES:
                dtype = _DTYPES[part]
            elif part == "lengths":
                lengths = True
            elif eq and option == "lengths":
                lengths, lengths_name = True, _check_name(text, value, "the keyword after 'lengths='")
            elif eq and option in ("seed", "high") and value.isdigit():
                seed, high = (int(value), high) if option == "seed" else (seed, int(value))
            else:
                raise UsageError(f"input spec {text!r}: {part!r} is neither a dtype nor an option", fix=_SPEC_FIX)
        return cls(shape, dtype, seed, lengths, high, name, lengths_name)

    def __str__(self) -> str:
        text = (f"{self.name}=" if self.name else "") + "x".join(map(str, self.shape))
        text += ":" + str(self.dtype).removeprefix("torch.")
        text += (f":lengths={self.lengths_name}" if self.lengths_name else ":lengths") if self.lengths else ""
        text += f":high={self.high}" if self.high is not None else ""
        return text + f":seed={self.seed}"

    def build(self, device: str | torch.device | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Build the input (on the CPU, then moved to ``device``): a tensor, or ``(tensor, lengths)``."""
        g = torch.Generator().manual_seed(self.seed)
        if self.dtype.is_floating_point:
            x = torch.randn(self.shape, generator=g, dtype=torch.float32).to(self.dtype)
        elif self.dtype == torch.bool:
            x = torch.randint(0, 2, self.shape, generator=g).bool()
        else:
            assert self.high is not None
            x = torch.randint(0, self.high, self.shape, generator=g, dtype=torch.int64).to(self.dtype)
        if not self.lengths:
            return x.to(device) if device is not None else x
        batch, time = self.shape[0], self.shape[-1]
        lengths = torch.randint(max(1, time // 2), time + 1, (batch,), generator=g, dtype=torch.int64)
        lengths[0] = time  # the padded batch is exactly as long as its longest sample
        pad = torch.arange(time)[None, :] >= lengths[:, None]  # (batch, time)
        x = x.masked_fill(pad.view(batch, *([1] * (len(self.shape) - 2)), time), 0)
        if device is not None:
            return x.to(device), lengths.to(device)
        return x, lengths


def build_inputs(specs: list[InputSpec] | tuple[InputSpec, ...],
                 device: str | torch.device | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Build a model call's ``(args, kwargs)`` from input specs: positional ones in their order
    (each followed by its lengths unless those are named), named ones as keywords.

    Raises:
        UsageError: two inputs (or lengths) share a keyword; every clash is named at once.

    Example:
        >>> specs = [InputSpec.parse(t) for t in ("2x4:float32", "mask=2x4:bool", "input_signal=2x8:lengths")]
        >>> args, kwargs = build_inputs(specs)
        >>> len(args), sorted(kwargs)
        (1, ['input_signal', 'input_signal_length', 'mask'])
    """
    names = [n for s in specs for n in (s.name, s.lengths_name) if n is not None]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"input specs pass the keyword argument(s) {', '.join(twice)} more than once",
                         fix="give each keyword once (lengths=NAME renames a spec's lengths)")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for spec in specs:
        value = spec.build(device)
        x, lengths = value if isinstance(value, tuple) else (value, None)
        if spec.name is None:
            args.append(x)
        else:
            kwargs[spec.name] = x
        if lengths is not None and spec.lengths_name is None:
            args.append(lengths)
        elif lengths is not None:
            kwargs[spec.lengths_name] = lengths  # type: ignore[index]
    return tuple(args), kwargs


def _feed(h: Any, obj: Any, depth: int = 0) -> None:
    if depth > 100:
        raise UsageError("the input nests more than 100 levels deep", fix="pass tensors, lists, tuples and dicts")
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=str):  # keyword order is no part of an input's identity
            h.update(repr(str(key)).encode() + b":")
            _feed(h, obj[key], depth + 1)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item, depth + 1)
            h.update(b",")
        h.update(b"]")
    elif is_dataclass(obj) and not isinstance(obj, type):
        _feed(h, {f.name: getattr(obj, f.name) for f in fields(obj)}, depth + 1)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def input_hash(*args: Any, **kwargs: Any) -> str:
    """Fingerprint a model call's inputs: blake2b over dtypes, shapes and bytes of every tensor.

    ``input_hash(x)`` equals the ``input_hash`` a trace records for ``model(x)``, and likewise
    for ``model(x, lengths=n)`` and ``input_hash(x, lengths=n)``; keyword order does not matter.

    Example:
        >>> input_hash(torch.zeros(2)) == input_hash(torch.zeros(2, dtype=torch.float64))
        False
        >>> len(input_hash(torch.zeros(2), lengths=torch.tensor([2])))
        32
    """
    h = hashlib.blake2b(digest_size=16)
    _feed(h, list(args))
    _feed(h, kwargs)
    return h.hexdigest()
