"""pyloader.batches: a per-sample dataset as a batch Sequence, shuffled per (seed, epoch), collated natively."""

from __future__ import annotations

import numpy as np
import pytest

import pyloader
from pyloader import _C


class Samples:
    """Sample j: a dict of an image, a label and a name, all derived from j."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int):
        if not 0 <= j < self.n:
            raise IndexError(j)
        return {"x": np.full((2, 3), j, np.float32), "y": j, "name": f"s{j}"}


def labels(loader):
    return [batch["y"].tolist() for batch in loader]


def test_unshuffled_batches_hold_the_samples_in_order_collated_into_slot_memory():
    seq = pyloader.batches(Samples(10), 4)
    assert len(seq) == 3
    with pyloader.Prefetcher(seq, workers=2) as loader:
        got = list(loader)
    assert [b["y"].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert got[0]["x"].shape == (4, 2, 3) and got[0]["x"].dtype == np.float32
    assert got[2]["name"] == ["s8", "s9"]
    assert isinstance(got[0]["x"].base, _C.Lease)  # stacked by the worker into the slot
    np.testing.assert_array_equal(got[1]["x"], seq.load(1)["x"])


def test_drop_last_drops_the_partial_batch():
    seq = pyloader.batches(Samples(10), 4, drop_last=True)
    assert len(seq) == 2
    with pyloader.Prefetcher(seq, workers=2) as loader:
        assert labels(loader) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_each_epoch_is_a_permutation_drawn_from_seed_and_epoch_across_prefetched_boundaries():
    seq = pyloader.batches(Samples(23), 5, shuffle=True, seed=7)
    twin = pyloader.batches(Samples(23), 5, shuffle=True, seed=7)
    epochs = []
    with pyloader.Prefetcher(seq, workers=3, depth=8) as loader:
        for epoch in range(4):
            flat = sum(labels(loader), [])
            assert sorted(flat) == list(range(23)), "every sample once per epoch"
            assert flat == twin.sample_order(epoch).tolist()
            epochs.append(flat)
    assert len({tuple(e) for e in epochs}) == 4, "a new order every epoch"
    other = pyloader.batches(Samples(23), 5, shuffle=True, seed=8)
    assert other.sample_order(0).tolist() != epochs[0]


def test_the_order_is_array_sequences_for_the_same_seed():
    x = np.arange(40, dtype=np.int32).reshape(20, 2)
    seq = pyloader.batches(x, 6, shuffle=True, seed=3)
    arrays = pyloader.ArraySequence(x, batch_size=6, shuffle=True, seed=3)
    with pyloader.Prefetcher(seq, workers=2) as a, pyloader.Prefetcher(arrays, workers=2) as b:
        for _ in range(2):
            for mine, theirs in zip(a, b, strict=True):
                np.testing.assert_array_equal(mine, theirs)


def test_worker_processes_follow_the_epochs_too():
    seq = pyloader.batches(Samples(12), 5, shuffle=True, seed=1)
    with pyloader.Prefetcher(seq, workers=2, mode="process") as loader:
        for epoch in range(3):
            assert sum(labels(loader), []) == seq.sample_order(epoch).tolist()


def test_a_state_dict_resumes_mid_epoch_with_the_epoch_set_first():
    def run(n_epochs, state=None):
        seq = pyloader.batches(Samples(17), 3, shuffle=True, seed=5)
        if state is not None:
            seq.set_epoch(state["epoch"])
        with pyloader.Prefetcher(seq, workers=2) as loader:
            if state is not None:
                loader.load_state_dict(state)
            return loader, [labels(loader) for _ in range(n_epochs)]

    full = run(3)[1]
    seq = pyloader.batches(Samples(17), 3, shuffle=True, seed=5)
    with pyloader.Prefetcher(seq, workers=2) as loader:
        labels(loader)
        it = iter(loader)
        head = [next(it)["y"].tolist() for _ in range(2)]
        state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 2
    _, rest = run(2, state)
    assert head + rest[0] == full[1] and rest[1] == full[2]


def test_collate_runs_in_the_worker_and_its_result_is_the_batch():
    def collate(samples):
        return np.stack([s["x"] for s in samples]).sum(axis=(1, 2)), [s["name"] for s in samples]

    seq = pyloader.batches(Samples(5), 2, collate=collate)
    with pyloader.Prefetcher(seq, workers=1) as loader:
        got = list(loader)
    np.testing.assert_array_equal(got[0][0], [0.0, 6.0])
    assert got[2][1] == ["s4"]
    assert isinstance(got[0][0].base, _C.Lease)


def test_getitems_fetches_a_batch_in_one_call():
    class Bulk(Samples):
        def __init__(self, n):
            super().__init__(n)
            self.calls = []

        def __getitems__(self, indices):
            self.calls.append(list(indices))
            return [self[j] for j in indices]

    data = Bulk(6)
    with pyloader.Prefetcher(pyloader.batches(data, 4), workers=1) as loader:
        assert labels(loader) == [[0, 1, 2, 3], [4, 5]]
    assert data.calls[:2] == [[0, 1, 2, 3], [4, 5]]  # (the next epoch may have begun loading)


def test_a_failing_sample_reaches_the_loop_naming_the_sample_and_the_batch():
    class Broken(Samples):
        def __getitem__(self, j):
            if j == 6:
                raise KeyError("no sample six")
            return super().__getitem__(j)

    with pyloader.Prefetcher(pyloader.batches(Broken(9), 4), workers=2) as loader:
        it = iter(loader)
        assert next(it)["y"].tolist() == [0, 1, 2, 3]
        with pytest.raises(pyloader.BatchError, match=r"__getitem__\(1\) raised KeyError") as info:
            next(it)
        assert next(it)["y"].tolist() == [8], "the loader goes on with the next batch"
    cause = info.value.__cause__
    assert isinstance(cause, KeyError)
    assert "in dataset[6], sample 2 of batch 1 (epoch 0)" in cause.__notes__
    with pytest.raises(KeyError) as plain:
        pyloader.batches(Broken(9), 4).load(1)
    assert "in dataset[6], sample 2 of batch 1 (epoch 0)" in plain.value.__notes__


def test_samples_that_do_not_stack_fail_naming_the_batch_and_the_sample():
    class Ragged(Samples):
        def __getitem__(self, j):
            return np.zeros(3 if j != 5 else 4)

    with pyloader.Prefetcher(pyloader.batches(Ragged(8), 4), workers=1) as loader:
        with pytest.raises(pyloader.BatchError, match=r"batch 1: sample 1 has an array of shape \(4,\)"):
            list(loader)


def test_a_getitems_returning_the_wrong_count_fails_naming_the_batch():
    class Short(Samples):
        def __getitems__(self, indices):
            return [self[j] for j in indices][:-1]

    with pytest.raises(ValueError, match=r"returned 3 samples for the 4 indices of batch 0 \(epoch 0\)"):
        pyloader.batches(Short(8), 4)[0]


def test_bad_indices_and_options_are_refused_showing_the_value():
    seq = pyloader.batches(Samples(10), 4)
    with pytest.raises(IndexError, match="batch index 3 is out of range for 3 batches"):
        seq[3]
    with pytest.raises(TypeError, match=r"batch indices must be integers, got str \('1'\)"):
        seq["1"]
    assert seq.load(-1)["y"].tolist() == [8, 9]
    for kwargs, match in (
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 2, "shuffle": "yes"}, "shuffle must be True or False, got 'yes'"),
        ({"batch_size": 2, "drop_last": 1}, "drop_last must be True or False, got 1"),
        ({"batch_size": 2, "seed": -1}, "seed must be None or an integer >= 0, got -1"),
        ({"batch_size": 2, "collate": "stack"}, "collate must be callable or None, got 'stack'"),
    ):
        with pytest.raises(ValueError, match=match):
            pyloader.batches(Samples(4), **kwargs)
    with pytest.raises(TypeError, match="dataset must have __len__"):
        pyloader.batches(iter(range(3)), 2)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got -2"):
        seq.set_epoch(-2)


def test_seed_none_draws_a_seed_that_is_recorded():
    seq = pyloader.batches(Samples(10), 4, shuffle=True)
    assert seq.seed_drawn and isinstance(seq.seed, int)
    again = pyloader.batches(Samples(10), 4, shuffle=True, seed=seq.seed)
    assert again.sample_order(3).tolist() == seq.sample_order(3).tolist()
    assert "seed=%d" % seq.seed in repr(seq)


def test_an_epochs_sample_order_is_drawn_once_not_once_per_batch():
    class Counting(pyloader.Batches):
        draws = 0

        def sample_order(self, epoch):
            Counting.draws += 1
            return super().sample_order(epoch)

    seq = Counting(Samples(40), 2, shuffle=True, seed=0)
    with pyloader.Prefetcher(seq, workers=2) as loader:
        for epoch in range(3):
            assert sum(labels(loader), []) == pyloader.batches(Samples(40), 2, shuffle=True, seed=0) \
                .sample_order(epoch).tolist()
    # 20 batches an epoch; two workers may both draw an epoch's order as it starts.
    assert Counting.draws <= 4 * 2
    import pickle
    plain = pyloader.batches(np.arange(40), 2, shuffle=True, seed=0)
    plain[0]
    assert len(plain._orders) == 1
    assert pickle.loads(pickle.dumps(plain))._orders == {}, "worker processes get no cached orders"
