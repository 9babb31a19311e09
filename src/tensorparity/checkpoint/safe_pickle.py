"""An inert unpickler: reads every pickle a checkpoint holds, executes nothing from it.

A pickle is a small program; ``pickle.load`` runs it, and any global it names (``os.system``,
``builtins.eval``, a ``__reduce__`` gadget) is called. Here the only globals that resolve to real
callables are a handful whose effect is to build plain data (``collections.OrderedDict``, ``set``,
``complex``) and torch's tensor-rebuild functions, which are replaced by functions that only
*describe* a tensor (:class:`TensorRef`): no storage is allocated and no byte is read. Every other
global resolves to a :class:`Placeholder` class: calling it records the name and arguments, and the
checkpoint still opens, with the placeholder reported as "not executed".

Known data types (numpy arrays and scalars, omegaconf containers, Lightning's ``AttributeDict``,
``argparse.Namespace``, pathlib paths, enums already imported by this process) are turned into
plain Python data afterwards by :func:`to_plain`, from the recorded arguments alone.
"""

from __future__ import annotations

import enum
import io
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tensorparity.errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["Placeholder", "StorageRef", "TensorRef", "inert_load_file", "inert_loads", "to_plain"]

# Hard caps against memory blow-ups from hostile pickles: a pickle is read from bytes already in
# memory, so sizes are bounded by the file; these bound what we derive from it.
MAX_PICKLE_BYTES = 1 << 30
MAX_TENSOR_DIMS = 64


@dataclass(frozen=True)
class StorageRef:
    """A storage named by a pickle's persistent id: where its bytes are, not the bytes."""

    key: str
    dtype: torch.dtype
    numel: int
    location: str

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass
class TensorRef:
    """A tensor described by a pickle: storage, offset, shape and strides; no data."""

    storage: StorageRef | None
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = False
    is_parameter: bool = False
    subclass: str | None = None
    device: str = "cpu"
    note: str | None = None

    def __setstate__(self, state: Any) -> None:  # BUILD on a tensor: Python attributes only
        pass


class Placeholder:
    """An object whose class or function a pickle named but that was not executed.

    ``name`` is the dotted global, ``args``/``kwargs`` what it would have been called with,
    ``state`` what ``__setstate__`` would have received, and ``items``/``listitems`` what would
    have been stored into it.
    """

    name: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.items = {}
        obj.listitems = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.listitems.append(value)

    def extend(self, values: Any) -> None:
        self.listitems.extend(values)

    def __reduce__(self) -> Any:  # never re-pickle a placeholder into something executable
        raise TypeError(f"placeholder for {self.name} cannot be pickled")

    def __repr__(self) -> str:
        args = ", ".join(_short(a) for a in self.args)
        return f"<not executed: {self.name}({args})>"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# What globals resolve to


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _legacy_storage_types() -> dict[str, _StorageType]:
    names = {
        "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
        "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
        "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
        "BFloat16Storage": torch.bfloat16, "ComplexDoubleStorage": torch.complex128,
        "ComplexFloatStorage": torch.complex64, "QInt8Storage": torch.qint8,
        "QInt32Storage": torch.qint32, "QUInt8Storage": torch.quint8,
        "QUInt4x2Storage": torch.quint4x2, "QUInt2x4Storage": torch.quint2x4,
        "UntypedStorage": torch.uint8,
    }
    return {name: _StorageType(dtype) for name, dtype in names.items()}


