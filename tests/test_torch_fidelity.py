"""pyloader.torch against torch, item by item of issue 18: the same code, only the import changed.

Every test runs one piece of torch code with ``torch.utils.data.DataLoader`` and with
``pyloader.torch.DataLoader`` in each of pyloader's modes (``"auto"``, the default; ``"thread"``;
``"process"``) and compares what comes out: batches, exception types, worker ids, seeds, random
draws, warnings. Where thread mode differs from torch by design (threads share one process: one
dataset, one set of random generators, no ``get_worker_info()``), the test asserts the difference
the documentation states, so that a change of it is noticed. Anything that kills a process runs in
a subprocess.
"""

from __future__ import annotations

import pickle
import random
import textwrap
import time
import typing
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader as TorchLoader  # noqa: E402
from torch.utils.data import Dataset, get_worker_info  # noqa: E402

import pyloader  # noqa: E402
from pyloader.torch import DataLoader  # noqa: E402

MODES = ["auto", "thread", "process"]
# torch's own warning for more worker processes than CPUs (2 here): what it warns is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def plain(batch: typing.Any) -> typing.Any:
    """A batch as comparable values: each tensor as (dtype, shape, values), containers kept."""
    if isinstance(batch, torch.Tensor):
        return ("tensor", str(batch.dtype), tuple(batch.shape), batch.tolist())
    if isinstance(batch, dict):
        return {k: plain(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(plain(v) for v in batch)
    return batch


def reseed() -> None:
    """The main process's global generators, as a seeded training script sets them."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def epochs(loader: typing.Any, n: int = 2) -> list[list[typing.Any]]:
    return [[plain(b) for b in loader] for _ in range(n)]


def run_both(dataset: typing.Any, mode: str, n_epochs: int = 2, **kwargs: typing.Any):
    """(torch's epochs, pyloader's epochs) for one DataLoader configuration, from equal seeds."""
    reseed()
    ref = epochs(TorchLoader(dataset, generator=torch.Generator().manual_seed(5), **kwargs), n_epochs)
    reseed()
    ours = epochs(DataLoader(dataset, generator=torch.Generator().manual_seed(5), mode=mode, **kwargs), n_epochs)
    return ref, ours


def script(body: str, timeout: float = 180.0) -> str:
    from conftest import run_python

    r = run_python(textwrap.dedent("""
        import os, signal, sys, warnings
        import numpy as np
        import torch
        import torch.utils.data._utils
        from torch.utils.data import Dataset
        from torch.utils.data import DataLoader as TorchLoader
        from pyloader.torch import DataLoader
        torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL = 0.5  # as conftest.py sets it, and why
    """) + textwrap.dedent(body), timeout=timeout)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


# ---- datasets (module level: spawned workers import them) -------------------------------------


class WorkerView(Dataset):
    """Each sample says what its worker saw: ``get_worker_info()``, the seeds, one draw from each
    global generator, and the state ``set_tag`` (a ``worker_init_fn``) left on the dataset."""

    def __init__(self, n: int = 12) -> None:
        self.n = n
        self.tag = -1

    def set_tag(self, worker_id: int) -> None:
        self.tag = 100 + worker_id

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, typing.Any]:
        info = get_worker_info()
        return {
            "i": i,
            "id": -1 if info is None else info.id,
            "num_workers": 0 if info is None else info.num_workers,
            "seed": -1 if info is None else info.seed,
            "initial_seed": torch.initial_seed(),
            "own_copy": info is not None and info.dataset is self,
            "tag": self.tag,
            "torch": torch.rand(2),
            "numpy": np.random.rand(2),
            "random": random.random(),
        }


class Failing(Dataset):
    """``dataset[5]`` raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        if i == 5:
            raise self.error
        return i


class Echo(Dataset):
    """Returns the index it is given, whatever its type (a sampler may yield any key)."""

    def __init__(self, n: int = 6) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: typing.Any) -> typing.Any:
        return key


class Reads(Dataset):
    """Reads ``self.start`` (set by the main process between epochs)."""

    def __init__(self) -> None:
        self.start = 0

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> int:
        return self.start * 100 + i


class Uneven(WorkerView):
    """WorkerView whose samples take uneven time: whichever worker is free first varies run to
    run, so only a fixed batch-to-worker assignment gives the same random draws every run."""

    def __getitem__(self, i: int) -> dict[str, typing.Any]:
        time.sleep(0.02 * ((i * 7919) % 3))
        return super().__getitem__(i)


class SlowToUnpickle(Echo):
    """A dataset whose unpickling takes ``delay`` seconds, as a spawned worker that imports heavy
    modules before it can unpickle the dataset."""

    def __init__(self, delay: float) -> None:
        super().__init__(4)
        self.delay = delay

    def __setstate__(self, state: dict[str, typing.Any]) -> None:
        time.sleep(state["delay"])
        self.__dict__.update(state)


def fail_collate(batch: list[typing.Any]) -> typing.Any:
    raise ValueError(f"cannot collate {len(batch)} samples")


# ---- 1. exceptions ------------------------------------------------------------------------------


class TwoArgs(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("error", [KeyError("k5"), ValueError("v5"), IndexError("i5")], ids=repr)
def test_an_exception_from_the_dataset_reaches_the_loop_as_the_type_torch_raises(mode, workers, error):
    if mode == "process" and workers == 0:
        workers = 1
    caught = []
    for loader in (TorchLoader(Failing(error), batch_size=2, num_workers=workers),
                   DataLoader(Failing(error), batch_size=2, num_workers=workers, mode=mode)):
        got = []
        try:
            for b in loader:
                got.append(b.tolist())
        except Exception as exc:  # noqa: BLE001 - what type arrives is the point
            caught.append((type(exc), got, exc))
    (torch_type, torch_got, _), (our_type, our_got, ours) = caught
    assert our_type is torch_type is type(error)
    assert our_got == torch_got == [[0, 1], [2, 3]]
    where = "process" if mode == "process" or (mode == "auto" and workers > 0) else "thread"
    notes = "\n".join(getattr(ours, "__notes__", []))
    assert f"DataLoader worker {where} " in notes and "dataset[5]" in notes and "batch 2 of epoch 0" in notes
    assert type(pickle.loads(pickle.dumps(ours))) is type(error)  # survives pickle (item 7)


@pytest.mark.parametrize("mode", MODES)
def test_an_exception_from_collate_fn_reaches_the_loop_as_the_type_torch_raises(mode):
    types = []
    for loader in (TorchLoader(Echo(), batch_size=3, num_workers=2, collate_fn=fail_collate),
                   DataLoader(Echo(), batch_size=3, num_workers=2, collate_fn=fail_collate, mode=mode)):
        with pytest.raises(Exception) as info:  # noqa: PT011 - the type is compared below
            next(iter(loader))
        types.append(type(info.value))
    assert types == [ValueError, ValueError]
    assert "cannot collate 3 samples" in str(info.value) and any("collate_fn" in n for n in info.value.__notes__)


@pytest.mark.parametrize("mode", MODES)
def test_an_exception_torch_cannot_rebuild_keeps_its_type_with_pyloader(mode):
    # torch re-raises by calling type(exc)(message); for an exception that takes two arguments
    # that fails and torch raises a RuntimeError instead. pyloader raises the exception itself
    # (documented): still catchable as the user's type.
    with pytest.raises(Exception) as theirs:  # noqa: PT011
        list(TorchLoader(Failing(TwoArgs(3, "x")), batch_size=2, num_workers=2))
    assert type(theirs.value) is RuntimeError
    with pytest.raises(TwoArgs) as ours:
        list(DataLoader(Failing(TwoArgs(3, "x")), batch_size=2, num_workers=2, mode=mode))
    assert ours.value.args == (3, "x")


@pytest.mark.parametrize("mode", ["auto", "process"])
def test_a_worker_that_dies_raises_a_runtime_error_naming_pid_and_signal_as_torch(mode):
    script(f"""
    class Killer(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return i

    import re
    for loader in (TorchLoader(Killer(), batch_size=2, num_workers=2),
                   DataLoader(Killer(), batch_size=2, num_workers=2, mode={mode!r})):
        got = []
        try:
            for b in loader:
                got.append(b.tolist())
        except RuntimeError as e:
            text = f"{{e}} {{e.__cause__ or ''}}"  # torch: "exited unexpectedly", from the signal's error
            assert re.search(r"(pid|process) \\(?\\d+", text) and "signal" in text.lower(), text
            assert "Killed" in text or "SIGKILL" in text, text
            # torch fails as soon as it notices the death (batches in flight are lost); pyloader
            # retries the batch on new workers, then fails it in its place: earlier batches arrive.
            assert got == ([[0, 1], [2, 3]] if loader.__class__ is DataLoader else got[:2]), got
        else:
            raise AssertionError(f"no RuntimeError from {{type(loader).__module__}}")
    print("OK")
    """)


# ---- 2. per-worker state, 7. deterministic worker assignment -----------------------------------


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_workers_see_what_torchs_workers_see(mode, workers, persistent):
    """worker_init_fn's state on the worker's own dataset copy, get_worker_info(), seeds and every
    random draw: equal to torch's, batch for batch, epoch after epoch."""
    if persistent and workers == 0:
        pytest.skip("torch: persistent_workers needs num_workers > 0")
    ds = WorkerView(14)
    ref, ours = run_both(ds, mode, batch_size=2, shuffle=True, num_workers=workers, worker_init_fn=ds.set_tag,
                         persistent_workers=persistent)
    processes = mode == "process" or (mode == "auto" and workers > 0)
    if processes or workers == 0:
        if mode == "process" and workers == 0:
            # one worker process where torch loads in the main process: documented difference
            assert [b["i"] for e in ours for b in e] == [b["i"] for e in ref for b in e]
            assert all(b["id"][3] == [0, 0] for e in ours for b in e)
            return
        assert ours == ref
        if workers:
            assert [b["id"][3][0] for b in ours[0]] == [k % workers for k in range(len(ours[0]))]
        return
    # thread mode (num_workers > 0): one process, one dataset, one set of generators (the docs)
    assert [b["i"] for e in ours for b in e] == [b["i"] for e in ref for b in e]  # the same samples
    assert all(b["id"][3] == [-1, -1] for e in ours for b in e)  # get_worker_info() is None
    assert all(b["own_copy"][3] == [False, False] for e in ours for b in e)


def test_per_worker_random_streams_give_the_same_data_every_run_in_process_mode():
    def run():
        reseed()
        loader = DataLoader(Uneven(18), batch_size=2, num_workers=3, generator=torch.Generator().manual_seed(1),
                            mode="process")
        return [plain(b) for b in loader]

    first = run()
    assert run() == first
    reseed()
    assert [plain(b) for b in TorchLoader(Uneven(18), batch_size=2, num_workers=3,
                                          generator=torch.Generator().manual_seed(1))] == first


# ---- 3. persistent workers keep their own copy ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_persistent_workers_keep_their_dataset_copy_across_epochs(mode):
    results = []
    for make in (TorchLoader, lambda *a, **k: DataLoader(*a, mode=mode, **k)):
        ds = Reads()
        loader = make(ds, batch_size=3, num_workers=2, persistent_workers=True)
        out = []
        for epoch in range(3):
            out.append([b.tolist() for b in loader])
            ds.start = epoch + 1  # the main process's copy changes; workers keep theirs
        results.append(out)
    ref, ours = results
    assert ref == [[[0, 1, 2], [3, 4, 5]]] * 3
    if mode == "thread":
        assert ours == [[[0, 1, 2], [3, 4, 5]], [[100, 101, 102], [103, 104, 105]],
                        [[200, 201, 202], [203, 204, 205]]]  # threads share the dataset (the docs)
    else:
        assert ours == ref


# ---- 4. typing ------------------------------------------------------------------------------


def test_dataloader_is_generic_like_torchs():
    def make(train: bool) -> DataLoader[list[torch.Tensor]]:
        return DataLoader(Echo(), batch_size=2)

    hints = typing.get_type_hints(make)
    assert typing.get_origin(hints["return"]) is DataLoader
    assert DataLoader[int] is not None and TorchLoader[int] is not None
    assert make(True).batch_size == 2


# ---- 5. indices, prefetch_factor, timeout, in_order, pin_memory, multiprocessing_context -------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sampler", [
    [2**40, 2**33 + 1, 5, 2**62],  # beyond int32 (and near int64's end)
    ["a", "b", "c"],  # keys of a mapping
    [(0, 1), (2, 3), (4, 5)],  # tuples
    [np.int64(3), np.int32(1), np.uint8(2)],  # numpy integers
    [torch.tensor(4), torch.tensor(2)],  # 0-d tensors
], ids=["int64", "str", "tuple", "numpy", "tensor"])
def test_any_index_a_sampler_yields_reaches_the_dataset_as_in_torch(mode, sampler):
    for workers in (0, 2):
        ref, ours = run_both(Echo(), mode, n_epochs=1, batch_size=2, sampler=sampler, num_workers=workers)
        assert ours == ref


