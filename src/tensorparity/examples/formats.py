"""Write one state dict in every format tensorparity reads, with each format's real producer.

Used by the demo, the docs and the benchmarks; the tests use it too, so what the demo shows is
what the tests check.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["artifact_name", "tar_folder", "write_dcp", "write_formats", "write_hf_sharded", "write_nemo",
           "write_nemo_folder"]


def artifact_name(name: str) -> str:
    """The name NeMo gives an artifact inside the archive (``<uuid hex>_<name>``; deterministic here)."""
    return f"{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}_{name}"


def write_nemo_folder(
    folder: Path,
    weights: Any,
    config: Mapping[str, Any],
    *,
    ranks: list[str] | None = None,
    artifacts: Mapping[str, bytes] | None = None,
    legacy: bool = False,
) -> Path:
    """Fill ``folder`` as NeMo's ``SaveRestoreConnector.save_to`` does before tarring it:
    ``model_config.yaml``, ``model_weights.ckpt`` (one per model-parallel rank folder when
    ``ranks`` names them, ``weights`` then being one state dict per rank), and each artifact as
    ``<uuid hex>_<name>``."""
    import yaml

    folder.mkdir(parents=True)
    (folder / "model_config.yaml").write_text(yaml.safe_dump(dict(config)))
    targets = ([(folder / rank / "model_weights.ckpt", w) for rank, w in zip(ranks, weights)] if ranks
               else [(folder / "model_weights.ckpt", weights)])
    for target, state in targets:
        target.parent.mkdir(exist_ok=True)
        torch.save(state, target, _use_new_zipfile_serialization=not legacy)
    for name, data in (artifacts or {}).items():
        (folder / artifact_name(name)).write_bytes(data)
    return folder


def tar_folder(folder: Path, path: Path, *, gzip: bool = False) -> Path:
    """Tar ``folder`` into ``path`` with ``arcname="."``, as NeMo's ``_make_nemo_file_from_folder``
    does (plain tar since NeMo 1.7, tar.gz before)."""
    with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
        tar.add(folder, arcname=".")
    return path


def write_nemo(path: Path, weights: Any, config: Mapping[str, Any], *, gzip: bool = False, **options: Any) -> Path:
    """Write a ``.nemo`` archive as NeMo does: a staging folder (see :func:`write_nemo_folder`,
    which takes ``options``), tarred with ``arcname="."``.

    Example:
        >>> import tempfile, torch
        >>> p = write_nemo(Path(tempfile.mkdtemp()) / "m.nemo", {"w": torch.ones(2)}, {"target": "x.Y"})
        >>> p.suffix
        '.nemo'
    """
    with tempfile.TemporaryDirectory() as staging:
        folder = write_nemo_folder(Path(staging) / "model", weights, config, **options)
        return tar_folder(folder, path, gzip=gzip)


def write_hf_sharded(folder: Path, state: Mapping[str, torch.Tensor], *, shards: int = 2,
                     safe: bool = True) -> Path:
    """Write a sharded Hugging Face folder: shard files plus the index ``save_pretrained`` writes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per = max(1, -(-len(keys) // shards))
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        part = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        if safe:
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, folder / name)
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def write_dcp(folder: Path, state: Mapping[str, Any]) -> Path:
    """Write a ``torch.distributed.checkpoint`` folder from one process (no process group)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(dict(state), checkpoint_id=str(folder), no_dist=True)
    return folder


def write_formats(model: torch.nn.Module, out: Path, *, config: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``model``'s weights in every supported format under ``out``; return ``{format: path}``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cfg = dict(config or {"target": f"{type(model).__module__}.{type(model).__qualname__}"})
    paths = {
        "torch-zip": out / "model.pt",
        "torch-legacy": out / "model_legacy.pt",
        "safetensors": out / "model.safetensors",
        "npz": out / "model.npz",
    }
    torch.save(state, paths["torch-zip"])
    torch.save(state, paths["torch-legacy"], _use_new_zipfile_serialization=False)
    save_file(state, str(paths["safetensors"]), metadata={"format": "pt"})
    np.savez(paths["npz"], **{k: v.numpy() for k, v in state.items()})
    paths["nemo"] = write_nemo(out / "model.nemo", state, cfg)
    paths["hf-sharded"] = write_hf_sharded(out / "hf_sharded", state)
    paths["dcp"] = write_dcp(out / "dcp", {"model": state})
    return paths
