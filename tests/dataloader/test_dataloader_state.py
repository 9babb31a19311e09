"""The acceptance test of issue 6, item 4: a legacy data-loader state, converted, restarts a real
``StatefulDataLoader`` that yields exactly the batches the uninterrupted legacy run yielded.

The legacy runs are real: :func:`run_legacy_training` reads data with a plain ``DataLoader`` (and
real worker processes), writes the old layout at a chosen step and keeps going. Worker processes
are slow to start on a shared machine, so the datasets are tiny and the worker cases few.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchdata.stateful_dataloader")

from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler  # noqa: E402

from tensorparity.dataloader._state import convert_dataloader_state, inspect_dataloader_state  # noqa: E402
from tensorparity.errors import UsageError  # noqa: E402
from tensorparity.examples.legacy_loader import (  # noqa: E402
    ShardedStream,
    SquaresDataset,
    run_legacy_training,
)

SIZE, BS, SEED = 22, 4, 1234  # 6 batches per epoch, the last one short


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdata's set_vital deprecation on every loader
        yield


def assert_same_batches(resumed: list[Any], uninterrupted: list[Any]) -> None:
    """Batch by batch, element by element."""
    assert len(resumed) == len(uninterrupted), (len(resumed), len(uninterrupted))
    for i, (a, b) in enumerate(zip(resumed, uninterrupted)):
        if isinstance(b, dict):
            assert a.keys() == b.keys(), i
            for key in b:
                assert torch.equal(a[key], b[key]), (i, key, a[key], b[key])
        else:
            assert torch.equal(a, b), (i, a, b)


def assert_same_state(a: Any, b: Any, *, skip: tuple[str, ...] = (), where: str = "") -> None:
    """Two state dicts: the same keys everywhere, the same values (tensors bitwise) except ``skip``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for key in a:
            assert_same_state(a[key], b[key], skip=skip, where=f"{where}.{key}")
    elif where.rsplit(".", 1)[-1] in skip:
        assert type(a) is type(b), where
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def resume_map(state_file: Path, *, num_workers: int) -> list[Any]:
    loader = StatefulDataLoader(SquaresDataset(SIZE), batch_size=BS, shuffle=True, num_workers=num_workers)
    loader.load_state_dict(torch.load(state_file, weights_only=True))
    return list(loader)


def test_map_shuffle_no_workers_is_what_torchdata_itself_saves(tmp_path: Path) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", num_workers=0, stop_epoch=1, stop_step=3)
    conv = convert_dataloader_state(legacy.folder, tmp_path / "state.pt")
    assert "next 3 batches" in (conv.verification or "")

    assert_same_batches(resume_map(tmp_path / "state.pt", num_workers=0), legacy.after)

    # A StatefulDataLoader that read the same epoch natively (its generator seeded the old way)
    # saves exactly the converted state, byte for byte in the generator.
    g = torch.Generator().manual_seed(SEED + 1)
    native = StatefulDataLoader(SquaresDataset(SIZE), batch_size=BS, shuffle=True, generator=g)
    it = iter(native)
    assert_same_batches([next(it) for _ in range(3)], legacy.before)
    assert_same_state(torch.load(tmp_path / "state.pt", weights_only=True), native.state_dict())


def test_map_shuffle_two_workers_resumes_and_matches_torchdata_structure(tmp_path: Path) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", num_workers=2, stop_epoch=1, stop_step=3)
    conv = convert_dataloader_state(legacy.folder, tmp_path / "state.pt")
    assert conv.result.num_workers == 2 and not conv.remapped
    assert conv.result.next_worker == 1  # batch 3 of the epoch comes from worker 3 % 2

    assert_same_batches(resume_map(tmp_path / "state.pt", num_workers=2), legacy.after)

    native = StatefulDataLoader(SquaresDataset(SIZE), batch_size=BS, shuffle=True, num_workers=2)
    it = iter(native)
    for _ in range(3):
        next(it)
    # Same keys at every level and the same positions; only the seeds differ (torchdata draws
    # its own generator and worker base seed, the converted state carries the legacy ones).
    assert_same_state(conv.state, native.state_dict(), skip=("generator", "_base_seed"))
    del it


