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
plain Python data afterwards by :func:`tensorparity.checkpoint._plain.to_plain`, from the
recorded arguments alone.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tensorparity._dtypes import TorchDType, dtype_info, is_dtype_name
from tensorparity.errors import CorruptCheckpointError, TensorParityError, UnsafeCheckpointError

__all__ = ["Placeholder", "StorageRef", "TensorRef", "completed", "inert_load_file", "inert_loads"]

PICKLE_FIX = "the pickle is damaged or was not written by torch.save; save the checkpoint again"

# Hard caps against memory blow-ups from hostile pickles: a pickle is read from bytes already in
# memory, so sizes are bounded by the file; these bound what we derive from it.
MAX_PICKLE_BYTES = 1 << 30
MAX_TENSOR_DIMS = 64
MAX_INDEX = (1 << 63) - 1  # sizes, strides and offsets are int64 in torch
# Shared references (pickle's memo) can make a small pickle describe an exponentially large tree
# ("billion laughs"); walking a shared container again is allowed this many times in all
# (real checkpoints share a few small containers, if any).
MAX_REVISITS = 100_000
MAX_GLOBALS = 10_000  # distinct globals one pickle may name; real ones name dozens


def _tamper(what: Any) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"pickle tries to modify {what}, which is not data (nothing was changed)",
                                 fix="do not load this file with torch.load; ask its author for a safetensors copy")


class _Frozen:
    """Refuses a pickle's BUILD, which would otherwise rewrite ``__dict__`` past ``frozen=True``.

    Mixed into the objects a pickle can reach (storage types, storage references, safe
    functions): their checked values must stay what was checked, in this file and the next.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _tamper(repr(self))

    def __copy__(self) -> Any:  # immutable: copies are the object itself, never via __setstate__
        return self

    def __deepcopy__(self, memo: Any) -> Any:
        return self


@dataclass(frozen=True)
class StorageRef(_Frozen):
    """A storage named by a pickle's persistent id: where its bytes are, not the bytes."""

    key: str
    dtype: str  # torch's name of the dtype, e.g. "float32"
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
    dtype: str  # torch's name of the dtype
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
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: dict[Any, Any]
    listitems: list[Any]

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

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        # Calling what an unknown global returned: how gadgets chain (getattr(__import__('os'),
        # 'system')('...')) and how protocol 2 pickles a classmethod constructor. Recorded, not
        # run: a new placeholder whose first argument is this one.
        name = self.name if self.name.endswith("(...)") else f"{self.name}(...)"
        return _named_placeholder_class(name)(self, *args, **kwargs)

    def __repr__(self) -> str:
        args = ", ".join(_short(a) for a in self.args)
        return f"<not executed: {self.name}({args})>"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# What globals resolve to


def _itemsize(dtype: str) -> int:
    return dtype_info(dtype).itemsize


@dataclass(frozen=True)
class _StorageType(_Frozen):  # shared by every file: a BUILD must not rewrite it
    dtype: str  # torch's name of the dtype


def _legacy_storage_types() -> dict[str, _StorageType]:
    names = {
        "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
        "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
        "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
        "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
        "ComplexFloatStorage": "complex64", "QInt8Storage": "qint8",
        "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
        "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
        "UntypedStorage": "uint8",
    }
    return {name: _StorageType(dtype) for name, dtype in names.items()}


_STORAGE_TYPES = _legacy_storage_types()
_DTYPES: dict[str, TorchDType] = {}  # torch.<dtype> as pickles name it, made once per name


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, Placeholder):
        value = value.args[0] if value.args else ()
    if not isinstance(value, (tuple, list)) or len(value) > MAX_TENSOR_DIMS:
        raise CorruptCheckpointError(f"tensor {what} is not a tuple of integers: {_short(value)}")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INDEX for v in out):
        raise CorruptCheckpointError(f"tensor {what} has a negative, huge or non-integer entry: {_short(out)}")
    return out


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise CorruptCheckpointError(f"tensor rebuilt from a non-storage: {_short(storage)}")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_INDEX:
        raise CorruptCheckpointError(f"tensor storage offset is not a non-negative int64: {_short(offset)}")
    shape, strides = _as_shape(size, "size"), _as_shape(stride, "stride")
    if len(shape) != len(strides):
        raise CorruptCheckpointError(f"tensor size {shape} and stride {strides} differ in length")
    requires_grad = bool(rest[0]) if rest and isinstance(rest[0], bool) else False
    return TensorRef(storage, offset, shape, strides, storage.dtype, requires_grad)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       hooks: Any, dtype: Any, *rest: Any) -> TensorRef:
    ref = _rebuild_tensor(storage, offset, size, stride, requires_grad)
    if not isinstance(dtype, TorchDType):
        raise CorruptCheckpointError(f"tensor dtype is not a torch dtype: {_short(dtype)}")
    dtype = dtype.name
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
    elif isinstance(result, TensorRef) and new_type is _PARAMETER:
        result.is_parameter = True
    return result


