"""pyloader.torch: a drop-in torch DataLoader whose batches, order, length and checks are torch's."""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import (  # noqa: E402
    BatchSampler,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data import DataLoader as TorchLoader  # noqa: E402

import pyloader  # noqa: E402
import pyloader.torch as pt  # noqa: E402
from pyloader.torch import DataLoader  # noqa: E402

Pair = collections.namedtuple("Pair", "a b")


class Samples(Dataset):
    """A map-style per-sample dataset; ``kind`` picks the structure of a sample."""

    def __init__(self, n: int = 23, kind: str = "tuple") -> None:
        self.n, self.kind = n, kind

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = np.arange(6, dtype=np.float32).reshape(2, 3) + i
        kind = self.kind
        if kind == "tuple":
            return x, i
        if kind == "dict":
            return {"x": torch.from_numpy(x).T, "y": float(i), "name": f"s{i}", "flag": i % 2 == 0,
                    "p": Pair(np.int16(i), [i, np.float32(i) / 2])}
        if kind == "tensors":
            return torch.full((3,), i, dtype=torch.bfloat16), torch.tensor(i), torch.zeros(2, dtype=torch.uint8)
        if kind == "mixed":  # int and float samples in one leaf: torch promotes, stack cannot
            return (i if i % 2 else float(i)), np.array([i])
        if kind == "list":
            return [x[0], {"k": i}], b"bytes"
        raise AssertionError(kind)


def assert_same(got, want, path="batch"):
    """Tensor-by-tensor equality, with types, dtypes and shapes."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{path}: {got} != {want}"
        assert torch.equal(got, want), f"{path}: {got} != {want}"
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for k, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{k}]")
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want)
    else:
        assert got == want, path


def both(dataset, epochs=2, seed=7, workers=2, mode="auto", **kwargs):
    """Batches of torch's DataLoader and of pyloader's, epoch by epoch, from equal generators."""
    ref = TorchLoader(dataset, generator=torch.Generator().manual_seed(seed), **kwargs)
    ours = DataLoader(dataset, generator=torch.Generator().manual_seed(seed), num_workers=workers, mode=mode,
                      **kwargs)
    assert len(ours) == len(ref)
    return [(list(ref), list(ours)) for _ in range(epochs)]


CONFIGS = {
    "sequential": dict(batch_size=4),
    "shuffle": dict(batch_size=3, shuffle=True),
    "shuffle-drop_last": dict(batch_size=5, shuffle=True, drop_last=True),
    "no-batching": dict(batch_size=None, shuffle=True),
}


@pytest.mark.parametrize("kind", ["tuple", "dict", "tensors", "mixed", "list"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_batches_equal_torch_tensor_by_tensor(kind, config):
    for ref, ours in both(Samples(23, kind), **CONFIGS[config]):
        assert len(ours) == len(ref)
        for want, got in zip(ref, ours):
            assert_same(got, want)


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize(
    "make_sampler",
    [
        lambda ds, g: dict(sampler=SubsetRandomSampler(list(range(3, 20)), generator=g), batch_size=4),
        lambda ds, g: dict(sampler=WeightedRandomSampler([1.0] * 10 + [5.0] * 13, 40, generator=g), batch_size=6),
        lambda ds, g: dict(sampler=RandomSampler(ds, replacement=True, num_samples=30, generator=g), batch_size=7,
                           drop_last=True),
        lambda ds, g: dict(batch_sampler=BatchSampler(RandomSampler(ds, generator=g), 5, False)),
        lambda ds, g: dict(batch_sampler=[[3, 1], [4, 1, 5], [9]]),
        lambda ds, g: dict(sampler=DistributedSampler(ds, num_replicas=3, rank=1, seed=g.initial_seed()), batch_size=2),
    ],
    ids=["subset", "weighted", "replacement", "batch_sampler", "list-batch_sampler", "distributed"],
)
def test_samplers_and_batch_samplers_give_torch_batches(make_sampler, workers):
    ds = Samples(23, "dict")
    ref = TorchLoader(ds, **make_sampler(ds, torch.Generator().manual_seed(3)))
    ours = DataLoader(ds, num_workers=workers, **make_sampler(ds, torch.Generator().manual_seed(3)))
    assert len(ours) == len(ref)
    for _ in range(2):
        for want, got in zip(list(ref), list(ours), strict=True):
            assert_same(got, want)


def test_global_rng_without_generator_gives_torch_order():
    ds = Samples(19)
    torch.manual_seed(11)
    ref = [list(TorchLoader(ds, batch_size=4, shuffle=True)) for _ in range(2)]
    torch.manual_seed(11)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
    for want in ref:
        for w, g in zip(want, list(loader), strict=True):
            assert_same(g, w)


class BatchSeq:
    """A batch Sequence (a dataset of whole batches) for batch_size=None."""

    def __len__(self):
        return 9

    def __getitem__(self, i):
        return np.full((4, 3), i, np.float32), np.arange(4) + i, {"id": np.int64(i), "name": "b"}


def test_batch_sequences_with_batch_size_none_are_converted_like_torch():
    for ref, ours in both(BatchSeq(), batch_size=None, shuffle=True):
        for want, got in zip(ref, ours, strict=True):
            assert_same(got, want)


@pytest.mark.parametrize("dataset", [
    TensorDataset(torch.arange(120.0).reshape(40, 3), torch.arange(40)),
    TensorDataset(torch.arange(40, dtype=torch.int16)),
    np.arange(200, dtype=np.uint8).reshape(40, 5),
    torch.arange(80.0).reshape(40, 2),
], ids=["TensorDataset", "TensorDataset-1", "ndarray", "tensor"])
@pytest.mark.parametrize("config", ["sequential", "shuffle", "shuffle-drop_last"])
def test_array_datasets_are_gathered_natively_and_equal_torch(dataset, config):
    ours = DataLoader(dataset, generator=torch.Generator().manual_seed(5), num_workers=2, **CONFIGS[config])
    it = iter(ours)
    assert isinstance(it._seq, pyloader.ArraySequence)  # the native gather path, no Python per batch
    del it
    for ref, got in both(dataset, **CONFIGS[config]):
        for w, g in zip(ref, got, strict=True):
            assert_same(g, w)


def test_array_rows_that_are_not_contiguous_are_fetched_in_python_and_equal_torch():
    dataset = TensorDataset(torch.arange(320.0).reshape(4, 40, 2).permute(1, 0, 2), torch.arange(40))
    it = iter(DataLoader(dataset, batch_size=3, shuffle=True))
    assert it._seq is None
    del it
    for ref, got in both(dataset, batch_size=3, shuffle=True):
        for w, g in zip(ref, got, strict=True):
            assert_same(g, w)


def test_custom_collate_fn_runs_in_a_worker_and_keeps_its_types():
    main = threading.get_ident()
    seen = set()

    def collate(samples):
        seen.add(threading.get_ident())
        xs = torch.stack([torch.from_numpy(x) for x, _ in samples])
        return {"x": xs, "y": np.array([y for _, y in samples]), "n": len(samples)}

    for ref, ours in both(Samples(10), batch_size=4, collate_fn=collate, mode="thread"):
        for want, got in zip(ref, ours, strict=True):
            assert isinstance(got["x"], torch.Tensor) and isinstance(got["y"], np.ndarray)
            assert_same(got, want)
    assert seen and main not in seen - {main} and any(t != main for t in seen)


def test_tensors_are_zero_copy_views_that_keep_their_slot_leased():
    it = iter(DataLoader(Samples(4), batch_size=4, num_workers=1))  # one batch
    x, y = next(it)
    info = it._prefetcher.memory_info
    deadline = time.monotonic() + 5
    while info()["leased"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    want = torch.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3)) + torch.arange(4).view(4, 1, 1)
    del y
    assert info()["leased"] == 1  # x alone keeps the batch's slot buffer
    assert torch.equal(x, want)
    del x
    assert info()["leased"] == 0  # it was the last owner: the tensor was a view, not a copy
    assert list(it) == []


def test_persistent_worker_threads_load_every_pass_on_the_same_prefetcher():
    """Torch's batches every epoch (base_seed is drawn once, as torch does, so the generator's
    stream stays aligned), all from one Prefetcher: the same worker threads."""
    ds = Samples(23)
    ref = TorchLoader(ds, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                      generator=torch.Generator().manual_seed(8))
    ours = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                      generator=torch.Generator().manual_seed(8))
    kept = None
    for epoch in range(3):
        for w, g in zip(list(ref), list(ours), strict=True):
            assert_same(g, w, f"epoch {epoch}")
        kept = kept or ours._kept[1]
        assert ours._kept[1] is kept  # the same Prefetcher, so the same worker threads
    it = iter(ours)
    next(it)
    iter(ours)  # a new pass takes the workers: the unfinished one ends with a clear error
    with pytest.raises(RuntimeError, match="replaced by a newer iter"):
        next(it)


def test_it_is_a_torch_dataloader_with_torchs_attributes():
    ds = Samples(10)
    ours, ref = DataLoader(ds, batch_size=3, shuffle=True), TorchLoader(ds, batch_size=3, shuffle=True)
    assert isinstance(ours, TorchLoader)
    assert type(ours.sampler) is type(ref.sampler) and type(ours.batch_sampler) is type(ref.batch_sampler)
    assert (ours.batch_size, ours.drop_last, ours.collate_fn) == (ref.batch_size, ref.drop_last, ref.collate_fn)
    assert "batch_size=3" in repr(ours)


def test_len_is_torch_len():
    ds = Samples(23)
    for kwargs in (dict(), dict(batch_size=4), dict(batch_size=4, drop_last=True), dict(batch_size=None),
                   dict(batch_sampler=[[1], [2, 3]]), dict(sampler=range(7), batch_size=3)):
        assert len(DataLoader(ds, **kwargs)) == len(TorchLoader(ds, **kwargs)), kwargs


@pytest.fixture
def one_torch_thread():
    """Torch's OpenMP threads spin while they wait: on a busy 2-core machine a tiny model then
    steps 100x slower. One intra-op thread keeps the test about the loader."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_training_loop_with_sgd_reduces_the_loss(one_torch_thread):
    from sequences import sgd_losses

    losses = sgd_losses(DataLoader)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("stop", [0, 3, 5])
