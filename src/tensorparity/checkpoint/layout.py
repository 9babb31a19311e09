"""Recognise what a loaded structure is: a bare state dict, a Lightning checkpoint, a training
checkpoint with model/optimizer/scheduler parts; name its sections and read its provenance."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tensorparity.checkpoint.tree import Checkpoint, LazyTensor, PlaceholderInfo, flatten, is_array, is_tensor

__all__ = ["RECORD_KEY", "RECORD_METADATA_KEY", "build_checkpoint", "detect_sections"]

# tensorparity's own record of the migrations it applied: a top-level value of a torch training
# checkpoint, the member ``tensorparity_migrations.json`` of a ``.nemo`` (read under this key).
# Not part of the model: diff leaves it out unless asked (``include_records``).
RECORD_KEY = "tensorparity_migrations"
RECORD_METADATA_KEY = "tensorparity.migrations"  # the record as a metadata string (safetensors header, ...)

# Lightning's top-level keys, and the section each belongs to.
_LIGHTNING = {
    "state_dict": "model",
    "optimizer_states": "optimizer",
    "lr_schedulers": "schedulers",
    "loops": "loops",
    "callbacks": "callbacks",
    "hyper_parameters": "hyper_parameters",
    "datamodule_hyper_parameters": "hyper_parameters",
    "hparams_name": "hyper_parameters",
    "datamodule_hparams_name": "hyper_parameters",
}
_LIGHTNING_META = ("epoch", "global_step", "pytorch-lightning_version", "hparams_type")

# Common hand-written training checkpoints: {"model": ..., "optimizer": ..., "epoch": ...}.
_GENERIC = {
    "model": "model", "state_dict": "model", "model_state_dict": "model", "module": "model",
    "model_state": "model", "weights": "model", "ema": "ema", "ema_state_dict": "ema",
    "model_ema": "ema", "optimizer": "optimizer", "optimizer_state_dict": "optimizer",
    "optim": "optimizer", "optimizer_state": "optimizer", "optimizers": "optimizer",
    "scheduler": "schedulers", "lr_scheduler": "schedulers", "scheduler_state_dict": "schedulers",
    "schedulers": "schedulers", "scaler": "scaler", "grad_scaler": "scaler",
    "rng_state": "rng", "rng_states": "rng", "torch_rng_state": "rng",
    "args": "config", "config": "config", "cfg": "config", "hparams": "hyper_parameters",
    "hyper_parameters": "hyper_parameters", "epoch": "meta", "step": "meta",
    "global_step": "meta", "iteration": "meta", "best_metric": "meta", "dataloader": "data",
    "sampler": "data", "data_loader_state": "data",
}


def _is_tensorish(value: Any) -> bool:
    return isinstance(value, LazyTensor) or is_tensor(value) or is_array(value)


def detect_sections(obj: Any) -> tuple[str | None, dict[str, str], dict[str, Any]]:
    """Return ``(framework, sections, provenance)`` for a loaded top-level structure.

    Example:
        >>> detect_sections({"state_dict": {}, "epoch": 3, "global_step": 30,
        ...                  "pytorch-lightning_version": "2.4.0"})[0]
        'lightning'
    """
    if not isinstance(obj, Mapping) or not obj:
        return None, {}, {}
    keys = [k for k in obj if isinstance(k, str)]
    provenance: dict[str, Any] = {}
    if "state_dict" in obj and ("pytorch-lightning_version" in obj or "loops" in obj
                                or ("epoch" in obj and "global_step" in obj)):
        sections = {k: _LIGHTNING.get(k, "meta") for k in keys}
        if "pytorch-lightning_version" in obj:
            provenance["framework"] = "lightning"
            provenance["framework_version"] = obj["pytorch-lightning_version"]
        for k in ("epoch", "global_step"):
            if isinstance(obj.get(k), int):
                provenance[k] = obj[k]
        return "lightning", sections, provenance
    if all(_is_tensorish(v) for v in obj.values()):
        return None, {}, {}  # a bare state dict: everything is model weights
    known = [k for k in keys if k in _GENERIC]
    if not known:
        return None, {}, {}
    sections = {k: _GENERIC.get(k, "other") for k in keys}
    for k in ("epoch", "step", "global_step", "iteration"):
        if isinstance(obj.get(k), int) and not isinstance(obj.get(k), bool):
            provenance[k] = obj[k]
    return None, sections, provenance


def build_checkpoint(
    obj: Any,
    *,
    source: str,
    base_format: str,
    provenance: Mapping[str, Any] | None = None,
    sections: Mapping[str, str] | None = None,
    closers: list[Callable[[], None]] | None = None,
    notes: list[str] | None = None,
) -> Checkpoint:
    """Flatten a loaded structure into a :class:`Checkpoint`, recognising its layout."""
    framework, found, prov = detect_sections(obj)
    placeholders: list[PlaceholderInfo] = []
    entries = flatten(obj, placeholders=placeholders)
    merged = {k: v for k, v in (provenance or {}).items() if v is not None}
    merged.update(prov)
    return Checkpoint(
        source=source,
        format=framework or base_format,
        entries=entries,
        sections={**found, **(sections or {})},
        provenance=merged,
        placeholders=placeholders,
        closers=closers,
        notes=notes,
        structure=obj,
    )
