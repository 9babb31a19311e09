"""Applying mappings to real checkpoints, and converting them to files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tensorparity
from tensorparity.checkpoint import Checkpoint, TensorEntry, ValueEntry
from tensorparity.errors import CorruptCheckpointError, UsageError
from tensorparity.examples import from_reference
from tensorparity import convert
from tensorparity.mapping import Mapping, MappingError, Reshape, Rule, apply_mapping

WriteYaml = Callable[..., Path]


def assert_same_tensors(ckpt: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt) == sorted(expected)
    for key, value in expected.items():
        entry = ckpt[key]
        assert isinstance(entry, TensorEntry)
        assert (entry.shape, entry.dtype) == (tuple(value.shape), value.dtype), key
        assert torch.equal(entry.load(), value), key


def test_reference_maps_to_the_port_exactly(tmp_path: Path, example_mapping: Mapping,
                                            reference_state: dict[str, torch.Tensor],
                                            port_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "reference.safetensors"
    save_file(reference_state, path)
    with tensorparity.open(path) as ckpt:
        result = apply_mapping(ckpt, example_mapping)
        assert_same_tensors(result.checkpoint, port_state)
        assert result.unmapped == () and result.passed_through == ()
        assert result.claims["blocks.1.qkv.bias"] == tuple(f"layers.1.self_attn.{p}_proj.bias" for p in "qkv")
        assert result.rule_of["blocks.1.qkv.bias"] == 3
        assert result.checkpoint.provenance["mapping"] == "reference-to-port"
        assert result.checkpoint.format == "safetensors"
        assert result.checkpoint["subsample.weight"].location == ckpt["pre_encode.weight"].location


def test_the_inverse_maps_the_port_back(example_mapping: Mapping, reference_state: dict[str, torch.Tensor],
                                        port_state: dict[str, torch.Tensor]) -> None:
    result = apply_mapping(port_state, example_mapping, direction="b_to_a")
    assert_same_tensors(result.checkpoint, reference_state)
    assert result.mapping.name == "inverse of reference-to-port"
    assert result.summary() == "31 keys -> 39: 27 renamed, 12 transformed, 0 passed through, 0 ignored, 0 unmapped"


def test_rules_that_match_nothing_are_reported(example_mapping: Mapping,
                                               reference_state: dict[str, torch.Tensor]) -> None:
    partial = {k: v for k, v in reference_state.items() if k != "feature_mean"}
    result = apply_mapping(partial, example_mapping)
    assert result.unused_rules == (9,)
    assert result.summary().endswith("; rules that matched nothing: rules[9]")


def test_the_bound_mapping_inverts_unequal_concats() -> None:
    # Grouped-query attention: the inverse must split 8/2/2, which only side A's shapes tell.
    a = {"q.w": torch.randn(8, 4), "k.w": torch.randn(2, 4), "v.w": torch.randn(2, 4)}
    m = Mapping([Rule(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}", {"concat": {"dim": 0}})])
    forward = apply_mapping(a, m)
    fused = {"qkv.w": forward.checkpoint["qkv.w"].load()}
    equal_parts = apply_mapping(fused, m, direction="b_to_a").checkpoint
    assert equal_parts["q.w"].shape == (4, 4)  # unbound: equal parts, which is wrong here
    back = apply_mapping(fused, forward.mapping, direction="b_to_a").checkpoint
    assert_same_tensors(back, a)


def test_planning_reads_no_tensor_data(example_mapping: Mapping, reference_state: dict[str, torch.Tensor]) -> None:
    def refuse() -> torch.Tensor:
        raise AssertionError("tensor data was read while planning")

    entries = {k: TensorEntry(k, tuple(v.shape), v.dtype, v.numel() * v.element_size(), "nowhere", refuse)
               for k, v in reference_state.items()}
    ckpt = Checkpoint(source="lazy", format="test", entries=entries)
    result = apply_mapping(ckpt, example_mapping)
    qkv = result.checkpoint["blocks.0.qkv.weight"]
    assert isinstance(qkv, TensorEntry) and qkv.shape == (96, 32) and qkv.nbytes == 96 * 32 * 4


def test_problems_in_applying_are_reported_together(write_yaml: WriteYaml) -> None:
    path = write_yaml("""\
name: broken-shapes
rules:
  - {a: "wq.weight", b: "q.weight", transform: {rearrange: "(h two d) c -> (h d two) c", h: 5, two: 2}}
  - a: ["a.{p}", "b.{p}"]
    b: "ab.{p}"
    transform: {concat: {dim: 1}}
  - {a: "c.weight", b: "v"}
  - {a: ["q.{p}", "k.{p}"], b: "qk.{p}", transform: {concat: {dim: 0}}}
  - {a: "lr", b: "optim.lr", transform: {cast: bfloat16}}
