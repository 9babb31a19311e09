"""Write ``.nemo`` archives the way NeMo's ``SaveRestoreConnector.save_to`` does.

NeMo fills a temporary folder (``model_config.yaml`` from the config, ``model_weights.ckpt`` from
``torch.save(model.state_dict())``, one per model-parallel rank folder when sharded, and each
artifact copied in as ``<uuid hex>_<name>``), then tars the folder with ``arcname="."`` (plain tar
since NeMo 1.7, tar.gz before).
"""

from __future__ import annotations

import tarfile
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml


def artifact_name(name: str) -> str:
    """The name NeMo gives an artifact inside the archive (deterministic here for the tests)."""
    return f"{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}_{name}"


def write_nemo_folder(
    folder: Path,
    weights: Any,
    config: dict[str, Any],
    *,
    ranks: list[str] | None = None,
    artifacts: dict[str, bytes] | None = None,
    legacy: bool = False,
) -> Path:
    """Fill ``folder`` as NeMo does before tarring it.

    ``weights`` is one state dict, or with ``ranks`` a list of state dicts, one per rank folder.
    """
    folder.mkdir(parents=True)
    (folder / "model_config.yaml").write_text(yaml.safe_dump(config))
    targets = [(folder / rank / "model_weights.ckpt", w) for rank, w in zip(ranks, weights)] if ranks else [
        (folder / "model_weights.ckpt", weights)]
    for target, state in targets:
        target.parent.mkdir(exist_ok=True)
        torch.save(state, target, _use_new_zipfile_serialization=not legacy)
    for name, data in (artifacts or {}).items():
        (folder / artifact_name(name)).write_bytes(data)
    return folder


def tar_folder(folder: Path, path: Path, *, gzip: bool = False) -> Path:
    """Tar ``folder`` into ``path`` with ``arcname="."``, as ``_make_nemo_file_from_folder`` does."""
    with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
        tar.add(folder, arcname=".")
    return path


def write_nemo(path: Path, weights: Any, config: dict[str, Any], *, gzip: bool = False, **options: Any) -> Path:
    """Write a ``.nemo`` at ``path`` (its staging folder sits next to it as ``<name>.d``)."""
    folder = write_nemo_folder(path.parent / f"{path.name}.d", weights, config, **options)
    return tar_folder(folder, path, gzip=gzip)