@pytest.mark.parametrize("new_workers", [3, 0])
def test_map_worker_remap_keeps_the_sample_order(tmp_path: Path, new_workers: int) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", num_workers=2, stop_epoch=0, stop_step=2)
    conv = convert_dataloader_state(legacy.folder, tmp_path / "state.pt", num_workers=new_workers)
    assert conv.remapped and any("re-mapped from 2 to" in n for n in conv.notes)
    assert_same_batches(resume_map(tmp_path / "state.pt", num_workers=new_workers), legacy.after)


def test_distributed_sampler_repeats_later_epochs_too(tmp_path: Path) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", num_workers=0, stop_epoch=1, stop_step=4, next_epochs=1)
    convert_dataloader_state(legacy.folder, tmp_path / "state.pt", sampler="distributed")
    dataset = SquaresDataset(SIZE)
    sampler = StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    loader = StatefulDataLoader(dataset, batch_size=BS, sampler=sampler)
    loader.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed = []
    for epoch in (1, 2):  # the rest of the checkpoint's epoch, then a whole new one
        sampler.set_epoch(epoch)
        resumed += list(loader)
    assert_same_batches(resumed, legacy.after)
    assert len(legacy.after) == 2 + 6


def test_epoch_end_with_drop_last_resumes_to_nothing(tmp_path: Path) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", num_workers=0, drop_last=True, stop_epoch=0, stop_step=5)
    conv = convert_dataloader_state(legacy.folder, tmp_path / "state.pt")
    assert "ends the epoch" in (conv.verification or "")
    loader = StatefulDataLoader(SquaresDataset(SIZE), batch_size=BS, shuffle=True, drop_last=True)
    loader.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert list(loader) == []
    assert len(list(loader)) == 5  # and the next epoch is a whole one


def test_torch_save_layout_converts_like_json(tmp_path: Path) -> None:
    a = run_legacy_training(tmp_path / "json", stop_epoch=0, stop_step=2, fmt="json")
    b = run_legacy_training(tmp_path / "torch", stop_epoch=0, stop_step=2, fmt="torch")
    assert sorted(p.name for p in b.folder.iterdir()) == ["loader_state.pt", "worker_0.pt"]
    assert_same_state(convert_dataloader_state(a.folder, verify=False).state,
                      convert_dataloader_state(b.folder, verify=False).state)


def test_iterable_two_workers_resumes_each_worker_at_its_position(tmp_path: Path) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", dataset_kind="iterable", num_workers=2, stop_epoch=0,
                                 stop_step=3)
    conv = convert_dataloader_state(legacy.folder, tmp_path / "state.pt")
    assert "every worker at its own position" in (conv.verification or "")

    def stream() -> ShardedStream:
        return ShardedStream(num_shards=6, shard_size=5)

    loader = StatefulDataLoader(stream(), batch_size=BS, num_workers=2)
    loader.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_same_batches(list(loader), legacy.after)

    # torchdata reading the same stream saves the same state (its base seed aside).
    native = StatefulDataLoader(stream(), batch_size=BS, num_workers=2)
    it = iter(native)
    for _ in range(3):
        next(it)
    native_state = native.state_dict()
    assert_same_state(conv.state, native_state, skip=("_base_seed",))
    del it
    # and inspect reads torchdata's own file the way it reads the converted one
    torch.save(native_state, tmp_path / "native.pt")
    theirs, ours = inspect_dataloader_state(tmp_path / "native.pt"), inspect_dataloader_state(tmp_path / "state.pt")
    assert theirs.rows() == ours.rows() and theirs.workers == ours.workers
    assert [w.position for w in ours.workers] == [{"shard": 2, "offset": 3}, {"shard": 1, "offset": 4}]


def test_iterable_main_process_to_one_worker_is_the_same_sharding(tmp_path: Path) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", dataset_kind="iterable", num_workers=0, stop_epoch=0,
                                 stop_step=2)
    convert_dataloader_state(legacy.folder, tmp_path / "state.pt", num_workers=1)
    loader = StatefulDataLoader(ShardedStream(num_shards=6, shard_size=5), batch_size=BS, num_workers=1)
    loader.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_same_batches(list(loader), legacy.after)


def test_iterable_remap_is_refused_with_the_reason(tmp_path: Path) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", dataset_kind="iterable", num_workers=2, stop_epoch=0,
                                 stop_step=1)
    with pytest.raises(UsageError) as exc:
        convert_dataloader_state(legacy.folder, tmp_path / "state.pt", num_workers=3)
    text = str(exc.value)
    assert "cannot re-map an iterable dataset from 2 to 3 workers" in text
    assert "fix: convert with --num-workers 2" in text and "\n" not in text
    assert not (tmp_path / "state.pt").exists()


