"""Parameter gradients through a mapping whose rule only reorders a tensor's slices are read in
place (a gather of the source), not copied through the transform: ``_layout.reorder_of`` finds
the reordering by running the transform on the tensor's own positions, and the report is the one
the transformed copies give."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tensorparity.mapping import Cast, Chain, Permute, Rearrange, Reshape, Transpose
from tensorparity.trace import _compare, capture, compare_traces
from tensorparity.trace._layout import reorder_of

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from test_layouts import interleaved_feed_forward  # noqa: E402

TWO = (("two", 2),)


@pytest.mark.parametrize(("transform", "shape", "axis"), [
    (Rearrange("(two h) c -> (h two) c", TWO), (8, 3), 0),
    (Rearrange("o (two h) -> o (h two)", TWO), (3, 8), 1),
    (Rearrange("(two h) -> (h two)", TWO), (8,), 0),
    (Rearrange("a (h d two) -> a (h two d)", (("h", 2), ("two", 2))), (3, 12), 1),
])
def test_a_reordering_of_one_axis_is_found_with_its_index(transform, shape: tuple[int, ...], axis: int) -> None:
    found = reorder_of(transform, shape)
    assert found is not None and found[0] == axis and found[1] is not None
    x = torch.randn(shape)
    assert torch.equal(x.index_select(axis, found[1]), transform.apply([x])[0])


@pytest.mark.parametrize(("transform", "shape"), [
    (Transpose(0, 1), (4, 4)),  # square: same shape, but the axes trade places
    (Transpose(0, 1), (3, 5)),
    (Reshape((6, 2)), (3, 4)),
    (Cast("bfloat16"), (4, 4)),
    (Chain((Rearrange("(two h) c -> (h two) c", TWO), Cast("float16"))), (8, 3)),
    (Permute((1, 0)), (4, 4)),
])
def test_anything_else_is_not_a_reordering(transform, shape: tuple[int, ...]) -> None:
    assert reorder_of(transform, shape) is None


def test_a_transform_that_leaves_the_order_is_no_gather() -> None:
    assert reorder_of(Rearrange("a b -> a b"), (3, 4)) == (0, None)


def test_parameter_gradients_read_in_place_report_what_their_transformed_copies_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, mapping = interleaved_feed_forward()
    x = torch.randn(3, 16, 16)
    folders = []
    for name, model in (("a", a), ("b", b)):
        model.zero_grad(set_to_none=True)
        with capture(model, out=tmp_path / name):
            model(x).sum().backward()
        folders.append(tmp_path / name)
    in_place = compare_traces(*folders, mapping=mapping).to_dict()
    calls = []
    real = _compare._in_place

    def copies(mapped, target, entry, located, reorders):
        calls.append(real(mapped, target, entry, located, reorders))
        return entry

    monkeypatch.setattr(_compare, "_in_place", copies)
    copied = compare_traces(*folders, mapping=mapping).to_dict()
    assert sum(type(c).__name__ == "Gathered" for c in calls) == 3  # up.weight, up.bias, down.weight
    assert in_place == copied
    assert [p["key"] for p in in_place["parameter_gradients"]] and in_place["verdict"] in ("identical", "close")
