"""The format registry: every format is recognised in the files of its own producer (and, when
tensorparity writes it, in what tensorparity wrote), names are unique, the detection order is
fixed, and a format another package registers is used by ``tensorparity.open`` and the writers."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tensorparity
from tensorparity.checkpoint import (
    Checkpoint,
    Format,
    Probe,
    TensorEntry,
    WritableFormat,
    detect_format,
    formats,
    register_format,
    unregister_format,
)
from tensorparity.checkpoint.format_registry import find_format, format_names, get_format
from tensorparity.checkpoint.tree import LazyTensor, flatten
from tensorparity.checkpoint.write import FORMATS, format_for_path, write_checkpoint
from tensorparity.errors import UnknownFormatError, UsageError
from tensorparity.examples.formats import write_nemo, write_nemo_folder

STATE = {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.tensor([1.0, -1.0])}


def _torch(folder: Path) -> Path:
    torch.save(STATE, folder / "m.pt")
    return folder / "m.pt"


def _torch_legacy(folder: Path) -> Path:
    torch.save(STATE, folder / "m.pt", _use_new_zipfile_serialization=False)
    return folder / "m.pt"


def _safetensors(folder: Path) -> Path:
    save_file(STATE, str(folder / "m.safetensors"))
    return folder / "m.safetensors"


def _hf_sharded(folder: Path) -> Path:
    from huggingface_hub import save_torch_state_dict

    (folder / "hf").mkdir()
    save_torch_state_dict(STATE, folder / "hf", max_shard_size=30)  # one tensor a shard: an index is written
    assert (folder / "hf" / "model.safetensors.index.json").is_file()
    return folder / "hf"


def _dcp(folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": dict(STATE)}, checkpoint_id=str(folder / "dcp"), no_dist=True)
    return folder / "dcp"


def _npz(folder: Path) -> Path:
    np.savez(folder / "m.npz", **{k: v.numpy() for k, v in STATE.items()})
    return folder / "m.npz"


def _trace(folder: Path) -> Path:
    from tensorparity.trace._capture import capture

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(STATE["layer.weight"])
        model.bias.copy_(STATE["layer.bias"])
    with capture(model, out=folder / "trace"):
        model(torch.ones(1, 3)).sum().backward()
    return folder / "trace"


# Each format's own producer, and the key its reader gives each tensor of STATE.
PRODUCERS: dict[str, tuple[Callable[[Path], Path], Callable[[str], str]]] = {
    "torch": (_torch, str),
    "safetensors": (_safetensors, str),
    "safetensors-sharded": (_hf_sharded, str),
    "dcp": (_dcp, lambda k: "model." + k),
    "nemo": (lambda d: write_nemo(d / "m.nemo", STATE, {"target": "x.Y"}), str),
    "npz": (_npz, str),
    "torch-legacy": (_torch_legacy, str),
    "nemo-folder": (lambda d: write_nemo_folder(d / "nemo", STATE, {"target": "x.Y"}), str),
    "trace": (_trace, lambda k: "param." + k.removeprefix("layer.")),
}


def _assert_holds_state(ckpt: Checkpoint, key: Callable[[str], str]) -> None:
    for name, value in STATE.items():
        entry = ckpt[key(name)]
        assert isinstance(entry, TensorEntry), name
        assert torch.equal(entry.load(), value), name


def test_every_registered_format_has_a_producer_here() -> None:
    assert sorted(format_names()) == sorted(PRODUCERS)


@pytest.mark.parametrize("name", list(PRODUCERS))
def test_a_format_claims_its_own_producers_files(tmp_path: Path, name: str) -> None:
    produce, key = PRODUCERS[name]
    path = produce(tmp_path)
    fmt = get_format(name)
    assert find_format(path) is fmt
    assert detect_format(path) == fmt.detected_as
    with tensorparity.open(path) as ckpt:
        assert ckpt.format in fmt.produces
        _assert_holds_state(ckpt, key)


@pytest.mark.parametrize("name", FORMATS)
def test_a_writable_format_claims_what_tensorparity_wrote(tmp_path: Path, name: str) -> None:
    produce, key = PRODUCERS[name]
    out = tmp_path / ("out" + next(iter(get_format(name).suffixes), ""))
    with tensorparity.open(produce(tmp_path)) as source:
        write_checkpoint(source, out, format=name,
                         max_shard_size=30 if name == "safetensors-sharded" else None)
    assert find_format(out) is get_format(name)
    with tensorparity.open(out) as again:
        _assert_holds_state(again, key)


def test_names_are_unique_and_a_taken_name_is_refused() -> None:
    names = [f.name for f in formats()]
    assert len(names) == len(set(names)) == len(format_names())
    with pytest.raises(UsageError, match="'torch' is registered already") as info:
        register_format(get_format("torch"))
    assert "pick another name" in info.value.fix
    assert [f.name for f in formats()] == names


def test_every_format_keeps_the_protocol() -> None:
    assert all(isinstance(f, Format) for f in formats())
    assert FORMATS == format_names(writable=True) == ("torch", "safetensors", "safetensors-sharded", "dcp", "nemo")
    assert {f.name for f in formats() if isinstance(f, WritableFormat)} == set(FORMATS)
    with pytest.raises(TypeError, match="is not a checkpoint Format"):
        register_format(object())  # type: ignore[arg-type]


def test_the_detection_order_is_fixed_and_decides_a_folder_two_formats_claim(tmp_path: Path) -> None:
    order = ("dcp", "safetensors-sharded", "nemo-folder", "trace", "npz", "torch", "safetensors", "torch-legacy",
             "nemo")
    assert tuple(f.name for f in formats()) == order
    listed = subprocess.run([sys.executable, "-c", "from tensorparity.checkpoint import formats; "
                             "print(' '.join(f.name for f in formats()))"],
                            capture_output=True, text=True, check=True, timeout=120)
    assert tuple(listed.stdout.split()) == order  # the same in a fresh process
    both = _dcp(tmp_path)
    _hf_sharded(tmp_path)
    for file in (tmp_path / "hf").iterdir():
        file.rename(both / file.name)
    assert get_format("safetensors-sharded").detect(Probe(both, is_dir=True))
    assert detect_format(both) == "dcp"  # asked first


def test_a_heavy_format_loads_only_when_used(tmp_path: Path) -> None:
    path = _safetensors(tmp_path)
    code = ("import sys, tensorparity; tensorparity.open(sys.argv[1]).close(); "
            "print(' '.join(m for m in ('torch.distributed.checkpoint', 'yaml', 'tensorparity.checkpoint.dcp', "
            "'tensorparity.checkpoint.nemo', 'tensorparity.checkpoint.tracefolder.reader') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                            timeout=120)
    assert loaded.stdout.split() == []


MAGIC = b"TPTXT\n"


def _text_checkpoint(data: bytes, source: Path, fmt: str) -> Checkpoint:
    values = json.loads(data[len(MAGIC):])
    lazy = {k: LazyTensor(shape=(len(v),), dtype=torch.float32, nbytes=4 * len(v), location=f"{source}:{k}",
                          loader=lambda v=v: torch.tensor(v, dtype=torch.float32))
            for k, v in values.items()}
    return Checkpoint(source=str(source), format=fmt, entries=flatten(lazy))


class TextTensors:
    """A third-party format: ``TPTXT`` and one JSON line of ``{key: [values]}`` (float32 vectors)."""

    name, detected_as, family, sharded = "tptxt", "tptxt", "tptxt", False
    suffixes, produces = (".tptxt",), ("tptxt",)

    def detect(self, probe: Probe) -> bool:
        return not probe.is_dir and probe.head.startswith(MAGIC)

    def read(self, path: Path) -> Checkpoint:
        return _text_checkpoint(path.read_bytes(), path, self.name)

    def check(self, ckpt: Checkpoint, dest: Path) -> None:
        flat = [e.key for e in ckpt.tensors() if len(e.shape) != 1]
        if flat:
            raise UsageError(f"only vectors fit: {', '.join(flat)}", path=dest, fix="write torch instead")

    def write(self, ckpt: Checkpoint, dest: Path, *, source: Checkpoint, max_shard_size: int | None,
              metadata: Mapping[str, str]) -> None:
        data = {e.key: e.load().tolist() for e in ckpt.tensors()}
        dest.write_bytes(MAGIC + json.dumps(data).encode())


class ZippedText:
    """A read-only third-party format inside a zip, which torch's detector would claim first."""

    name, detected_as, family = "zipped-tptxt", "zip", "torch"
    suffixes, produces = (".ztxt",), ("zipped-tptxt",)

    def detect(self, probe: Probe) -> bool:
        return probe.path.suffix == ".ztxt" and probe.head[:4] == b"PK\x03\x04"

    def read(self, path: Path) -> Checkpoint:
        with zipfile.ZipFile(path) as zf:
            return _text_checkpoint(zf.read("v.tptxt"), path, self.name)


