"""Registry of the loaders the benchmark compares, pyloader and its peers.

A loader is a :class:`LoaderSpec`: a name, a kind (``"pyloader"`` or ``"peer"``), the modules it
needs, and ``open(seq, workers=...)`` returning a :class:`Session`. A session runs epochs over the
Sequence (``epoch()`` yields every batch once, in order), may report engine statistics
(``stats()``), and is closed once. The harness opens one session per measurement, in a fresh
subprocess, and times ``repeats`` epochs on it, so every loader pays its own per-epoch costs
(a DataLoader without ``persistent_workers`` forks its workers every epoch, Keras starts a new
pool every epoch, as they do inside a training loop).

A loader that cannot run here is *unavailable*, not an error: a missing module (found out cheaply
with :func:`probe` before any subprocess starts), or ``open`` raising :class:`Unavailable`
(pyloader raises ``ValueError`` for a ``mode`` it does not support yet; the pyloader entries turn
that into :class:`Unavailable`). The harness then skips it with a note.

Adding a loader (a native array source, process mode, a framework adapter) is one entry in
:data:`LOADERS`: write an ``open`` function and call :func:`register`. The ``fit-*`` loaders run
a real ``model.fit`` epoch per ``epoch()`` (group ``"fit"``), so they are compared only with each
other.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from typing import Any, Callable, Protocol, cast

__all__ = [
    "LOADERS",
    "LoaderSpec",
    "Session",
    "Unavailable",
    "default_loaders",
    "peers",
    "probe",
    "register",
]


class Unavailable(Exception):
    """The loader cannot run in this environment; the message says why."""


class Session(Protocol):
    """An opened loader over one Sequence."""

    def epoch(self) -> Iterator[Any]:
        """Yield every batch of one epoch, in order."""
        ...

    def stats(self) -> dict[str, Any] | None:
        """Engine statistics of the epoch that just ended, or None if the loader has none."""
        ...

    # Optional: ``batches_per_epoch``, when an epoch is not ``len(seq)`` batches (a loader that
    # re-batches the workload's data, like the native array source).

    def close(self) -> None:
        """Release workers and memory; called once."""
        ...


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """A loader the benchmark can measure.

    Attributes:
        name: Name used on the command line and in results.
        kind: ``"pyloader"`` for pyloader's own loaders, ``"peer"`` for the loaders it is compared
            with (ratios are computed against peers).
        description: One line for ``--list`` and the report.
        open: ``open(seq, *, workers)`` returns a :class:`Session`; raises :class:`Unavailable`.
        requires: Top-level modules that must be importable.
        uses_workers: False if ``workers`` means nothing to this loader (measured once).
        default: Part of the default ``--loaders`` set.
        applies: ``applies(workload_name)`` says whether the loader can run that workload
            (e.g. a native array source only fits ``gather``).
        probe_sequence: Makes the two-batch Sequence the measurement opens (and closes) before
            building the workload, to import modules and find out early that it is unavailable.
        group: What an epoch measures: ``"batches"`` (batches handed to the harness) or
            ``"fit"`` (a ``model.fit`` epoch, data and training); ratios are computed only
            against peers of the same group.
    """

    name: str
    kind: str
    description: str
    open: Callable[..., Session]
    requires: tuple[str, ...] = ()
    uses_workers: bool = True
    default: bool = True
    applies: Callable[[str], bool] = lambda workload: _batch_workload(workload)
    probe_sequence: Callable[[], Any] = lambda: _workloads().TinySequence(batches=2)
    group: str = "batches"


def _workloads() -> Any:
    from pyloader._bench import workloads

    return workloads


def _batch_workload(workload: str) -> bool:
    """Whether a workload is a batch Sequence (not a dataset of samples, which only loaders that
    batch samples, such as a torch DataLoader, can run)."""
    spec = _workloads().WORKLOADS.get(workload)
    return spec is None or not (spec.per_sample or spec.stream)


def _stream_workload(workload: str) -> bool:
    """Whether a workload is a stream of shards (:class:`~pyloader._bench.workloads.StreamWorkload`)."""
    spec = _workloads().WORKLOADS.get(workload)
    return spec is not None and spec.stream


def probe(modules: tuple[str, ...]) -> str | None:
    """Check cheaply, without importing them, that ``modules`` can be imported.

    Args:
        modules: Top-level module names.

    Returns:
        None if all are importable, else a note naming the missing one.
    """
    for name in modules:
        if name in sys.modules and sys.modules[name] is None:
            return f"{name} is not importable (blocked in sys.modules)"
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as exc:
            return f"{name} is not importable ({exc})"
        if spec is None:
            return f"{name} is not installed"
    return None


# -- plain ------------------------------------------------------------------------------------


class _NoStatsSession:
    """A session whose loader keeps no engine statistics. Closing drops every reference the
    session holds: the peer's threads or processes end when its last reference goes."""

    def stats(self) -> None:
        return None

    def close(self) -> None:
        vars(self).clear()


