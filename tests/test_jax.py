"""pyloader.jax: batches as jax.Array on a sharding, loaded and placed ahead; several devices and processes.

Tests that need several (virtual) CPU devices or processes run in fresh interpreters: the XLA flag
that makes them must be set before jax initialises.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import run_python

jax = pytest.importorskip("jax", reason="jax is not installed: pyloader.jax untested (pip install '.[jax]')")

import jax.numpy as jnp  # noqa: E402

import pyloader  # noqa: E402
import pyloader.jax as pj  # noqa: E402


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


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_state_dict_counts_the_batches_taken_not_those_placed_ahead(mode):
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
    with make() as loader:
        loader.set_epoch(2)
        assert rows(loader) == full[2]


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


MESH = """
import json, os
import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import pyloader, pyloader.jax as pj

assert len(jax.devices()) == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
seq = pyloader.batches(x, 8, shuffle=True, seed=2)
out = []
with pj.prefetch(seq, sharding=NamedSharding(mesh, P("data")), workers=2) as loader:
    for epoch in range(2):
        order = seq.sample_order(epoch)
        for i, batch in enumerate(loader):
            rows = x[order[8 * i:8 * (i + 1)]]
            assert batch.shape == (8, 3) and len(batch.addressable_shards) == 8
            for r in range(4):
                for c in range(2):
                    device = mesh.devices[r, c]
                    [shard] = [s for s in batch.addressable_shards if s.device == device]
                    # Row block r of the batch on every device of mesh row r (replicated over "model").
                    np.testing.assert_array_equal(np.asarray(shard.data), rows[2 * r:2 * (r + 1)])
            out.append(i)
print(json.dumps(out))
"""


def test_a_named_sharding_over_eight_devices_puts_each_row_block_on_its_devices():
    r = run_python(MESH, timeout=180, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == list(range(5)) * 2


DISTRIBUTED = """
import json, sys
import numpy as np
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process,
                           initialization_timeout=60)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import pyloader, pyloader.jax as pj

mesh = Mesh(np.array(jax.devices()), ("data",))  # 2 processes x 2 devices
x = np.arange(32 * 2, dtype=np.float32).reshape(32, 2)
seq = pyloader.batches(x, 4, shuffle=True, seed=6)  # 8 batches of 4: 4 per process
total = jax.jit(lambda a: a.sum())
report = {"count": jax.process_count(), "index": jax.process_index(), "epochs": []}
with pj.prefetch(seq, sharding=NamedSharding(mesh, P("data")), workers=2) as loader:
    report["shard"] = [loader.prefetcher.state_dict()[k] for k in ("rank", "world_size")]
    for epoch in range(2):
        batches = []
        for batch in loader:
            assert batch.shape == (8, 2), batch.shape
            shards = sorted((s.index[0].start, np.asarray(s.data).tolist()) for s in batch.addressable_shards)
            batches.append({"shards": shards, "sum": float(total(batch))})
        report["epochs"].append(batches)
print("REPORT " + json.dumps(report), flush=True)
jax.distributed.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_jax_processes_assemble_global_batches_from_their_shares():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = str(free_port())
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(DISTRIBUTED), str(p), port], env=env,
                              cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in range(2)]
    reports = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
            [line] = [ln for ln in out.splitlines() if ln.startswith("REPORT ")]
            reports.append(json.loads(line[len("REPORT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    x = np.arange(32 * 2, dtype=np.float32).reshape(32, 2)
    seq = pyloader.batches(x, 4, shuffle=True, seed=6)
    for process, report in enumerate(reports):
        assert (report["count"], report["index"]) == (2, process)
        assert report["shard"] == [process, 2], "shard='auto' is JAX's process index and count"
    for epoch in range(2):
        seq.set_epoch(epoch)
        for i in range(4):
            # Global batch i: process 0's batch 2i (rows 0-3), then process 1's batch 2i+1 (rows 4-7).
            want = np.concatenate([seq.load(2 * i), seq.load(2 * i + 1)])
            for process, report in enumerate(reports):
                got = report["epochs"][epoch][i]
                for start, data in got["shards"]:
                    assert 4 * process <= start < 4 * (process + 1), "each process holds its own rows"
                    np.testing.assert_array_equal(np.asarray(data), want[start:start + len(data)])
                assert got["sum"] == float(want.sum()), "a jitted step over the global batch"


def test_the_bench_measures_pyloader_jax_and_grain_on_the_same_workload(tmp_path):
    loaders = "pyloader-jax,grain"
    r = subprocess.run([sys.executable, "-m", "pyloader", "bench", "--quick", "-w", "tiny", "-l", loaders,
                        "--workers", "2", "--no-progress", "--json", "out.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "out.json", encoding="utf-8") as f:
        rows = {row["loader"]: row for row in json.load(f)["results"]}
    assert rows["pyloader-jax"]["status"] == "ok" and rows["pyloader-jax"]["batches_per_s"] > 0
    grain = rows.get("grain", {"status": "unavailable"})
    try:
        import grain as _  # noqa: F401
    except ImportError:
        assert grain["status"] == "unavailable", "skipped with a note when grain is not installed"
    else:
        assert grain["status"] == "ok" and "grain" in rows["pyloader-jax"]["ratios"]