def test_a_registered_format_is_used_by_open_and_the_writers(tmp_path: Path) -> None:
    fmt = register_format(TextTensors())
    try:
        assert formats()[-1] is fmt and format_names(writable=True)[-1] == "tptxt"
        path = tmp_path / "v.tptxt"
        path.write_bytes(MAGIC + b'{"bias": [1.0, -1.0]}')
        assert detect_format(path) == "tptxt"
        with tensorparity.open(path) as ckpt:
            assert ckpt.format == "tptxt"
            assert torch.equal(ckpt["bias"].load(), STATE["layer.bias"])
        assert format_for_path(tmp_path / "out.tptxt") == "tptxt"
        write_checkpoint(tensorparity.open({"b": STATE["layer.bias"]}), tmp_path / "out.tptxt", format="tptxt")
        assert tensorparity.open(tmp_path / "out.tptxt")["b"].load().tolist() == [1.0, -1.0]
        with pytest.raises(UsageError, match="only vectors fit: w"):
            write_checkpoint(tensorparity.open({"w": STATE["layer.weight"]}), tmp_path / "w.tptxt", format="tptxt")
        # convert and migrate ask the registry when they run, not what it held at import
        report = tensorparity.convert(path, tmp_path / "converted.tptxt")
        assert report.verified and report.format == "tptxt"
        assert tensorparity.open(tmp_path / "converted.tptxt")["bias"].load().tolist() == [1.0, -1.0]
    finally:
        assert unregister_format("tptxt") is fmt
    assert "tptxt" not in format_names()
    with pytest.raises(UnknownFormatError, match="unrecognised file format"):
        tensorparity.open(path)


