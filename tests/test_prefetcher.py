"""The thread-mode Prefetcher: order, structure, epochs, state, errors, statistics."""

from __future__ import annotations

import collections
import gc
import os
import time
import traceback

import numpy as np
import pytest
from sequences import Counting, WithEpochEnd, batch_value, indices_of

import pyloader
from pyloader import _C


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_every_batch_once_in_order(workers):
    seq = Counting(57)
    with pyloader.Prefetcher(seq, workers=workers) as loader:
        batches = list(loader)
    assert indices_of(batches) == list(range(57))
    for i, (x, _meta) in enumerate(batches):
        np.testing.assert_array_equal(x, batch_value(i))


def test_len_is_batches_per_epoch():
    assert len(pyloader.Prefetcher(Counting(9), workers=1)) == 9


Point = collections.namedtuple("Point", "x y")


class Structured:
    def __len__(self):
        return 6

    def __getitem__(self, i):
        base = np.arange(24, dtype=np.float32).reshape(4, 6) + i
        return {
            "image": base,
            "strided": base[:, ::2],  # not contiguous
            "transposed": base.T,
            "reversed": base[::-1],
            "scalar": np.float64(i),
            "number": i,
            "text": f"item {i}",
            "none": None,
            "objects": np.array([i, "x"], dtype=object),
            "nested": [(np.int8(i), np.zeros(0, np.uint8)), Point(np.ones(2, np.bool_) , [i])],
            "zero_d": np.array(i, dtype=np.int16),
            "ragged": np.arange(i),  # shapes change from batch to batch
            "bigendian": np.arange(3, dtype=">u4") + i,
            "structured": np.array([(i, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
            "complex": np.array([1j * i], dtype=np.complex64),
            "half": np.array([i], dtype=np.float16),
        }


def test_batches_keep_their_structure_and_values():
    seq = Structured()
    with pyloader.Prefetcher(seq, workers=3) as loader:
        for i, got in enumerate(loader):
            want = seq[i]
            assert list(got) == list(want)
            for key in ("image", "strided", "transposed", "reversed", "zero_d", "ragged", "bigendian",
                        "structured", "complex", "half"):
                assert got[key].dtype == want[key].dtype, key
                np.testing.assert_array_equal(got[key], want[key])
                assert got[key].flags.c_contiguous, key
            assert got["scalar"] == i and type(got["scalar"]) is np.float64
            assert got["number"] == i and got["text"] == f"item {i}" and got["none"] is None
            assert got["objects"].dtype == object and got["objects"].tolist() == [i, "x"]
            (small, empty), point = got["nested"]
            assert small == i and empty.shape == (0,) and empty.dtype == np.uint8
            assert type(point) is Point and point.x.tolist() == [True, True] and point.y == [i]


def test_arrays_are_views_whose_base_is_a_lease():
    with pyloader.Prefetcher(Counting(4), workers=1) as loader:
        x, _ = next(iter(loader))
    assert isinstance(x.base, _C.Lease)
    assert x.base.nbytes >= x.nbytes and x.base.nbytes % 4096 == 0


class _Subclasses:
    """Batch i: a masked array (its mask means something), a record array (its fields are
    attributes) and a memmap's rows."""

    def __init__(self, path):
        self.rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(4, 3))
        self.rows[:] = np.arange(12, dtype=np.float32).reshape(4, 3)
        self.rows.flush()

    def __len__(self):
        return 4

    def __getitem__(self, i):
        masked = np.ma.masked_array(np.arange(3) + i, mask=[False, True, i % 2 == 0])
        return masked, np.rec.fromarrays([[i], [1.5]], names="a,b"), self.rows[i : i + 1]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_array_subclasses_keep_their_meaning(mode, tmp_path):
    with pyloader.Prefetcher(_Subclasses(str(tmp_path / "rows.npy")), workers=2, mode=mode) as loader:
        for i, (masked, records, rows) in enumerate(loader):
            # A masked array and a record array pass through as they are (a copy would drop the
            # mask, and the fields' attributes).
            assert type(masked) is np.ma.MaskedArray
            assert masked.mask.tolist() == [False, True, i % 2 == 0]
            assert masked.sum() == i + (0 if i % 2 == 0 else i + 2)
            assert type(records) is np.recarray and records.a.tolist() == [i]
            # A memmap's bytes mean what they say: copied into slot memory like any array.
            assert isinstance(rows.base, _C.Lease)
            np.testing.assert_array_equal(rows, [[3 * i, 3 * i + 1, 3 * i + 2]])


class _Large:
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return np.full(1 << 20, i, dtype=np.float32)  # 4 MiB


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_close_returns_the_pool_now_and_a_kept_batch_when_it_dies(mode):
    loader = pyloader.Prefetcher(_Large(), workers=2, mode=mode)
    batches = list(loader)
    kept = batches[5]
    del batches
    gc.collect()
    assert loader.memory_info()["buffers"] >= 2
    loader.close()
    info = loader.memory_info()
    assert (info["buffers"], info["leased"], info["bytes"]) == (1, 1, kept.base.nbytes)
    np.testing.assert_array_equal(kept, np.full(1 << 20, 5, dtype=np.float32))
    del kept
    gc.collect()
    info = loader.memory_info()
    assert (info["buffers"], info["leased"], info["bytes"]) == (0, 0, 0)


def test_absurd_worker_counts_warn_and_start_only_the_threads_there_is_work_for():
    before = len(os.listdir("/proc/self/task"))
    with pytest.warns(UserWarning, match=r"workers=5000 is far more than the \d+ CPUs"):
        loader = pyloader.Prefetcher(Counting(8), workers=5000)
    with loader:
        batches = iter(loader)
        first = next(batches)
        started = len(os.listdir("/proc/self/task")) - before
        assert indices_of([first, *batches]) == list(range(8))
    assert 1 <= started <= 16, started  # two epochs of 8 batches at most, not 5000 threads
    assert loader.stats()["epochs"][0]["batches"] == 8


def test_lease_keeps_the_buffer_alive_after_the_loader_and_the_lease_name_are_gone():
    loader = pyloader.Prefetcher(Counting(8), workers=2)
    x, _ = next(iter(loader))
    lease = x.base
    loader.close()
    del loader, lease
    gc.collect()
    np.testing.assert_array_equal(x, batch_value(0))  # the view still owns its memory through the lease


def test_shuffle_is_deterministic_per_seed_and_differs_per_epoch():
    def run(seed):
        with pyloader.Prefetcher(Counting(30), workers=3, shuffle=True, seed=seed) as loader:
            return [indices_of(loader) for _ in range(3)]

    a, b = run(11), run(11)
    assert a == b
    assert a[0] != a[1] != a[2]
    assert all(sorted(e) == list(range(30)) for e in a)
    assert run(12) != a


def test_seed_none_draws_a_seed_and_records_it():
    loader = pyloader.Prefetcher(Counting(10), workers=1, shuffle=True)
    seed = loader.state_dict()["seed"]
    first = indices_of(loader)
    loader.close()
    again = pyloader.Prefetcher(Counting(10), workers=1, shuffle=True, seed=seed)
    assert indices_of(again) == first
    again.close()


@pytest.mark.parametrize("n,world,drop_last", [(10, 2, False), (11, 3, False), (11, 3, True)])
def test_shards_are_disjoint_and_cover_every_batch(n, world, drop_last):
    shares = []
    for rank in range(world):
        with pyloader.Prefetcher(Counting(n), workers=2, shuffle=True, shard=(rank, world),
                                 drop_last=drop_last) as loader:
            shares.append(indices_of(loader))
    assert len({len(s) for s in shares}) == 1
    flat = [i for s in shares for i in s]
    if drop_last:
        assert len(set(flat)) == len(flat) == n // world * world
    else:
        assert set(flat) == set(range(n))


def test_on_epoch_end_runs_after_the_last_load_of_an_epoch_and_before_the_next_epoch_loads():
    seq = WithEpochEnd(12)
    with pyloader.Prefetcher(seq, workers=4, depth=6) as loader:
        for _ in range(3):
            assert sorted(indices_of(loader)) == list(range(12))
    log = seq.log
    ends = [k for k, v in enumerate(log) if v == "end"]
    assert len(ends) >= 3
    for e, at in enumerate(ends[:3]):
        start = 0 if e == 0 else ends[e - 1] + 1
        assert sorted(log[start:at]) == list(range(12)), f"epoch {e}: exactly its loads before its end"


def test_loading_runs_ahead_across_the_epoch_boundary():
    seq = Counting(6)
    loader = pyloader.Prefetcher(seq, workers=2, depth=4)
    assert indices_of(loader) == list(range(6))
    deadline = time.monotonic() + 10
    while len(seq.loaded) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(seq.loaded) == 10, "the first 4 batches of epoch 1 load before it is asked for"
    assert indices_of(loader) == list(range(6))
    loader.close()


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_dict_mid_epoch_resumes_exactly(shuffle):
    def take(loader, k):
        it = iter(loader)
        return [int(next(it)[1]["i"]) for _ in range(k)]

    reference = pyloader.Prefetcher(Counting(10), workers=3, shuffle=shuffle, seed=5)
    expected = [indices_of(reference) for _ in range(3)]
    reference.close()

    first = pyloader.Prefetcher(Counting(10), workers=3, shuffle=shuffle, seed=5)
    assert indices_of(first) == expected[0]
    assert take(first, 4) == expected[1][:4]
    state = first.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (1, 4)
    first.close()

    resumed = pyloader.Prefetcher(Counting(10), workers=2, shuffle=shuffle, seed=99)
    resumed.load_state_dict(state)
    assert indices_of(resumed) == expected[1][4:]
    assert indices_of(resumed) == expected[2]
    resumed.close()


def test_state_dict_from_another_length_is_refused():
    state = pyloader.Prefetcher(Counting(10), workers=1).state_dict()
    with pytest.raises(ValueError, match="length=10"):
        pyloader.Prefetcher(Counting(11), workers=1).load_state_dict(state)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("epoch", 10**30, r"state\['epoch'\] must be at most"),
        ("epoch", -1, r"state\['epoch'\] must be an integer >= 0, got -1"),
        ("shuffle", "no", r"state\['shuffle'\] must be True or False, got 'no'"),
        ("seed", 1.5, r"state\['seed'\] must be an integer >= 0, got 1.5"),
        ("batches_consumed", None, r"state\['batches_consumed'\] must be an integer >= 0, got None"),
        ("seed", KeyError, r"state_dict lacks 'seed'"),
    ],
)
def test_load_state_dict_names_the_bad_field(field, value, match):
    with pyloader.Prefetcher(Counting(10), workers=1) as loader:
        state = loader.state_dict()
        if value is KeyError:
            del state[field]
        else:
            state[field] = value
        with pytest.raises(ValueError, match=match):
            loader.load_state_dict(state)
        assert indices_of(list(loader)) == list(range(10))  # the refused state changed nothing


