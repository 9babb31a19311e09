"""Known data types inside an inertly read pickle, turned into plain Python data.

The inert unpickler (:mod:`.safe_pickle`) records every global it does not trust as a
:class:`Placeholder`. Some of those are plain data in disguise: numpy arrays and scalars, omegaconf
containers, Lightning's ``AttributeDict``, ``argparse.Namespace``, pathlib paths, enums already
imported by this process. :func:`to_plain` rebuilds them from the recorded arguments alone —
nothing the pickle named is imported or called.
"""

from __future__ import annotations

import enum
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tensorparity.checkpoint.safe_pickle import (
    MAX_REVISITS,
    PICKLE_FIX,
    Placeholder,
    _as_shape,
    _short,
    completed,
)
from tensorparity.errors import CorruptCheckpointError, TensorParityError, UnsafeCheckpointError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["placeholder_children", "to_plain"]


def _numpy_dtype(obj: Any) -> np.dtype[Any]:
    # numpy.dtype('f8', False, True) then BUILD (3, '<', ...) -> reconstruct from the code alone.
    import numpy as np  # only for a pickle that holds numpy data

    if isinstance(obj, np.dtype):
        return obj
    if isinstance(obj, Placeholder) and obj.name.endswith(".dtype") and obj.args and isinstance(obj.args[0], str):
        code = obj.args[0]
        order = obj.state[1] if isinstance(obj.state, tuple) and len(obj.state) > 1 else "="
        if code == "O" or code.startswith("V") or code.startswith("O"):
            raise CorruptCheckpointError(f"numpy object/void arrays are not supported as data (dtype {code!r})")
        prefix = order if order in ("<", ">", "=") else "="
        try:
            dt = np.dtype(prefix + code if code[:1] not in ("<", ">", "=", "|") else code)
        except (TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"unknown numpy dtype {_short(code)}") from exc
        if dt.hasobject:
            raise CorruptCheckpointError(f"numpy object arrays are not supported as data (dtype {dt})")
        return dt
    raise CorruptCheckpointError(f"numpy array with an unreadable dtype: {_short(obj)}")


def _numpy_array(obj: Placeholder) -> Any:
    state = obj.state
    if not (isinstance(state, tuple) and len(state) == 5):
        raise CorruptCheckpointError("numpy array with malformed state")
    _, shape, dtype, fortran, raw = state
    dt = _numpy_dtype(dtype)
    shape = _as_shape(shape, "numpy shape")
    count = math.prod(shape)  # Python ints: np.prod would wrap around on a hostile shape
    raw = _latin1(raw)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dt.itemsize or not dt.itemsize:
        raise CorruptCheckpointError(f"numpy array of shape {shape} and dtype {dt} has the wrong number of bytes")
    import numpy as np

    return np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C").copy()


def _latin1(raw: Any) -> Any:
    # Python 2 pickles carry bytes as latin-1 text; anything else is left for the caller to refuse.
    if isinstance(raw, str):
        try:
            return raw.encode("latin1")
        except UnicodeEncodeError as exc:
            raise CorruptCheckpointError("numpy data is text that is not latin-1 bytes") from exc
    return raw


def _numpy_scalar(obj: Placeholder) -> Any:
    if len(obj.args) != 2:
        raise CorruptCheckpointError("numpy scalar with malformed arguments")
    dt, raw = _numpy_dtype(obj.args[0]), _latin1(obj.args[1])
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != dt.itemsize or not dt.itemsize:
        raise CorruptCheckpointError("numpy scalar with the wrong number of bytes")
    import numpy as np

    return np.frombuffer(bytes(raw), dtype=dt)[0].item()


def _state_dict_part(state: Any) -> dict[Any, Any]:
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
        merged: dict[Any, Any] = {}
        for part in state:
            if isinstance(part, dict):
                merged.update(part)
        return merged
    return state if isinstance(state, dict) else {}


def _omegaconf(obj: Placeholder, plain: Callable[[Any], Any]) -> Any:
    state = _state_dict_part(obj.state)
    if obj.name.endswith("DictConfig") or obj.name.endswith("ListConfig"):
        content = state.get("_content")
        return plain(content)
    # value nodes (AnyNode, StringNode, ...): the value is _val
    return plain(state.get("_val"))


def _loaded_enum(name: str) -> type[enum.Enum] | None:
    module, _, attr = name.rpartition(".")
    mod = sys.modules.get(module)
    try:  # vars(), not getattr(): a module's __getattr__ could run code
        cls = vars(mod).get(attr) if mod is not None else None
    except TypeError:  # something that is not a module sits in sys.modules
        return None
    return cls if isinstance(cls, type) and issubclass(cls, enum.Enum) else None


