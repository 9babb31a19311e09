"""tensorparity.diff: verdicts, metrics and key bookkeeping on real checkpoints written by torch.save,
safetensors and Lightning-shaped dicts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tensorparity
from tensorparity.checks import diff
from tensorparity.errors import UsageError
from tensorparity.numerics import Tolerance


@dataclasses.dataclass
class TrainConfig:
    """Pickled by reference: it opens as a not-executed placeholder, compared by its recorded state."""

    lr: float = 0.5
    warmup: int = 10


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8),
        **{f"layers.{i}.{name}.weight": torch.randn(8, 8) for i in range(3) for name in ("attn", "mlp")},
        **{f"layers.{i}.norm.bias": torch.randn(8) for i in range(3)},
        "head.weight": torch.randn(4, 8),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
    }


def save_pt(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def save_st(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def lightning(state: dict[str, torch.Tensor], *, lr: float = 1e-3, config: TrainConfig | None = None) -> dict:
    """What Lightning's Trainer.save_checkpoint writes (weights under state_dict, hyper-parameters, loops)."""
    return {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": dict(state),
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": lr, "betas": (0.9, 0.999), "params": [0, 1]}]}],
        "lr_schedulers": [{"base_lrs": [lr], "last_epoch": 10}],
        "hyper_parameters": {"lr": lr, "layers": 3, "config": config or TrainConfig()},
    }


def test_identical_in_two_formats(tmp_path: Path) -> None:
    state = weights()
    report = diff(save_pt(tmp_path / "a.pt", state), save_st(tmp_path / "b.safetensors", state))
    assert report.verdict == "identical" and report.passed and report.exit_code == 0
    assert report.classic_summary() == ("Common keys: 12 / Only in A: 0 / Only in B: 0 / Shape mismatches: 0 / "
                                        "Value mismatches: 0 → identical")
    assert all(t.status == "identical" for t in report.tensors) and len(report.tensors) == 12
    assert report.a.format == "torch-zip" and report.b.format == "safetensors"
    assert report.a.parameters == report.b.parameters == sum(v.numel() for v in state.values())
    assert report.summary() == "identical: 12 keys, 12 tensors, every byte the same"


def test_one_changed_element_is_found_with_both_values(tmp_path: Path) -> None:
    state = weights()
    broken = dict(state)
    broken["layers.1.mlp.weight"] = state["layers.1.mlp.weight"].clone()
    broken["layers.1.mlp.weight"][5, 2] += 0.125
    report = diff(save_pt(tmp_path / "a.pt", state), save_st(tmp_path / "b.safetensors", broken))
    assert report.verdict == "differs" and report.exit_code == 1
    (bad,) = report.mismatches
    assert bad.key == "layers.1.mlp.weight" and bad.n_mismatch == 1 and bad.numel == 64
    assert bad.first_index == (5, 2)
    assert bad.first_a == state["layers.1.mlp.weight"][5, 2].item()
    assert bad.first_b == broken["layers.1.mlp.weight"][5, 2].item()
    assert bad.max_abs == pytest.approx(0.125, rel=1e-6)
    assert bad.required_atol == pytest.approx(0.125 - bad.tolerance.rtol * abs(bad.first_b), rel=1e-5)
    assert report.classic_summary().endswith("Shape mismatches: 0 / Value mismatches: 1 → differs")
    assert "worst layers.1.mlp.weight" in report.summary()
    assert report.sections[0].identical == 11 and report.sections[0].value_mismatches == 1


def test_bf16_copy_is_close_and_the_dtype_difference_is_reported(tmp_path: Path) -> None:
    state = {k: v for k, v in weights().items() if v.is_floating_point()}
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    report = diff(save_st(tmp_path / "f32.safetensors", state), save_pt(tmp_path / "bf16.pt", half))
    assert report.verdict == "close" and report.exit_code == 0
    assert len(report.dtype_mismatches) == len(state)
    t = report.tensors[0]
    assert (t.dtype_a, t.dtype_b) == ("float32", "bfloat16") and t.status == "close"
    assert t.tolerance.rtol == pytest.approx(1.6e-2)  # the looser dtype's default
    assert 0 < t.max_abs and t.required_rtol <= 2 ** -8
    assert "dtype differences" in report.summary()
    # Exact mode refuses the same pair.
    assert diff(state, half, tolerance=Tolerance(exact=True)).verdict == "differs"


