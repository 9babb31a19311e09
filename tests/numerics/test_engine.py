import threading

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