def _convert(obj: Placeholder, plain: Callable[[Any], Any]) -> Any:
    """Return plain data for a known type, or the placeholder itself."""
    name = obj.name
    if name in ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"):
        return _numpy_array(obj)
    if name in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):
        return _numpy_scalar(obj)
    if name == "numpy.dtype":
        return str(_numpy_dtype(obj))
    if name.startswith("omegaconf."):
        return _omegaconf(obj, plain)
    if name == "argparse.Namespace":
        return plain(_state_dict_part(obj.state))
    if name.endswith(".AttributeDict") and name.startswith(("lightning", "pytorch_lightning")):
        return plain(dict(obj.items))
    if name.startswith("pathlib.") and name.rpartition(".")[2] in (
        "Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"
    ) and all(isinstance(a, str) for a in obj.args):
        from pathlib import PurePosixPath, PureWindowsPath

        pure = PureWindowsPath if "Windows" in name else PurePosixPath
        return str(pure(*obj.args))
    if _loaded_enum(name) is not None and len(obj.args) == 1 and not obj.kwargs:
        value = obj.args[0]
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
    return obj


def to_plain(obj: Any, *, on_placeholder: Callable[[Placeholder], None] | None = None) -> Any:
    """Turn known data types inside ``obj`` into plain Python data, recursively.

    Containers become ``dict``/``list``; numpy arrays stay numpy arrays; tensors stay
    :class:`TensorRef`. Unknown placeholders are kept and passed to ``on_placeholder``.

    Raises:
        CorruptCheckpointError: the structure nests more than 200 levels deep.
        UnsafeCheckpointError: shared references expand it past a million extra nodes.

    Example:
        >>> to_plain((1, [2, {"a": 3}]))
        (1, [2, {'a': 3}])
    """
    try:
        return _Plain(on_placeholder).walk(obj, 0)
    except TensorParityError as exc:
        raise completed(exc, fix=PICKLE_FIX) from exc
    except RecursionError as exc:  # 200 levels of containers inside placeholders inside ...
        raise CorruptCheckpointError("structure nests too deeply to read", fix=PICKLE_FIX) from exc


class _Plain:
    """One :func:`to_plain` walk: the placeholder callback and the budget for shared parts."""

    def __init__(self, on_placeholder: Callable[[Placeholder], None] | None) -> None:
        self.on_placeholder = on_placeholder
        self.seen: dict[int, Any] = {}  # id -> object; holding it keeps the id unique
        self.revisits = 0

    def _count(self, obj: Any) -> None:
        if id(obj) not in self.seen:
            self.seen[id(obj)] = obj
            return
        self.revisits += 1
        if self.revisits > MAX_REVISITS:
            raise UnsafeCheckpointError(
                f"shared references expand the pickle past {MAX_REVISITS:,} extra nodes (a 'billion laughs' file)",
                fix="refusing a structure built to exhaust memory; re-save the checkpoint")

    def walk(self, obj: Any, depth: int) -> Any:
        if depth > 200:
            raise CorruptCheckpointError("structure nests more than 200 levels deep")

        def plain(value: Any) -> Any:
            return self.walk(value, depth + 1)

        if isinstance(obj, (Placeholder, dict, list, tuple, set, frozenset)):
            self._count(obj)
        if isinstance(obj, Placeholder):
            converted = _convert(obj, plain)
            if converted is not obj:
                return converted
            if self.on_placeholder is not None:
                self.on_placeholder(obj)
            # Walk what the placeholder holds, so tensors inside it are still found.
            obj.args = tuple(plain(a) for a in obj.args)
            obj.state = plain(obj.state)
            obj.items = {k: plain(v) for k, v in obj.items.items()}
            obj.listitems = [plain(v) for v in obj.listitems]
            return obj
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [plain(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(plain(v) for v in obj)
        if isinstance(obj, (set, frozenset)):
            return sorted((plain(v) for v in obj), key=repr)
        return obj


def placeholder_children(obj: Placeholder) -> dict[str, Any]:
    """What a placeholder holds, as named children for flattening."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(obj.args):
        out[f"args.{i}"] = arg
    for k, v in obj.kwargs.items():
        out[f"kwargs.{k}"] = v
    if obj.state is not None:
        out["state"] = obj.state
    for k, v in obj.items.items():
        out[f"items.{k}"] = v
    for i, v in enumerate(obj.listitems):
        out[f"listitems.{i}"] = v
    return out