def test_a_new_pass_after_break_starts_the_next_epoch_without_loading_the_rest():
    seq = Counting(200)
    loader = pyloader.Prefetcher(seq, workers=2, depth=4)
    for k, _ in enumerate(loader):
        if k == 2:
            break
    assert loader.epoch == 0
    assert indices_of(loader) == list(range(200))
    assert loader.epoch == 2
    assert len(seq.loaded) < 2 * 200, "the abandoned rest of epoch 0 was skipped, not loaded"
    loader.close()


def test_set_epoch_restarts_the_order_of_that_epoch():
    loader = pyloader.Prefetcher(Counting(8), workers=2, shuffle=True, seed=3)
    orders = [indices_of(loader) for _ in range(3)]
    loader.set_epoch(1)
    assert indices_of(loader) == orders[1]
    loader.close()


def test_error_in_getitem_names_the_index_and_carries_the_original_traceback():
    loader = pyloader.Prefetcher(Counting(6, fail=frozenset({3})), workers=2)
    got = []
    with pytest.raises(pyloader.BatchError, match=r"__getitem__\(3\) raised ValueError: bad batch 3") as info:
        for b in loader:
            got.append(int(b[1]["i"]))
    assert got == [0, 1, 2]
    err = info.value
    assert (err.index, err.epoch) == (3, 0)
    assert isinstance(err.__cause__, ValueError)
    frames = traceback.extract_tb(err.__cause__.__traceback__)
    assert any(f.name == "__getitem__" for f in frames), "the worker's traceback is kept"
    # The loader stays usable: the next epoch fails at 3 again and loads the others.
    got = []
    with pytest.raises(pyloader.BatchError):
        for b in loader:
            got.append(int(b[1]["i"]))
    assert got == [0, 1, 2]
    loader.close()


