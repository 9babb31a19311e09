"""Wrapper-free names: the components that DDP, FSDP1, activation checkpointing and
``torch.compile`` insert into module, parameter and state-dict paths (private).

A wrapper holds the real module under a fixed attribute: ``DistributedDataParallel.module``,
``FullyShardedDataParallel._fsdp_wrapped_module``, ``CheckpointWrapper._checkpoint_wrapped_module``
and ``OptimizedModule._orig_mod``. Those components are dropped only where the module that
holds them really is such a wrapper (found by class, walking the live model), so a user's own
sub-module called ``module`` keeps its name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["WRAPPER_ATTRS", "WrapperNames", "wrapper_attr"]

# Wrapper class (its own name or a base class's) -> the attribute that holds the wrapped module.
WRAPPER_ATTRS = {
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
    "ActivationWrapper": "_checkpoint_wrapped_module",
    "CheckpointWrapper": "_checkpoint_wrapped_module",
    "OffloadWrapper": "_checkpoint_wrapped_module",
    "OptimizedModule": "_orig_mod",
}


def wrapper_attr(module: Any) -> str | None:
    """The attribute under which ``module`` holds the module it wraps, if it is a wrapper.

    Example:
        >>> import torch
        >>> wrapper_attr(torch.nn.Linear(2, 2)) is None
        True
    """
    children = getattr(module, "_modules", None)
    if not children:
        return None
    for cls in type(module).__mro__:
        attr = WRAPPER_ATTRS.get(cls.__name__)
        if attr is not None and cls.__module__.startswith("torch") and children.get(attr) is not None:
            return attr
    return None


class WrapperNames:
    """Raw (registered) dotted paths of a live model -> wrapper-free paths.

    Example:
        >>> import torch
        >>> model = torch.compile(torch.nn.Sequential(torch.nn.Linear(2, 2)), backend="eager")
        >>> names = WrapperNames(model)
        >>> names.clean("_orig_mod.0"), names.clean_key("_orig_mod.0.weight"), names.removed
        ('0', '0.weight', ['_orig_mod.'])
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._cache: dict[str, str] = {"": ""}
        self._removed: dict[str, None] = {}
        self.wrapper_ids: set[int] = set()  # modules that are wrappers (transparent: not layers)
        for _, module in _walk(model):
            if wrapper_attr(module) is not None:
                self.wrapper_ids.add(id(module))

    @property
    def removed(self) -> list[str]:
        """The wrapper components found and removed, as ``"module."``, ``"_orig_mod."``..."""
        return list(self._removed)

    def is_wrapper(self, module: Any) -> bool:
        return id(module) in self.wrapper_ids

    def clean(self, path: str) -> str:
        """A registered module path without wrapper components (``module.layers.0`` -> ``layers.0``)."""
        found = self._cache.get(path)
        if found is not None:
            return found
        module, out = self.model, []
        for part in path.split("."):
            attr = wrapper_attr(module) if module is not None else None
            children = getattr(module, "_modules", None) or {}
            module = children.get(part)
            if attr is not None and part == attr:
                self._removed[part + "."] = None
                continue
            out.append(part)
        found = self._cache[path] = ".".join(out)
        return found

    def clean_key(self, key: str) -> str:
        """A parameter / state-dict key (``owner.name``) without wrapper components."""
        owner, dot, last = key.rpartition(".")
        if not dot:
            return key
        base = self.clean(owner)
        return f"{base}.{last}" if base else last


def _walk(model: Any) -> Iterable[tuple[str, Any]]:
    named = getattr(model, "named_modules", None)
    return named() if callable(named) else ()