def test_dataset_state_hook_translates_positions(tmp_path: Path) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", dataset_kind="iterable", num_workers=0, stop_epoch=0,
                                 stop_step=2)
    conv = convert_dataloader_state(
        legacy.folder, dataset_state=lambda w: {"cursor": [w.position["shard"], w.position["offset"]]})
    assert conv.state["dataset_state"] == {"cursor": [1, 3]}  # 8 samples of 5-sample shards read
    assert "restarts every worker" in (conv.verification or "")


def test_inspect_reads_both_sides_and_summaries_agree(tmp_path: Path) -> None:
    legacy = run_legacy_training(tmp_path / "legacy", num_workers=0, stop_epoch=2, stop_step=1)
    convert_dataloader_state(legacy.folder, tmp_path / "state.pt", verify=False)
    old, new = inspect_dataloader_state(legacy.folder), inspect_dataloader_state(tmp_path / "state.pt")
    assert (old.layout, old.epoch, old.global_step) == ("legacy/1", 2, 13)
    assert (new.batches_in_epoch, new.samples_in_epoch) == (old.batches_in_epoch, old.samples_in_epoch) == (1, 4)
    assert "freshly seeded 1236" in new.sampler  # shuffle_seed 1234 + epoch 2
    assert new.to_dict()["schema"] == "tensorparity.dataloader_state/1"
    assert "samples in epoch" in str(new) and "legacy/1" in str(old)


def test_demo_step_resumes_identically_and_refuses_the_iterable_remap(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from tensorparity.examples.legacy_loader import step

    buf = io.StringIO()
    step(Console(file=buf, width=120, color_system=None), tmp_path)
    text = " ".join(buf.getvalue().split())  # rich wraps long lines
    assert "vs the uninterrupted old run: identical" in text
    assert "refused" in text and "cannot re-map an iterable dataset from 2 to 3 workers" in text


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tensorparity.dataloader._build import summarize_state  # noqa: E402
from tensorparity.dataloader._legacy import LegacyLoaderState, LegacyWorker, expected_worker_samples  # noqa: E402
from tensorparity.errors import TensorParityError  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 40), bs=st.integers(1, 7), workers=st.integers(0, 3), drop_last=st.booleans(),
       shuffle=st.booleans(), seed=st.integers(0, 2**40), epoch=st.integers(0, 5), data=st.data())
def test_any_consistent_map_state_restarts_torchdata_where_the_legacy_epoch_stood(
        size: int, bs: int, workers: int, drop_last: bool, shuffle: bool, seed: int, epoch: int,
        data: st.DataObject) -> None:
    per_epoch = size // bs if drop_last else -(-size // bs)
    k = data.draw(st.integers(0, per_epoch), label="step_in_epoch")
    counts = expected_worker_samples(batches=k, batch_size=bs, readers=max(workers, 1), dataset_size=size)
    legacy = LegacyLoaderState(
        path=Path("."), version=1, global_step=epoch * per_epoch + k, epoch=epoch, step_in_epoch=k, batch_size=bs,
        drop_last=drop_last, shuffle=shuffle, shuffle_seed=seed if shuffle else None, num_workers=workers,
        dataset_kind="map", dataset_size=size, worker_seed=None,
        workers=tuple(LegacyWorker(i, epoch, c, None, Path(f"worker_{i}.json")) for i, c in enumerate(counts)))
    # The restart is checked inside (a real single-process StatefulDataLoader against the legacy order).
    conv = convert_dataloader_state(legacy, num_workers=0)
    assert conv.verification and ("yields the legacy epoch's next" in conv.verification
                                  or "ends the epoch" in conv.verification)
    assert conv.result.samples_in_epoch == sum(counts) == min(k * bs, size)


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["_num_yielded", "_snapshot", "_main_snapshot", "_num_workers",
                                         "_worker_snapshots", "_snapshot_step", "_last_yielded_worker_id",
                                         "_sampler_iter_state", "worker_0", "samples_yielded", "x"]),
                        inner, max_size=4), max_leaves=12))
def test_inspecting_any_odd_state_is_a_summary_or_a_clean_error(state: Any) -> None:
    try:
        summarize_state(state, source="odd.pt")
    except TensorParityError as exc:
        assert "odd.pt" in str(exc) and "\n" not in str(exc)
