"""Write one state dict in every format tensorparity reads, with each format's real producer.

Used by the demo, the docs and the benchmarks; the tests use it too, so what the demo shows is
what the tests check.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["write_dcp", "write_formats", "write_hf_sharded", "write_nemo"]


def write_nemo(
    path: Path,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    gzip: bool = False,
    artifacts: Mapping[str, bytes] | None = None,
    ranks: int = 0,
) -> Path:
    """Write a ``.nemo`` archive as NeMo's ``SaveRestoreConnector`` does: a tar of a folder
    (arcname ``.``) with ``model_config.yaml``, ``model_weights.ckpt`` (or
    ``mp_rank_XX/model_weights.ckpt`` per model-parallel rank) and artifacts.

    Example:
        >>> import tempfile, torch
        >>> p = write_nemo(Path(tempfile.mkdtemp()) / "m.nemo", {"w": torch.ones(2)}, {"target": "x.Y"})
        >>> p.suffix
        '.nemo'
    """
    import yaml

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(f"./{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def saved(obj: Any) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
        add(tar, "model_config.yaml", yaml.safe_dump(dict(config)).encode())
        if ranks:
            for rank in range(ranks):
                # Model parallel: each rank holds its slice of every weight (split on dim 0).
                part = {k: v.chunk(ranks)[rank].clone() if v.dim() else v for k, v in state.items()}
                add(tar, f"mp_rank_{rank:02d}/model_weights.ckpt", saved(part))
        else:
            add(tar, "model_weights.ckpt", saved(dict(state)))
        for name, data in (artifacts or {}).items():
            add(tar, name, data)
    return path


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