@pytest.mark.parametrize("config", ["shuffle", "no-batching"])
def test_state_dict_resumes_exactly_this_epoch_and_the_next(stop, config):
    ds = Samples(23)
    ref = DataLoader(ds, generator=torch.Generator().manual_seed(9), num_workers=2, **CONFIGS[config])
    want = list(ref) + list(ref) + list(ref)
    per_epoch = len(ref)

    first = DataLoader(ds, generator=torch.Generator().manual_seed(9), num_workers=2, **CONFIGS[config])
    got = list(first)
    it = iter(first)
    got += [next(it) for _ in range(stop)]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == stop
    del it

    second = DataLoader(ds, generator=torch.Generator().manual_seed(1234), num_workers=1, **CONFIGS[config])
    second.load_state_dict(state)
    got += list(second)
    assert len(got) == 2 * per_epoch
    got += list(second)
    for w, g in zip(want, got, strict=True):
        assert_same(g, w)


def test_state_dict_after_the_last_batch_resumes_at_the_next_epoch():
    loader = DataLoader(Samples(8), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))
    it = iter(loader)
    next(it), next(it)  # every batch, but the loop has not seen StopIteration yet
    state = loader.state_dict()
    assert (state["epoch"], state["batches_consumed"], state["remaining"]) == (1, 0, None)
    ref = DataLoader(Samples(8), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))
    list(ref)
    resumed = DataLoader(Samples(8), batch_size=4, shuffle=True, generator=torch.Generator())
    resumed.load_state_dict(state)
    for w, g in zip(list(ref), list(resumed), strict=True):
        assert_same(g, w)


