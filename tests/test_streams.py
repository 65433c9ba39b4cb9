"""pyloader.Stream: shards read in whole by one worker each, round-robin order, exactly once, resume."""

from __future__ import annotations

import functools
import pickle
import threading

import numpy as np
import pytest
from conftest import run_python

import pyloader


def gen(k: int, n: int):
    """Shard k: items k*1000 + i for i < n, each an array of 3."""
    for i in range(n):
        yield np.full(3, k * 1000 + i, np.int64)


def shards_of(lengths: list[int]) -> list[functools.partial]:
    return [functools.partial(gen, k, n) for k, n in enumerate(lengths)]


def expected(lengths: list[int], batch_size: int | None = None, drop_last: bool = False) -> list[list[int]]:
    """The stream's batches by hand: per shard, batches of its items; then round-robin."""
    per_shard = []
    for k, n in enumerate(lengths):
        items = [k * 1000 + i for i in range(n)]
        size = batch_size or 1
        batches = [items[b : b + size] for b in range(0, n, size)]
        if drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        per_shard.append(batches)
    out = []
    for r in range(max((len(b) for b in per_shard), default=0)):
        out += [b[r] for b in per_shard if r < len(b)]
    return out


def values(batch) -> list[int]:
    arr = np.asarray(batch)
    return [int(v) for v in (arr[:, 0] if arr.ndim == 2 else arr[:1])]


def take(stream) -> list[list[int]]:
    return [values(b) for b in stream]


LENGTHS = [5, 2, 7, 0, 3]


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_round_robin_over_shards_whatever_the_workers(mode, workers):
    with pyloader.Stream(shards_of(LENGTHS), workers=workers, mode=mode) as stream:
        assert stream.workers == min(workers, len(LENGTHS))
        for _ in range(2):  # every pass reads every shard again
            assert take(stream) == expected(LENGTHS)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_are_per_shard_and_collated_natively(drop_last):
    lengths = [5, 4, 1]
    with pyloader.Stream(shards_of(lengths), batch_size=2, drop_last=drop_last, workers=2) as stream:
        batches = list(stream)
    assert [values(b) for b in batches] == expected(lengths, 2, drop_last)
    assert all(isinstance(b.base, pyloader._C.Lease) for b in batches)  # in the slot's buffer