""")
    ckpt = {"wq.weight": torch.zeros(32, 8), "a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(5, 4),
            "c.weight": torch.zeros(2), "v": torch.zeros(2), "q.weight": torch.zeros(2), "lr": 0.1}
    with pytest.raises(MappingError) as err:
        apply_mapping(ckpt, path)
    problems = {p.rule: p for p in err.value.problems}
    assert set(problems) == {0, 1, 2, 3, 4}
    assert "can't divide axis of length 32 in chunks of 10" in problems[0].message
    assert "'wq.weight' [32, 8] float32" in problems[0].message and problems[0].line == 3
    assert "correct the transform's dims/axis sizes" in problems[0].fix
    assert "'b.weight' [5, 4]" in problems[1].message and problems[1].line == 4
    assert ("'v' is produced twice: by rules[2] from 'c.weight' and by passing through unchanged from 'v'"
            in problems[2].message)
    assert "'q.weight' needs its partner(s) 'k.weight', which is not in the checkpoint" in problems[3].message
    assert "'lr' (a float value) is not one" in problems[4].message
    assert str(err.value).startswith(f"{path}: 5 problems in the mapping, nothing was compared")


def test_a_key_claimed_by_two_regex_rules_is_reported() -> None:
    m = Mapping([Rule(r"layer\.(\d+)\.w", r"l.\1.w", regex=True), Rule(r"layer\.0\.(\w)", r"first.\1", regex=True)])
    with pytest.raises(MappingError) as err:
        apply_mapping({"layer.0.w": torch.zeros(1), "layer.1.w": torch.zeros(1)}, m)
    assert "key 'layer.0.w' is claimed by rules[0] and rules[1]" in str(err.value)
    assert "`fallback: true`" in err.value.problems[0].fix


def test_values_are_renamed_and_ignored_keys_reported() -> None:
    ckpt = {"model.bn.weight": torch.ones(2), "model.bn.num_batches_tracked": torch.tensor(3),
            "model.cfg": {"lr": 0.1}, "other": 1}
    m = Mapping([Rule("bn.{p}", "norm.{p}")], prefix_a="model.", prefix_b="net.", ignore_a=["*.num_batches_tracked"])
    result = apply_mapping(ckpt, m)
    assert list(result.checkpoint) == ["net.norm.weight", "net.cfg.lr"]
    assert result.checkpoint["net.cfg.lr"] == ValueEntry("net.cfg.lr", 0.1)
    assert result.ignored == ("model.bn.num_batches_tracked",)
    assert result.unmapped == ("other",)  # outside prefix_a
    assert result.passed_through == ("model.cfg.lr",)


@pytest.fixture(scope="session")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lightning")
    from tensorparity.examples.lightning_run import train_lightning

    return train_lightning(tmp_path_factory.mktemp("lightning") / "run.ckpt", steps=1)


def test_a_lightning_checkpoint_maps_through_its_prefix(lightning_ckpt: Path, example_mapping: Mapping) -> None:
    m = Mapping(example_mapping.rules, prefix_a="state_dict.model.", passthrough=False, name="lightning-to-port")
    with tensorparity.open(lightning_ckpt) as ckpt:
        trained = {k.removeprefix("state_dict.model."): e.load() for k, e in ckpt.items()
                   if k.startswith("state_dict.model.")}
        result = apply_mapping(ckpt, m)
        assert_same_tensors(result.checkpoint, from_reference(trained))
        assert "epoch" in result.unmapped and any(k.startswith("optimizer_states.") for k in result.unmapped)
        assert {result.checkpoint.section_of(k) for k in result.checkpoint} == {"model"}
        back = apply_mapping(result.checkpoint, result.mapping, direction="b_to_a").checkpoint
        assert sorted(back) == sorted(f"state_dict.model.{k}" for k in trained)


def test_convert_writes_a_checkpoint_that_reopens_equal(tmp_path: Path, example_mapping: Mapping,
                                                         reference_state: dict[str, torch.Tensor],
                                                         port_state: dict[str, torch.Tensor]) -> None:
    src = tmp_path / "reference.pt"
    torch.save(reference_state, src)
    out = tmp_path / "port.safetensors"
    result = convert(src, out, mapping=example_mapping)
    assert sorted(os.listdir(tmp_path)) == ["port.safetensors", "reference.pt"]  # no temporary left behind
    with tensorparity.open(out) as reopened:
        assert_same_tensors(reopened, port_state)
        assert reopened.provenance["metadata"]["tensorparity.mapping"] == "reference-to-port"
    assert result.verified and result.tensors == len(port_state) and "reference-to-port" in result.notes[0]
    # and back, into a torch file, through the inverse
    back = tmp_path / "back.pt"
    convert(out, back, mapping=example_mapping, direction="b_to_a")
    with tensorparity.open(back) as reopened:
        assert_same_tensors(reopened, reference_state)


def test_convert_keeps_values_in_torch_files_and_refuses_them_in_safetensors(tmp_path: Path) -> None:
    ckpt = {"w": torch.ones(2, 2).t(), "tied": None, "meta": {"epoch": 3}}
    ckpt["tied"] = ckpt["w"]  # shared storage: safetensors would refuse it as is
    m = Mapping([Rule("w", "weight")])
    with pytest.raises(UsageError) as err:
        convert(ckpt, tmp_path / "out.safetensors", mapping=m)
    assert "1 non-tensor value(s) cannot go into safetensors: meta.epoch" in str(err.value) and "write torch" in err.value.fix
    assert os.listdir(tmp_path) == []
    convert({k: v for k, v in ckpt.items() if k != "meta"}, tmp_path / "out.safetensors", mapping=m)
    with tensorparity.open(tmp_path / "out.safetensors") as reopened:
        assert torch.equal(reopened["tied"].load(), reopened["weight"].load())
    convert(ckpt, tmp_path / "out.pt", mapping=m)
    with tensorparity.open(tmp_path / "out.pt") as reopened:
        assert reopened["meta.epoch"].value == 3 and torch.equal(reopened["weight"].load(), ckpt["w"])


def test_convert_never_overwrites_the_source_or_an_existing_file(tmp_path: Path, example_mapping: Mapping,
                                                                 reference_state: dict[str, torch.Tensor]) -> None:
    src = tmp_path / "reference.safetensors"
    save_file(reference_state, src)
    before = src.read_bytes()
    with pytest.raises(UsageError, match="refusing to write the converted checkpoint over"):
        convert(src, src, mapping=example_mapping, overwrite=True)
    with pytest.raises(UsageError, match="refusing to write"):
        convert(tensorparity.open(src), tmp_path / "." / "reference.safetensors", mapping=example_mapping,
                overwrite=True)
    out = tmp_path / "port.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError) as err:
        convert(src, out, mapping=example_mapping)
    assert err.value.fix == "pass --overwrite to replace it, or choose another path"
    assert src.read_bytes() == before and out.read_bytes() == b"keep me"
    convert(src, out, mapping=example_mapping, overwrite=True)
    assert out.read_bytes() != b"keep me"


def test_a_failed_convert_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    def corrupt() -> torch.Tensor:
        raise CorruptCheckpointError("truncated", path="src.pt", key="b", fix="save it again")

    entries = {"a": TensorEntry("a", (2,), torch.float32, 8, "mem", lambda: torch.ones(2)),
               "b": TensorEntry("b", (2,), torch.float32, 8, "mem", corrupt)}
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(CorruptCheckpointError, match="save it again"):
        convert(Checkpoint(source="src.pt", format="test", entries=entries), out, mapping=Mapping(), overwrite=True)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.safetensors"]


def test_a_mapping_error_stops_convert_before_anything_is_written(tmp_path: Path) -> None:
    m = Mapping([Rule("w", "v", {"transpose": [0, 2]})])
    with pytest.raises(MappingError, match=r"transpose dims 0 and 2 does not fit 'w' \[2, 2\]"):
        convert({"w": torch.zeros(2, 2)}, tmp_path / "out.safetensors", mapping=m)
    assert os.listdir(tmp_path) == []


def test_binding_splits_a_rule_whose_groups_learn_different_shapes() -> None:
    a = {"emb.weight": torch.randn(4, 3), "emb.bias": torch.randn(4), "x": torch.ones(1)}
    m = Mapping([Rule("emb.{p}", "flat.{p}", {"reshape": [-1]}), Rule("x", "y")])
    result = apply_mapping(a, m)
    bound = result.mapping
    assert [r.a for r in bound.rules] == [("emb.weight",), ("emb.bias",), ("x",)]
    assert [r.transform for r in bound.rules[:2]] == [Reshape((-1,), (4, 3)), Reshape((-1,), (4,))]
    assert result.rule_of == {"flat.weight": 0, "flat.bias": 1, "y": 2}
    back = apply_mapping(result.checkpoint, bound, direction="b_to_a").checkpoint
    assert_same_tensors(back, a)


class TrainConfig:
    """Pickled by torch.save as a class instance: opened inertly as a not-executed placeholder."""

    def __init__(self) -> None:
        self.lr = 0.1


def test_sections_and_placeholders_follow_the_keys(tmp_path: Path) -> None:
    src = tmp_path / "train.pt"
    torch.save({"model": {"w": torch.ones(2)}, "cfg": TrainConfig()}, src)
    m = Mapping([Rule("model.{p}", "net.{p}"), Rule("cfg", "config")])
    with tensorparity.open(src) as ckpt:
        mapped = apply_mapping(ckpt, m).checkpoint
        assert [p.key for p in mapped.placeholders] == ["config"]
        assert (mapped.section_of("net.w"), mapped.section_of("config")) == ("model", "config")
        with pytest.raises(UsageError) as err:
            convert(ckpt, tmp_path / "out.pt", mapping=m)
        assert "never executed" in str(err.value) and "mapping `ignore`" in err.value.fix