def _rebuild_meta(dtype: Any, size: Any, stride: Any, requires_grad: Any = False) -> TensorRef:
    if not isinstance(dtype, TorchDType):
        raise CorruptCheckpointError(f"meta tensor dtype is not a torch dtype: {_short(dtype)}")
    dtype = dtype.name
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


def _bytearray(source: Any = b"", encoding: Any = None) -> bytearray:
    # bytearray(n) would allocate n zero bytes: a 10-byte pickle could ask for terabytes.
    if isinstance(source, str) and encoding in ("latin1", "latin-1"):
        return bytearray(source, "latin-1")
    if isinstance(source, (bytes, bytearray)) and encoding is None:
        return bytearray(source)
    raise CorruptCheckpointError(f"bytearray rebuilt from unexpected arguments: {_short(source)}")


class _Inert(_Frozen):
    """A function the unpickler may call, wrapped so that a pickle's BUILD cannot modify it.

    BUILD on a bare Python function sets its attributes (``__defaults__``), which would change
    how this process reads every later file.
    """

    __slots__ = ("_func", "_name")

    def __init__(self, name: str, func: Callable[..., Any]) -> None:
        object.__setattr__(self, "_func", func)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _tamper(self._name)

    def __repr__(self) -> str:
        return f"<{self._name}>"


