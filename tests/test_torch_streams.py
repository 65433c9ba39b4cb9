"""pyloader.torch.DataLoader over an IterableDataset, side by side with torch's own DataLoader."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader as TorchLoader  # noqa: E402
from torch.utils.data import IterableDataset, get_worker_info  # noqa: E402

import pyloader.torch as pt  # noqa: E402


class Sharded(IterableDataset):
    """Shards itself by worker id (uneven: worker k gets the items i with i % num_workers == k);
    each item records the worker's id and seed, and a draw from torch's generator."""

    def __init__(self, n: int, *, fail_at: int | None = None) -> None:
        self.n = n
        self.fail_at = fail_at
        self.tag = 0  # set by worker_init_fn in the worker's copy

    def __iter__(self):
        info = get_worker_info()
        first, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(first, self.n, step):
            if i == self.fail_at:
                raise KeyError(f"item {i}")
            yield {
                "i": torch.tensor(i),
                "worker": -1 if info is None else info.id,
                "seed": torch.initial_seed() % 100_000,
                "draw": torch.randint(0, 1000, (2,)),
                "tag": self.tag,
            }


def tag_worker(worker_id: int) -> None:
    get_worker_info().dataset.tag = 10 + worker_id


def plain(batch):
    if isinstance(batch, torch.Tensor):
        return ("tensor", str(batch.dtype), batch.tolist())
    if isinstance(batch, dict):
        return {k: plain(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [plain(v) for v in batch]
    return batch


def run(cls, dataset, epochs: int = 1, **kwargs):
    """Every epoch's batches, or the exception type where a next() raised (the loop goes on)."""
    torch.manual_seed(123)  # num_workers=0 draws from the global generator, in both
    loader = cls(dataset, generator=torch.Generator().manual_seed(7), **kwargs)
    out = []
    for _ in range(epochs):
        it = iter(loader)
        while True:
            try:
                out.append(plain(next(it)))
            except StopIteration:
                break
            except Exception as error:  # noqa: BLE001 - compared by type with torch's
                out.append(("raised", type(error).__name__))
    return out


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers", [0, 1, 3])
@pytest.mark.parametrize("batching", [dict(batch_size=None), dict(batch_size=4), dict(batch_size=4, drop_last=True)])
def test_same_batches_order_worker_ids_and_seeds_as_torch(num_workers, batching):
    kwargs = dict(num_workers=num_workers, **batching)
    assert run(pt.DataLoader, Sharded(23), **kwargs) == run(TorchLoader, Sharded(23), **kwargs)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_persistent_workers_worker_init_fn_and_collate_fn_as_torch():
    def collate(items):
        return [int(x["i"]) * 2 for x in items], torch.stack([x["draw"] for x in items])

    kwargs = dict(num_workers=2, batch_size=3, persistent_workers=True, worker_init_fn=tag_worker)
    assert run(pt.DataLoader, Sharded(11), epochs=2, **kwargs) == run(TorchLoader, Sharded(11), epochs=2, **kwargs)
    kwargs = dict(num_workers=2, batch_size=3, collate_fn=collate)
    assert run(pt.DataLoader, Sharded(11), **kwargs) == run(TorchLoader, Sharded(11), **kwargs)


def test_an_exception_in_a_workers_iterator_is_the_users_type_and_the_loop_goes_on():
    kwargs = dict(num_workers=2, batch_size=2)
    ours = run(pt.DataLoader, Sharded(12, fail_at=5), **kwargs)
    assert ours == run(TorchLoader, Sharded(12, fail_at=5), **kwargs)
    assert ("raised", "KeyError") in ours
    loader = pt.DataLoader(Sharded(12, fail_at=5), **kwargs)
    with pytest.raises(KeyError) as caught:
        list(loader)
    notes = "\n".join(caught.value.__notes__)
    assert "Caught KeyError in DataLoader worker process 1" in notes and "shard 1" in notes


def test_thread_mode_with_workers_uses_processes_and_says_so():
    with pytest.warns(UserWarning, match="get_worker_info"):
        loader = pt.DataLoader(Sharded(7), num_workers=2, mode="thread")
    assert iter(loader).stream.mode == "process"
    with pytest.warns(UserWarning, match="get_worker_info"):
        ours = run(pt.DataLoader, Sharded(7), num_workers=2, batch_size=2, mode="thread")
    assert ours == run(TorchLoader, Sharded(7), num_workers=2, batch_size=2)
    assert run(pt.DataLoader, Sharded(5), num_workers=0, mode="thread") == run(TorchLoader, Sharded(5))


class Regression(IterableDataset):
    """y = 3x - 1 with noise, sharded by worker."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        g = torch.Generator().manual_seed(0 if info is None else info.id)
        for _ in range(0 if info is None else info.id, self.n, 1 if info is None else info.num_workers):
            x = torch.rand(1, generator=g)
            yield x, 3 * x - 1


def test_a_training_loop_over_an_iterable_dataset_learns():
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = pt.DataLoader(Regression(256), batch_size=16, num_workers=2)
    losses = []
    for _ in range(6):
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert len(losses) == 6 * 16
    assert losses[-1] < 0.1 * losses[0]


class Longer(IterableDataset):
    """Says it has 5 items and yields 8 (torch warns past len(loader), once len() was asked)."""

    def __len__(self) -> int:
        return 5

    def __iter__(self):
        return iter(range(8))


def test_yielding_past_len_warns_as_torch_once_len_was_taken():
    def warnings_of(cls):
        import warnings

        loader = cls(Longer(), batch_size=None)
        assert len(loader) == 5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert list(loader) == list(range(8))
        return [str(w.message).split("(when")[1] for w in caught if "Length of IterableDataset" in str(w.message)]

    ours = warnings_of(pt.DataLoader)
    assert ours == warnings_of(TorchLoader) and len(ours) == 3


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("num_workers, persistent", [(0, False), (2, False), (2, True)])
def test_a_shuffling_datapipe_is_seeded_and_sharded_as_torch_does(num_workers, persistent):
    from torch.utils.data.datapipes.iter import IterableWrapper

    def batches(cls):
        pipe = IterableWrapper(list(range(30))).shuffle(buffer_size=7).sharding_filter()
        loader = cls(pipe, batch_size=4, num_workers=num_workers, shuffle=True, persistent_workers=persistent,
                     generator=torch.Generator().manual_seed(3))
        return [[b.tolist() for b in loader] for _ in range(3)]

    ours = batches(pt.DataLoader)
    assert ours == batches(TorchLoader)
    assert ours[0] != ours[1]  # a new seed every pass