class _PlainSession(_NoStatsSession):
    def __init__(self, seq: Any) -> None:
        self.seq = seq

    def epoch(self) -> Iterator[Any]:
        seq = self.seq
        for i in range(len(seq)):
            yield seq[i]


def _open_plain(seq: Any, *, workers: int) -> Session:
    del workers
    return _PlainSession(seq)


# -- pyloader ---------------------------------------------------------------------------------


class _PyloaderSession:
    def __init__(self, seq: Any, *, workers: int | str, mode: str) -> None:
        try:
            import pyloader

            prefetcher = pyloader.Prefetcher
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"pyloader engine not importable: {exc}") from exc
        self.loader = prefetcher(seq, workers=workers, mode=mode)
        self.epochs_started = 0

    def epoch(self) -> Iterator[Any]:
        self.epochs_started += 1
        return iter(self.loader)

    def stats(self) -> dict[str, Any] | None:
        # The engine plans one epoch ahead, so the latest entry may be the next epoch, already
        # loading: pick the epoch that just ended (a fresh Prefetcher numbers epochs from 0).
        stats = self.loader.stats()
        found = stats.get("current")
        for entry in stats.get("epochs") or []:
            if entry.get("epoch") == self.epochs_started - 1:
                found = entry
        if found is None:
            return None
        found = dict(found)
        if stats.get("autotune") is not None:  # the settings after the epoch, and every decision
            found["autotune"] = stats["autotune"]
        return found

    def close(self) -> None:
        self.loader.close()


class _ArraySession(_PyloaderSession):
    """The ``gather`` workload's arrays through ``pyloader.ArraySequence``: rows are gathered
    natively, without the GIL. Same batch size and random rows (a per-epoch sample shuffle), but
    an epoch is every row once, so it has ``rows / batch_size`` batches, not ``len(seq)``."""

    def __init__(self, seq: Any, *, workers: int | str) -> None:
        try:
            import pyloader

            array_sequence = pyloader.ArraySequence
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"pyloader.ArraySequence not importable: {exc}") from exc
        arrays = array_sequence(seq.data, seq.labels, batch_size=seq.indices.shape[1],
                                shuffle=True, seed=0)
        self.batches_per_epoch = len(arrays)
        super().__init__(arrays, workers=workers, mode="thread")


def _open_array(seq: Any, *, workers: int) -> Session:
    return _ArraySession(seq, workers=workers)


# -- JAX: pyloader.jax and Grain ---------------------------------------------------------------


def _ready(batches: Any) -> Iterator[Any]:
    """Each batch once its arrays are on the device (``jax.block_until_ready``), as a step needs it."""
    import jax

    for batch in batches:
        yield jax.block_until_ready(batch)