def test_after_an_error_next_goes_on_with_the_following_batches():
    loader = pyloader.Prefetcher(Counting(5, fail=frozenset({1})), workers=2)
    it = iter(loader)
    got = [int(next(it)[1]["i"])]
    with pytest.raises(pyloader.BatchError):
        next(it)
    got += indices_of(it)
    assert got == [0, 2, 3, 4]
    loader.close()


class ReturnsNone:
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return None if i == 1 else np.zeros(2)


def test_getitem_returning_none_raises_type_error_naming_the_index():
    with pyloader.Prefetcher(ReturnsNone(), workers=1) as loader:
        it = iter(loader)
        next(it)
        with pytest.raises(TypeError, match=r"__getitem__\(1\) returned None"):
            next(it)


class ReturnsGenerator:
    def __len__(self):
        return 1

    def __getitem__(self, i):
        yield np.zeros(2)


def test_getitem_returning_a_generator_raises_type_error():
    with pyloader.Prefetcher(ReturnsGenerator(), workers=1) as loader:
        with pytest.raises(TypeError, match=r"__getitem__\(0\) returned generator"):
            list(loader)


class SelfContaining:
    def __len__(self):
        return 1

    def __getitem__(self, i):
        x: list = []
        x.append(x)
        return x


def test_a_structure_that_contains_itself_raises_type_error():
    with pyloader.Prefetcher(SelfContaining(), workers=1) as loader:
        with pytest.raises(TypeError, match=r"__getitem__\(0\) returned a structure nested"):
            list(loader)