def test_nan_at_the_same_places(tmp_path: Path) -> None:
    a = torch.linspace(-1, 1, 10)
    a[[2, 7]] = math.nan
    b = a.clone()
    b[0] += 1e-7  # within tolerance, so the bytes differ and the values are judged
    pa, pb = save_pt(tmp_path / "a.pt", {"w": a}), save_st(tmp_path / "b.safetensors", {"w": b})
    ok = diff(pa, pb)
    assert ok.verdict == "close"
    (t,) = ok.tensors
    assert (t.nan_a, t.nan_b, t.nan_agree) == (2, 2, True)
    strict = diff(pa, pb, tolerance=Tolerance(equal_nan=False))
    assert strict.verdict == "differs" and strict.required_atol is None  # no atol makes NaN equal NaN
    assert "passes with equal_nan (NaNs in the same places)" in str(strict)
    (t,) = strict.mismatches
    assert t.n_mismatch == 2 and t.first_index == (2,)
    moved = b.clone()
    moved[[2, 3]] = moved[[3, 2]]  # one NaN moves
    (t,) = diff(pa, {"w": moved}).mismatches
    assert t.nan_agree is False and t.first_index == (2,)


def test_different_shapes_are_reported_never_broadcast(tmp_path: Path) -> None:
    a = {"w": torch.ones(3, 1), "b": torch.zeros(2)}
    b = {"w": torch.ones(3, 4), "b": torch.zeros(2)}
    report = diff(save_pt(tmp_path / "a.pt", a), save_st(tmp_path / "b.safetensors", b))
    (t,) = report.shape_mismatches
    assert (t.key, t.shape_a, t.shape_b, t.passed) == ("w", (3, 1), (3, 4), False)
    assert report.verdict == "differs" and report.required_atol is None
    assert "Shape mismatches: 1" in report.classic_summary()


def test_keys_only_in_one_side(tmp_path: Path) -> None:
    state = weights()
    a = {**state, "extra.weight": torch.ones(2)}
    b = {k: v for k, v in state.items() if k != "head.weight"}
    report = diff(save_pt(tmp_path / "a.pt", a), save_st(tmp_path / "b.safetensors", b))
    assert [k.key for k in report.only_in_a] == ["head.weight", "extra.weight"]
    assert report.only_in_b == ()
    assert report.only_in_a[0].shape == (4, 8)
    assert report.classic_summary().startswith("Common keys: 11 / Only in A: 2 / Only in B: 0")
    assert report.verdict == "differs"
    swapped = diff(b, a)
    assert [k.key for k in swapped.only_in_b] == ["head.weight", "extra.weight"]


def test_hyper_parameter_and_config_differences(tmp_path: Path) -> None:
    state = weights()
    a = save_pt(tmp_path / "a.ckpt", lightning(state, lr=1e-3))
    b = save_pt(tmp_path / "b.ckpt", lightning(state, lr=3e-4, config=TrainConfig(lr=0.1)))
    report = diff(a, b)
    by_key = {v.key: v for v in report.values}
    assert set(by_key) == {"hyper_parameters.lr", "hyper_parameters.config",
                           "optimizer_states.0.param_groups.0.lr", "lr_schedulers.0.base_lrs"}
    assert (by_key["hyper_parameters.lr"].a, by_key["hyper_parameters.lr"].b) == ("0.001", "0.0003")
    assert by_key["hyper_parameters.lr"].section == "hyper_parameters"
    config = by_key["hyper_parameters.config"]
    assert "TrainConfig()" in config.a and "'lr': 0.5" in config.a and "'lr': 0.1" in config.b
    assert report.verdict == "differs" and report.mismatches == ()
    assert "Value mismatches: 4" in report.classic_summary()
    same = diff(a, save_pt(tmp_path / "c.ckpt", lightning(state, lr=1e-3)))
    assert same.values == () and same.verdict == "identical"  # placeholders compare by their recorded state


def test_value_types_and_tensor_vs_value() -> None:
    report = diff({"n": 1, "t": torch.zeros(2), "x": float("nan")}, {"n": 1.0, "t": 3, "x": float("nan")})
    kinds = {v.key: v.kind for v in report.values}
    assert kinds == {"n": "type", "t": "kind"}
    assert next(v for v in report.values if v.key == "t").a == "tensor [2] float32"


def test_per_key_override_loosens_one_key() -> None:
    a = {"enc.w": torch.ones(4), "dec.w": torch.ones(4)}
    b = {k: v + 1e-3 for k, v in a.items()}
    assert {t.key for t in diff(a, b).mismatches} == {"enc.w", "dec.w"}
    report = diff(a, b, tolerance=Tolerance(overrides=((r"^dec\.", Tolerance(atol=1e-2)),)))
    assert [t.key for t in report.mismatches] == ["enc.w"]
    dec = next(t for t in report.tensors if t.key == "dec.w")
    assert dec.status == "close" and dec.tolerance.atol == 1e-2 and "override" in dec.tolerance.source