class _PyloaderJaxSession(_PyloaderSession):
    """``pyloader.jax.prefetch`` onto the first local device: ``jax.Array`` batches."""

    def __init__(self, seq: Any, *, workers: int) -> None:
        try:
            import jax

            import pyloader.jax
        except ImportError as exc:
            raise Unavailable(f"pyloader.jax not importable: {exc}") from exc
        # A JaxPrefetcher: iteration, stats() and close() as the Prefetcher's.
        self.loader = cast(Any, pyloader.jax.prefetch(seq, sharding=jax.local_devices()[0], workers=workers))
        self.epochs_started = 0

    def epoch(self) -> Iterator[Any]:
        return _ready(super().epoch())


class _GrainSession(_NoStatsSession):
    """Grain's pipeline for the same job: ``MapDataset.source(seq).to_iter_dataset(
    ReadOptions(num_threads=W))`` (its read threads and default read-ahead buffer), then
    ``grain.experimental.device_put`` (Grain's prefetch onto the device) to the first device."""

    def __init__(self, seq: Any, *, workers: int) -> None:
        try:
            import grain
            import jax
        except ImportError as exc:
            raise Unavailable(f"grain not importable: {exc}") from exc
        from ._peers import grain_map  # the grain peer's pipeline, then Grain's device_put

        self.loader = grain.experimental.device_put(grain_map(seq, workers, False), jax.local_devices()[0])

    def epoch(self) -> Iterator[Any]:
        return _ready(self.loader)


class _GrainMapSession(_NoStatsSession):
    """Grain over a map-style source, in order (``_peers.grain_map``): read threads, or worker
    processes (``mp_prefetch``)."""

    def __init__(self, seq: Any, *, workers: int, processes: bool = False) -> None:
        from ._peers import grain_map

        self.dataset = grain_map(seq, workers, processes)

    def epoch(self) -> Iterator[Any]:
        return iter(self.dataset)


class _SpdlMapSession(_NoStatsSession):
    """SPDL over a map-style source (``_peers.spdl_map``): in order, or unordered."""

    def __init__(self, seq: Any, *, workers: int, ordered: bool = True) -> None:
        self.seq, self.workers, self.ordered = seq, workers, ordered

    def epoch(self) -> Iterator[Any]:
        from ._peers import spdl_map

        return spdl_map(self.seq, self.workers, self.ordered)


def _open_auto(seq: Any, *, workers: int | None) -> Session:
    del workers  # autotune: no worker count, measured once
    return _PyloaderSession(seq, workers="auto", mode="auto")


def _open_array_auto(seq: Any, *, workers: int | None) -> Session:
    del workers
    return _ArraySession(seq, workers="auto")


# -- torch DataLoader -------------------------------------------------------------------------


class _TorchSession(_NoStatsSession):
    """A DataLoader as a training loop makes one: ``batch_size=None`` over a batch Sequence; over a
    per-sample dataset, its ``sample_batch_size``, ``shuffle=True`` and a seeded generator (the
    same batches for every DataLoader class measured)."""

    def __init__(self, seq: Any, *, workers: int, loader_class: Any = None, persistent: bool = False) -> None:
        import torch

        if loader_class is None:
            loader_class = torch.utils.data.DataLoader

        batch_size = getattr(seq, "sample_batch_size", None)
        persistent = persistent and workers > 0
        if getattr(seq, "stream", False):  # an IterableDataset: each worker batches its shards
            self.loader = loader_class(seq.torch_dataset(), batch_size=seq.batch_size, num_workers=workers,
                                       persistent_workers=persistent)
            self.batches_per_epoch = len(seq)
            return
        if batch_size is None:
            self.loader = loader_class(seq, batch_size=None, num_workers=workers,
                                       persistent_workers=persistent)
        else:
            self.loader = loader_class(seq, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       generator=torch.Generator().manual_seed(0),
                                       persistent_workers=persistent)
        self.batches_per_epoch = len(self.loader)

    def epoch(self) -> Iterator[Any]:
        return iter(self.loader)


