import threading

import pytest
import torch

import tensorparity as tp
from tensorparity.numerics import Pair, Tolerance, compare_pairs


class CountingLoad:
    """A lazy entry that records how many loads are alive at once."""

    alive = 0
    peak = 0
    lock = threading.Lock()

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def load(self) -> torch.Tensor:
        with CountingLoad.lock:
            CountingLoad.alive += 1
            CountingLoad.peak = max(CountingLoad.peak, CountingLoad.alive)
        return self.tensor


def test_results_come_in_order_with_two_workers() -> None:
    a = tp.open({f"w{i}": torch.full((50,), float(i)) for i in range(20)})
    b = tp.open({f"w{i}": torch.full((50,), float(i) + (i == 7)) for i in range(20)})
    seen = []
    results = list(compare_pairs((Pair(k, a[k], b[k]) for k in a), Tolerance(), workers=2,
                                 on_result=lambda r: seen.append(r.key)))
    assert [r.key for r in results] == [f"w{i}" for i in range(20)] == seen
    assert [r.key for r in results if not r.passed] == ["w7"]


def test_pairs_are_consumed_lazily() -> None:
    consumed = []

    def gen():  # noqa: ANN202
        for i in range(100):
            consumed.append(i)
            yield Pair(f"k{i}", CountingLoad(torch.ones(3)), CountingLoad(torch.ones(3)))

    it = compare_pairs(gen(), workers=2)
    next(it)
    assert len(consumed) <= 17  # a bounded window (8 per worker) is read ahead, not the whole input
    assert len(list(it)) == 99


class Failing:
    """A lazy entry whose load raises (a corrupt file)."""

    def __init__(self, side: str) -> None:
        self.side = side

    def load(self) -> torch.Tensor:
        raise ValueError(f"{self.side} is corrupt")


def test_a_load_error_is_a_s_when_both_fail_whichever_worker_loads_first() -> None:
    ok = tp.open({"w": torch.ones(3)})["w"]
    for workers in (1, 2):
        for i in range(4):  # pairs land on both workers: one loads A first, the other B
            pairs = [Pair(f"p{j}", ok, ok) for j in range(i)] + [Pair("bad", Failing("A"), Failing("B"))]
            with pytest.raises(ValueError, match="A is corrupt"):
                list(compare_pairs(pairs, workers=workers))
            pairs[-1] = Pair("bad", ok, Failing("B"))
            with pytest.raises(ValueError, match="B is corrupt"):
                list(compare_pairs(pairs, workers=workers))


@pytest.mark.parametrize("b_first", [False, True])
def test_either_load_order_raises_as_loading_a_first_would(b_first: bool) -> None:
    from tensorparity.numerics import engine

    ok = tp.open({"w": torch.ones(3)})["w"]
    engine._WORKER.b_first = b_first
    try:
        with pytest.raises(ValueError, match="A is corrupt"):
            engine._run(Pair("bad", Failing("A"), Failing("B")), Tolerance())
        with pytest.raises(ValueError, match="A is corrupt"):
            engine._run(Pair("bad", Failing("A"), ok), Tolerance())
        with pytest.raises(ValueError, match="B is corrupt"):
            engine._run(Pair("bad", ok, Failing("B")), Tolerance())
        assert engine._run(Pair("w", ok, ok), Tolerance()).status == "identical"
    finally:
        del engine._WORKER.b_first


def test_small_pairs_handed_over_together_keep_their_order_and_errors() -> None:
    """Consecutive small pairs go to a thread in batches: records still come in input order, and
    a load that fails inside a batch raises after the records before it, as one by one."""
    from tensorparity.checkpoint.tree import TensorEntry
    from tensorparity.numerics import engine

    sizes = [3, 5, engine.SMALL // 4 + 1, 7, 1, 2, 9, 4] * 12
    a = tp.open({f"w{i}": torch.full((n,), float(i)) for i, n in enumerate(sizes)})
    b = tp.open({f"w{i}": torch.full((n,), float(i) + (i % 10 == 3)) for i, n in enumerate(sizes)})
    keys = list(a.keys())
    tasks = [len(t) for t in engine._tasks(Pair(k, a[k], b[k]) for k in keys)]
    assert sum(tasks) == len(keys) and max(tasks) > 1 and 1 in tasks  # batches, and the large pairs alone
    for workers in (1, 2):
        seen: list[str] = []
        results = list(compare_pairs((Pair(k, a[k], b[k]) for k in keys), Tolerance(), workers=workers,
                                     on_result=lambda r: seen.append(r.key)))
        assert [r.key for r in results] == keys == seen
        assert [r.key for r in results if not r.passed] == [k for i, k in enumerate(keys) if i % 10 == 3]

    def corrupt() -> torch.Tensor:
        raise ValueError("w40 is corrupt")

    broken = TensorEntry("w40", (sizes[40],), "float32", 4 * sizes[40], "x", corrupt)
    pairs = [Pair(k, broken if k == "w40" else a[k], b[k]) for k in keys]
    for workers in (1, 2):
        got: list[str] = []
        with pytest.raises(ValueError, match="w40 is corrupt"):
            for r in compare_pairs(pairs, Tolerance(), workers=workers):
                got.append(r.key)
        assert got == keys[:40]