_STORAGE_TYPES = _legacy_storage_types()
_DTYPES = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, Placeholder):
        value = value.args[0] if value.args else ()
    if not isinstance(value, (tuple, list)) or len(value) > MAX_TENSOR_DIMS:
        raise CorruptCheckpointError(f"tensor {what} is not a tuple of integers: {_short(value)}")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise CorruptCheckpointError(f"tensor {what} has a negative or non-integer entry: {out}")
    return out


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise CorruptCheckpointError(f"tensor rebuilt from a non-storage: {_short(storage)}")
    if not isinstance(offset, int) or offset < 0:
        raise CorruptCheckpointError(f"tensor storage offset is not a non-negative integer: {offset!r}")
    shape, strides = _as_shape(size, "size"), _as_shape(stride, "stride")
    if len(shape) != len(strides):
        raise CorruptCheckpointError(f"tensor size {shape} and stride {strides} differ in length")
    requires_grad = bool(rest[0]) if rest and isinstance(rest[0], bool) else False
    return TensorRef(storage, offset, shape, strides, storage.dtype, requires_grad)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       hooks: Any, dtype: Any, *rest: Any) -> TensorRef:
    ref = _rebuild_tensor(storage, offset, size, stride, requires_grad)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"tensor dtype is not a torch dtype: {_short(dtype)}")
    assert isinstance(storage, StorageRef)
    # v3 pairs an untyped (byte) storage with a dtype: offsets are in elements of that dtype.
    itemsize = _itemsize(dtype)
    ref.storage = StorageRef(storage.key, dtype, storage.nbytes // itemsize, storage.location)
    ref.dtype = dtype
    return ref


def _rebuild_parameter(data: Any, requires_grad: Any = False, *rest: Any) -> Any:
    if isinstance(data, TensorRef):
        data.is_parameter = True
        data.requires_grad = bool(requires_grad)
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not callable(func) or not isinstance(args, tuple):
        raise CorruptCheckpointError("tensor subclass rebuild with a malformed call")
    result = func(*args)
    if isinstance(result, TensorRef) and isinstance(new_type, type) and issubclass(new_type, Placeholder):
        result.subclass = new_type.name
    elif isinstance(result, TensorRef) and new_type is torch.nn.Parameter:
        result.is_parameter = True
    return result


def _rebuild_meta(dtype: Any, size: Any, stride: Any, requires_grad: Any = False) -> TensorRef:
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"meta tensor dtype is not a torch dtype: {_short(dtype)}")
    shape, strides = _as_shape(size, "size"), _as_shape(stride, "stride")
    return TensorRef(None, 0, shape, strides, dtype, bool(requires_grad), device="meta",
                     note="meta tensor: shape only, no data")


def _rebuild_device(data: Any, dtype: Any, device: Any, requires_grad: Any) -> Any:
    # Device tensors saved through numpy: data is a numpy array (already plain), moved nowhere.
    return data


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CorruptCheckpointError("_codecs.encode called with unexpected arguments")
    return text.encode(encoding)


def _plain_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    # defaultdict(factory) -> dict; the factory is never called.
    return {}


def _torch_size(value: Any = ()) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else ()


def _torch_device(*args: Any) -> str:
    return ":".join(str(a) for a in args if a is not None)


def _layout(name: Any) -> str:
    return str(name)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): _plain_dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _rebuild_device,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("torch.serialization", "_get_layout"): _layout,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,  # a marker for _rebuild_from_type_v2
    ("torch", "Tensor"): torch.Tensor,
}

_PLACEHOLDER_CLASSES: dict[str, type[Placeholder]] = {}


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    dotted = f"{module}.{name}"
    cls = _PLACEHOLDER_CLASSES.get(dotted)
    if cls is None:
        # A real class (not a callable instance) so that NEWOBJ, which demands a type, works too.
        cls = type(f"NotExecuted[{dotted}]", (Placeholder,), {"name": dotted, "__slots__": ()})
        _PLACEHOLDER_CLASSES[dotted] = cls
    return cls


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, persistent_load: Callable[[Any], Any] | None) -> None:
        super().__init__(file, encoding="latin1")
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        safe = _SAFE_GLOBALS.get((module, name))
        if safe is not None:
            return safe
        if module == "torch.storage" and name == "UntypedStorage":
            return _STORAGE_TYPES["UntypedStorage"]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        return _placeholder_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise CorruptCheckpointError("pickle refers to external data (a persistent id) but none is expected here")
        return self._persistent(pid)