def test_exact_fails_on_one_ulp_that_default_accepts(tmp_path: Path) -> None:
    state = weights()
    nudged = dict(state)
    w = state["head.weight"].clone()
    w[1, 1] = torch.nextafter(w[1, 1], torch.tensor(math.inf))
    nudged["head.weight"] = w
    pa, pb = save_pt(tmp_path / "a.pt", state), save_st(tmp_path / "b.safetensors", nudged)
    assert diff(pa, pb).verdict == "close"
    exact = diff(pa, pb, tolerance=Tolerance(exact=True))
    assert exact.verdict == "differs"
    (t,) = exact.mismatches
    assert t.key == "head.weight" and t.max_abs > 0
    assert (t.first_index, t.n_mismatch) == ((1, 1), 1)
    assert (t.first_a, t.first_b) == (state["head.weight"][1, 1].item(), w[1, 1].item())
    assert exact.tolerance.describe().startswith("exact")


def test_exact_mode_names_the_first_differing_element() -> None:
    a = torch.ones(4)
    b = a.clone()
    b[2] = torch.nextafter(b[2], torch.tensor(2.0))
    (t,) = diff({"w": a}, {"w": b}, tolerance=Tolerance(exact=True)).mismatches
    assert (t.n_mismatch, t.first_index) == (1, (2,))


def test_lightning_checkpoint_vs_bare_safetensors_compares_weights(tmp_path: Path) -> None:
    state = weights()
    ckpt = save_pt(tmp_path / "run.ckpt", lightning(state))
    bare = save_st(tmp_path / "model.safetensors", state)
    report = diff(ckpt, bare)
    assert report.verdict == "identical" and report.common == len(state)
    assert report.a.selected == "model weights only, prefix 'state_dict.' removed" and report.b.selected is None
    assert any("compared A's model weights with B" in n for n in report.notes)
    reverse = diff(bare, ckpt)
    assert reverse.b.selected and reverse.verdict == "identical"
    everything = diff(ckpt, bare, weights_only=False)
    assert everything.verdict == "differs" and everything.common == 0
    assert {s.name for s in everything.sections} >= {"model", "optimizer", "hyper_parameters"}
    assert any(f"{len(state)} of A's keys would without their prefix 'state_dict.'" in n
               for n in everything.notes)  # the hint


def test_include_exclude_filter_on_a_keys(tmp_path: Path) -> None:
    state = weights()
    broken = {**state, "head.weight": state["head.weight"] + 1}
    report = diff(state, broken, include=r"^layers\.")
    assert report.verdict == "identical" and report.common == 9 and report.include == r"^layers\."
    assert diff(state, broken, exclude=r"^head\.").verdict == "identical"
    assert diff(state, broken, include=r"^head\.").verdict == "differs"
    with pytest.raises(UsageError) as err:
        diff(state, broken, include="layers.(")
    assert "not a valid regular expression" in str(err.value) and r"fix: escape special characters" in str(err.value)
    with pytest.raises(UsageError) as err:
        diff(state, broken, include="no-such-key")
    assert "leave nothing to compare" in str(err.value) and "tensorparity inspect" in str(err.value)


def test_bad_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="workers must be a positive integer.*fix: e.g."):
        diff({}, {}, workers=0)
    with pytest.raises(UsageError, match="tolerance must be a tensorparity.Tolerance"):
        diff({}, {}, tolerance=1e-3)  # type: ignore[arg-type]


def test_integers_and_bools_compare_exactly() -> None:
    a = {"ids": torch.tensor([1, 2, 2**60]), "mask": torch.tensor([True, False])}
    b = {"ids": torch.tensor([1, 2, 2**60 + 1]), "mask": torch.tensor([True, True])}
    report = diff(a, b)
    assert {t.key: t.first_index for t in report.mismatches} == {"ids": (2,), "mask": (1,)}


def test_checkpoints_passed_in_stay_open_and_progress_draws_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    a = tensorparity.open(weights())
    report = diff(a, weights(), progress=True, workers=1)
    assert report.verdict == "identical"
    assert a["head.weight"].load().shape == (4, 8)  # still usable


# --- through a mapping: the bundled reference model against its port -----------------------------

MAP = Path(tensorparity.__file__).parent / "examples" / "reference_to_port.yaml"


