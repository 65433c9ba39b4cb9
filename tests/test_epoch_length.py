"""A Sequence whose len() changes between epochs: each epoch's length is read at its start.

The next epoch is planned (and loaded) ahead, before the current one ends; its length is checked
again after on_epoch_end (which may change it) and at iter() (for a change made anywhere else).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sequences import indices_of

import pyloader
from pyloader._plan import Plan


class Resizing:
    """Epoch e has lens[e] batches (the last entry repeats); on_epoch_end moves to the next epoch.
    Batch i of the current epoch is ``(array, {"i": i, "epoch": e})``; an index past the current
    length raises IndexError, as a real Sequence would."""

    def __init__(self, lens: list[int], *, hook: bool = True) -> None:
        self.lens = lens
        self.epoch = 0
        self.hooks = 0
        self.bad: list[tuple[int, int]] = []  # (epoch, index) asked past the length
        self._lock = threading.Lock()
        if not hook:
            self.on_epoch_end = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return self.lens[min(self.epoch, len(self.lens) - 1)]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            with self._lock:
                self.bad.append((self.epoch, i))
            raise IndexError(f"batch {i} of {len(self)} (epoch {self.epoch})")
        return np.full((2,), i, np.int64), {"i": i, "epoch": self.epoch}

    def on_epoch_end(self) -> None:
        self.hooks += 1
        self.epoch += 1


LENS = [5, 9, 3, 7, 1, 6]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_length_on_epoch_end_changes_is_the_next_epochs_length(shuffle, mode):
    seq = Resizing(LENS)
    with pyloader.Prefetcher(seq, workers=3, depth=4, shuffle=shuffle, seed=11, mode=mode) as loader:
        for e, n in enumerate(LENS):
            assert len(loader) == n, f"epoch {e}"
            batches = list(loader)
            assert indices_of(batches) == list(Plan(n, shuffle, 11).indices(e)), f"epoch {e}"
            assert {b[1]["epoch"] for b in batches} <= {e}, "loaded after the hook that set its length"
    assert seq.bad == [], "no batch index past the length of its epoch was asked for"


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_sharded_epoch_is_planned_over_the_length_its_start_reads(drop_last):
    lens = [8, 3, 11, 5]
    for rank in range(2):
        seq = Resizing(lens)
        with pyloader.Prefetcher(seq, workers=2, shard=(rank, 2), drop_last=drop_last, shuffle=True, seed=4) as loader:
            for e, n in enumerate(lens):
                plan = Plan(n, True, 4, rank, 2, drop_last)
                assert len(loader) == plan.epoch_length
                assert indices_of(loader) == list(plan.indices(e)), f"rank {rank}, epoch {e}"
        assert seq.bad == []


@pytest.mark.parametrize("change", [+4, -3])
def test_a_length_changed_between_passes_without_a_hook_is_read_at_the_next_start(change):
    seq = Resizing([6], hook=False)
    with pyloader.Prefetcher(seq, workers=2, depth=4) as loader:
        assert indices_of(loader) == list(range(6))  # epoch 1 is planned, and loads, meanwhile
        seq.lens = [6 + change]
        assert len(loader) == 6 + change
        assert indices_of(loader) == list(range(6 + change))
        assert indices_of(loader) == list(range(6 + change))
        assert loader.epoch == 3
    # Epoch 1's first batches may have loaded (and failed) before the change was seen: never
    # delivered, and nothing was asked past the new length once it was.
    assert all(i >= 6 + change for _, i in seq.bad)


def test_an_epoch_on_epoch_end_empties_has_no_batches_and_runs_its_hook():
    seq = Resizing([3, 0, 0, 4])
    with pyloader.Prefetcher(seq, workers=2) as loader:
        assert [len(indices_of(loader)) for _ in range(5)] == [3, 0, 0, 4, 4]
        assert seq.hooks == 5
        assert loader.epoch == 5
    assert seq.bad == []


def test_state_dict_after_a_length_change_resumes_exactly_and_records_that_length():
    lens = [5, 9, 4]
    reference = Resizing(lens)
    with pyloader.Prefetcher(reference, workers=2, shuffle=True, seed=2) as loader:
        expected = [indices_of(loader) for _ in lens]

    seq = Resizing(lens)
    with pyloader.Prefetcher(seq, workers=2, shuffle=True, seed=2) as loader:
        assert indices_of(loader) == expected[0]
        it = iter(loader)
        taken = [int(next(it)[1]["i"]) for _ in range(4)]
        state = loader.state_dict()
    assert taken == expected[1][:4]
    assert (state["epoch"], state["batches_consumed"], state["length"]) == (1, 4, 9)

    resumed_seq = Resizing(lens)
    resumed_seq.epoch = 1  # the Sequence's own state is restored first: it has epoch 1's length
    with pyloader.Prefetcher(resumed_seq, workers=3) as resumed:
        resumed.load_state_dict(state)
        assert len(resumed) == 9
        assert indices_of(resumed) == expected[1][4:]
        assert indices_of(resumed) == expected[2]

    with pyloader.Prefetcher(Resizing(lens), workers=1) as other:  # still at epoch 0's 5 batches
        with pytest.raises(ValueError, match=r"length=9 but this Prefetcher has length=5"):
            other.load_state_dict(state)


def test_state_dict_at_an_epochs_start_records_the_length_that_start_reads():
    seq = Resizing([5, 2])
    with pyloader.Prefetcher(seq, workers=2) as loader:
        assert loader.state_dict()["length"] == 5
        list(loader)
        state = loader.state_dict()
        assert (state["epoch"], state["batches_consumed"], state["length"]) == (1, 0, 2)