def test_before_places_a_format_ahead_of_one_that_would_claim_its_files(tmp_path: Path) -> None:
    path = tmp_path / "v.ztxt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("v.tptxt", MAGIC + b'{"bias": [1.0, -1.0]}')
    assert find_format(path) is get_format("torch")
    with pytest.raises(UsageError, match="no checkpoint format is named 'nope'"):
        register_format(ZippedText(), before="nope")
    assert "zipped-tptxt" not in format_names()
    register_format(ZippedText(), before="torch")
    try:
        names = [f.name for f in formats()]
        assert names.index("zipped-tptxt") == names.index("torch") - 1
        with tensorparity.open(path) as ckpt:
            assert ckpt.format == "zipped-tptxt" and ckpt["bias"].load().tolist() == [1.0, -1.0]
    finally:
        unregister_format("zipped-tptxt")
    assert find_format(path) is get_format("torch")


def test_a_safetensors_header_holding_ustar_at_byte_257_is_not_taken_for_a_tar(tmp_path: Path) -> None:
    # a tar is recognised by "ustar" at byte 257; a safetensors header is JSON text that may hold it there
    path = tmp_path / "w.safetensors"
    for pad in range(300):
        key = "k" * pad + "ustar"
        save_file({key: torch.ones(2)}, path)
        at = path.read_bytes().find(b"ustar")
        if at == 257:
            break
    assert path.read_bytes()[257:262] == b"ustar"
    assert detect_format(path) == "safetensors"
    with tensorparity.open(path) as ckpt:
        assert torch.equal(ckpt[key].load(), torch.ones(2))