def _open_torch(seq: Any, *, workers: int) -> Session:
    return _TorchSession(seq, workers=workers)


def _open_torch_persistent(seq: Any, *, workers: int) -> Session:
    return _TorchSession(seq, workers=workers, persistent=True)


def _pyloader_torch_session(seq: Any, workers: int, *, persistent: bool = False, **options: Any) -> Session:
    try:
        from pyloader.torch import DataLoader
    except ImportError as exc:
        raise Unavailable(f"pyloader.torch not importable: {exc}") from exc
    return _TorchSession(seq, workers=workers, loader_class=functools.partial(DataLoader, **options),
                         persistent=persistent)


def _open_pyloader_torch(seq: Any, *, workers: int) -> Session:
    return _pyloader_torch_session(seq, workers)


def _open_pyloader_torch_thread(seq: Any, *, workers: int) -> Session:
    return _pyloader_torch_session(seq, workers, mode="thread")


def _open_pyloader_torch_process(seq: Any, *, workers: int) -> Session:
    return _pyloader_torch_session(seq, workers, mode="process")


def _open_pyloader_torch_process_persistent(seq: Any, *, workers: int) -> Session:
    return _pyloader_torch_session(seq, workers, mode="process", persistent=True)


# -- pyloader.Stream ---------------------------------------------------------------------------


class _StreamSession(_NoStatsSession):
    """A streamed workload's shards through ``pyloader.Stream`` (batches per shard, round-robin).
    No stats: its epochs are chunks of slots, not the workload's epochs."""

    def __init__(self, seq: Any, *, workers: int, mode: str) -> None:
        try:
            from pyloader import Stream
        except ImportError as exc:
            raise Unavailable(f"pyloader.Stream not importable: {exc}") from exc
        self.stream = Stream(seq.shards, batch_size=seq.batch_size, workers=workers, mode=mode)
        self.batches_per_epoch = len(seq)

    def epoch(self) -> Iterator[Any]:
        return iter(self.stream)

    def close(self) -> None:
        self.stream.close()


def _stream_probe() -> Any:
    return _workloads()._tiny_stream(2, 4, 2)


class _GrainStreamSession(_NoStatsSession):
    """Grain's streaming pipeline for shards of items: an ``InterleaveIterDataset`` reading
    ``W`` shards at a time (each on its own thread, two items buffered), ``batch(B)``, then a
    thread prefetch of two batches; items of several shards share a batch (Grain's order)."""

    def __init__(self, seq: Any, *, workers: int) -> None:
        from ._peers import grain_stream

        self.dataset = grain_stream(seq.shards, seq.batch_size, workers)
        self.batches_per_epoch = len(seq)

    def epoch(self) -> Iterator[Any]:
        return iter(self.dataset)


class _SpdlStreamSession(_NoStatsSession):
    """SPDL's streaming pipeline: the shards as its source, each iterated by a generator stage
    with ``concurrency=W`` on ``W`` threads (items in completion order: unordered), ``aggregate(B)``,
    a numpy collate stage, a sink of two batches."""

    def __init__(self, seq: Any, *, workers: int) -> None:
        self.seq = seq
        self.workers = workers
        self.batches_per_epoch = len(seq)

    def epoch(self) -> Iterator[Any]:
        from ._peers import spdl_stream

        return spdl_stream(self.seq.shards, self.seq.batch_size, self.workers)


# -- Keras 3 PyDataset ------------------------------------------------------------------------


def _default_keras_backend() -> None:
    """Keras reads ``KERAS_BACKEND`` when imported: torch, unless the user chose one or torch is missing."""
    if "KERAS_BACKEND" not in os.environ and probe(("torch",)) is None:
        os.environ["KERAS_BACKEND"] = "torch"


