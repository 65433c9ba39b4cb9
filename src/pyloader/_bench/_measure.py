"""One measurement (a loader on a workload), run in a fresh subprocess by the harness.

``python -m pyloader._bench._measure REQUEST_JSON`` builds the workload, opens the loader, times
``repeats`` epochs, and reports JSON lines on its original stdout (the protocol channel; fd 1 is
pointed at stderr first, so prints and warnings from libraries cannot corrupt it):

1. ``{"event": "unavailable", "note": ...}`` and exit, if the loader cannot run here; else, for
   each workload of the request (usually one),
2. ``{"event": "ready", "workload": ...}`` once the workload is built and the loader's modules
   are imported: the harness tracks the peak memory of the process tree from this point, so
   setup transients do not count;
3. ``{"event": "result", "workload": ...}`` with the per-epoch timings, or ``"error"``.

A fresh process per measurement keeps memory honest (no allocator state or imports carried over
from the loader measured before) and isolates crashes and hangs. ``--quick`` sends all workloads
of a loader to one process to save the imports (Keras takes seconds); its memory figures are then
only indicative.

Timing: an epoch runs from the call that starts it (``iter``) to its last batch. First-batch
latency is the time to the first batch of the epoch; *stall* is the time the consumer spent inside
``next`` over the epoch's wall time (with ``step_ms`` the consumer sleeps that long per batch, a
stand-in for the training step).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from typing import Any, TextIO

from .._consume import consume

__all__ = ["measure", "main"]


def _resource_hwm() -> dict[str, float | None]:
    try:
        import resource
    except ImportError:
        return {"self_rss_hwm_mb": None, "children_rss_hwm_mb": None}
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10  # bytes on macOS, KiB on Linux
    return {
        "self_rss_hwm_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        "children_rss_hwm_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale,
    }


def _run_epoch(session: Any, *, expected: int, step_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    it = iter(session.epoch())
    starting = time.perf_counter() - t0  # starting the epoch (e.g. forking workers) is waiting for data too
    n, wait, first = consume(it, step_s, t0)
    wait += starting
    wall = time.perf_counter() - t0
    if n != expected:
        raise RuntimeError(f"loader delivered {n} batches in an epoch, expected {expected}")
    record: dict[str, Any] = {
        "batches": n,
        "wall_s": wall,
        "first_batch_s": first if first is not None else wall,
        "wait_s": wait,
        "stall_fraction": wait / wall if wall > 0 else None,
    }
    stats = session.stats()
    if stats is not None:
        record["engine_stats"] = stats
    return record


def _measure_one(spec: Any, workload: str, request: dict[str, Any], emit: Any) -> None:
    from pyloader._bench.loaders import probe
    from pyloader._bench.workloads import WORKLOADS, build_workload

    missing = probe(WORKLOADS[workload].requires)
    if missing:
        emit({"event": "unavailable", "workload": workload, "note": missing})
        return
    seq = build_workload(workload, quick=bool(request["quick"]))
    gc.collect()
    emit({"event": "ready", "workload": workload, "sequence": repr(seq)})

    t = time.perf_counter()
    session = spec.open(seq, workers=int(request["workers"] or 1))
    startup = time.perf_counter() - t
    expected = getattr(session, "batches_per_epoch", len(seq))
    epochs = []
    try:
        for _ in range(int(request["repeats"])):
            epochs.append(
                _run_epoch(session, expected=expected, step_s=float(request["step_ms"]) / 1e3)
            )
    finally:
        t = time.perf_counter()
        session.close()
        close = time.perf_counter() - t
    del session, seq
    gc.collect()
    emit({"event": "result", "workload": workload, "startup_s": startup, "close_s": close,
          "epochs": epochs, **_resource_hwm()})


def measure(request: dict[str, Any], emit: Any) -> None:
    """Run the measurements of one loader and report events through ``emit(dict)``.

    Args:
        request: ``loader``, ``workloads`` (measured one after the other in this process),
            ``workers``, ``repeats``, ``quick``, ``step_ms``.
        emit: Called with each protocol event; events about one workload carry its name.
    """
    from pyloader._bench.loaders import LOADERS, Unavailable, probe

    spec = LOADERS[request["loader"]]
    missing = probe(spec.requires)
    if missing:
        emit({"event": "unavailable", "note": missing})
        return
    # Open on a two-batch Sequence first: imports happen here, not in the timed region, and an
    # unsupported loader is found out before the (possibly 500 MB) workload is built.
    try:
        spec.open(spec.probe_sequence(), workers=int(request["workers"] or 1)).close()
    except Unavailable as exc:
        emit({"event": "unavailable", "note": str(exc)})
        return
    for workload in request["workloads"]:
        try:
            _measure_one(spec, workload, request, emit)
        except Exception as exc:  # noqa: BLE001 - reported; the next workload still runs
            emit({"event": "error", "workload": workload, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()})
            gc.collect()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the measurement subprocess.

    Args:
        argv: ``[REQUEST_JSON]``; defaults to ``sys.argv[1:]``.

    Returns:
        The exit status: 0, or 1 after reporting an error event.
    """
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(args[0])
    # Keep fd 1 as the protocol channel; everything else that writes to stdout goes to stderr.
    proto: TextIO = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)

    def emit(event: dict[str, Any]) -> None:
        proto.write(json.dumps(event, default=_jsonable) + "\n")
        proto.flush()

    try:
        measure(request, emit)
    except BaseException as exc:  # noqa: BLE001 - reported to the harness, which decides
        emit({"event": "error", "error": f"{type(exc).__name__}: {exc}",
              "traceback": traceback.format_exc()})
        return 1
    finally:
        proto.flush()
    return 0


def _jsonable(value: Any) -> Any:
    """JSON fallback for numpy scalars and other odd values in engine stats."""
    for attr in ("item", "tolist"):
        if hasattr(value, attr):
            return getattr(value, attr)()
    return repr(value)


if __name__ == "__main__":
    raise SystemExit(main())
