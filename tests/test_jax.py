"""pyloader.jax: batches as jax.Array on a sharding, loaded and placed ahead; several devices and processes.

Every test runs JAX in fresh interpreters, never in the pytest process: once initialised, JAX warns
at every ``os.fork()``, which the suite's forking tests (process mode, torch's workers) would fail
on. The cases that need one JAX process are ``tests/_jax_cases.py``'s ``test_*`` functions, one
interpreter each (warnings are errors there too); several devices need an XLA flag set before jax
initialises, and several processes are two interpreters.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import run_python

import pyloader

if importlib.util.find_spec("jax") is None:
    pytest.skip("jax is not installed: pyloader.jax untested (pip install '.[jax]')", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "_jax_cases.py"), encoding="utf-8") as _f:
    CASES = [node.name for node in ast.parse(_f.read()).body
             if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


@pytest.mark.parametrize("case", CASES)
def test_case(case):
    r = run_python(f"""
        import warnings
        warnings.simplefilter("error")
        import _jax_cases
        _jax_cases.{case}()
        print("CASE PASSED")
    """, timeout=300)
    assert r.returncode == 0 and "CASE PASSED" in r.stdout, r.stdout[-2000:] + r.stderr[-6000:]


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
try:
    pj.prefetch(pyloader.batches(x, 4, shuffle=True), sharding=NamedSharding(mesh, P("data")))
    raise AssertionError("a drawn seed was accepted by two processes")
except ValueError as exc:
    assert "2 JAX processes must agree on the sample order: pass seed=" in str(exc), exc
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
    loaders = "pyloader-jax,grain-jax"
    r = subprocess.run([sys.executable, "-m", "pyloader", "bench", "--quick", "-w", "tiny", "-l", loaders,
                        "--workers", "2", "--no-progress", "--json", "out.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "out.json", encoding="utf-8") as f:
        rows = {row["loader"]: row for row in json.load(f)["results"]}
    assert rows["pyloader-jax"]["status"] == "ok" and rows["pyloader-jax"]["batches_per_s"] > 0
    grain = rows.get("grain-jax", {"status": "unavailable"})
    try:
        import grain as _  # noqa: F401
    except ImportError:
        assert grain["status"] == "unavailable", "skipped with a note when grain is not installed"
    else:
        assert grain["status"] == "ok" and "grain-jax" in rows["pyloader-jax"]["ratios"]