class _KerasSession(_NoStatsSession):
    """Drives a Keras 3 PyDataset the way ``Model.fit`` does, without a model.

    ``fit`` wraps a PyDataset in ``PyDatasetAdapter`` (which owns an ``OrderedEnqueuer`` when
    ``workers > 1`` or ``use_multiprocessing``), calls ``on_epoch_begin()`` (starts the enqueuer's
    pool), iterates ``get_numpy_iterator()`` (the finite generator stops the enqueuer after the
    last batch), then calls ``on_epoch_end()``. We do exactly that; see
    ``keras/src/trainers/data_adapters/py_dataset_adapter.py`` and ``epoch_iterator.py``.
    """

    def __init__(self, seq: Any, *, workers: int, use_multiprocessing: bool) -> None:
        _default_keras_backend()
        try:
            import keras
            from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
        except ImportError as exc:
            raise Unavailable(f"keras PyDataset not importable: {exc}") from exc

        class _Wrapped(keras.utils.PyDataset):
            def __init__(self, inner: Any) -> None:
                super().__init__(
                    workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=10
                )
                self.inner = inner

            def __len__(self) -> int:
                return len(self.inner)

            def __getitem__(self, index: int) -> Any:
                return self.inner[index]

        self.adapter = PyDatasetAdapter(_Wrapped(seq), shuffle=False)

    def epoch(self) -> Iterator[Any]:
        self.adapter.on_epoch_begin()
        try:
            yield from self.adapter.get_numpy_iterator()
        finally:
            self.adapter.on_epoch_end()

    def close(self) -> None:
        enqueuer = self.adapter.enqueuer
        if enqueuer is not None:
            enqueuer.stop()


# -- Keras 3 model.fit -------------------------------------------------------------------------


class _FitSession:
    """One ``model.fit`` epoch per :meth:`epoch` on a small model (:class:`pyloader._bench.keras_fit.FitRun`),
    the data fed by Keras's workers or by pyloader. The batches are consumed inside ``fit``:
    ``epoch()`` yields one ``None`` per training step ``fit`` ran, after it returns, so
    batches/s is the training throughput and the first batch arrives with the whole epoch."""

    def __init__(self, seq: Any, *, workers: int, loader: str) -> None:
        _default_keras_backend()
        try:
            from pyloader._bench.keras_fit import FitRun
        except ImportError as exc:
            raise Unavailable(f"pyloader.keras not importable: {exc}") from exc
        self.run = FitRun(seq, loader=loader, workers=workers)

    def epoch(self) -> Iterator[Any]:
        _, batches = self.run.epoch()
        for _ in range(batches):
            yield None

    def stats(self) -> dict[str, Any] | None:
        return self.run.stats()

    def close(self) -> None:
        self.run.close()


def _fit_spec(name: str, kind: str, loader: str, description: str) -> LoaderSpec:
    """A ``fit-*`` loader: opt-in (Keras imports and a model per measurement cost seconds), on
    the ``latency`` and ``gather`` workloads, compared only with the other ``fit-*`` loaders."""
    return LoaderSpec(
        name, kind, f"model.fit epochs of a Flatten->Dense(1) model fed by {description} "
                    "(batches/s: training steps/s; 1st batch and stall span the fit epoch)",
        functools.partial(_FitSession, loader=loader), requires=("keras", "pyloader"), default=False,
        applies=lambda workload: workload in ("latency", "gather"),
        probe_sequence=lambda: _workloads().LatencySequence(batches=2, delay_s=0.0, rows=2),
        group="fit")


# -- registry ---------------------------------------------------------------------------------

LOADERS: dict[str, LoaderSpec] = {}


def register(spec: LoaderSpec) -> LoaderSpec:
    """Add a loader to :data:`LOADERS` (replacing one of the same name).

    Args:
        spec: The loader.

    Returns:
        ``spec``.

    Raises:
        ValueError: If ``spec.kind`` is not ``"pyloader"`` or ``"peer"``.
    """
    if spec.kind not in ("pyloader", "peer"):
        raise ValueError(f"kind must be 'pyloader' or 'peer', got {spec.kind!r}")
    LOADERS[spec.name] = spec
    return spec