class Failing(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i == 7:
            raise KeyError(f"no sample {i}")
        return np.zeros(2, np.float32), i


@pytest.mark.parametrize(("workers", "mode"), [(0, "auto"), (2, "thread"), (2, "process")])
def test_a_failing_sample_raises_its_own_type_naming_its_index_and_iteration_goes_on(workers, mode):
    it = iter(DataLoader(Failing(), batch_size=3, num_workers=workers, mode=mode))
    got = []
    with pytest.raises(KeyError, match="no sample 7") as info:  # torch re-raises the type too
        while True:
            got.append(next(it)[1].tolist())
    kind = "process" if mode == "process" else "thread"
    assert any(f"DataLoader worker {kind} " in n and "raised by dataset[7] (dataset indices [6, 7, 8]) while "
               "loading batch 2 of epoch 0" in n for n in info.value.__notes__), info.value.__notes__
    assert got == [[0, 1, 2], [3, 4, 5]]
    assert [b[1].tolist() for b in it] == [[9]]  # like torch's iterator, the next batch follows


def test_samples_torch_accepts_but_the_native_stack_refuses_are_collated_by_torch():
    class Keys(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"a": i, "b": np.float32(i)} if i % 2 else {"b": np.float32(i), "a": i}

    with pytest.warns(pt.StackFallbackWarning, match="batch 0 of epoch 0: pyloader.stack"):
        ref, ours = both(Keys(), epochs=1, batch_size=2)[0]
    for want, got in zip(ref, ours, strict=True):
        assert_same(got, want)


def test_samples_torch_refuses_fail_with_torch_error_and_batch_index():
    class Ragged(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.zeros(i)

    with pytest.raises(RuntimeError) as torch_error:
        list(TorchLoader(Ragged(), batch_size=2))
    with pytest.raises(RuntimeError) as ours:
        list(DataLoader(Ragged(), batch_size=2))
    assert type(ours.value) is type(torch_error.value) and str(ours.value) == str(torch_error.value)
    assert any("torch's default_collate" in n and "batch 0 of epoch 0" in n for n in ours.value.__notes__)


def test_worker_init_fn_runs_once_in_each_worker_thread():
    calls = []

    def init(worker_id):
        calls.append((worker_id, threading.get_ident()))

    loader = DataLoader(Samples(40), batch_size=2, num_workers=2, worker_init_fn=init, mode="thread")
    assert len(list(loader)) == 20
    ids = sorted(w for w, _ in calls)
    assert ids in ([0], [0, 1]) and len({t for _, t in calls}) == len(calls)
    assert threading.get_ident() not in {t for _, t in calls}


def test_timeout_raises_torch_error():
    class Slow(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            time.sleep(0.6)
            return i

    it = iter(DataLoader(Slow(), batch_size=1, num_workers=1, timeout=0.2))
    with pytest.raises(RuntimeError, match=r"^DataLoader timed out after 0.2 seconds$"):
        next(it)


def test_an_iterable_dataset_is_loaded_by_pyloader_not_torch():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(10))

    loader = DataLoader(Stream(), batch_size=4)  # no fallback, no warning (tests/test_torch_streams.py)
    assert isinstance(loader.__iter__().stream, pyloader.Stream)
    assert [b.tolist() for b in loader] == [b.tolist() for b in TorchLoader(Stream(), batch_size=4)]


def test_auto_sharding_follows_distributed_sampler(monkeypatch):
    """Without a process group this fakes one; the real two-process run is test_ddp_..."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 2)
    ds = Samples(22)
    ours = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
    ref_sampler = DistributedSampler(ds, num_replicas=3, rank=2, shuffle=True, seed=0)
    ref = TorchLoader(ds, batch_size=4, sampler=ref_sampler)
    assert len(ours) == len(ref) == 2
    for epoch in range(3):
        ref_sampler.set_epoch(epoch)  # pyloader advances the epoch by itself
        for w, g in zip(list(ref), list(ours), strict=True):
            assert_same(g, w)
    explicit = DataLoader(ds, batch_size=4, sampler=SequentialSampler(ds))  # opting out
    assert len(explicit) == 6


# ---- torch's argument checks, replicated -------------------------------------------------------

class Tiny(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return i


BAD_ARGUMENTS = {
    "num_workers<0": dict(num_workers=-1),
    "timeout<0": dict(timeout=-1),
    "prefetch_factor without workers": dict(prefetch_factor=2),
    "prefetch_factor<0": dict(num_workers=1, prefetch_factor=-1),
    "persistent without workers": dict(persistent_workers=True),
    "sampler and shuffle": dict(sampler=[0, 1], shuffle=True),
    "batch_sampler and batch_size": dict(batch_sampler=[[0]], batch_size=2),
    "batch_sampler and shuffle": dict(batch_sampler=[[0]], shuffle=True),
    "batch_sampler and sampler": dict(batch_sampler=[[0]], sampler=[0]),
    "batch_sampler and drop_last": dict(batch_sampler=[[0]], drop_last=True),
    "no batching and drop_last": dict(batch_size=None, drop_last=True),
    "batch_size=0": dict(batch_size=0),
    "batch_size=1.5": dict(batch_size=1.5),
    "drop_last not a bool": dict(drop_last="yes"),
    "context without workers": dict(multiprocessing_context="spawn"),
    "unknown start method": dict(num_workers=1, multiprocessing_context="teleport"),
    "context of a wrong type": dict(num_workers=1, multiprocessing_context=3),
}


@pytest.mark.parametrize("bad", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_torchs_exception_and_message(bad):
    kwargs = BAD_ARGUMENTS[bad]
    with pytest.raises(Exception) as want:
        TorchLoader(Tiny(), **kwargs)
    with pytest.raises(Exception) as got:
        DataLoader(Tiny(), **kwargs)
    assert type(got.value) is type(want.value)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize(
    "attr", ["batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers"])
def test_attributes_torch_freezes_are_frozen(attr):
    with pytest.raises(ValueError) as want:
        setattr(TorchLoader(Tiny()), attr, None)
    with pytest.raises(ValueError) as got:
        setattr(DataLoader(Tiny()), attr, None)
    assert str(got.value) == str(want.value)


def test_iteration_warnings_and_checks_are_torchs():
    def caught(make):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                iter(make())
            except AssertionError as exc:
                return ["AssertionError: " + str(exc)]
        return sorted(str(x.message) for x in w)

    for kwargs in (dict(pin_memory=True), dict(pin_memory=True, pin_memory_device="cuda"), dict(timeout=1)):
        want = caught(lambda kw=kwargs: TorchLoader(Tiny(), **kw))
        assert want, kwargs
        assert caught(lambda kw=kwargs: DataLoader(Tiny(), **kw)) == want, kwargs


def test_more_workers_than_cpus_warns_like_torch():
    many = (torch._utils.cpu_count() or 1) + 1
    with pytest.warns(UserWarning) as want:
        TorchLoader(Tiny(), num_workers=many)
    with pytest.warns(UserWarning) as got:
        DataLoader(Tiny(), num_workers=many)
    assert [str(w.message) for w in got] == [str(w.message) for w in want]


def test_an_unknown_mode_fails_at_construction():
    with pytest.raises(ValueError, match="mode"):
        DataLoader(Tiny(), mode="fibers")


# ---- prefetch ----------------------------------------------------------------------------------

def test_prefetch_on_cpu_yields_tensor_views_without_a_copy():
    with pt.prefetch(BatchSeq(), workers=2) as batches:
        assert len(batches) == 9
        for _epoch in range(2):
            got = list(batches)
            assert len(got) == 9
            for i, (x, y, extra) in enumerate(got):
                assert isinstance(x, torch.Tensor) and torch.equal(x, torch.full((4, 3), float(i)))
                assert torch.equal(y, torch.arange(4) + i) and extra["name"] == "b"
    info = batches.prefetcher.memory_info  # closed: only the batches still referenced hold slots
    assert info()["leased"] == 9  # each batch's tensors are views of its slot buffer: no copy
    del got, x, y, extra
    assert info()["leased"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device on this machine: the device-copy path (pinned slots, "
                           "non_blocking copies on a side stream) is not exercised")
def test_prefetch_to_cuda_copies_ahead_on_a_side_stream():
    with pt.prefetch(BatchSeq(), "cuda", workers=2, ahead=3) as batches:
        assert batches.prefetcher.memory_info()["pin_method"] == "cuda"
        for i, (x, y, _) in enumerate(batches):
            assert x.is_cuda and y.is_cuda
            assert torch.equal(x.cpu(), torch.full((4, 3), float(i)))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device on this machine: pinned DataLoader batches are not exercised")
def test_pin_memory_batches_are_pinned_views():
    for x, _ in DataLoader(Samples(8), batch_size=4, pin_memory=True, num_workers=2):
        assert x.is_pinned()


# ---- two real processes ------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.utils.data import Dataset, DistributedSampler
    from pyloader.torch import DataLoader

    class Points(Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            x = torch.full((4,), float(i) / 50)
            return x, torch.tensor(float(i % 2)), i

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(Points(), batch_size=4, shuffle=True, num_workers=2)
    ref_sampler = DistributedSampler(Points(), shuffle=True, seed=0)
    ref = torch.utils.data.DataLoader(Points(), batch_size=4, sampler=ref_sampler)
    epochs, matches, losses = [], [], []
    for epoch in range(2):
        ref_sampler.set_epoch(epoch)
        seen = []
        for x, y, idx in loader:
            loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            seen += idx.tolist()
        epochs.append(seen)
        matches.append(seen == [i for _, _, b in ref for i in b.tolist()])
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"epochs": epochs, "matches": matches, "losses": losses, "len": len(loader)}, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_gloo_on_two_processes_shards_disjointly_and_covers_the_dataset(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=tmp_path,
                         env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        a, b = (set(r["epochs"][epoch]) for r in ranks)
        assert not a & b, "the ranks' samples overlap"
        assert a | b == set(range(50)), "the ranks' samples do not cover the dataset"
        assert len(ranks[0]["epochs"][epoch]) == len(ranks[1]["epochs"][epoch]) == 25
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1], "no new order in the second epoch"
    assert all(all(r["matches"]) for r in ranks), "not the batches of torch's DistributedSampler"
    assert ranks[0]["len"] == 7


# ---- mode="process" ----------------------------------------------------------------------------
# Worker processes, killed for real: each scenario runs in a fresh interpreter with a timeout
# (conftest.run_python), so that a hang or a stray process fails one test, not the suite. The
# scenarios import this module's datasets (they run in tests/) and print "OK" at the end.

PROC_PRELUDE = """
import gc, glob, multiprocessing, os, signal, sys, time
import numpy as np
import psutil
import torch
from torch.utils.data import Dataset
from torch.utils.data import DataLoader as TorchLoader
import pyloader
from pyloader.torch import DataLoader
from test_torch import CONFIGS, Samples, assert_same
"""

process_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process mode tests fork")


def run_ok(body: str, *, timeout: float = 120.0, env: dict[str, str] | None = None) -> str:
    from conftest import run_python

    r = run_python(PROC_PRELUDE + textwrap.dedent(body), timeout=timeout, env=env)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


@process_only
def test_process_mode_batches_equal_torch_batch_for_batch():
    run_ok("""
    import warnings
    warnings.simplefilter("ignore", pyloader.torch.StackFallbackWarning)  # kind "mixed"
    for kind in ["tuple", "dict", "tensors", "mixed", "list"]:
        for name, config in CONFIGS.items():
            ds = Samples(23, kind)
            ref = TorchLoader(ds, generator=torch.Generator().manual_seed(7), **config)
            ours = DataLoader(ds, generator=torch.Generator().manual_seed(7), num_workers=2, mode="process",
                              **config)
            assert len(ours) == len(ref)
            for epoch in range(2):
                want, it = list(ref), iter(ours)
                assert len(it.worker_pids()) == 2 and os.getpid() not in it.worker_pids()
                got = list(it)
                assert len(got) == len(want), (kind, name, epoch)
                for w, g in zip(want, got):
                    assert_same(g, w, f"{kind}/{name}/epoch {epoch}")
    # persistent workers: torch draws base_seed once; the generator's stream stays aligned
    ds = Samples(9)
    ref = TorchLoader(ds, batch_size=4, shuffle=True, num_workers=1, persistent_workers=True,
                      generator=torch.Generator().manual_seed(4))
    ours = DataLoader(ds, batch_size=4, shuffle=True, num_workers=1, persistent_workers=True,
                      generator=torch.Generator().manual_seed(4), mode="process")
    for _ in range(3):
        for w, g in zip(list(ref), list(ours), strict=True):
            assert_same(g, w)
    # a state_dict taken mid-epoch resumes in a new DataLoader with new worker processes
    config = CONFIGS["shuffle"]
    want = list(DataLoader(Samples(23), generator=torch.Generator().manual_seed(9), num_workers=2,
                           mode="process", **config))
    first = DataLoader(Samples(23), generator=torch.Generator().manual_seed(9), num_workers=2, mode="process",
                       **config)
    it = iter(first)
    got = [next(it) for _ in range(3)]
    state = first.state_dict()
    del it
    second = DataLoader(Samples(23), generator=torch.Generator().manual_seed(0), num_workers=2, mode="process",
                        **config)
    second.load_state_dict(state)
    got += list(second)
    for w, g in zip(want, got, strict=True):
        assert_same(g, w)
    # in-memory arrays need no Python per batch: native threads gather them in either mode
    from torch.utils.data import TensorDataset
    tensors = TensorDataset(torch.arange(60.0).view(20, 3), torch.arange(20))
    ref = TorchLoader(tensors, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(2))
    ours = DataLoader(tensors, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(2),
                      num_workers=2, mode="process")
    for _ in range(2):
        it = iter(ours)
        assert it.worker_pids() == []
        for w, g in zip(list(ref), list(it), strict=True):
            assert_same(g, w)
    # num_workers=0 means one worker process
    it = iter(DataLoader(Samples(10), batch_size=4, mode="process"))
    assert len(it.worker_pids()) == 1 and os.getpid() not in it.worker_pids()
    assert [b[1].tolist() for b in it] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    print("OK")
    """)


@process_only
def test_process_mode_multiprocessing_context_picks_how_workers_start():
    run_ok("""
    for context in ["spawn", multiprocessing.get_context("forkserver"), None]:
        ds = Samples(23, "dict")
        ref = TorchLoader(ds, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1))
        ours = DataLoader(ds, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1),
                          num_workers=2, mode="process", multiprocessing_context=context)
        it = iter(ours)
        name = context if context is None or isinstance(context, str) else context.get_start_method()
        assert it._prefetcher.start_method == (name or "fork"), it._prefetcher.start_method
        for w, g in zip(list(ref), list(it), strict=True):
            assert_same(g, w)
    try:
        iter(DataLoader(Samples(5), batch_size=2, num_workers=1, mode="process",
                        multiprocessing_context="spawn", collate_fn=lambda batch: batch))
    except TypeError as e:
        assert "collate_fn" in str(e) and "multiprocessing_context='spawn'" in str(e), e
    else:
        raise AssertionError("an unpicklable collate_fn was accepted for spawn")
    print("OK")
    """, timeout=180)


@process_only
def test_process_mode_training_loop_with_sgd_reduces_the_loss():
    run_ok("""
    from sequences import sgd_losses
    torch.set_num_threads(1)
    losses = sgd_losses(DataLoader, mode="process")
    assert losses[-1] < 0.5 * losses[0], losses
    print("OK")
    """)


@process_only
def test_process_mode_a_sigkilled_worker_mid_epoch_still_yields_every_batch(tmp_path):
    run_ok(f"""
    class Slow(Samples):
        def __getitem__(self, i):
            time.sleep(0.005)
            return super().__getitem__(i)

    def init(worker_id):
        open(os.path.join({str(tmp_path)!r}, f"init-{{worker_id}}-{{os.getpid()}}"), "w").close()

    ds = Slow(160, "dict")
    ref = list(TorchLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)))
    loader = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5),
                        num_workers=2, worker_init_fn=init, mode="process")
    it = iter(loader)
    got, victim = [], None
    for k, batch in enumerate(it):
        got.append(batch)
        if k == 5:
            before = it.worker_pids()
            victim = before[1]
            os.kill(victim, signal.SIGKILL)
        if k == 30:
            after = it.worker_pids()
            assert victim not in after and after[0] == before[0], (before, after)
    assert len(got) == len(ref) == 40
    for w, g in zip(ref, got):
        assert_same(g, w)
    inits = sorted(os.path.basename(f) for f in glob.glob(os.path.join({str(tmp_path)!r}, "init-*")))
    assert inits == sorted([f"init-0-{{before[0]}}", f"init-1-{{victim}}", f"init-1-{{after[1]}}"]), inits
    print("OK")
    """)


@process_only
def test_process_mode_worker_init_fn_runs_in_each_worker_process_like_torchs(tmp_path):
    run_ok(f"""
    import json
    out = {str(tmp_path)!r}

    class Checked(Samples):
        def __getitem__(self, i):
            assert torch.utils.data.get_worker_info().dataset is self  # the worker's own copy
            return super().__getitem__(i)

    def init(worker_id):
        info = torch.utils.data.get_worker_info()
        record = dict(id=worker_id, pid=os.getpid(), info_id=info.id, num_workers=info.num_workers,
                      seed=info.seed, torch_seed=torch.initial_seed(), threads=torch.get_num_threads(),
                      dataset=type(info.dataset).__name__)
        with open(os.path.join(out, f"{{os.getpid()}}.tmp"), "w") as f:
            json.dump(record, f)
        os.rename(f.name, os.path.join(out, f"{{os.getpid()}}.json"))  # whole, or not there

    def records(pids):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(glob.glob(os.path.join(out, "*.json"))) < len(pids):
            time.sleep(0.02)
        found = {{}}
        for path in glob.glob(os.path.join(out, "*.json")):
            with open(path) as f:
                r = json.load(f)
            found[r["pid"]] = r
            os.remove(path)
        assert set(found) == set(pids), (found, pids)
        return found

    def epoch_seeds(loader):
        it = iter(loader)
        pids = it.worker_pids()
        assert len(pids) == 2 and os.getpid() not in pids
        got = records(pids)
        for slot, pid in enumerate(pids):
            r = got[pid]
            assert r["id"] == r["info_id"] == slot and r["num_workers"] == 2, r
            assert r["seed"] == r["torch_seed"] and r["threads"] == 1 and r["dataset"] == "Checked", r
        assert len(list(it)) == 20
        return [got[pid]["seed"] for pid in pids]

    def seeds(generator_seed):
        loader = DataLoader(Checked(40), batch_size=2, num_workers=2, worker_init_fn=init, mode="process",
                            shuffle=True, generator=torch.Generator().manual_seed(generator_seed))
        return [epoch_seeds(loader) for _ in range(2)]

    first = seeds(3)
    assert len(set(first[0] + first[1])) == 4, first  # per worker and per epoch
    assert seeds(3) == first  # reproducible from the generator
    assert seeds(4) != first
    assert torch.utils.data.get_worker_info() is None  # the consumer is no worker
    print("OK")
    """)


@process_only
def test_process_mode_persistent_workers_keep_their_processes_and_state_across_epochs(tmp_path):
    run_ok(f"""
    class Counting(Samples):
        # Each worker process's copy counts the samples it served: a persistent copy keeps counting.
        served = 0

        def __getitem__(self, i):
            type(self).served += 1
            x, y = super().__getitem__(i)
            return x, y, type(self).served

    def init(worker_id):
        open(os.path.join({str(tmp_path)!r}, f"init-{{worker_id}}-{{os.getpid()}}"), "w").close()

    ds = Counting(40)
    ref = TorchLoader(Samples(40), batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                      generator=torch.Generator().manual_seed(3))
    ours = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                      worker_init_fn=init, generator=torch.Generator().manual_seed(3), mode="process")
    me = psutil.Process()
    pids = None
    for epoch in range(3):
        it = iter(ours)
        workers = it.worker_pids()
        got, want = list(it), list(ref)
        assert len(got) == len(want) == 10
        for g, w in zip(got, want):
            assert_same(g[:2], w, f"epoch {{epoch}}")  # torch's batches, in torch's order, every epoch
        if pids is None:
            pids = sorted(p.pid for p in me.children(recursive=True))
        assert sorted(p.pid for p in me.children(recursive=True)) == pids  # no new process
        served = max(int(b[2].max()) for b in got)
        assert served > 20 * epoch, (epoch, served)  # the copies kept counting
    inits = glob.glob(os.path.join({str(tmp_path)!r}, "init-*"))
    assert len(inits) == 2, inits  # worker_init_fn ran once per worker, not per epoch

    # A worker killed between passes: its successor gets the current pass's batches.
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    for epoch in range(2):
        it = iter(ours)
        got, want = list(it), list(ref)
        for g, w in zip(got, want, strict=True):
            assert_same(g[:2], w, f"after the kill, epoch {{epoch}}")
    assert victim not in iter(ours).worker_pids()
    list(ref)  # that iter() abandoned a pass: keep torch's generator in step

    # A new pass takes the workers over from an unfinished one.
    old = iter(ours)
    next(old)
    new = iter(ours)
    try:
        next(old)
    except RuntimeError as e:
        assert "replaced by a newer iter()" in str(e), e
    else:
        raise AssertionError("a replaced iterator went on")
    want = list(ref)
    want = list(ref)  # one epoch for the abandoned pass, one for the new pass
    got = list(new)
    for g, w in zip(got, want, strict=True):
        assert_same(g[:2], w, "after an abandoned pass")

    # state_dict mid-epoch, resumed on persistent workers: the rest, then whole epochs again.
    it = iter(ours)
    head = [next(it) for _ in range(3)]
    state = ours.state_dict()
    rest = list(it)
    resumed = DataLoader(Counting(40), batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                         generator=torch.Generator().manual_seed(0), mode="process")
    resumed.load_state_dict(state)
    for g, w in zip(list(resumed), rest, strict=True):
        assert_same(g[:2], w[:2], "resumed")
    assert len(list(resumed)) == 10
    del ours, resumed, it, old, new, ref
    gc.collect()
    assert me.children(recursive=True) == [], me.children(recursive=True)
    print("OK")
    """)


@process_only
def test_process_mode_leaves_no_child_processes():
    run_ok("""
    me = psutil.Process()
    ds = Samples(40)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, mode="process")
    assert me.children(recursive=True) == []  # construction starts nothing
    for epoch in range(2):
        assert len(list(loader)) == 10
        assert me.children(recursive=True) == [], me.children(recursive=True)
    for batch in loader:  # an unfinished pass: its iterator is gone at once, and so are its workers
        break
    del batch
    assert me.children(recursive=True) == []
    old = iter(loader)
    next(old)
    pids = old.worker_pids()
    new = iter(loader)  # a new pass retires the unfinished one: its workers end
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    try:
        next(old)
    except RuntimeError as e:
        assert "replaced by a newer iter()" in str(e), e
    else:
        raise AssertionError("a retired iterator went on")
    assert len(list(new)) == 10
    it = iter(loader)
    next(it)
    assert len(me.children(recursive=True)) == 3  # a zygote and its two workers
    del loader, it, old, new
    gc.collect()
    assert me.children(recursive=True) == [], me.children(recursive=True)
    print("OK")
    """)


@process_only
def test_process_mode_sample_errors_and_timeouts_are_torchs():
    run_ok("""
    class Bad(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 4:
                raise KeyError(f"no {i}")
            if i == 9:
                time.sleep(2)
            return i

    it = iter(DataLoader(Bad(), batch_size=2, num_workers=2, mode="process"))
    assert [next(it).tolist() for _ in range(2)] == [[0, 1], [2, 3]]
    pids = it.worker_pids()
    try:
        next(it)
    except KeyError as e:
        assert "no 4" in str(e)
        assert any("raised by dataset[4] (dataset indices [4, 5]) while loading batch 2 of epoch 0" in n
                   for n in e.__notes__), e.__notes__
        assert any("Traceback in worker process" in n for n in e.__notes__)
    else:
        raise AssertionError("no KeyError")
    assert it.worker_pids() == pids  # the same worker processes go on after a failed sample
    assert [b.tolist() for b in it] == [[6, 7], [8, 9]]  # iteration goes on after the error

    it = iter(DataLoader(Bad(), batch_size=2, num_workers=1, mode="process", timeout=0.3))
    got = []
    try:
        while True:
            got.append(next(it).tolist())
    except KeyError:
        pass
    try:
        while True:
            got.append(next(it).tolist())
    except RuntimeError as e:
        assert str(e) == "DataLoader timed out after 0.3 seconds", e
    assert got == [[0, 1], [2, 3], [6, 7]], got
    print("OK")
    """)
