"""ArraySequence: native gather of array rows, exact per-epoch sample shuffling, memory-mapped files."""

from __future__ import annotations

import numpy as np
import pytest

import pyloader
from pyloader import _C


def make(n=103):
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    y = np.arange(n, dtype=np.int64)
    return x, y


def epochs(ds, *, workers=2, epochs=3, **options):
    with pyloader.Prefetcher(ds, workers=workers, **options) as loader:
        return [[(np.array(a), np.array(b)) for a, b in loader] for _ in range(epochs)]


def plain(ds, epoch):
    ds.set_epoch(epoch)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_exactly_once_per_epoch(shuffle):
    x, y = make()
    ds = pyloader.ArraySequence(x, y, batch_size=10, shuffle=shuffle, seed=4)
    runs = epochs(ds)
    for batches in runs:
        labels = np.concatenate([b for _, b in batches])
        assert sorted(labels.tolist()) == list(range(103))
        for xs, ys in batches:
            np.testing.assert_array_equal(xs, x[ys])  # rows travel together
    if shuffle:
        assert runs[0][0][1].tolist() != runs[1][0][1].tolist(), "samples reshuffle every epoch"
        assert runs[0][0][1].tolist() != list(range(10))
    else:
        assert np.concatenate([b for _, b in runs[0]]).tolist() == list(range(103))


def test_the_same_batches_in_a_plain_loop_and_in_a_prefetcher():
    x, y = make()
    ds = pyloader.ArraySequence(x, y, batch_size=16, shuffle=True, seed=1)
    runs = epochs(ds, workers=3)
    for epoch, batches in enumerate(runs):
        for (gx, gy), (px, py) in zip(batches, plain(ds, epoch)):
            np.testing.assert_array_equal(gx, px)
            np.testing.assert_array_equal(gy, py)


def test_deterministic_across_runs_and_worker_counts():
    x, y = make()
    results = []
    for workers in (1, 2, 5):
        ds = pyloader.ArraySequence(x, y, batch_size=7, shuffle=True, seed=9)
        results.append([[b.tolist() for _, b in e] for e in epochs(ds, workers=workers)])
    assert results[0] == results[1] == results[2]


def test_last_partial_batch_and_drop_last():
    x, y = make(25)
    ds = pyloader.ArraySequence(x, y, batch_size=10)
    assert len(ds) == 3
    assert [len(b) for _, b in epochs(ds, epochs=1)[0]] == [10, 10, 5]
    dropped = pyloader.ArraySequence(x, y, batch_size=10, drop_last=True)
    assert len(dropped) == 2
    assert [len(b) for _, b in epochs(dropped, epochs=1)[0]] == [10, 10]


def test_dict_of_arrays_gives_dict_batches_viewing_slot_memory():
    x, y = make(20)
    ds = pyloader.ArraySequence({"image": x, "label": y}, batch_size=8)
    with pyloader.Prefetcher(ds, workers=2) as loader:
        batches = list(loader)
    assert list(batches[0]) == ["image", "label"]
    assert batches[0]["image"].shape == (8, 2, 3) and batches[-1]["label"].tolist() == list(range(16, 20))
    assert isinstance(batches[0]["image"].base, _C.Lease)
    assert ds[0]["label"].tolist() == list(range(8))


def test_a_single_array_gives_array_batches():
    x, _ = make(9)
    ds = pyloader.ArraySequence(x, batch_size=4)
    with pyloader.Prefetcher(ds, workers=1) as loader:
        got = list(loader)
    assert [g.shape for g in got] == [(4, 2, 3), (4, 2, 3), (1, 2, 3)]
    np.testing.assert_array_equal(np.concatenate(got), x)


def test_memory_mapped_npy_files(tmp_path):
    x, y = make(50)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    ds = pyloader.ArraySequence.from_npy(tmp_path / "x.npy", tmp_path / "y.npy", batch_size=8, shuffle=True, seed=2)
    assert all(isinstance(a, np.memmap) for a in ds._arrays)
    batches = epochs(ds, epochs=1)[0]
    labels = np.concatenate([b for _, b in batches])
    assert sorted(labels.tolist()) == list(range(50))
    for xs, ys in batches:
        np.testing.assert_array_equal(xs, x[ys])
    named = pyloader.ArraySequence.from_npy({"x": tmp_path / "x.npy"}, batch_size=50)
    np.testing.assert_array_equal(named[0]["x"], x)


def test_resume_mid_epoch_from_a_state_dict():
    x, y = make()
    ds = pyloader.ArraySequence(x, y, batch_size=10, shuffle=True, seed=3)
    expected = [[b.tolist() for _, b in e] for e in epochs(ds, epochs=2, shuffle=True, seed=5)]
    first = pyloader.Prefetcher(ds, workers=2, shuffle=True, seed=5)
    it = iter(first)
    seen = [next(it)[1].tolist() for _ in range(4)]
    state = first.state_dict()
    first.close()
    assert seen == expected[0][:4]
    resumed = pyloader.Prefetcher(ds, workers=3)
    resumed.load_state_dict(state)
    assert [b.tolist() for _, b in resumed] == expected[0][4:]
    assert [b.tolist() for _, b in resumed] == expected[1]
    resumed.close()


def test_no_copy_of_the_data_is_made():
    x, y = make()
    ds = pyloader.ArraySequence(x, y, batch_size=10)
    assert ds._arrays[0] is x and ds._arrays[1] is y


