"""The cases of tests/test_jax.py that run in one JAX process, each in a fresh interpreter.

JAX, once initialised, warns at every ``os.fork()`` (its runtime is multithreaded), and the test
suite turns warnings into errors: so jax is never initialised in the pytest process, and
test_jax.py runs each ``test_*`` function here as ``python -c "import _jax_cases; ..."``.
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pyloader
import pyloader.jax as pj


class Regression:
    """Sample j: features x_j and the target w . x_j + b (w, b fixed), float32."""

    def __init__(self, n: int = 512, dim: int = 4) -> None:
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(n, dim)).astype(np.float32)
        self.w = np.arange(1, dim + 1, dtype=np.float32)
        self.y = (self.x @ self.w + 0.5).astype(np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, j: int):
        return self.x[j], self.y[j]


def test_a_jax_training_loop_learns_from_prefetched_batches():
    def loss(params, x, y):
        w, b = params
        return jnp.mean((x @ w + b - y) ** 2)

    step = jax.jit(lambda params, x, y: jax.tree_util.tree_map(
        lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params, x, y)))
    data = Regression()
    params = (jnp.zeros(4), jnp.zeros(()))
    first = float(loss(params, data.x, data.y))
    seq = pyloader.batches(data, 32, shuffle=True, seed=0, drop_last=True)
    with pj.prefetch(seq, workers=2) as loader:
        for _ in range(5):
            for x, y in loader:
                assert isinstance(x, jax.Array) and x.shape == (32, 4) and x.dtype == jnp.float32
                assert x.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                params = step(params, x, y)
    last = float(loss(params, data.x, data.y))
    assert last < first / 100, (first, last)


def test_batches_equal_the_host_batches_in_order():
    seq = pyloader.batches(Regression(50), 8, shuffle=True, seed=4)
    twin = pyloader.batches(Regression(50), 8, shuffle=True, seed=4)
    with pj.prefetch(seq, workers=3, ahead=3) as loader:
        for epoch in range(3):
            twin.set_epoch(epoch)
            got = list(loader)
            assert len(got) == len(twin) == 7
            for i, (x, y) in enumerate(got):
                want_x, want_y = twin.load(i)
                np.testing.assert_array_equal(np.asarray(x), want_x)
                np.testing.assert_array_equal(np.asarray(y), want_y)


def test_on_cpu_the_arrays_are_the_slots_and_keep_their_leases():
    x = np.arange(6 * 64 * 16, dtype=np.float32).reshape(6 * 64, 16)
    seq = pyloader.ArraySequence(x, batch_size=64)
    with pj.prefetch(seq, workers=1, depth=2, ahead=1) as loader:
        kept = list(loader)
        # No copy: each jax.Array holds its slot's buffer (so its lease): six leased at least.
        assert loader.prefetcher.memory_info()["leased"] >= 6
        for i, batch in enumerate(kept):
            np.testing.assert_array_equal(np.asarray(batch), x[64 * i:64 * (i + 1)])
        del kept, batch
        gc.collect()
        # Only what the engine has loaded ahead (the next epoch: at most depth) is still leased.
        assert loader.prefetcher.memory_info()["leased"] <= 2


def test_dtypes_jax_does_not_hold_are_converted_by_jax():
    class Labels:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"label": np.arange(3, dtype=np.int64) + i, "name": f"b{i}"}

    with pj.prefetch(Labels(), workers=1) as loader:
        got = list(loader)
    assert got[1]["name"] == "b1", "leaves that are not arrays pass through"
    label = got[1]["label"]
    assert isinstance(label, jax.Array) and label.tolist() == [1, 2, 3]
    assert label.dtype == (jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)


def test_jax_arrays_returned_by_getitem_travel_as_numpy_and_arrive_on_the_sharding():
    class JaxBatches:
        def __init__(self):
            self.epochs_ended = 0

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return jnp.full((4, 2), i, jnp.float32), [jnp.arange(3) + i]

        def on_epoch_end(self):
            self.epochs_ended += 1

    class JaxSamples:
        def __len__(self):
            return 5

        def __getitem__(self, j):
            return {"v": jnp.full((2,), j, jnp.float32)}

    source = JaxBatches()
    with pj.prefetch(source, workers=2) as loader:
        for _ in range(2):
            for i, (a, [b]) in enumerate(loader):
                assert isinstance(a, jax.Array) and a.tolist() == [[float(i)] * 2] * 4
                assert b.tolist() == [i, i + 1, i + 2]
    assert source.epochs_ended >= 1, "the wrapped Sequence's on_epoch_end still runs"
    # The host side: what the workers delivered is numpy, in slot memory.
    with pyloader.Prefetcher(pj._NumpyLeaves(JaxBatches()), workers=1) as host:
        a, [b] = next(iter(host))
    assert isinstance(a, np.ndarray) and isinstance(a.base, pyloader._C.Lease)
    with pyloader.Prefetcher(pyloader.batches(JaxSamples(), 5), workers=1) as host:
        batch = next(iter(host))
    assert isinstance(batch["v"].base, pyloader._C.Lease) and batch["v"][:, 0].tolist() == [0, 1, 2, 3, 4]


def rows(loader):
    return [np.asarray(batch).tolist() for batch in loader]


def test_a_state_dict_counts_the_batches_taken_not_those_placed_ahead_thread():
    state_dict_counts_the_batches_taken(mode="thread")


def test_a_state_dict_counts_the_batches_taken_not_those_placed_ahead_process():
    state_dict_counts_the_batches_taken(mode="process")


def state_dict_counts_the_batches_taken(mode):
    data = np.arange(40 * 2, dtype=np.float32).reshape(40, 2)  # picklable: process mode spawns

    def make():
        return pj.prefetch(pyloader.batches(data, 6, shuffle=True, seed=9), workers=2, ahead=3, mode=mode)

    with make() as loader:
        full = [rows(loader) for _ in range(3)]
    with make() as loader:
        list(loader)
        it = iter(loader)
        head = [np.asarray(next(it)).tolist() for _ in range(2)]  # three more are on the device
        state = loader.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (1, 2)
    with make() as loader:
        loader.load_state_dict(state)  # sets the batches' epoch, in the worker processes too
        rest = [rows(loader) for _ in range(2)]
    assert head + rest[0] == full[1] and rest[1] == full[2]
    twin = pyloader.batches(data, 6, shuffle=True, seed=9)
    twin.set_epoch(3)
    with make() as loader:
        loader.set_epoch(2)
        assert rows(loader) == full[2]
        with pytest.raises(ValueError, match="state_dict was taken with length=5"):
            loader.load_state_dict(dict(state, length=5))
        assert rows(loader) == [twin.load(i).tolist() for i in range(len(twin))], "a refused state changes nothing"


def test_process_mode_starts_fresh_interpreters_not_forks_of_jax():
    data = np.arange(8, dtype=np.float32).reshape(4, 2)
    with pj.prefetch(pyloader.batches(data, 2), workers=1, mode="process") as loader:
        assert loader.prefetcher.start_method == "forkserver"
        assert rows(loader) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    # Any Sequence (here a list) is wrapped to turn jax.Array leaves into numpy; pickled to the workers.
    with pj.prefetch([data[:2], data[2:]], workers=1, mode="process") as loader:
        assert rows(loader) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_bad_options_are_refused_showing_the_value():
    seq = pyloader.batches(Regression(8), 4)
    with pytest.raises(ValueError, match="ahead must be an integer >= 1, got 0"):
        pj.prefetch(seq, ahead=0)
    with pytest.raises(ValueError, match="sharding must be a jax.sharding.Sharding, a jax.Device or None, got 'cpu'"):
        pj.prefetch(seq, sharding="cpu")
    with pj.prefetch(seq, sharding=jax.local_devices()[0], workers=1) as loader:
        assert len(loader) == 2 and "ahead=2" in repr(loader)