for _spec in [
    LoaderSpec("plain", "peer", "a for loop over seq[i] in the consumer thread", _open_plain,
               uses_workers=False),
    LoaderSpec("pyloader", "pyloader", "pyloader.Prefetcher, mode='thread'",
               functools.partial(_PyloaderSession, mode="thread"), requires=("pyloader",)),
    LoaderSpec("pyloader-process", "pyloader", "pyloader.Prefetcher, mode='process'",
               functools.partial(_PyloaderSession, mode="process"), requires=("pyloader",)),
    LoaderSpec("pyloader-auto", "pyloader",
               "pyloader.Prefetcher(seq) with no settings: workers, depth and mode 'auto' (autotune)",
               _open_auto, requires=("pyloader",), uses_workers=False),
    LoaderSpec("pyloader-array-auto", "pyloader",
               "pyloader-array with no settings: workers and depth 'auto' (gather workload only)",
               _open_array_auto, requires=("pyloader",), uses_workers=False,
               applies=lambda workload: workload == "gather",
               probe_sequence=lambda: _workloads().GatherSequence(rows=8, batch_size=4,
                                                                  batches=2)),
    LoaderSpec("pyloader-array", "pyloader",
               "pyloader.Prefetcher over pyloader.ArraySequence (native GIL-free row gather; "
               "gather workload only)", _open_array, requires=("pyloader",),
               applies=lambda workload: workload == "gather",
               probe_sequence=lambda: _workloads().GatherSequence(rows=8, batch_size=4,
                                                                  batches=2)),
    LoaderSpec("pyloader-torch", "pyloader",
               "pyloader.torch.DataLoader, the same arguments as the torch peer (default mode='auto': "
               "worker processes, as torch's)",
               _open_pyloader_torch, requires=("pyloader", "torch"), applies=lambda workload: True),
    LoaderSpec("pyloader-torch-thread", "pyloader",
               "pyloader.torch.DataLoader(..., mode='thread'), the same arguments as the torch peer",
               _open_pyloader_torch_thread, requires=("pyloader", "torch"), applies=lambda workload: True,
               default=False),
    LoaderSpec("pyloader-torch-process", "pyloader",
               "pyloader.torch.DataLoader(..., mode='process'), the same arguments as the torch peer",
               _open_pyloader_torch_process, requires=("pyloader", "torch"), applies=lambda workload: True,
               default=False),
    LoaderSpec("pyloader-torch-process-persistent", "pyloader",
               "pyloader.torch.DataLoader(..., mode='process', persistent_workers=True): worker processes "
               "kept from epoch to epoch; compare with torch-persistent",
               _open_pyloader_torch_process_persistent, requires=("pyloader", "torch"),
               applies=lambda workload: True, default=False),
    LoaderSpec("pyloader-stream", "pyloader",
               "pyloader.Stream(shards, batch_size=B, workers=W): streamed workloads only",
               functools.partial(_StreamSession, mode="thread"), requires=("pyloader",),
               applies=_stream_workload, probe_sequence=_stream_probe),
    LoaderSpec("pyloader-stream-process", "pyloader",
               "pyloader.Stream(shards, batch_size=B, workers=W, mode='process'): streamed workloads only",
               functools.partial(_StreamSession, mode="process"), requires=("pyloader",),
               applies=_stream_workload, probe_sequence=_stream_probe),
    LoaderSpec("grain-stream", "peer",
               "Grain: InterleaveIterDataset over the shards (cycle_length=W), batch(B), thread "
               "prefetch; streamed workloads only", _GrainStreamSession, requires=("grain",),
               applies=_stream_workload, probe_sequence=_stream_probe),
    LoaderSpec("spdl-stream", "peer",
               "SPDL pipeline: the shards as source, a generator stage (concurrency=W) reading them, "
               "aggregate(B), numpy collate; unordered; streamed workloads only", _SpdlStreamSession,
               requires=("spdl",), applies=_stream_workload, probe_sequence=_stream_probe),
    LoaderSpec("pyloader-jax", "pyloader",
               "pyloader.jax.prefetch(seq, sharding=<first device>, workers=W): jax.Array batches, "
               "each block_until_ready when handed over",
               _PyloaderJaxSession, requires=("pyloader", "jax")),
    LoaderSpec("grain-jax", "peer",
               "Grain: MapDataset.source(seq).to_iter_dataset(ReadOptions(num_threads=W)), then "
               "grain.experimental.device_put to the first device; each batch block_until_ready",
               _GrainSession, requires=("grain", "jax"), default=False),
    LoaderSpec("grain", "peer",
               "Grain: MapDataset.source(seq).to_iter_dataset(ReadOptions(num_threads=W)): read threads, "
               "in order", _GrainMapSession, requires=("grain",)),
    LoaderSpec("grain-process", "peer",
               "Grain: MapDataset.source(seq).to_iter_dataset().mp_prefetch(MultiprocessingOptions("
               "num_workers=W)): worker processes, in order",
               functools.partial(_GrainMapSession, processes=True), requires=("grain",),
               # Not in the default set: every worker gets the Sequence pickled (the gather
               # workload's 500 MB array: 4.8 GB peak at 2 workers, 7.3 GB at 4).
               default=False),
    LoaderSpec("spdl", "peer",
               "SPDL pipeline: indices as source, seq.__getitem__ stage (concurrency=W, output_order="
               "'input') on W threads: in order", _SpdlMapSession, requires=("spdl",)),
    LoaderSpec("spdl-unordered", "peer",
               "SPDL pipeline as spdl, output_order='completion': UNORDERED (batches as they finish)",
               functools.partial(_SpdlMapSession, ordered=False), requires=("spdl",)),
    LoaderSpec("torch", "peer", "torch DataLoader(seq, batch_size=None, num_workers=W); per-sample "
               "datasets: batch_size=sample_batch_size, shuffle=True, seeded generator; streamed: an "
               "IterableDataset whose workers read every W-th shard, batch_size=B",
               _open_torch, requires=("torch",), applies=lambda workload: True),
    LoaderSpec("torch-persistent", "peer", "the torch peer with persistent_workers=True (workers kept from "
               "epoch to epoch)", _open_torch_persistent, requires=("torch",), applies=lambda workload: True,
               default=False),
    LoaderSpec("keras-threads", "peer", "Keras 3 PyDataset(workers=W), thread pool",
               functools.partial(_KerasSession, use_multiprocessing=False), requires=("keras",)),
    LoaderSpec("keras-processes", "peer",
               "Keras 3 PyDataset(workers=W, use_multiprocessing=True), process pool",
               functools.partial(_KerasSession, use_multiprocessing=True), requires=("keras",)),
    _fit_spec("fit-keras-threads", "peer", "keras-threads",
              "the user's PyDataset(workers=W), Keras thread pool"),
    _fit_spec("fit-keras-processes", "peer", "keras-processes",
              "the user's PyDataset(workers=W, use_multiprocessing=True), Keras process pool"),
    _fit_spec("fit-pyloader", "pyloader", "pyloader",
              "pyloader.keras.prefetch(PyDataset, workers=W)"),
]:
    register(_spec)


def peers() -> list[str]:
    """Names of the registered peer loaders, in registration order."""
    return [name for name, spec in LOADERS.items() if spec.kind == "peer"]


def default_loaders() -> list[str]:
    """Names of the loaders measured when ``--loaders`` is not given."""
    return [name for name, spec in LOADERS.items() if spec.default]