def test_strided_rows_work_but_non_contiguous_rows_are_refused_with_a_fix():
    x, y = make(40)
    every_other = pyloader.ArraySequence(x[::2], y[::2], batch_size=6)
    got = epochs(every_other, epochs=1)[0]
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), y[::2])
    np.testing.assert_array_equal(np.concatenate([a for a, _ in got]), x[::2])
    with pytest.raises(ValueError, match=r"not contiguous.*np.ascontiguousarray"):
        pyloader.ArraySequence(x[:, :, ::2], y, batch_size=4)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((np.zeros(3), np.zeros(4)), {"batch_size": 2}, "equal first dimensions"),
        ((np.array([object()] * 3),), {"batch_size": 2}, "Python objects"),
        ((np.float32(1),), {"batch_size": 2}, "numpy arrays"),
        ((np.array(1.0),), {"batch_size": 2}, "0-dimensional"),
        (([1, 2, 3],), {"batch_size": 2}, r"np.asarray"),
        ((np.zeros(3),), {"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ((np.zeros(3),), {"batch_size": 2, "shuffle": 1}, "shuffle"),
        ((np.zeros(3),), {"batch_size": 2, "seed": -2}, "seed"),
        ((), {"batch_size": 2}, "at least one array"),
    ],
)
def test_bad_inputs_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pyloader.ArraySequence(*args, **kwargs)


def test_plain_indexing_checks_the_index():
    ds = pyloader.ArraySequence(np.arange(10), batch_size=4)
    assert ds[-1].tolist() == [8, 9]
    with pytest.raises(IndexError, match="out of range for 3 batches"):
        ds[3]
    with pytest.raises(TypeError):
        ds["0"]


@pytest.mark.parametrize("split_threads", [0, 1, 3])
def test_large_batches_split_across_threads_arrive_intact(split_threads):
    n = 600
    x = np.random.default_rng(0).integers(0, 255, size=(n, 64, 64, 3), dtype=np.uint8)  # 12 KiB rows
    y = np.arange(n)
    ds = pyloader.ArraySequence(x, y, batch_size=128, shuffle=True, seed=7, split_threads=split_threads)
    assert 128 * x[0].nbytes >= 1 << 20, "batches are big enough to be split"
    for batches in epochs(ds, workers=2, epochs=2):
        assert sorted(np.concatenate([b for _, b in batches]).tolist()) == list(range(n))
        for xs, ys in batches:
            np.testing.assert_array_equal(xs, x[ys])


def test_split_threads_is_validated():
    with pytest.raises(ValueError, match="split_threads must be None or an integer >= 0, got -1"):
        pyloader.ArraySequence(np.zeros(4), batch_size=2, split_threads=-1)


class BadOrder(pyloader.ArraySequence):
    def sample_order(self, epoch):
        order = np.arange(self.samples)
        order[3] = 1 << 40
        return order


def test_a_sample_order_out_of_range_is_refused_before_any_row_is_read():
    ds = BadOrder(np.arange(10), batch_size=4, shuffle=True)
    with pytest.raises(IndexError, match=r"index 1099511627776 at position 3, outside \[0, 10\)"):
        list(pyloader.Prefetcher(ds, workers=1))


def test_two_prefetchers_over_one_array_sequence_keep_each_others_sample_orders():
    x, y = make()
    ds = pyloader.ArraySequence(x, y, batch_size=10, shuffle=True, seed=3)
    expected = {frozenset(ds.batch_indices(i, 0).tolist()) for i in range(len(ds))}
    # depth=1, one worker: `a` cannot prepare its third batch before its second is taken.
    with pyloader.Prefetcher(ds, workers=1, depth=1) as a, pyloader.Prefetcher(ds, workers=1, depth=1) as b:
        it = iter(a)
        got = [next(it)]
        b.set_epoch(5)
        for _ in b:  # plans epochs 5 and 6; registering 6 drops the orders of epochs before 4
            pass
        got += list(it)  # the rest of `a`'s epoch 0
    assert len(got) == len(ds)
    assert {frozenset(ys.tolist()) for _, ys in got} == expected
    for xs, ys in got:
        np.testing.assert_array_equal(xs, x[ys])


def test_a_fresh_prefetcher_over_an_array_sequence_makes_its_first_buffers_ahead():
    # Two columns, the second at a 64-byte aligned offset after the first: the buffers made ahead
    # must fit what the gather asks for, or the first epoch would map new ones.
    x = np.arange(64 * 4 * 1000, dtype=np.float32).reshape(64 * 4, 1000)
    y = np.arange(64 * 4 * 3, dtype=np.int16).reshape(64 * 4, 3)
    seq = pyloader.ArraySequence(x, y, batch_size=4)
    with pyloader.Prefetcher(seq, workers=2, depth=4) as loader:
        assert loader._prefault is not None
        loader._prefault.join()
        info = loader.memory_info()
        assert (info["buffers"], info["leased"], info["allocations"]) == (4 + 2, 0, 4 + 2)
        for i, (bx, by) in enumerate(loader):
            np.testing.assert_array_equal(bx, x[4 * i:4 * i + 4])
            np.testing.assert_array_equal(by, y[4 * i:4 * i + 4])
        assert loader.memory_info()["allocations"] == 4 + 2  # the first epoch mapped nothing