@pytest.mark.parametrize("mode", MODES)
def test_fewer_batches_than_workers(mode):
    ref, ours = run_both(WorkerView(3), mode, batch_size=1, num_workers=4)
    if mode == "thread":
        assert [b["i"] for e in ours for b in e] == [b["i"] for e in ref for b in e]
    else:
        assert ours == ref


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", [1, 3])
def test_prefetch_factor(mode, factor):
    ref, ours = run_both(WorkerView(10), mode, batch_size=2, num_workers=2, prefetch_factor=factor)
    if mode == "thread":
        assert [b["i"] for e in ours for b in e] == [b["i"] for e in ref for b in e]
    else:
        assert ours == ref


@pytest.mark.parametrize("mode", MODES)
def test_a_timeout_raises_torchs_error(mode):
    script(f"""
    import time

    class Slow(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            time.sleep(3 if i == 2 else 0)
            return i

    texts = []
    for loader in (TorchLoader(Slow(), batch_size=1, num_workers=1, timeout=1),
                   DataLoader(Slow(), batch_size=1, num_workers=1, timeout=1, mode={mode!r})):
        it = iter(loader)
        got = [next(it).tolist(), next(it).tolist()]
        try:
            next(it)
        except RuntimeError as e:
            texts.append((got, str(e)))
        del it
    assert texts[0] == texts[1] == ([[0], [1]], "DataLoader timed out after 1 seconds"), texts
    print("OK")
    """)


