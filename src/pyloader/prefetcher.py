"""The Prefetcher: loads a Sequence's batches ahead of the training loop, in order.

Design in brief (see ARCHITECTURE.md): an epoch is a run of *positions*; the plan (:mod:`pyloader._plan`)
maps each to a Sequence index. The native engine (``pyloader._C.Engine``) loads up to ``depth``
positions ahead on ``workers`` native threads into reusable buffers and hands them over strictly
in position order. This module owns the plan, the epochs and the state: it appends each epoch's
positions to the engine one epoch ahead (so loading runs across the boundary), turns the engine's
position into ``(epoch, batches consumed)`` for :meth:`Prefetcher.state_dict`, and restarts the
engine when the state is loaded. The table of appended epochs (which positions load which epoch) is
the engine's (``Engine.segments()``); this module keeps only what the engine cannot know: how many
batches of the engine's first epoch were consumed before it started, and the ``len(sequence)`` each
planned epoch was planned with.

Length: each epoch's length is ``len(sequence)`` read at the epoch's start, as Keras reads it. The
next epoch is planned (and loads) ahead, so its length is read early and checked again at its start:
- with ``on_epoch_end``, an epoch starts where its hooks put it: once the previous epoch's hook has
  run (when loading crosses over, ahead of the consumer). The next epoch is gated on that hook, and
  the hook's callback (on the engine thread that ran it, before the gate opens) plans it again
  with the length the hook left (``Engine.replan``): no bubble, nothing loaded in vain;
- without, an epoch starts at ``iter()``: a length that differs from the one the epoch was planned
  with then restarts the engine at the epoch's start (rare: the length changed between passes).

Iteration: one pass over the Prefetcher is one epoch. A new ``iter()`` after a pass that was left
unfinished (``break``, an exception) starts the next epoch: the rest of the unfinished one is
skipped, not loaded. After :meth:`Prefetcher.load_state_dict` the next pass resumes the saved
epoch exactly where it stopped.

Hangs (README, "Timeouts, stuck workers and closing"): a batch that times out is *abandoned*: the
engine is stopped at once and restarted after that position when it is next needed (its stuck
thread is abandoned, its stuck worker process killed and replaced), so the pass goes on with the
following batch. Joining an engine's threads waits at most :attr:`Prefetcher.close_grace_s` for
a thread inside user code, then abandons it with a :class:`~pyloader.StallWarning`.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import _C, _checks, _stats, _tune
from . import process as _process
from ._closing import Closing
from ._errors import EpochEndError, PoolExhaustedWarning, StallWarning, batch_error
from ._gil import GilProbe
from ._plan import Plan, fresh_seed, resolve_shard
from ._window import Window

if TYPE_CHECKING:
    from .streams import Stream
from .arrays import ArraySequence

__all__ = ["Prefetcher", "prefetch"]

_STATE_VERSION = 1
_STATE_KEYS = ("epoch", "batches_consumed", "seed", "shuffle", "length", "rank", "world_size", "drop_last")
_MANY_WORKERS = 64  # workers above this and 8 per CPU earn a warning
_MAX_EPOCH = 1 << 62  # positions are 64-bit: epochs beyond this could not be planned
_RUN_BUDGET_US = 200.0  # a worker holding the GIL keeps loading ready batches while cheaper than this
_MODES = ("thread", "process", "auto")
_PREFAULT_HELD = 2  # buffers made ahead beyond depth: the batch the loop holds, the one it takes next
_ARENA_SLACK = 1 << 30  # the arena's room beyond twice the pool's bound (it is sparse: costs nothing)
_CHECK_EVERY = 8  # autotune: batches between two looks at the window's clock, mid-pass
_NEVER = 1 << 62  # no mid-pass checkpoint (no tuner)

_live: weakref.WeakSet[Prefetcher] = weakref.WeakSet()
_live_lock = threading.Lock()


def _orphan_live() -> None:
    # In a forked child, the Prefetchers are copies whose threads and processes belong to the
    # parent: closing them here would join threads that do not exist. Keep them, inert, forever.
    for loader in list(_live):
        loader._closed = True
        _orphans.append(loader)
    _live.clear()


_orphans: list[Prefetcher] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_orphan_live)


@atexit.register
def _close_all() -> None:
    # Native workers must be joined while the interpreter can still hand them the GIL.
    with _live_lock:
        loaders = list(_live)
    for loader in loaders:
        loader.close()


def _default_max_pool_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _pin_request(pin: object) -> str:
    if pin is True or pin == "auto":
        return "auto"
    if pin is False or pin is None or pin == "off":
        return "off"
    if pin in ("cuda", "mlock"):
        return str(pin)
    raise ValueError(f"pin must be 'auto', 'cuda', 'mlock' or False, got {pin!r}")


class Prefetcher(Closing):
    """Loads batches of a Sequence ahead of the consumer, on native threads, in order.

    Args:
        sequence: anything with ``__len__`` (number of batches) and ``__getitem__(i)`` (batch
            ``i``): a ``keras.utils.PyDataset``/``Sequence``, a map-style batch dataset, a class
            of your own. A batch is a numpy array, a number, or a tuple/list/dict (nested) of
            them; other values pass through untouched.
        workers: native loading threads (or worker processes). ``"auto"`` (the default): chosen
            and adapted at epoch boundaries (README, "Autotune"; :meth:`stats` lists each decision
            and why).
        depth: batches loaded ahead of the consumer (Keras's ``max_queue_size``). ``"auto"`` (the
            default): from the load-time spread, within ``max_pool_bytes``; ``None``: fixed at
            ``2 * workers``.
        shuffle: permute the batch order each epoch, from ``(seed, epoch)``.
        seed: the seed of the order. ``None`` draws one (recorded in :meth:`state_dict`), or uses
            0 when sharded, so that every rank agrees.
        shard: ``(rank, world_size)`` to load a disjoint share of the batches (DistributedSampler
            semantics), ``"auto"`` to read it from ``torch.distributed`` or ``RANK``/``WORLD_SIZE``,
            or ``None``.
        drop_last: with ``shard``, drop the uneven tail instead of padding it with wrapped batches.
        pin: ``"auto"`` pins buffers (CUDA when a device is present, else ``mlock``), ``"cuda"``,
            ``"mlock"``, or ``False``. See :meth:`memory_info` for what was pinned.
        timeout: seconds to wait for one batch before raising ``TimeoutError`` naming its index;
            ``None`` waits forever.
        mode: ``"thread"``, or ``"process"`` for a ``__getitem__`` that holds the GIL: worker
            processes write batches straight into shared memory (see :mod:`pyloader.process`).
            ``"auto"`` (the default) starts with threads and moves to processes at an epoch
            boundary when the GIL caps loading. An :class:`~pyloader.ArraySequence` is gathered
            natively on threads in every mode.
        max_pool_bytes: bound of the buffer pool; it grows past ``depth`` buffers only while you
            keep references to old batches. Default: half the physical memory.
        start_method: process mode: how the worker processes start. ``"fork"`` (the default
            where it exists) forks them from a copy of this process taken now; ``"spawn"`` and
            ``"forkserver"`` start a fresh interpreter that receives the Sequence pickled.
        worker_init_fn: process mode: called as ``worker_init_fn(worker_id)`` in each new worker
            process (replacements too), after ``random`` and numpy are seeded from
            ``(seed, worker_id)``.
        max_retries: process mode: how many times a batch whose worker process died is loaded
            again (by a new worker) before it fails with :class:`~pyloader.WorkerDiedError`.

    Waiting and closing (class attributes: set one on the class for every Prefetcher, or on an
    instance before its first ``iter()``; ``close_grace_s`` is read when the engine is joined):

    Attributes:
        close_grace_s: seconds :meth:`close` (and the restart after a ``TimeoutError``) waits for
            a worker thread inside user code (``__getitem__``, ``on_epoch_end``) before it
            abandons the thread with a :class:`~pyloader.StallWarning` naming the batch and how
            long it has run. An abandoned thread ends on its own when its call returns (or with
            the process). Process mode never waits: a stuck worker process is killed. ``None``:
            wait for ever. Default 5.
        stall_warning_s: seconds one batch may keep the loop waiting before a
            :class:`~pyloader.StallWarning` names it, its epoch, the worker (thread, or process
            pid and whether it is stopped) and the time waited; once per batch, and the wait goes
            on (``timeout`` ends it). ``None``: never. Default 60.
        pool_wait_s: seconds the batch needed next may wait for a buffer while every buffer holds
            a batch you keep, before :class:`~pyloader.PoolExhaustedError` (a ``MemoryError``)
            says what is held and how to raise ``max_pool_bytes``; a
            :class:`~pyloader.PoolExhaustedWarning` comes first (after 2 s). Releasing a batch
            meanwhile lets the loader go on. ``None``: wait for ever. Default 30.

    Raises:
        TypeError: ``sequence`` has no ``__len__`` or ``__getitem__``.
        ValueError: an option has a bad value (the message shows it).
    """

    close_grace_s: float | None = 5.0
    stall_warning_s: float | None = 60.0
    pool_wait_s: float | None = 30.0

    def __init__(
        self,
        sequence: Any,
        *,
        workers: int | str = "auto",
        depth: int | str | None = "auto",
        shuffle: bool = False,
        seed: int | None = None,
        shard: tuple[int, int] | str | None = None,
        drop_last: bool = False,
        pin: bool | str = "auto",
        timeout: float | None = None,
        mode: str = "auto",
        max_pool_bytes: int | None = None,
        start_method: str | None = None,
        worker_init_fn: Any = None,
        max_retries: int = 2,
    ) -> None:
        self._closed = True  # until construction succeeds: __del__ must find a consistent object
        self._engine: _C.Engine | None = None
        self._workers: _process.WorkerPool | None = None
        if not (hasattr(sequence, "__len__") and hasattr(sequence, "__getitem__")):
            raise TypeError(
                f"sequence must have __len__ and __getitem__ (a Sequence of batches), "
                f"got {type(sequence).__name__}"
            )
        length = _read_length(sequence)
        usable = _tune.usable_cpus()
        auto_workers, auto_depth, auto_mode = workers == "auto", depth == "auto", mode == "auto"
        self.workers = _tune.initial_workers(usable) if auto_workers else _checks.whole("workers", workers, 1)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if self.workers > max(_MANY_WORKERS, 8 * cpus):
            warnings.warn(
                f"workers={self.workers} is far more than the {cpus} CPUs this process may use: "
                f"each worker is a native thread (or, in process mode, a process); a few per CPU "
                f"(for I/O-bound batches) is plenty. Thread mode starts at most depth and at most "
                f"two epochs' batches' worth of them.",
                stacklevel=2,
            )
        if depth is None or auto_depth:
            self.depth = _tune.initial_depth(self.workers)
        else:
            self.depth = _checks.whole("depth", depth, 1)
        self.shuffle = _checks.flag("shuffle", shuffle)
        self.drop_last = _checks.flag("drop_last", drop_last)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = "thread" if auto_mode else mode
        if mode in ("process", "auto"):
            if start_method is None:
                start_method = _process.default_start_method()
            if start_method not in _process.START_METHODS:
                raise ValueError(f"start_method must be one of {_process.START_METHODS} or None, got {start_method!r}")
            if worker_init_fn is not None and not callable(worker_init_fn):
                raise ValueError(f"worker_init_fn must be callable or None, got {worker_init_fn!r}")
        elif start_method is not None or worker_init_fn is not None:
            raise ValueError("start_method and worker_init_fn apply to mode='process' (or 'auto') only")
        self.start_method = start_method
        self._worker_init_fn = worker_init_fn
        self.max_retries = _checks.whole("max_retries", max_retries, 0)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
        self.timeout = None if timeout is None else float(timeout)
        self._pin = _pin_request(pin)
        max_pool = _default_max_pool_bytes() if max_pool_bytes is None else max_pool_bytes
        self._max_pool_bytes = _checks.whole("max_pool_bytes", max_pool, 1)
        rank, world = resolve_shard(shard)
        if seed is None:
            seed = 0 if world > 1 else fresh_seed()
        seed = _checks.whole("seed", seed, 0)
        self._plan = Plan(length, self.shuffle, seed, rank, world, self.drop_last)
        self._seed = seed
        self._sequence = sequence
        # An ArraySequence is gathered natively: the engine passes it the epoch, no hook needed.
        # In process mode too: it holds no GIL, so processes would add nothing but copies.
        self._native = isinstance(sequence, ArraySequence)
        # Its own native source, kept across engines: the source stores the sample orders of the
        # epochs this Prefetcher plans (NOTE [ Gather prunes sample orders two epochs behind the
        # plan ]), so no other Prefetcher over the same ArraySequence may share it.
        self._native_source = sequence.native_source() if self._native else None
        hook = None if self._native else getattr(sequence, "on_epoch_end", None)
        self._on_epoch_end = hook if callable(hook) else None
        arena = 2 * self._max_pool_bytes + _ARENA_SLACK if mode == "process" and not self._native else 0
        self._pool = _C.BufferPool(self._max_pool_bytes, self._pin, arena)
        # A fresh pool would map and first-touch its buffers while the first epoch fills them:
        # make the first batches' buffers now, on a thread of their own (buffer_pool.h, "Faulting
        # in ahead of need"), done by the first engine's start. An ArraySequence's batch size is
        # known before any batch loads.
        self._prefault: threading.Thread | None = None
        if self._native:
            self._prefault = _start_prefault(self._pool, self.depth + _PREFAULT_HELD,
                                             sequence._batch_nbytes(), self._max_pool_bytes)
        self._hooks_run = 0  # epoch hooks run so far (process mode: workers replay them)
        self._threads = self.workers  # the engine's threads (set again as each engine starts)
        self._proc_loader: Any = None
        # Autotune: the settings left "auto" change mid-pass (_checkpoint) and at epoch boundaries
        # (_autotune), decided on what the window measured since the last decision.
        self._tuner: _tune.Tuner | None = None
        self._probe: GilProbe | None = None
        self._window = Window()
        self._measured: _tune.Measurement | None = None  # a window ended with a pass, not yet tuned on
        if auto_workers or auto_depth or auto_mode:
            limits = _tune.Limits(usable, self._max_pool_bytes, auto_mode and not self._native,
                                  auto_workers, auto_depth, process_ok=not self._native)
            self._tuner = _tune.Tuner(_tune.Settings(self.mode, self.workers, self.depth), limits)
        if mode == "process" and not self._native:
            # Now, before any thread of this Prefetcher runs: the zygote is forked from this image.
            assert start_method is not None, "resolved above for mode='process'"
            self._workers = _process.WorkerPool(
                sequence, workers=self.workers, pool=self._pool, start_method=start_method,
                worker_init_fn=worker_init_fn, seed=seed, replay_hooks=self._on_epoch_end is not None,
            )

        # Where the next engine starts: (epoch, batches of that epoch already consumed).
        self._resume: tuple[int, int] = (0, 0)
        # Batches of the engine's first epoch consumed before the engine started: its positions
        # begin after them (a resumed epoch). The engine numbers positions from 0 and cannot know.
        self._skipped = 0
        self._token = 0  # identifies the live epoch iterator
        # Engines stopped but not yet joined (after a TimeoutError), with their ProcLoader.
        self._retired: list[tuple[_C.Engine, Any]] = []
        # The epoch whose pass lost a batch to a timeout: a new iter() skips the rest of it.
        self._abandoned_epoch: int | None = None
        # Plan (and load) the next epoch while this one ends: no bubble at the boundary. Off for an
        # owner that renews the Sequence before every pass (pyloader.torch).
        self._plan_ahead = True
        self._past_stats = _stats.EpochRecords()  # of the engines that have stopped
        # len(sequence) each epoch of the running engine was planned with (the latest few).
        self._lengths: dict[int, int] = {}
        self._plan_lock = threading.Lock()  # planning an epoch vs. the hook re-planning it
        self._first_epoch = 0  # the running engine's first epoch (which _skipped applies to)
        self._pass_epoch: int | None = None  # the epoch the latest iter() started
        self._closed = False
        with _live_lock:
            _live.add(self)

    # ---- iteration -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch (for this shard): of the epoch being iterated, or else of the next one,
        as its start would read ``len(sequence)`` now."""
        return self._plan_of(self._length_at(*self._position())).epoch_length

    def _length_at(self, epoch: int, consumed: int) -> int:
        """``len(sequence)`` of the epoch at this position: the one it was planned with once it has
        begun (a pass started, or batches consumed), else what its start would read now."""
        begun = consumed or epoch == self._pass_epoch
        # With a hook, an epoch begins once the hook before it ran, which re-planned it.
        if begun or (self._on_epoch_end is not None and epoch in self._lengths):
            return self._lengths.get(epoch, self._plan.length)
        return _read_length(self._sequence)

    def __iter__(self) -> Iterator[Any]:
        """One epoch of batches, in plan order. See the module docstring for resumption."""
        self._check_open()
        self._autotune()
        self._token += 1
        self._pass_epoch = None
        engine = self._engine
        abandoned, self._abandoned_epoch = self._abandoned_epoch, None
        if engine is None and abandoned is not None and self._resume[0] == abandoned:
            # A pass left after a TimeoutError: its engine stopped. Start it where the pass would
            # go on, so that the rest of it is skipped below as any unfinished pass's is.
            self._start_engine()
            engine = self._engine
        if engine is not None:
            epoch, start, end = self._segment_at(engine.next_position)
            # An unfinished pass: skip the rest of that epoch. (After a timeout the engine restarted
            # past the abandoned batch, so its position alone does not tell.)
            if engine.next_position > start or abandoned == epoch:
                skipped = self._skip_rest(engine, epoch, end)
                if skipped is not None:
                    engine = skipped
                    epoch, start, end = self._segment_at(engine.next_position)
                else:  # gave up on a batch still loading: the engine stopped, the next epoch starts
                    engine = None
        if engine is not None:
            resumed = epoch == self._first_epoch and self._skipped > 0
            if not resumed and (start == end or self._length_changed(epoch)):
                # The length changed since the epoch was planned, or on_epoch_end's callback
                # emptied it (its hook is ours to call): start again at the epoch's start.
                self._stop_engine()
                engine = None
        if engine is None:
            epoch, offset = self._resume
            if offset == 0:  # an epoch's start: its length is read now
                self._plan = self._plan_of(_read_length(self._sequence))
            if self._plan.epoch_length == 0:
                return self._empty_epoch()
            self._start_engine()
            engine = self._engine
            assert engine is not None
        # At most one ahead: NOTE [ Gather prunes sample orders two epochs behind the plan ] (gather.h)
        if self._plan_ahead:
            self._plan_through(epoch + 1)  # keep one epoch planned ahead: no bubble at the boundary
        self._pass_epoch = epoch
        if self._tuner is not None:
            # The GIL is sampled for passes that will be tuned on (an epoch of _tune.MIN_BATCHES,
            # or short ones pooled, from the second on) while the tuner may still need it.
            if (self._probe is None and self._tuner.sample_gil
                    and (self._plan.epoch_length >= _tune.MIN_BATCHES or self._window.pooled)):
                self._probe = GilProbe()
            self._window.start(engine, epoch)
        return _EpochIterator(self, engine, epoch, self._end_of(epoch), self._token)

    # ---- autotune ------------------------------------------------------------------------------

    def _pass_ended(self, engine: _C.Engine, epoch: int) -> None:
        """A pass ran to its end on ``engine``: its last segment joins the window, and a window
        long enough to tell is what the next ``iter()`` tunes on (short passes are pooled until
        they are long enough together)."""
        if self._tuner is None or not self._window.open:
            return
        self._window.close(engine, self._threads)
        if self._window.ready():
            self._measured = self._take_window(epoch, None)

    def _take_window(self, epoch: int, batch: int | None) -> _tune.Measurement:
        gil = self._probe.take() if self._probe is not None else None
        # Process mode's workers are other processes: this one's CPU time does not count them.
        return self._window.take(epoch, batch, gil, count_cpu=self._workers is None)

    def _observe(self, measured: _tune.Measurement) -> tuple[_tune.Settings, _tune.Settings]:
        """The tuner's settings before and after ``measured``; the GIL probe stops once the tuner
        no longer needs it."""
        tuner = self._tuner
        assert tuner is not None
        before = tuner.settings
        after = tuner.observe(measured)
        if not tuner.sample_gil and self._probe is not None:
            self._probe.close()  # nothing left to decide about the GIL (and no thread while forking)
            self._probe = None
        return before, after

    def _checkpoint(self, iterator: _EpochIterator) -> None:
        """Mid-pass, before the consumer's next batch: once the window has run ``_tune.MID_PASS_S``,
        the tuner decides on it, and a change is applied now, by restarting the engine at the
        consumer's position (the batches the stopped engine loaded ahead are loaded again: none
        is lost or repeated). Only while the epoch's last position cannot have started loading
        (at most ``depth`` ahead of the consumer): its ``on_epoch_end`` must not have run."""
        engine, window, tuner = self._engine, self._window, self._tuner
        if (tuner is None or engine is None or engine is not iterator._engine or not window.open
                or window.elapsed_s() < _tune.MID_PASS_S
                or iterator._end - engine.next_position <= self.depth):
            return
        window.close(engine, self._threads)
        epoch, consumed = self._position()
        if window.ready():
            measured = self._take_window(epoch, consumed)
            before, after = self._observe(measured)
            if after != before:
                self._apply(before, after, measured)
                engine = self._continue_pass(iterator)
                assert engine is not None, "mid-epoch: the pass goes on"
                iterator._engine = engine
        window.start(engine, epoch)

    def _autotune(self) -> None:
        """At a new pass after a window that ended with a pass: the tuner's next settings, applied
        by restarting the engine at the epoch's start."""
        measured, self._measured = self._measured, None
        tuner = self._tuner
        if tuner is None or measured is None:
            return
        before, after = self._observe(measured)
        if after != before:
            self._apply(before, after, measured)

    def _apply(self, before: _tune.Settings, after: _tune.Settings, measured: _tune.Measurement) -> None:
        """Stops the engine and takes the tuner's new settings (the caller starts the next engine,
        where the consumer is): a new set of worker processes when their mode or number changes."""
        tuner = self._tuner
        assert tuner is not None
        self._stop_engine()
        if after.mode == "process" and (before.mode != "process" or after.workers != before.workers):
            try:
                self._start_processes(after.workers)
            except Exception as exc:  # e.g. a Sequence that spawn cannot pickle: threads go on
                tuner.limits = dataclasses.replace(tuner.limits, process_ok=False)
                tuner.settings = after = dataclasses.replace(after, mode="thread", workers=before.workers)
                tuner.decisions.append(f"{measured.where}: worker processes could not start "
                                       f"({type(exc).__name__}: {exc}); threads go on")
        self.mode, self.workers, self.depth = after.mode, after.workers, after.depth

    def _start_processes(self, workers: int) -> None:
        """Process mode from now on, with ``workers`` worker processes (the engine is stopped):
        a buffer pool carved from a shared arena, and a new zygote forked from this image (or
        sent the Sequence pickled), whose copy of the Sequence has every hook run so far."""
        old = self._workers
        self._workers = None
        if old is not None:
            old.close()
        if self._pool.arena_size == 0:
            # Thread mode's pool has no arena: batches still held keep the old pool's buffers.
            arena = 2 * self._max_pool_bytes + _ARENA_SLACK
            pool = _C.BufferPool(self._max_pool_bytes, self._pin, arena)
            self._pool.close()
            self._pool = pool
        start_method = self.start_method or _process.default_start_method()
        self._workers = _process.WorkerPool(
            self._sequence, workers=workers, pool=self._pool, start_method=start_method,
            worker_init_fn=self._worker_init_fn, seed=self._seed,
            replay_hooks=self._on_epoch_end is not None,
        )
        self.start_method = start_method
        self._hooks_run = 0  # the new workers' copies start from this process's Sequence

    def _length_changed(self, epoch: int) -> bool:
        """Without a hook an epoch starts at iter(): whether len(sequence) differs from its plan's."""
        return self._on_epoch_end is None and self._lengths.get(epoch) != _read_length(self._sequence)

    def _skip_rest(self, engine: _C.Engine, epoch: int, end: int) -> _C.Engine | None:
        """Skips the rest of an unfinished pass: its positions are not loaded, and those being
        loaded are waited for, at most ``timeout``. Returns the engine, or None when one of them
        takes longer (a stuck ``__getitem__``): then the engine is stopped (its stuck thread
        joined or abandoned within ``close_grace_s``, a stuck worker process killed), the epoch's
        ``on_epoch_end`` runs here, as the engine would have run it, and the next epoch is to start
        from the resume point."""
        try:
            engine.drain_to(end, self.timeout)
            return engine
        except TimeoutError:
            pass
        self._retire_engine()
        self._resume = (epoch + 1, 0)
        self._warn_abandoned(self._join_retired())
        self._run_epoch_hook()  # its error ends no pass, as for any skipped epoch
        return None

    def _run_epoch_hook(self) -> Exception | None:
        """Runs ``on_epoch_end`` here, where no engine will (an epoch that ended without one:
        empty, or its last batch given up): counted, so that worker processes replay it.
        Returns the hook's exception (None: it returned, or there is no hook)."""
        if self._on_epoch_end is None:
            return None
        self._hooks_run += 1
        try:
            self._on_epoch_end()
        except Exception as exc:
            return exc
        return None

    def _empty_epoch(self) -> Iterator[Any]:
        epoch, _ = self._resume
        self._resume = (epoch + 1, 0)
        error = self._run_epoch_hook()
        if error is not None:
            raise error
        return
        yield  # a generator that yields nothing

    def _start_engine(self) -> None:
        self._warn_abandoned(self._join_retired())  # the stopped engine's threads joined or abandoned
        prefault, self._prefault = self._prefault, None
        if prefault is not None:
            # Loading starts now: the prefault thread (an ArraySequence's first buffers, faulted
            # in ahead while the caller did other things) stops after the buffer it is touching,
            # and the workers make the buffers it did not (faulting in on a thread of its own
            # while they fill would slow them: buffer_pool.h, "Faulting in ahead of need").
            self._pool.stop_reserving()
            prefault.join()
        epoch, offset = self._resume
        cell: list[Any] = [None]  # a weak reference to the engine, once made
        hook = None if self._on_epoch_end is None else self._epoch_hook(cell)
        if self._workers is not None:
            source = self._proc_loader = self._workers.loader(self._pool, hook, self.max_retries, self._hooks_run)
            threads = self.workers  # one thread drives each worker process
        else:
            source = self._native_source if self._native_source is not None else self._sequence
            # More threads than positions that can be loading at once would only wait: at most
            # depth are in flight, and at most two epochs are planned (this one and the next). A
            # stream source (pyloader._stream) lays its shards out over exactly `workers` threads.
            threads = min(self.workers, self.depth, max(1, 2 * self._plan.epoch_length))
            if getattr(self._sequence, "_pyloader_stream_source", False):
                threads = self.workers
        self._threads = threads
        engine = _C.Engine(
            source,
            hook,
            self._pool,
            threads,
            self.depth,
            _RUN_BUDGET_US,
            batch_error,
            PoolExhaustedWarning,
            StallWarning,
            self.stall_warning_s,
            self.pool_wait_s,
        )
        cell[0] = weakref.ref(engine)
        try:
            indices = self._plan.indices(epoch)[offset:]
            self._register_epoch(epoch)
            engine.append(epoch, indices, False)
            engine.start()
        except BaseException:
            engine.close(self.close_grace_s)  # leave the Prefetcher as it was: no engine
            raise
        self._engine = engine
        self._skipped = offset
        self._first_epoch = epoch
        self._lengths = {epoch: self._plan.length}

    def _epoch_hook(self, cell: list[Any]) -> Any:
        """The engine's epoch hook: the Sequence's ``on_epoch_end``, then the next epoch planned
        again with the length it left. Runs on the engine thread that loaded the epoch's last
        batch, before the next epoch's gate opens (engine.h: "Re-planning"); in process mode, in
        this process (the workers replay the hook on their copies: the length is this process's).
        """
        hook = self._on_epoch_end
        assert hook is not None
        me = weakref.ref(self)

        def epoch_end(epoch: int) -> None:
            try:
                hook()
            finally:
                loader = me()
                engine: _C.Engine | None = cell[0]() if cell[0] is not None else None
                if loader is not None and engine is not None and loader._engine is engine:
                    loader._replan(epoch + 1)

        return epoch_end

    def _replan(self, epoch: int) -> None:
        """Plans ``epoch`` (gated, not loaded yet) again if ``len(sequence)`` changed."""
        engine = self._engine
        assert engine is not None, "called by the running engine's hook"
        with self._plan_lock:  # not between _plan_through's read of the length and its append
            planned = self._lengths.get(epoch)
            if planned is None:
                return  # not planned yet: its length is read when it is, after this hook
            length = _read_length(self._sequence)
            if length != planned and engine.replan(epoch, self._plan_of(length).indices(epoch)):
                self._lengths[epoch] = length

    def _segments(self) -> list[tuple[int, int, int]]:
        """The engine's epochs, in position order: ``(epoch, first position, end position)``."""
        assert self._engine is not None
        return self._engine.segments()

    def _plan_through(self, epoch: int) -> None:
        assert self._engine is not None
        last_epoch = self._segments()[-1][0]
        while last_epoch < epoch:
            last_epoch += 1
            # Read ahead of the epoch's start: on_epoch_end's callback (_replan) or the next
            # iter() checks it again. Under the lock: a hook that runs meanwhile (on an engine
            # thread) must find the epoch appended, or not yet read.
            with self._plan_lock:
                plan = self._plan = self._plan_of(_read_length(self._sequence))
                indices = plan.indices(last_epoch)
                self._register_epoch(last_epoch)
                self._lengths[last_epoch] = plan.length
                for old in [e for e in self._lengths if e < last_epoch - 2]:
                    del self._lengths[old]
                self._engine.append(last_epoch, indices, True)

    def _plan_of(self, length: int) -> Plan:
        """The plan with this ``len(sequence)`` (and the order and sharding of every epoch)."""
        return self._plan if length == self._plan.length else dataclasses.replace(self._plan, length=length)

    def _register_epoch(self, epoch: int) -> None:
        """Tells a native source the epoch's sample order before its positions can load."""
        if self._native_source is not None:
            self._native_source.set_order(epoch, self._sequence.sample_order(epoch))

    def _end_of(self, epoch: int) -> int:
        """The end position of a planned epoch."""
        for seg_epoch, _, end in self._segments():
            if seg_epoch == epoch:
                return end
        raise AssertionError(f"epoch {epoch} is not planned")

    def _segment_at(self, position: int) -> tuple[int, int, int]:
        """The segment the consumer is in: a finished segment counts as the start of the next (an
        empty one, re-planned so by on_epoch_end, included)."""
        segments = self._segments()
        for seg in segments:
            if position < seg[2] or position == seg[1] == seg[2]:
                return seg
        self._plan_through(segments[-1][0] + 1)
        return self._segments()[-1]

    # ---- state ---------------------------------------------------------------------------------

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it consumed) of the consumer now."""
        if self._engine is None:
            return self._resume
        pos = self._engine.next_position
        # The engine keeps the segments from the one that ends at the consumer's position on
        # (NOTE [ Engine prunes segments behind the consumer ], engine.h): the first one kept need
        # not be the engine's first epoch, which alone was resumed after _skipped batches.
        segments = self._segments()
        for epoch, start, end in segments:
            if pos < end or pos == start == end:
                return epoch, (self._skipped if epoch == self._first_epoch else 0) + pos - start
        return segments[-1][0] + 1, 0

    @property
    def epoch(self) -> int:
        """The epoch the consumer is in (or about to start)."""
        return self._position()[0]

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is: loading it into a new Prefetcher over the same Sequence yields
        exactly the batches this one would have yielded next, this epoch and the following ones."""
        epoch, consumed = self._position()
        length = self._length_at(epoch, consumed)
        if consumed and consumed == self._plan_of(length).epoch_length:
            epoch, consumed = epoch + 1, 0
            length = self._length_at(epoch, consumed)
        p = self._plan
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "batches_consumed": consumed,
            "seed": p.seed,
            "shuffle": p.shuffle,
            "length": length,
            "rank": p.rank,
            "world_size": p.world_size,
            "drop_last": p.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a :meth:`state_dict`: the next pass resumes that epoch where it stopped.

        The state's ``length`` is the ``len(sequence)`` of the epoch it resumes (the one its start
        read, or would read): the Sequence must have that length when the state is loaded (for a
        Sequence whose length changes between epochs, restore its own state first).

        Raises:
            ValueError: the state is malformed or was taken over a different Sequence length or
                sharding.
        """
        self._check_open()
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a pyloader state_dict (version {_STATE_VERSION}): {state!r}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(map(repr, missing))}: it has {sorted(state)}")
        p = self._plan_of(_read_length(self._sequence))
        for key, mine in (("length", p.length), ("rank", p.rank), ("world_size", p.world_size),
                          ("drop_last", p.drop_last)):
            if state[key] != mine:
                raise ValueError(
                    f"state_dict was taken with {key}={state[key]!r} but this Prefetcher has "
                    f"{key}={mine!r}: it can only resume the same Sequence and sharding"
                )
        epoch = _checks.whole("state['epoch']", state["epoch"], 0)
        if epoch > _MAX_EPOCH:
            raise ValueError(f"state['epoch'] must be at most {_MAX_EPOCH}, got {epoch!r}")
        consumed = _checks.whole("state['batches_consumed']", state["batches_consumed"], 0)
        if consumed > p.epoch_length:
            raise ValueError(
                f"state['batches_consumed']={consumed} is more than the {p.epoch_length} batches of an epoch"
            )
        shuffle = _checks.flag("state['shuffle']", state["shuffle"])
        seed = _checks.whole("state['seed']", state["seed"], 0)
        self._plan = Plan(p.length, shuffle, seed, p.rank, p.world_size, p.drop_last)
        self.shuffle = self._plan.shuffle
        self._stop_engine()
        self._resume = (epoch + 1, 0) if consumed == p.epoch_length and consumed else (epoch, consumed)

    def _renew(self, name: str, *args: Any) -> None:
        """The Sequence's contents change: calls ``sequence.<name>(*args)``, here and in every
        worker process, and makes the next pass a fresh epoch over ``len(sequence)`` batches.

        The workers (threads or processes) stay: this is how ``pyloader.torch`` keeps persistent
        workers across passes. A worker process started later (a replacement) gets the latest
        call before its first batch, so the method must *set* state, not add to it.
        """
        self._check_open()
        self._stop_engine()
        getattr(self._sequence, name)(*args)
        if self._workers is not None:
            self._workers.update(name, args, self._hooks_run)
        self._plan = self._plan_of(_read_length(self._sequence))
        epoch, consumed = self._resume
        self._resume = (epoch + 1, 0) if consumed else (epoch, 0)

    def _quiesce(self, timeout_s: float) -> None:
        """Waits, at most ``timeout_s``, until no worker is inside a position (between positions
        they wait for a ring slot or a plan), so that the next stop interrupts none: in process
        mode an interrupted worker process is replaced, losing its state (a persistent worker's
        random streams). For a pass that ends before the plan does (a stream's)."""
        engine = self._engine
        if engine is None or self._workers is None:
            return
        deadline = time.monotonic() + timeout_s
        while engine.busy_workers() and time.monotonic() < deadline:
            time.sleep(0.001)

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass be epoch ``epoch`` from its start (like ``sampler.set_epoch``)."""
        self._check_open()
        epoch = _checks.whole("epoch", epoch, 0)
        if self._position() == (epoch, 0):
            return
        self._stop_engine()
        self._resume = (epoch, 0)

    # ---- observability -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per-epoch figures: batches, load time per batch (p50, p95 in ms), time the consumer
        waited (``wait_s``) and its fraction of the epoch's wall time (``stall_fraction``), buffer
        pool size, peak batches in flight, and the workers' busy fraction.

        The consumer's wait is the time spent inside pyloader to get each batch: sleeping until
        it is loaded, taking the GIL back, and the hand-off (building the batch's arrays). Python's
        own iteration overhead around it is not counted.

        Memory stays bounded however long the run: the latest 64 epochs are listed, older ones are
        merged into ``"earlier"`` (the same keys, plus ``first_epoch`` and ``epochs``, the number
        merged). Load-time percentiles come from a log-scale histogram: exact below 16 µs, else
        within 3.1% of the order statistic at rank ``floor(q * (n - 1))``.

        With autotune (a setting left ``"auto"``), ``"autotune"`` holds the settings in force
        (``mode``, ``workers``, ``depth``) and ``decisions``: every change made, each with its
        epoch and why (for example ``"epoch 2: thread -> process: the GIL was held 92% of the time
        the loop waited for a batch ..."``); ``None`` without autotune.

        Returns:
            ``{"epochs": [dict per epoch], "current": the latest epoch's dict or None, "earlier":
            the older epochs merged, or None, "autotune": dict or None}``.
        """
        live = self._engine.stats() if self._engine is not None else None
        view = self._past_stats.view(live, self._threads)
        tuner = self._tuner
        view["autotune"] = None if tuner is None else {
            "mode": self.mode, "workers": self.workers, "depth": self.depth,
            "decisions": list(tuner.decisions),
        }
        return view

    def memory_info(self) -> dict[str, Any]:
        """What the buffer pool holds and what was pinned, how, and why.

        Returns:
            a dict with ``pin_requested``, ``pin_method`` (``"cuda"``, ``"mlock"`` or ``"none"``),
            ``pin_reason``, ``pin_error`` (the last failure), ``pinned_bytes``, ``pin_failures``,
            ``buffers``, ``leased``, ``bytes``, ``peak_bytes``, ``max_bytes`` and ``allocations``.
        """
        info = dict(self._pool.info())
        info["pin_requested"] = self._pin
        return info

    # ---- lifetime ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Prefetcher is closed")

    def _stop_engine(self) -> None:
        """Stops and joins the engine for a restart whose caller then sets ``_resume`` (a state,
        an epoch, a renewal): no pass is left unfinished after it."""
        self._retire_engine()
        self._abandoned_epoch = None
        self._warn_abandoned(self._join_retired())

    def _retire_engine(self) -> None:
        """Stops the engine at once (no new position starts) and leaves joining it to
        :meth:`_join_retired`; ``_resume`` is where the consumer is."""
        engine = self._engine
        if engine is not None:
            self._resume = self._position()  # where the next engine starts
            if self._resume[1]:  # mid-epoch: the next engine resumes it over the length it began with
                self._plan = self._plan_of(self._lengths.get(self._resume[0], self._plan.length))
            try:
                self._past_stats.add(engine.stats(), self._threads)
            finally:  # a summary that fails (numpy gone at exit) must not leave the engine running
                self._engine = None
                engine.stop()
                self._retired.append((engine, self._proc_loader))
                self._proc_loader = None
        self._skipped = 0
        self._lengths = {}
        self._pass_epoch = None

    def _join_retired(self) -> list[str]:
        """Joins the stopped engines (at most ``close_grace_s`` for a thread inside user code,
        then it is abandoned) and, in process mode, replaces the workers they left
        mid-conversation: a stuck or stopped worker process is killed. Returns what each
        abandoned thread was doing."""
        abandoned: list[str] = []
        while self._retired:
            engine, loader = self._retired.pop(0)
            abandoned += engine.close(self.close_grace_s)
            if loader is not None and self._workers is not None:
                self._hooks_run = loader.hooks
                if not self._closed:
                    self._workers.discard(loader.dirty())  # workers left mid-conversation
        return abandoned

    def _warn_abandoned(self, abandoned: list[str]) -> None:
        for what in abandoned:
            warnings.warn(
                f"pyloader: abandoned {what}: it did not return within close_grace_s="
                f"{self.close_grace_s} s of the engine's stop. It ends on its own when the call "
                f"returns (or with the process); its batch is not delivered.",
                StallWarning,
                stacklevel=3,
            )

    def _abandon(self, iterator: _EpochIterator) -> None:
        """After a TimeoutError: the batch the consumer waited for is given up. The engine stops
        now; the next one (started when the pass goes on, or by a new ``iter()``) begins after
        that batch. When it was its epoch's last, the epoch ends here: its ``on_epoch_end`` runs
        now, as the engine would have run it after the batch."""
        epoch, consumed = self._position()
        self._retire_engine()
        iterator._engine = None
        if consumed + 1 < self._plan.epoch_length:
            self._resume = (epoch, consumed + 1)
            self._abandoned_epoch = epoch
            return
        self._resume = (epoch + 1, 0)
        self._abandoned_epoch = None
        if self._on_epoch_end is not None:
            self._warn_abandoned(self._join_retired())  # process mode: the hook count first
            iterator._epoch_error = self._run_epoch_hook()

    def _continue_pass(self, iterator: _EpochIterator) -> _C.Engine | None:
        """The engine for a pass whose engine was stopped mid-epoch (after a timeout, or by an
        autotune decision), started where the pass goes on; None if the abandoned batch was the
        pass's last."""
        if self._resume[0] != iterator._epoch:
            return None
        if self._engine is None:
            self._start_engine()
            self._past_stats.continues(iterator._epoch)  # one record of the epoch in stats()
        assert self._engine is not None
        if self._plan_ahead:
            self._plan_through(iterator._epoch + 1)
        iterator._end = self._end_of(iterator._epoch)
        return self._engine

    def close(self) -> None:
        """Stops and joins every worker thread (and process) and returns the buffer pool's memory
        to the OS: at once for buffers no batch uses, and as each batch you kept dies for the
        rest. Idempotent; batches already delivered stay valid.

        It never waits for ever: a worker thread still inside user code after ``close_grace_s``
        is abandoned (a :class:`~pyloader.StallWarning` names its batch; it ends when its call
        returns, or with the process), and worker processes are killed, stuck or stopped ones
        too. No process started by the Prefetcher survives it."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        probe, self._probe = getattr(self, "_probe", None), None
        if probe is not None:
            probe.close()
        prefault, self._prefault = getattr(self, "_prefault", None), None
        if prefault is not None:
            prefault.join()  # a few buffers' page faults: it ends soon
        self._retire_engine()
        abandoned = self._join_retired()
        workers, self._workers = getattr(self, "_workers", None), None
        if workers is not None:
            workers.close()  # kills every worker process, a stuck or stopped one too
            self._pool.close_arena_fd()
        self._pool.close()  # its memory goes back now, a kept batch's when the batch dies
        with _live_lock:
            _live.discard(self)
        self._warn_abandoned(abandoned)  # last: a warning turned into an error leaves it closed

    def worker_pids(self) -> list[int]:
        """Process mode: the process ids of the current workers, one per worker (a replaced worker's
        successor takes its place, once started; a worker that could not be replaced is left
        out). Thread mode: ``[]``."""
        if self._workers is None:
            return []
        # WorkerPool.pids() waits out a replacement in progress; a slot whose replacement failed
        # holds pid 0, never handed out: os.kill(0, sig) signals the caller's whole process group.
        return [pid for pid in self._workers.pids() if pid > 0]

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"epoch={self.epoch}"
        return (
            f"Prefetcher({type(self._sequence).__name__} of {self._plan.length} batches, "
            f"workers={self.workers}, depth={self.depth}, mode={self.mode!r}, "
            f"shuffle={self.shuffle}, shard=({self._plan.rank}, {self._plan.world_size}), {state})"
        )


class _EpochIterator:
    """One pass over a Prefetcher: the positions of one epoch, in order.

    After a :class:`~pyloader.BatchError` the iterator stays usable: ``next()`` goes on with the
    following batch. After a ``TimeoutError`` too: the batch that timed out is abandoned (not
    delivered, this epoch; it counts as passed in :meth:`Prefetcher.state_dict`), and ``next()``
    goes on with the following batch, or ends the pass if it was the epoch's last. After a
    :class:`~pyloader.PoolExhaustedError` (or a stall warning turned into an error) ``next()``
    waits for the same batch again. A ``for`` loop that an exception leaves has abandoned the
    pass: the next ``iter()`` of the Prefetcher starts the next epoch.
    """

    __slots__ = ("_loader", "_engine", "_epoch", "_end", "_token", "_timeout", "_ended", "_epoch_error",
                 "_taken", "_check_at")

    def __init__(self, loader: Prefetcher, engine: _C.Engine, epoch: int, end: int, token: int) -> None:
        self._loader = loader
        self._engine: _C.Engine | None = engine  # None: stopped after a timeout (Prefetcher._abandon)
        self._epoch_error: BaseException | None = None  # on_epoch_end's, when run by _abandon
        self._epoch = epoch
        self._end = end
        self._token = token
        self._timeout = loader.timeout
        self._ended = False
        self._taken = 0  # batches taken by this pass
        # Autotune's mid-pass checkpoints: every _CHECK_EVERY batches (never without a tuner).
        self._check_at = _CHECK_EVERY if loader._tuner is not None else _NEVER

    def __iter__(self) -> _EpochIterator:
        return self

    def __next__(self) -> Any:
        if self._loader._token != self._token:
            raise RuntimeError("this epoch iterator was replaced by a newer iter() of its Prefetcher")
        engine = self._engine
        if engine is None and not self._ended:
            engine = self._engine = self._loader._continue_pass(self)
        elif self._taken >= self._check_at and engine is not None:
            # Before the take: a restart that fails loses no batch taken.
            self._check_at = self._taken + _CHECK_EVERY
            self._loader._checkpoint(self)
            engine = self._engine
        probe = self._loader._probe
        try:
            if engine is not None:
                # The end is checked in the engine, in the same turn as the take: two threads
                # racing for the epoch's last batch cannot take one of the next epoch (one of them
                # is refused with pyloader._C.ConcurrentConsumerError, a RuntimeError).
                if probe is None:
                    batch = engine.next_batch(self._timeout, self._end)
                else:
                    probe.waiting = True  # the GIL probe samples the loader's use of it now
                    try:
                        batch = engine.next_batch(self._timeout, self._end)
                    finally:
                        probe.waiting = False
                self._taken += 1
                return batch
        except StopIteration:
            if not self._ended and engine is not None:
                self._loader._pass_ended(engine, self._epoch)
        except TimeoutError:
            self._loader._abandon(self)
            raise
        if not self._ended:
            self._ended = True
            error = self._epoch_error if engine is None else engine.epoch_error(self._epoch)
            if error is not None:
                raise EpochEndError(f"on_epoch_end() raised after epoch {self._epoch}: {error!r}") from error
        raise StopIteration

    def __length_hint__(self) -> int:
        if self._engine is None:
            epoch, consumed = self._loader._resume
            return max(0, len(self._loader) - consumed) if epoch == self._epoch and not self._ended else 0
        return max(0, self._end - self._engine.next_position)


def _start_prefault(pool: _C.BufferPool, count: int, nbytes: int, max_pool_bytes: int) -> threading.Thread | None:
    """Starts a thread that makes ``count`` buffers of ``nbytes`` in ``pool`` and touches their
    pages, when they take at most half the pool's bound; returns it (None: nothing to do)."""
    if nbytes <= 0 or count * nbytes > max_pool_bytes // 2:
        return None
    thread = threading.Thread(target=pool.reserve, args=(count, nbytes), name="pyloader-prefault", daemon=True)
    thread.start()
    return thread


def _read_length(sequence: Any) -> int:
    """``len(sequence)``: the number of batches of an epoch, read when it starts (or is planned)."""
    return len(sequence)


def prefetch(sequence: Any, **options: Any) -> Prefetcher | Stream:
    """A :class:`Prefetcher` for raw loops, to use as a context manager; for an iterator (a
    generator), a :class:`~pyloader.Stream` of that one shard, read by one worker thread.

    Example::

        with pyloader.prefetch(seq, workers=4) as batches:
            for x, y in batches:
                ...

    Args:
        sequence: the Sequence to load, or an iterator.
        **options: the keyword options of :class:`Prefetcher` (of :class:`~pyloader.Stream` for
            an iterator).
    """
    from .streams import Stream, is_stream_like  # streams builds on this module

    if is_stream_like(sequence):
        return Stream([sequence], **options)
    return Prefetcher(sequence, **options)