class _Marker(_Frozen):
    """A class a pickle may name as data (``torch.Tensor`` as a rebuild's type), never call."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _tamper(self.name)

    def __repr__(self) -> str:
        return f"<{self.name}>"


# Calling the real classes would allocate (torch.Tensor(10**12)) or let BUILD patch torch itself.
_PARAMETER = _Marker("torch.nn.parameter.Parameter")
_TENSOR = _Marker("torch.Tensor")


# Builtin types are immutable (BUILD cannot patch them) and stay real types, because NEWOBJ
# demands a type; our own functions are wrapped in _Inert.
_SAFE_TYPES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,  # a marker for _rebuild_from_type_v2
    ("torch", "Tensor"): _TENSOR,
}
_SAFE_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "defaultdict"): _plain_dict,
    ("builtins", "bytearray"): _bytearray,
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
}
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    **_SAFE_TYPES,
    **{key: _Inert(".".join(key), func) for key, func in _SAFE_FUNCTIONS.items()},
}


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 spelling of a global that a protocol-2 pickle wrote for Python 2.

    torch.save writes protocol 2, whose pickler renames ``builtins.eval`` to
    ``__builtin__.eval`` and ``subprocess.Popen`` to ``commands.Popen``; map them back so that
    placeholders and safe globals use the names a reader expects.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name

_PLACEHOLDER_CLASSES: dict[str, type[Placeholder]] = {}
MAX_PLACEHOLDER_CLASSES = 4096  # cached across files; a hostile pickle may name millions


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    return _named_placeholder_class(f"{module}.{name}")


def _named_placeholder_class(dotted: str) -> type[Placeholder]:
    cls = _PLACEHOLDER_CLASSES.get(dotted)
    if cls is None:
        # A real class (not a callable instance) so that NEWOBJ, which demands a type, works too.
        cls = type(f"NotExecuted[{dotted}]", (Placeholder,), {"name": dotted, "__slots__": ()})
        if len(_PLACEHOLDER_CLASSES) < MAX_PLACEHOLDER_CLASSES:
            _PLACEHOLDER_CLASSES[dotted] = cls
    return cls


class _Bounded:
    """A pickle source that never asks its file for more bytes than the file has left.

    A counted opcode (BINBYTES8, BINUNICODE8) declares its length; a buffered file preallocates
    what is asked for, so a 20-byte pickle could otherwise ask for terabytes.
    """

    def __init__(self, file: Any) -> None:
        self._file = file
        try:
            pos = file.tell()
            end = file.seek(0, io.SEEK_END)
            file.seek(pos)
            self.left = self.total = max(0, end - pos)
        except (OSError, AttributeError, ValueError):  # not seekable: the overall cap still holds
            self.left = self.total = MAX_PICKLE_BYTES

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(self.left if n is None or n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._file.readline(self.left)
        self.left -= len(line)
        return line


def _load_bytearray8(self: _InertUnpickler) -> None:
    (size,) = struct.unpack("<Q", self.read(8))
    if size > self._total:  # the stock loader allocates (and zeroes) size bytes first
        raise CorruptCheckpointError(f"pickle declares a {size}-byte bytearray in a {self._total}-byte pickle")
    data = self.read(size)
    if len(data) != size:
        raise CorruptCheckpointError("pickle data was truncated")
    self.append(bytearray(data))


class _InertUnpickler(pickle._Unpickler):  # noqa: SLF001 - see below
    """The pure-Python unpickler, with every global resolved by :meth:`find_class`.

    Not the C one: for LONG_BINPUT n, the C unpickler grows its memo array to 2n entries and
    zeroes them, so a 10-byte pickle can demand 32 GB; the Python one keeps its memo in a dict.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def __init__(self, file: Any, persistent_load: Callable[[Any], Any] | None) -> None:
        if isinstance(file, io.BytesIO):
            # In memory already: a read is bounded by what is there, and allocates no more.
            self._total = len(file.getbuffer()) - file.tell()
            source: Any = file
        else:
            source = _Bounded(file)
            self._total = source.total
        super().__init__(source, encoding="latin1")
        self._persistent = persistent_load
        self._globals: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str) -> Any:
        self._globals.add((module, name))
        if len(self._globals) > MAX_GLOBALS:
            raise UnsafeCheckpointError(f"pickle names more than {MAX_GLOBALS:,} different globals",
                                        fix="refusing a pickle built to exhaust memory; re-save the checkpoint")
        module, name = _python3_name(module, name)
        safe = _SAFE_GLOBALS.get((module, name))
        if safe is not None:
            return safe
        if module == "torch.storage" and name == "UntypedStorage":
            return _STORAGE_TYPES["UntypedStorage"]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "torch" and (name in _DTYPES or is_dtype_name(name)):
            return _DTYPES.setdefault(name, TorchDType(name))
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
        >>> dict(inert_loads(pickle.dumps(collections.OrderedDict(a=1))))
        {'a': 1}
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
    except TensorParityError as exc:
        raise completed(exc, fix=PICKLE_FIX) from exc
    except RecursionError as exc:
        raise CorruptCheckpointError("pickle nests too deeply to read", fix=PICKLE_FIX) from exc
    except MemoryError as exc:
        raise CorruptCheckpointError("pickle asks for more memory than is available", fix=PICKLE_FIX) from exc
    except Exception as exc:  # noqa: BLE001 - any failure of a malformed pickle is corruption
        raise CorruptCheckpointError(f"malformed pickle ({type(exc).__name__}: {_short(str(exc))})",
                                     fix=PICKLE_FIX) from exc


def completed(exc: TensorParityError, *, path: Any = None, key: str | None = None,
              fix: str | None = None) -> TensorParityError:
    """The same error with the file, key or fix that its raiser did not know filled in.

    Errors raised deep inside a pickle know neither the file nor the archive member; the reader
    that catches them does.

    Example:
        >>> str(completed(CorruptCheckpointError("bad"), path="m.pt", key="archive/data.pkl", fix="save again"))
        'm.pt [archive/data.pkl]: bad; fix: save again'
    """
    if (exc.path or path is None) and (exc.key or key is None) and (exc.fix or fix is None):
        return exc
    return type(exc)(exc.message, path=exc.path or path, key=exc.key or key, fix=exc.fix or fix)