@pytest.mark.parametrize("mode", MODES)
def test_in_order_false_yields_torchs_batches_in_order(mode):
    ref, _ = run_both(WorkerView(12), mode, n_epochs=1, batch_size=2, num_workers=2)
    unordered, ours = run_both(WorkerView(12), mode, n_epochs=1, batch_size=2, num_workers=2, in_order=False)
    key = [b["i"] for b in ref[0]]
    assert sorted(b["i"] for b in unordered[0]) == sorted(key)  # torch: any order
    assert [b["i"] for b in ours[0]] == key  # pyloader: in order (documented)
    if mode != "thread":
        assert ours == ref


@pytest.mark.parametrize("mode", MODES)
def test_pin_memory_without_an_accelerator_warns_as_torch(mode):
    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: pinning happens")
    recorded = []
    for make in (TorchLoader, lambda *a, **k: DataLoader(*a, mode=mode, **k)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = [b.tolist() for b in make(Echo(), batch_size=2, pin_memory=True)]
        recorded.append((batches, sorted(str(w.message) for w in caught if "pin" in str(w.message))))
    assert recorded[0] == recorded[1] and recorded[0][1]


@pytest.mark.parametrize("mode", ["auto", "process"])
@pytest.mark.parametrize("context", ["spawn", "forkserver", "fork-object"])
def test_multiprocessing_context_gives_torchs_batches(mode, context):
    import multiprocessing

    ctx: typing.Any = multiprocessing.get_context("fork") if context == "fork-object" else context
    ds = WorkerView(8)
    ref, ours = run_both(ds, mode, n_epochs=1, batch_size=2, num_workers=2, worker_init_fn=ds.set_tag,
                         multiprocessing_context=ctx)
    assert ours == ref


@pytest.mark.parametrize("mode", ["auto", "process"])
def test_spawned_workers_may_take_longer_to_start_than_pyloaders_reply_timeout(mode):
    """Torch waits for spawned workers however long they take to import and unpickle the dataset;
    so does pyloader (its zygote's start-up was cut off after a fixed 10 s; here 0.5 s, against a
    dataset that takes 2 s to unpickle)."""
    script(f"""
    import pyloader.process._pool as pool
    from test_torch_fidelity import SlowToUnpickle

    pool._ZYGOTE_TIMEOUT_S = 0.5
    ref = [b.tolist() for b in TorchLoader(SlowToUnpickle(2.0), batch_size=2, num_workers=1,
                                           multiprocessing_context="spawn")]
    ours = [b.tolist() for b in DataLoader(SlowToUnpickle(2.0), batch_size=2, num_workers=1,
                                           multiprocessing_context="spawn", mode={mode!r})]
    assert ours == ref == [[0, 1], [2, 3]], (ours, ref)
    print("OK")
    """)


# ---- 7. pickling, segfaults, and issue 14 item 17 --------------------------------------------


def test_pyloader_errors_survive_pickle():
    for error in (pyloader.BatchError("m", index=1, epoch=2, position=3, worker=4),
                  pyloader.WorkerDiedError("died", index=5, epoch=6, position=7, worker=8)):
        pyloader_add_note = getattr(error, "add_note", None)
        if pyloader_add_note is not None:
            pyloader_add_note("a note")
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert (back.index, back.epoch, back.position, back.worker) == (
            error.index, error.epoch, error.position, error.worker)
        assert getattr(back, "__notes__", None) == getattr(error, "__notes__", None)
        # torch's ExceptionWrapper (and code like it) rebuilds an exception as type(exc)(message)
        rebuilt = type(error)(str(error))
        assert type(rebuilt) is type(error) and str(rebuilt) == str(error) and rebuilt.index == -1


@pytest.mark.parametrize("mode", ["auto", "process"])
def test_a_segfault_in_a_worker_is_reported_as_torch_reports_it(mode):
    script(f"""
    import ctypes, re

    class Segfault(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return ctypes.string_at(0)

    for loader in (TorchLoader(Segfault(), batch_size=2, num_workers=2),
                   DataLoader(Segfault(), batch_size=2, num_workers=2, mode={mode!r})):
        try:
            next(iter(loader))
        except RuntimeError as e:
            text = f"{{e}} {{e.__cause__ or ''}}"  # torch: "exited unexpectedly", from the signal's error
            assert re.search(r"(pid|process) \\(?\\d+", text) and "signal" in text.lower(), text
            assert "SIGSEGV" in text or "Segmentation fault" in text, text
        else:
            raise AssertionError("no RuntimeError")
    print("OK")
    """)


def test_a_segfault_in_thread_mode_ends_the_process_as_documented():
    from conftest import run_python

    r = run_python("""
    import ctypes
    from torch.utils.data import Dataset
    from pyloader.torch import DataLoader

    class Segfault(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return ctypes.string_at(0)

    next(iter(DataLoader(Segfault(), batch_size=2, num_workers=2, mode="thread")))
    print("survived")
    """, timeout=120)
    assert r.returncode != 0 and "survived" not in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_torchs_worker_count_warning_only_where_worker_processes_start(mode):
    """Issue 14 item 17: torch's 'will create N worker processes' warning, as often as torch gives
    it, where pyloader starts worker processes; never for threads."""
    import os

    workers = len(os.sched_getaffinity(0)) + 1
    counts = []
    for make in (TorchLoader, lambda *a, **k: DataLoader(*a, mode=mode, **k)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = make(Echo(), batch_size=2, num_workers=workers)
            list(loader)
        counts.append(sum("worker processes in total" in str(w.message) for w in caught))
    assert counts[0] >= 1
    assert counts[1] == (0 if mode == "thread" else counts[0])