@pytest.fixture
def reference_and_port(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from tensorparity.examples import port_model, reference_model

    ref = save_pt(tmp_path / "reference.pt", reference_model().state_dict())
    return ref, {k: v.detach().clone() for k, v in port_model().state_dict().items()}


def test_reference_vs_port_through_the_mapping_passes(
        tmp_path: Path, reference_and_port: tuple[Path, dict[str, torch.Tensor]]) -> None:
    ref, port = reference_and_port
    report = diff(ref, save_st(tmp_path / "port.safetensors", port), mapping=MAP)
    assert report.verdict == "identical", report.summary()
    assert report.common == len(port) and report.only_in_a == () and report.only_in_b == ()
    assert report.mapping is not None and report.mapping.name == "reference-to-port"
    assert report.origins["blocks.0.qkv.weight"] == tuple(f"layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    # Without the mapping the names do not even meet.
    assert diff(ref, port).common == 0


def test_reference_vs_port_with_a_broken_weight_names_it(
        tmp_path: Path, reference_and_port: tuple[Path, dict[str, torch.Tensor]]) -> None:
    ref, port = reference_and_port
    port["blocks.1.qkv.weight"][70, 3] += 0.5  # row 70 of the fused qkv: v_proj's row 6
    report = diff(ref, save_st(tmp_path / "port.safetensors", port), mapping=str(MAP))
    assert report.verdict == "differs" and report.exit_code == 1
    (bad,) = report.mismatches
    assert bad.key == "blocks.1.qkv.weight" and bad.first_index == (70, 3)
    assert report.origins[bad.key][2] == "layers.1.self_attn.v_proj.weight"
    assert "made from A's layers.1.self_attn.q_proj.weight" in str(report)
    data = report.to_dict()
    row = next(t for t in data["tensors"] if t["key"] == "blocks.1.qkv.weight")
    assert row["a_keys"][0] == "layers.1.self_attn.q_proj.weight" and row["passed"] is False
    # include/exclude speak A's names: a fused key is kept when any of its sources is included.
    assert diff(ref, port, mapping=MAP, include=r"layers\.1\.self_attn\.v_proj\.weight").common == 1
    assert diff(ref, port, mapping=MAP, exclude=r"v_proj").verdict == "identical"


def test_keys_the_mapping_leaves_unmapped_are_only_in_a(
        reference_and_port: tuple[Path, dict[str, torch.Tensor]]) -> None:
    ref, port = reference_and_port
    extra = {**dict(tensorparity.open(ref).items()), "aux.scale": torch.ones(1)}
    a = {k: (e.load() if isinstance(e, tensorparity.TensorEntry) else e) for k, e in extra.items()}
    report = diff(a, port, mapping=MAP)
    assert [k.key for k in report.only_in_a] == ["aux.scale"]
    assert report.mapping is not None and report.mapping.unmapped == ("aux.scale",)
    assert report.verdict == "differs" and any("claimed by no rule" in n for n in report.notes)


def test_a_bad_mapping_fails_before_anything_is_compared(tmp_path: Path) -> None:
    from tensorparity.mapping import MappingError

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - {a: 'w', b: 'weight', trasform: {transpose: [0, 1]}}\n")
    with pytest.raises(MappingError) as err:
        diff({"w": torch.ones(2, 2)}, {"weight": torch.ones(2, 2)}, mapping=bad)
    assert "trasform" in str(err.value) and "fix:" in str(err.value)
    with pytest.raises(UsageError, match="mapping must be a tensorparity.mapping.Mapping"):
        diff({}, {}, mapping=3)  # type: ignore[arg-type]


def test_mapping_built_in_python_with_ignored_keys() -> None:
    from tensorparity.mapping import Mapping

    mapping = Mapping.from_dict({"rules": [{"a": "enc.{p}", "b": "encoder.{p}"}],
                                 "ignore_a": ["*.tmp"], "ignore_b": ["*.num_batches_tracked"]})
    a = {"enc.w": torch.ones(2), "enc.tmp": torch.zeros(1)}
    b = {"encoder.w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(3)}
    report = diff(a, b, mapping=mapping)
    assert report.verdict == "identical" and report.common == 1
    assert report.mapping is not None
    assert (report.mapping.ignored_a, report.mapping.ignored_b) == (("enc.tmp",), ("bn.num_batches_tracked",))
    assert report.mapping.source == "<mapping built in Python>" and report.origins == {"encoder.w": ("enc.w",)}


def test_diff_takes_atol_and_rtol_directly() -> None:
    import pytest
    import torch

    import tensorparity
    from tensorparity.errors import UsageError
    from tensorparity.numerics import Tolerance

    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 2.001])}
    assert tensorparity.diff(a, b).verdict == "differs"
    loose = tensorparity.diff(a, b, atol=1e-2, rtol=0.0)
    assert loose.verdict == "close" and loose.mismatches == ()
    assert tensorparity.diff(a, b, atol=1e-2).verdict == tensorparity.diff(a, b, tolerance=Tolerance(atol=1e-2)).verdict
    with pytest.raises(UsageError, match="atol/rtol or tolerance, not both"):
        tensorparity.diff(a, b, atol=1e-2, tolerance=Tolerance())
