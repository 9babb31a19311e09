"""Live sources: an ``nn.Module`` or a (nested) state dict already in memory."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tensorparity.checkpoint._wrappers import WrapperNames
from tensorparity.checkpoint.layout import build_checkpoint
from tensorparity.checkpoint.tree import Checkpoint

__all__ = ["read_live"]


def read_live(obj: Any, *, name: str | None = None) -> Checkpoint:
    """Open a live ``nn.Module`` (its ``state_dict``) or a mapping as a :class:`Checkpoint`.

    Tensors are not copied: entries load the very tensors the object holds (detached). The keys
    of a wrapped module lose the wrappers' components (``module.`` of DDP, ``_orig_mod.`` of
    ``torch.compile``, ...; listed in the provenance as ``name_prefixes_removed``), so a wrapped
    model and the plain one have the same keys.

    Example:
        >>> import torch
        >>> read_live(torch.nn.Linear(2, 2)).provenance["trainable_parameters"]
        6
    """
    torch = sys.modules.get("torch")  # a live module means torch is imported; reading a file need not
    if torch is not None and isinstance(obj, torch.nn.Module):
        names = WrapperNames(obj)
        raw = obj.state_dict(keep_vars=True)
        state = {names.clean_key(k): v.detach() for k, v in raw.items()}
        if len(state) != len(raw):  # two keys would become one: keep them as they are
            state = {k: v.detach() for k, v in raw.items()}
        trainable = {n for n, p in obj.named_parameters() if p.requires_grad}
        provenance = {
            "framework": "torch",
            "framework_version": torch.__version__,
            "model_class": f"{type(obj).__module__}.{type(obj).__qualname__}",
            "trainable_parameters": sum(p.numel() for n, p in obj.named_parameters() if n in trainable),
        }
        if names.removed and len(state) == len(raw):
            provenance["name_prefixes_removed"] = names.removed
        source = name or f"<{type(obj).__qualname__} module>"
        return build_checkpoint(state, source=source, base_format="module", provenance=provenance)
    if isinstance(obj, Mapping):
        source = name or "<in-memory mapping>"
        return build_checkpoint(dict(obj), source=source, base_format="mapping")
    raise TypeError(f"cannot open a live {type(obj).__name__}; pass an nn.Module, a mapping or a path")
