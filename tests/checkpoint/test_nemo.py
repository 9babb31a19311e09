""".nemo archives written as NeMo's SaveRestoreConnector writes them (tar of a folder, arcname ".")."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import tensorparity as tp
from tensorparity.checkpoint import nemo
from tensorparity.errors import CorruptCheckpointError, UnknownFormatError, UnsafeCheckpointError
from tensorparity.examples.formats import artifact_name, tar_folder, write_nemo, write_nemo_folder

CONFIG = {
    "target": "nemo.collections.asr.models.EncDecCTCModel",
    "nemo_version": "1.23.0",
    "encoder": {"d_model": 8, "n_layers": 2, "dropout": 0.1},
    "labels": ["a", "b", " "],
    "tokenizer": {"model": "nemo:" + artifact_name("tokenizer.model")},
}


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "encoder.layers.0.weight": torch.randn(8, 8, generator=gen),
        "encoder.layers.0.bias": torch.randn(8, generator=gen).to(torch.bfloat16),
        "encoder.embed.weight": torch.randn(5, 8, generator=gen),
        "decoder.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "decoder.positions": torch.arange(6, dtype=torch.int64),
    }


def _assert_weights(ckpt: tp.Checkpoint, weights: dict[str, torch.Tensor], prefix: str = "") -> None:
    for key, value in weights.items():
        entry = ckpt[prefix + key]
        assert isinstance(entry, tp.TensorEntry), key
        assert entry.dtype == value.dtype and entry.shape == tuple(value.shape), key
        assert torch.equal(entry.load(), value), key


def _fresh_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fresh = tmp_path / "TMPDIR"
    fresh.mkdir()
    monkeypatch.setenv("TMPDIR", str(fresh))
    monkeypatch.setattr(tempfile, "tempdir", str(fresh))  # tempfile caches the directory it chose
    return fresh


def test_plain_tar_round_trip(tmp_path: Path) -> None:
    weights = _weights()
    path = write_nemo(tmp_path / "asr.nemo", weights, CONFIG, artifacts={"tokenizer.model": b"x" * 123})
    with tp.open(path) as ckpt:
        assert ckpt.format == "nemo" and ckpt.source == str(path)
        _assert_weights(ckpt, weights)
        assert ckpt["model_config.encoder.d_model"].value == 8
        assert ckpt["model_config.labels"].value == ["a", "b", " "]
        assert ckpt[f"artifacts.{artifact_name('tokenizer.model')}"].value == {"size": 123}
        assert ckpt.section_of("encoder.layers.0.weight") == "model"
        assert ckpt.section_of("model_config.encoder.dropout") == "config"
        assert ckpt.section_of(f"artifacts.{artifact_name('tokenizer.model')}") == "artifacts"
        assert ckpt.provenance["framework"] == "nemo"
        assert ckpt.provenance["target"] == CONFIG["target"]
        assert ckpt.provenance["nemo_version"] == "1.23.0"
        assert ckpt.provenance["compression"] == "none"
        assert ckpt.provenance["model_parallel_ranks"] == []
        # The location is an offset into the .nemo itself, inside the weights member's bytes.
        with tarfile.open(path) as tar:
            member = tar.getmember("./model_weights.ckpt")
        offset = int(ckpt["encoder.embed.weight"].location.rsplit("@", 1)[1])
        assert member.offset_data < offset < member.offset_data + member.size
        assert ckpt.num_parameters("model") == sum(v.numel() for v in weights.values())


def test_plain_tar_weights_are_read_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_nemo(tmp_path / "m.nemo", {"w": torch.zeros(256), "v": torch.arange(4.0)}, CONFIG)
    fresh = _fresh_tmpdir(tmp_path, monkeypatch)
    before = set(tmp_path.rglob("*"))
    ckpt = tp.open(path)
    assert torch.equal(ckpt["v"].load(), torch.arange(4.0))
    # The tensor's bytes are in the .nemo itself: change them there and load() sees the change.
    offset = int(ckpt["w"].location.rsplit("@", 1)[1])
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(torch.ones(256).numpy().tobytes())
    assert ckpt["w"].load().sum().item() == 256
    ckpt.close()
    assert list(fresh.iterdir()) == []
    assert set(tmp_path.rglob("*")) == before


def test_gzip_round_trip_and_temp_folder_removed_on_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = _weights()
    path = write_nemo(tmp_path / "old.nemo", weights, CONFIG, gzip=True, artifacts={"vocab.txt": b"a\nb\n"})
    fresh = _fresh_tmpdir(tmp_path, monkeypatch)
    ckpt = tp.open(path)
    assert ckpt.provenance["compression"] == "gzip"
    _assert_weights(ckpt, weights)
    assert ckpt[f"artifacts.{artifact_name('vocab.txt')}"].value == {"size": 4}
    assert ckpt["model_config.encoder.n_layers"].value == 2
    (copied,) = fresh.iterdir()  # only the weights were copied out, into one private folder
    assert [p.name for p in copied.iterdir()] == ["model.ckpt"]
    ckpt.close()
    assert list(fresh.iterdir()) == []


@pytest.mark.parametrize("ranks", [["mp_rank_00", "mp_rank_01"], ["tp_rank_00_pp_rank_000", "tp_rank_01_pp_rank_000"]])
@pytest.mark.parametrize("gzip", [False, True])
def test_model_parallel_ranks(tmp_path: Path, ranks: list[str], gzip: bool) -> None:
    shards = [{"layer.weight": torch.full((2, 3), float(i)), "layer.bias": torch.arange(3) + i} for i in range(2)]
    path = write_nemo(tmp_path / "mp.nemo", shards, CONFIG, ranks=ranks, gzip=gzip)
    with tp.open(path) as ckpt:
        assert ckpt.provenance["model_parallel_ranks"] == ranks
        for rank, shard in zip(ranks, shards):
            _assert_weights(ckpt, shard, prefix=f"{rank}.")
            assert ckpt.section_of(f"{rank}.layer.weight") == "model"
        assert not any(key.startswith("layer.") for key in ckpt)


def test_extracted_folder(tmp_path: Path) -> None:
    weights = _weights()
    folder = write_nemo_folder(tmp_path / "extracted", weights, CONFIG, artifacts={"tokenizer.model": b"abc"})
    with tp.open(folder) as ckpt:
        assert ckpt.format == "nemo"
        _assert_weights(ckpt, weights)
        assert ckpt["model_config.tokenizer.model"].value == CONFIG["tokenizer"]["model"]
        assert ckpt[f"artifacts.{artifact_name('tokenizer.model')}"].value == {"size": 3}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sharded_weights_folder(tmp_path: Path) -> None:
    pytest.importorskip("tensorparity.checkpoint.dcp")
    from torch.distributed import checkpoint as dcp

    weights = {"decoder.layers.0.weight": torch.randn(4, 4), "embedding.weight": torch.randn(3, 4)}
    folder = tmp_path / "extracted"
    folder.mkdir()
    (folder / "model_config.yaml").write_text(yaml.safe_dump(CONFIG))
    dcp.save(weights, checkpoint_id=folder / "model_weights")
    with tp.open(folder) as ckpt:  # extracted: the weights folder is read by its own reader
        assert ckpt.provenance["weights_format"] == "dcp"
        _assert_weights(ckpt, weights)
        assert ckpt["model_config.encoder.d_model"].value == 8
    path = tar_folder(folder, tmp_path / "sharded.nemo")
    with pytest.raises(UnknownFormatError) as info:  # archived: not read in place
        tp.open(path)
    assert "[model_weights/]" in str(info.value)
    assert "fix: extract it (mkdir out && tar -xf sharded.nemo -C out) and open the folder" in str(info.value)


def test_legacy_weights_inside_a_nemo(tmp_path: Path) -> None:
    weights = _weights()
    path = write_nemo(tmp_path / "legacy.nemo", weights, CONFIG, legacy=True)
    with tp.open(path) as ckpt:
        assert ckpt.provenance["weights_format"] == "torch-legacy"
        _assert_weights(ckpt, weights)


def test_malicious_pickle_in_weights_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    path = write_nemo(tmp_path / "evil.nemo", {"w": torch.ones(2), "payload": Evil()}, CONFIG)
    with tp.open(path) as ckpt:
        names = {p.name for p in ckpt.placeholders}
        assert names & {"posix.system", "os.system"}
        assert ckpt["payload"].not_executed
        assert torch.equal(ckpt["w"].load(), torch.ones(2))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Refused and broken archives


def _archive_with(tmp_path: Path, extra: tarfile.TarInfo, data: bytes = b"", *, gzip: bool = False) -> Path:
    """A genuine .nemo plus one hand-made member appended."""
    folder = write_nemo_folder(tmp_path / "src", {"w": torch.ones(2)}, CONFIG)
    path = tmp_path / ("bad.nemo" if not gzip else "bad.nemo.gz")
    with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
        tar.add(folder, arcname=".")
        tar.addfile(extra, io.BytesIO(data) if extra.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, *, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize(("member", "why"), [
    (_member("./../../etc/evil.txt", size=3), "'..'"),
    (_member("/etc/evil.txt", size=3), "absolute path"),
    (_member("./link.model", tarfile.SYMTYPE, link="/etc/passwd"), "symbolic link"),
    (_member("./hard.model", tarfile.LNKTYPE, link="./model_config.yaml"), "hard link"),
    (_member("./dev.model", tarfile.CHRTYPE), "device file"),
    (_member("./pipe.model", tarfile.FIFOTYPE), "fifo"),
])
@pytest.mark.parametrize("gzip", [False, True])
def test_unsafe_members_refuse_the_archive(tmp_path: Path, member: tarfile.TarInfo, why: str, gzip: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = _archive_with(tmp_path, member, b"abc" if member.isfile() else b"", gzip=gzip)
    fresh = _fresh_tmpdir(tmp_path, monkeypatch)
    with pytest.raises(UnsafeCheckpointError) as info:
        tp.open(path)
    text = str(info.value)
    assert member.name in text and why in text and "the archive is refused" in text
    assert "fix: refusing the whole archive; re-create the .nemo with model.save_to()" in text
    assert str(path) in text
    assert list(fresh.iterdir()) == []  # a gzip archive's copied weights are cleaned up too


def test_truncated_tar(tmp_path: Path) -> None:
    path = write_nemo(tmp_path / "m.nemo", {"w": torch.zeros(4096)}, CONFIG)
    with tarfile.open(path) as tar:
        weights = tar.getmember("./model_weights.ckpt")
    data = path.read_bytes()
    path.write_bytes(data[: weights.offset_data + weights.size // 2])
    with pytest.raises(CorruptCheckpointError) as info:
        tp.open(path)
    assert "./model_weights.ckpt" in str(info.value)
    assert "fix: the .nemo is truncated or corrupt" in str(info.value)


def test_truncated_gzip(tmp_path: Path) -> None:
    path = write_nemo(tmp_path / "m.nemo", {"w": torch.randn(4096)}, CONFIG, gzip=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError) as info:
        tp.open(path)
    assert "model_weights.ckpt" in str(info.value) and "fix: the .nemo is truncated or corrupt" in str(info.value)


def test_gzip_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 24 MiB of zeros compresses ~1000x; the cap is lowered so the test stays fast.
    monkeypatch.setattr(nemo, "MAX_INFLATED_MIN", 1 << 20)
    zeros = bytes(24 << 20)
    path = _archive_with(tmp_path, _member("./zeros_tokenizer.model", size=len(zeros)), zeros, gzip=True)
    assert path.stat().st_size < 200_000
    fresh = _fresh_tmpdir(tmp_path, monkeypatch)
    with pytest.raises(UnsafeCheckpointError) as info:
        tp.open(path)
    text = str(info.value)
    assert "./zeros_tokenizer.model" in text and "gzip bomb" in text
    assert "fix: if the archive is genuine, decompress it (gunzip)" in text
    assert list(fresh.iterdir()) == []


def test_inflated_bytes_are_counted_across_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each member alone is under the cap; together they are not.
    monkeypatch.setattr(nemo, "MAX_INFLATED_MIN", 1 << 20)
    folder = write_nemo_folder(tmp_path / "src", {"w": torch.ones(2)}, CONFIG)
    for i in range(4):
        (folder / f"part{i}.bin").write_bytes(bytes(400_000))
    path = tar_folder(folder, tmp_path / "many.nemo", gzip=True)
    with pytest.raises(UnsafeCheckpointError) as info:
        tp.open(path)
    assert "part" in str(info.value) and "gzip bomb" in str(info.value)


def test_huge_tar_header_in_gzip_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tarfile keeps a header's pax records in memory: a few KB of gzip must not become GBs of header.
    monkeypatch.setattr(nemo, "MAX_HEADER_BYTES", 1 << 20)
    member = _member("./padded.model", size=1)
    member.pax_headers = {"comment": "x" * (4 << 20)}
    path = _archive_with(tmp_path, member, b"x", gzip=True)
    with pytest.raises(UnsafeCheckpointError) as info:
        tp.open(path)
    text = str(info.value)
    assert "a tar header after member './model_weights.ckpt' inflates past the 1048576-byte limit" in text
    assert "fix: if the archive is genuine, decompress it (gunzip)" in text


def test_missing_weights_member(tmp_path: Path) -> None:
    folder = write_nemo_folder(tmp_path / "src", {"w": torch.ones(2)}, CONFIG)
    (folder / "model_weights.ckpt").unlink()
    path = tar_folder(folder, tmp_path / "no_weights.nemo")
    with pytest.raises(CorruptCheckpointError) as info:
        tp.open(path)
    text = str(info.value)
    assert str(path) in text and "model_weights.ckpt" in text
    assert "fix: the archive is incomplete; re-save it with model.save_to()" in text


def test_bad_yaml(tmp_path: Path) -> None:
    folder = write_nemo_folder(tmp_path / "src", {"w": torch.ones(2)}, CONFIG)
    (folder / "model_config.yaml").write_text("encoder: {d_model: [8, 2\n")
    path = tar_folder(folder, tmp_path / "bad_yaml.nemo")
    with pytest.raises(CorruptCheckpointError) as info:
        tp.open(path)
    text = str(info.value)
    assert "[model_config.yaml]" in text and "invalid YAML" in text
    assert "fix: fix or regenerate model_config.yaml" in text


def test_yaml_alias_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nemo, "MAX_CONFIG_VALUES", 10_000)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]
    folder = write_nemo_folder(tmp_path / "src", {"w": torch.ones(2)}, CONFIG)
    (folder / "model_config.yaml").write_text("\n".join(lines) + "\n")
    path = tar_folder(folder, tmp_path / "laughs.nemo")
    with pytest.raises(UnsafeCheckpointError) as info:
        tp.open(path)
    assert "[model_config.yaml]" in str(info.value) and "fix: write the config without anchors" in str(info.value)


def test_duplicate_weights_member_is_ambiguous(tmp_path: Path) -> None:
    folder = write_nemo_folder(tmp_path / "src", {"w": torch.ones(2)}, CONFIG)
    path = tmp_path / "dup.nemo"
    with tarfile.open(path, "w:") as tar:
        tar.add(folder, arcname=".")
        tar.add(folder / "model_weights.ckpt", arcname="./model_weights.ckpt")
    with pytest.raises(CorruptCheckpointError) as info:
        tp.open(path)
    assert "model_weights.ckpt" in str(info.value) and "appears twice" in str(info.value)


def test_tar_that_is_not_a_nemo(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text(yaml.safe_dump({"a": 1}))
    path = tar_folder(tmp_path / "src", tmp_path / "plain.tar")
    with pytest.raises(UnknownFormatError) as info:
        tp.open(path)
    assert "not a .nemo" in str(info.value) and "fix: open a .nemo written by NeMo's model.save_to()" in str(info.value)