def test_timeout_names_the_slow_index():
    seq = Counting(3, sleep=1.0)
    with pyloader.Prefetcher(seq, workers=1, timeout=0.1) as loader:
        with pytest.raises(TimeoutError, match=r"batch 0 \(epoch 0\) was not loaded within timeout=0.1"):
            next(iter(loader))


@pytest.mark.parametrize(
    "option,value",
    [("workers", 0), ("workers", 1.5), ("workers", True), ("depth", 0), ("shuffle", "yes"),
     ("seed", -1), ("shard", (2, 2)), ("drop_last", None), ("pin", "gpu"), ("timeout", 0),
     ("timeout", "1"), ("mode", "fork"), ("mode", "processes"), ("max_pool_bytes", 0),
         ("max_retries", -1)],
)
def test_bad_options_raise_value_error_showing_the_value(option, value):
    with pytest.raises(ValueError, match=option) as info:
        pyloader.Prefetcher(Counting(3), **{option: value})
    assert repr(value) in str(info.value)


def test_something_that_is_not_a_sequence_raises_type_error():
    with pytest.raises(TypeError, match="__len__ and __getitem__"):
        pyloader.Prefetcher(iter([1, 2]))


def test_empty_sequence_gives_empty_epochs_and_still_ends_them():
    seq = WithEpochEnd(0)
    with pyloader.Prefetcher(seq, workers=2) as loader:
        assert [list(loader) for _ in range(3)] == [[], [], []]
        assert loader.epoch == 3
    assert seq.epoch_ends == 3


class FailingEpochEnd(Counting):
    def on_epoch_end(self):
        raise KeyError("hook")


def test_an_error_in_on_epoch_end_is_raised_at_the_end_of_the_epoch():
    with pyloader.Prefetcher(FailingEpochEnd(4), workers=2) as loader:
        got = []
        with pytest.raises(pyloader.EpochEndError, match="after epoch 0") as info:
            for b in loader:
                got.append(int(b[1]["i"]))
        assert got == [0, 1, 2, 3]
        assert isinstance(info.value.__cause__, KeyError)


def test_stats_report_each_epoch():
    with pyloader.Prefetcher(Counting(20, sleep=0.002), workers=2) as loader:
        for _ in range(2):
            for _ in loader:
                time.sleep(0.001)
        stats = loader.stats()
    assert [e["epoch"] for e in stats["epochs"]] == [0, 1]
    cur = stats["current"]
    assert cur["batches"] == 20
    assert cur["load_ms_p95"] >= cur["load_ms_p50"] >= 1.5  # each load sleeps 2 ms
    assert 0 <= cur["stall_fraction"] <= 1 and 0 <= cur["worker_busy_fraction"] <= 1
    assert cur["wall_s"] >= cur["wait_s"] >= 0
    assert 1 <= cur["peak_in_flight"] <= 4 and cur["pool_buffers"] >= 1 and cur["pool_bytes"] > 0