def test_dict_items_collate_field_by_field_and_a_custom_collate_runs_in_the_worker():
    def records(n):
        for i in range(n):
            yield {"x": np.full(2, i, np.float32), "y": i}

    with pyloader.Stream([functools.partial(records, 5)], batch_size=2) as stream:
        batches = list(stream)
    assert [b["y"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[0]["x"].shape == (2, 2) and batches[0]["x"].dtype == np.float32

    seen = []

    def collate(items):
        seen.append(threading.current_thread().name)
        return np.array([it["y"] for it in items])

    with pyloader.Stream([functools.partial(records, 4)], batch_size=3, collate=collate) as stream:
        assert [b.tolist() for b in stream] == [[0, 1, 2], [3]]
    assert seen and threading.main_thread().name not in seen


def test_a_generator_is_prefetched_by_one_thread_and_read_once():
    produced = []

    def items():
        for i in range(6):
            produced.append(threading.current_thread().name)
            yield np.full(3, i)

    with pyloader.prefetch(items()) as stream:
        assert isinstance(stream, pyloader.Stream) and stream.workers == 1
        assert take(stream) == [[i] for i in range(6)]
        with pytest.raises(TypeError, match="read once"):
            iter(stream)
    assert threading.main_thread().name not in produced  # loaded ahead, off the loop's thread


def test_a_generator_over_several_workers_or_processes_asks_for_shards():
    with pytest.raises(TypeError, match="split the data into shards"):
        pyloader.prefetch(gen(0, 3), workers=4)
    with pytest.raises(TypeError, match="worker processes"):
        pyloader.prefetch(gen(0, 3), mode="process")
    with pytest.raises(TypeError, match="one of 2 shards"):
        pyloader.Stream([gen(0, 3), gen(1, 3)])


def test_bad_shards_and_options_are_refused_by_name():
    with pytest.raises(TypeError, match="shard 1 is a int"):
        pyloader.Stream([functools.partial(gen, 0, 1), 7])
    with pytest.raises(TypeError, match="list of shards"):
        pyloader.Stream(gen(0, 3))
    with pytest.raises(ValueError, match="at least one shard"):
        pyloader.Stream([])
    with pytest.raises(ValueError, match="batch_size"):
        pyloader.Stream(shards_of([1]), batch_size=0)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        pyloader.Stream(shards_of([1]), shuffle_buffer=-1)
    with pytest.raises(ValueError, match="rank 3 of 4 has no shard"):
        pyloader.Stream(shards_of([1, 1, 1]), shard=(3, 4))


def test_ranks_take_every_world_size_th_shard():
    lengths = [3, 1, 4, 1, 5]
    got = {}
    for rank in range(2):
        with pyloader.Stream(shards_of(lengths), shard=(rank, 2), workers=2) as stream:
            got[rank] = take(stream)
    assert sorted(v for r in got.values() for [v] in r) == sorted(v for b in expected(lengths) for v in b)
    assert {v // 1000 for [v] in got[0]} == {0, 2, 4} and {v // 1000 for [v] in got[1]} == {1, 3}
    assert got[0] == expected([3, 0, 4, 0, 5])  # rank 0's shards 0, 2, 4, round-robin


def test_shuffle_buffer_is_seeded_per_pass_and_shard_and_independent_of_workers():
    lengths = [40, 25]
    runs = []
    for workers in (1, 2):
        with pyloader.Stream(shards_of(lengths), shuffle_buffer=8, seed=3, workers=workers) as stream:
            runs.append([take(stream), take(stream)])
    assert runs[0] == runs[1]
    first, second = runs[0]
    assert first != second  # each pass draws anew
    for one in (first, second):
        flat = [v for [v] in one]
        assert sorted(flat) == sorted(v for b in expected(lengths) for v in b)
        assert flat != [v for b in expected(lengths) for v in b]
        # round-robin over shards still holds: shard 0 and shard 1 alternate while both last
        assert [v // 1000 for v in flat[:50]] == [0, 1] * 25


@pytest.mark.parametrize("shuffle_buffer", [0, 6])
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_resume_mid_stream_yields_exactly_what_an_uninterrupted_run_would(mode, shuffle_buffer):
    lengths = [9, 4, 12]
    options = dict(batch_size=2, shuffle_buffer=shuffle_buffer, seed=11, mode=mode)
    with pyloader.Stream(shards_of(lengths), workers=2, **options) as stream:
        whole = [take(stream), take(stream)]
    flat = whole[0] + whole[1]
    for cut in (0, 1, 5, len(whole[0]) - 1, len(whole[0]), len(whole[0]) + 3):
        with pyloader.Stream(shards_of(lengths), workers=2, **options) as stream:
            got, it = [], iter(stream)
            while len(got) < cut:
                try:
                    got.append(values(next(it)))
                except StopIteration:
                    it = iter(stream)
            state = pickle.loads(pickle.dumps(stream.state_dict()))
        # A new Stream (other workers, too) resumes there: the rest of this pass, then the next.
        with pyloader.Stream(shards_of(lengths), workers=3, **options) as resumed:
            resumed.load_state_dict(state)
            rest = take(resumed)  # the rest of the pass the state is in (maybe no batch)
            if state["pass"] == 0:
                rest += take(resumed)
        assert got + rest == flat, (cut, state)


def test_resume_skips_with_iter_from_when_the_shard_has_it():
    class Shard:
        def __init__(self, n):
            self.n, self.opened = n, []

        def __iter__(self):
            self.opened.append(0)
            return gen(0, self.n)

        def iter_from(self, start):
            self.opened.append(start)
            return (np.full(3, i) for i in range(start, self.n))

    shard = Shard(10)
    with pyloader.Stream([shard], batch_size=3, workers=1) as stream:
        it = iter(stream)
        next(it)
        state = stream.state_dict()
    with pyloader.Stream([shard], batch_size=3, workers=1) as stream:
        stream.load_state_dict(state)
        assert take(stream) == [[3, 4, 5], [6, 7, 8], [9]]
    assert shard.opened[-1] == 3


def test_state_dict_from_other_shards_is_refused():
    with pyloader.Stream(shards_of([3, 3]), workers=1) as stream:
        state = stream.state_dict()
    with pyloader.Stream(shards_of([3, 3, 3]), workers=1) as other:
        with pytest.raises(ValueError, match="shards=2"):
            other.load_state_dict(state)
        with pytest.raises(ValueError, match="not a pyloader Stream state_dict"):
            other.load_state_dict({"version": 99})


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_shard_that_raises_names_itself_and_the_item_and_the_loop_goes_on(mode):
    def one_pass(stream):
        got, errors = [], []
        it = iter(stream)
        while True:
            try:
                got.append(values(next(it)))
            except StopIteration:
                return got, errors
            except pyloader.BatchError as error:
                errors.append(error)

    with pyloader.Stream([functools.partial(gen, 0, 5), functools.partial(broken, 1, 6, 3)],
                         workers=2, mode=mode) as stream:
        for _ in range(2):  # the next pass reads the shard again, and meets its error again
            got, [error] = one_pass(stream)
            assert got == [[0], [1000], [1], [1001], [2], [1002], [3], [4]]  # shard 1 ended at item 3
            assert isinstance(error.__cause__, KeyError)
            assert "shard 1 raised KeyError" in str(error) and "item 3" in str(error)
            assert error.shard == 1 and error.item == 3


def broken(k: int, n: int, at: int):
    for i in range(n):
        if i == at:
            raise KeyError(f"item {i} is bad")
        yield np.full(3, k * 1000 + i, np.int64)


def test_break_ends_the_pass_and_the_next_iter_starts_the_next():
    with pyloader.Stream(shards_of([4, 4]), workers=2, shuffle_buffer=3, seed=0) as stream:
        for _ in stream:
            break
        second = take(stream)
        assert stream.pass_number == 2
    with pyloader.Stream(shards_of([4, 4]), workers=2, shuffle_buffer=3, seed=0) as stream:
        take(stream)
        assert take(stream) == second


def test_shards_over_files_the_test_writes(tmp_path):
    paths = []
    for k in range(4):
        path = tmp_path / f"part-{k}.txt"
        path.write_text("".join(f"{k} {i}\n" for i in range(3 + k)))
        paths.append(path)

    def lines(path):
        with open(path) as f:
            for line in f:
                k, i = map(int, line.split())
                yield np.array([k, i])

    with pyloader.Stream([functools.partial(lines, p) for p in paths], batch_size=2, workers=2,
                         mode="process") as stream:
        got = [b.tolist() for b in stream]
    assert got[0] == [[0, 0], [0, 1]] and got[1] == [[1, 0], [1, 1]]
    assert sorted(tuple(r) for b in got for r in b) == sorted((k, i) for k in range(4) for i in range(3 + k))


def test_sigkilled_workers_lose_and_repeat_nothing(tmp_path):
    out = run_python(
        f"""
        import functools, os, signal
        import numpy as np
        import pyloader

        MARK = {str(tmp_path)!r}

        def shard(k, n):
            for i in range(n):
                mark = os.path.join(MARK, f"{{k}}-{{i}}")
                if i % 7 == 3 and not os.path.exists(mark):  # the first reader of item i dies
                    open(mark, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                yield np.full(2, k * 1000 + i)

        lengths = [30, 22, 17, 25]
        with pyloader.Stream([functools.partial(shard, k, n) for k, n in enumerate(lengths)],
                             batch_size=2, workers=2, mode="process", max_retries=3) as stream:
            got = [b[:, 0].tolist() for b in stream]
        per = [[[k * 1000 + i for i in range(n)][b:b + 2] for b in range(0, n, 2)] for k, n in enumerate(lengths)]
        want = [p[r] for r in range(max(map(len, per))) for p in per if r < len(p)]
        assert got == want, (got, want)
        print("OK", len(os.listdir(MARK)))
        """,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK"), out.stdout
    kills = int(out.stdout.split()[1])
    assert kills >= 10, kills


def test_stats_and_repr():
    with pyloader.Stream(shards_of([3, 3]), workers=2) as stream:
        take(stream)
        assert stream.stats()["epochs"][0]["batches"] >= 6
        assert "2 shards" in repr(stream)
    assert "closed" in repr(stream)
    with pytest.raises(RuntimeError, match="closed"):
        iter(stream)


def test_the_order_is_a_function_of_the_contents_only_in_a_fresh_process():
    code = """
    import functools
    import numpy as np
    import pyloader
    from test_streams import shards_of, take
    with pyloader.Stream(shards_of([6, 3, 5]), batch_size=2, shuffle_buffer=4, seed=9, workers=2) as s:
        print(take(s))
    """
    outs = {run_python(code, timeout=60).stdout for _ in range(2)}
    assert len(outs) == 1 and outs.pop().startswith("[[")