def inert_loads(data: bytes | memoryview, *, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle ``data`` without executing anything it names.

    Args:
        data: the pickle's bytes.
        persistent_load: resolves persistent ids (torch storages) to descriptions.

    Returns:
        The unpickled structure, with :class:`Placeholder` objects for unknown globals and
        :class:`TensorRef` objects for tensors.

    Raises:
        CorruptCheckpointError: the bytes are not a well-formed pickle.

    Example:
        >>> import pickle, collections
        >>> inert_loads(pickle.dumps(collections.OrderedDict(a=1)))
        OrderedDict({'a': 1})
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise UnsafeCheckpointError(f"pickle of {len(data)} bytes is larger than the {MAX_PICKLE_BYTES}-byte limit")
    return inert_load_file(io.BytesIO(data), persistent_load=persistent_load)


def inert_load_file(file: Any, *, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Like :func:`inert_loads`, reading one pickle from an open binary file.

    The file is left just after the pickle's STOP, so consecutive pickles (torch's legacy format)
    can be read one after another.
    """
    try:
        return _InertUnpickler(file, persistent_load).load()
    except (CorruptCheckpointError, UnsafeCheckpointError):
        raise
    except RecursionError as exc:
        raise CorruptCheckpointError("pickle nests too deeply to read") from exc
    except MemoryError as exc:
        raise CorruptCheckpointError("pickle asks for more memory than is available") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of a malformed pickle is corruption
        raise CorruptCheckpointError(f"malformed pickle ({type(exc).__name__}: {_short(str(exc))})") from exc


# ---------------------------------------------------------------------------------------------
# Known data types -> plain data


def _numpy_dtype(obj: Any) -> np.dtype[Any]:
    # numpy.dtype('f8', False, True) then BUILD (3, '<', ...) -> reconstruct from the code alone.
    if isinstance(obj, np.dtype):
        return obj
    if isinstance(obj, Placeholder) and obj.name.endswith(".dtype") and obj.args and isinstance(obj.args[0], str):
        code = obj.args[0]
        order = obj.state[1] if isinstance(obj.state, tuple) and len(obj.state) > 1 else "="
        if code == "O" or code.startswith("V") or code.startswith("O"):
            raise CorruptCheckpointError(f"numpy object/void arrays are not supported as data (dtype {code!r})")
        prefix = order if order in ("<", ">", "=") else "="
        try:
            return np.dtype(prefix + code if code[0] not in "<>=|" else code)
        except TypeError as exc:
            raise CorruptCheckpointError(f"unknown numpy dtype {code!r}") from exc
    raise CorruptCheckpointError(f"numpy array with an unreadable dtype: {_short(obj)}")


def _numpy_array(obj: Placeholder) -> Any:
    state = obj.state
    if not (isinstance(state, tuple) and len(state) == 5):
        raise CorruptCheckpointError("numpy array with malformed state")
    _, shape, dtype, fortran, raw = state
    dt = _numpy_dtype(dtype)
    shape = _as_shape(shape, "numpy shape")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dt.itemsize:
        raise CorruptCheckpointError(f"numpy array of shape {shape} and dtype {dt} has the wrong number of bytes")
    return np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C").copy()


def _numpy_scalar(obj: Placeholder) -> Any:
    if len(obj.args) != 2:
        raise CorruptCheckpointError("numpy scalar with malformed arguments")
    dt, raw = _numpy_dtype(obj.args[0]), obj.args[1]
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != dt.itemsize:
        raise CorruptCheckpointError("numpy scalar with the wrong number of bytes")
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
    cls = vars(mod).get(attr) if mod is not None else None
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


def to_plain(obj: Any, *, on_placeholder: Callable[[Placeholder], None] | None = None, _depth: int = 0) -> Any:
    """Turn known data types inside ``obj`` into plain Python data, recursively.

    Containers become ``dict``/``list``; numpy arrays stay numpy arrays; tensors stay
    :class:`TensorRef`. Unknown placeholders are kept and passed to ``on_placeholder``.

    Example:
        >>> to_plain((1, [2, {"a": 3}]))
        (1, [2, {'a': 3}])
    """
    if _depth > 200:
        raise CorruptCheckpointError("structure nests more than 200 levels deep")

    def plain(value: Any) -> Any:
        return to_plain(value, on_placeholder=on_placeholder, _depth=_depth + 1)

    if isinstance(obj, Placeholder):
        converted = _convert(obj, plain)
        if converted is not obj:
            return converted
        if on_placeholder is not None:
            on_placeholder(obj)
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