def test_memory_info_says_what_was_pinned_and_how():
    with pyloader.Prefetcher(Counting(4), workers=1) as loader:
        list(loader)
        info = loader.memory_info()
    assert info["pin_requested"] == "auto"
    assert info["pin_method"] in ("cuda", "mlock")
    assert info["pinned_bytes"] + info["pin_failures"] * 4096 >= 4096 or info["pin_error"]
    with pyloader.Prefetcher(Counting(4), workers=1, pin=False) as loader:
        list(loader)
        off = loader.memory_info()
    assert off["pin_method"] == "none" and off["pinned_bytes"] == 0


def test_buffers_are_reused_in_steady_state():
    with pyloader.Prefetcher(Counting(200), workers=2, depth=4) as loader:
        for _ in loader:  # batches are dropped as the loop goes
            pass
        first = loader.memory_info()["allocations"]
        assert first <= 4 + 2 + 1, "depth + workers + the batch the loop holds"
        for _ in range(2):
            for _ in loader:
                pass
        assert loader.memory_info()["allocations"] == first


def test_close_is_idempotent_and_a_closed_loader_refuses_to_iterate():
    loader = pyloader.Prefetcher(Counting(4), workers=2)
    list(loader)
    loader.close()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)
    assert "closed" in repr(loader)


def test_prefetch_is_a_context_manager_over_a_prefetcher():
    with pyloader.prefetch(Counting(5), workers=2) as batches:
        assert indices_of(batches) == list(range(5))
    assert "closed" in repr(batches)


def test_repr_shows_the_configuration():
    loader = pyloader.Prefetcher(Counting(4), workers=3, depth=5)
    assert repr(loader) == (
        "Prefetcher(Counting of 4 batches, workers=3, depth=5, mode='thread', shuffle=False, "
        "shard=(0, 1), epoch=0)"
    )
    loader.close()


def test_public_api_is_sorted_and_complete():
    assert pyloader.__all__ == sorted(pyloader.__all__)
    for name in pyloader.__all__:
        assert hasattr(pyloader, name)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_errors_from_the_native_core_have_registered_types_that_keep_their_base_types(python_subprocess, mode):
    # Python tells pyloader's own errors apart by type, never by message: a returned None is a
    # _C.BatchLayoutError (a TypeError, raised as it is), a refused stack a _C.StackError (a
    # ValueError, the cause of a BatchError). In process mode both cross the process boundary.
    r = python_subprocess(
        """
        import numpy as np
        import pyloader
        from pyloader import _C

        class Bad:
            def __len__(self):
                return 3

            def __getitem__(self, i):
                if i == 1:
                    return None
                if i == 2:
                    return pyloader.stack([np.zeros(2), np.zeros(3)])
                return np.zeros(2)

        with pyloader.Prefetcher(Bad(), workers=1, mode=%r) as loader:
            it = iter(loader)
            next(it)
            try:
                next(it)
            except _C.BatchLayoutError as e:
                assert isinstance(e, TypeError) and str(e).startswith("__getitem__(1) returned None"), e
            else:
                raise AssertionError("no BatchLayoutError")
            try:
                next(it)
            except pyloader.BatchError as e:
                cause = e.__cause__
                assert isinstance(cause, _C.StackError) and isinstance(cause, ValueError), repr(cause)
                assert str(cause).startswith("pyloader.stack: batch 2: sample 1"), cause
            else:
                raise AssertionError("no BatchError")
        print("ok")
        """ % mode,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok"), r.stdout


class SlowBatchThree(Counting):
    """Batch 3 sleeps 1 s the first time it is loaded."""

    def __init__(self) -> None:
        super().__init__(8)
        self.slept = False

    def __getitem__(self, index):
        if index == 3 and not self.slept:
            self.slept = True
            time.sleep(1.0)
        return super().__getitem__(index)


def test_an_epoch_run_again_is_a_record_of_its_own_but_a_pass_restarted_mid_epoch_is_one():
    with pyloader.Prefetcher(SlowBatchThree(), workers=2, timeout=0.3) as loader:
        batches = iter(loader)
        got = [next(batches) for _ in range(3)]
        with pytest.raises(TimeoutError, match=r"batch 3 \(epoch 0\)"):
            next(batches)
        got += list(batches)  # the pass goes on, on a new engine, after the abandoned batch
        assert indices_of(got) == [0, 1, 2, 4, 5, 6, 7]
        loader.set_epoch(0)  # a second pass over epoch 0: a record of its own
        assert indices_of(list(loader)) == list(range(8))
        assert [(e["epoch"], e["batches"]) for e in loader.stats()["epochs"]] == [(0, 7), (0, 8)]
