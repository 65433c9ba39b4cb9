"""The Keras adapter: real model.fit / evaluate / predict on pyloader.keras.prefetch, on the backend
``KERAS_BACKEND`` names (torch when unset; CI runs this file on torch, jax and tensorflow).

Batches carry their Sequence index in every row of ``x[:, 0]``; a pass-through layer records the
index of every batch that reaches the model, so each test counts what Keras actually consumed. The
models run eagerly (``run_eagerly=True``) so that the layer sees values on every backend. A test
about one backend says so in its name and skips on the others.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import textwrap
import threading
from collections import Counter

os.environ.setdefault("KERAS_BACKEND", "torch")

import warnings

import numpy as np
import pytest
from conftest import run_python

keras = pytest.importorskip("keras")

import pyloader  # noqa: E402
import pyloader.keras as pk  # noqa: E402
from pyloader import _tune  # noqa: E402

BACKEND = keras.backend.backend()
ROWS = 4

torch_only = pytest.mark.skipif(BACKEND != "torch", reason=f"about the torch backend (this run: {BACKEND})")
tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason=f"about the tensorflow backend (this run: {BACKEND})"
)


def concrete(x) -> np.ndarray | None:
    """The values of a tensor the model computes on, or None while Keras traces it symbolically."""
    if isinstance(x, keras.KerasTensor):
        return None
    if BACKEND == "torch":
        return None if x.is_meta else x.detach().cpu().numpy()
    if BACKEND == "jax":
        import jax

        return None if isinstance(x, jax.core.Tracer) else np.asarray(x)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return x.numpy() if tf.executing_eagerly() and hasattr(x, "numpy") else None
    return keras.ops.convert_to_numpy(x)  # pragma: no cover - another backend

# numpy >= 2 warns when Keras's torch backend calls np.array() on a tensor (torch's __array__ takes
# no copy=): Keras does so itself in evaluate/predict, whatever feeds it.
# On jax, process mode forks (pyloader's zygote) from a process where jax runs threads: jax warns at
# every os.fork(). The workers run only the Sequence's __getitem__, never jax.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning"),
]


def read_directly() -> bool:
    """Whether ``__getitem__`` runs on the main thread: a read of the test's own, or one Keras makes
    itself (on tensorflow, Keras reads the first batches to learn their spec, whatever feeds it).
    pyloader's thread-mode workers never run there."""
    return threading.current_thread() is threading.main_thread()


class Indexed(keras.utils.PyDataset):
    """Batch i: x = rows of [i, i/10], y = 2*i/10 + 1 (learnable), i.e. (x, y); logs the loads of
    pyloader's workers (``loaded``) apart from direct reads (``direct``, see :func:`read_directly`)."""

    def __init__(self, n: int, *, weights: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n
        self.weights = weights
        self.loaded: list[int] = []
        self.direct: list[int] = []
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        with self.lock:
            (self.direct if read_directly() else self.loaded).append(i)
        x = np.empty((ROWS, 2), np.float32)
        x[:, 0] = i
        x[:, 1] = i / 10
        y = np.full((ROWS, 1), 2 * i / 10 + 1, np.float32)
        if self.weights:
            return x, y, np.zeros(ROWS, np.float32)
        return x, y


class Hooked(Indexed):
    """Also logs on_epoch_begin / on_epoch_end, in one log with the loads."""

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(n, **kwargs)
        self.log: list[object] = []

    def __getitem__(self, i: int):
        out = super().__getitem__(i)
        if not read_directly():
            with self.lock:
                self.log.append(i)
        return out

    def on_epoch_begin(self) -> None:
        with self.lock:
            self.log.append("begin")

    def on_epoch_end(self) -> None:
        with self.lock:
            self.log.append("end")


class Recorder(keras.layers.Layer):
    """Identity layer that records the Sequence index of each batch it sees."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_seen: list[int] = []
        self.infer_seen: list[int] = []
        self.train_rows: list[int] = []
        self.pointers: list[int] = []

    def call(self, x, training=None):
        values = concrete(x)
        if values is None:  # building the model symbolically
            return x
        index = int(values[0, 0])
        (self.train_seen if training else self.infer_seen).append(index)
        if training:
            self.train_rows += [int(v) for v in values[:, 0]]
        if BACKEND == "torch":
            self.pointers.append(x.data_ptr())
        return x


def model_with_recorder(*, learning_rate: float = 0.01) -> tuple[keras.Model, Recorder]:
    recorder = Recorder()
    model = keras.Sequential([keras.Input((2,)), recorder, keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(learning_rate), "mse", run_eagerly=True)
    return model, recorder


def per_epoch(seen: list[int], n: int) -> list[list[int]]:
    return [seen[k : k + n] for k in range(0, len(seen), n)]


@pytest.fixture
def prefetched():
    made: list[pk.PrefetchedDataset] = []

    def make(seq, **options) -> pk.PrefetchedDataset:
        ds = pk.prefetch(seq, **options)
        made.append(ds)
        return ds

    yield make
    for ds in made:
        ds.close()


# ---- fit -----------------------------------------------------------------------------------------


def test_a_missing_backend_is_named_with_how_to_pick_another():
    import importlib.util

    missing = [b for b in ("jax", "tensorflow", "torch") if importlib.util.find_spec(b) is None]
    if not missing:
        pytest.skip("every backend is installed: the missing-backend message needs one that is not")
    done = run_python("""
        try:
            import pyloader.keras
        except ImportError as exc:
            print(exc)
    """, env={"KERAS_BACKEND": missing[0]})
    assert done.returncode == 0, done.stderr
    assert f"keras could not import its backend, {missing[0]} (KERAS_BACKEND='{missing[0]}')" in done.stdout
    assert "set KERAS_BACKEND to a backend you have installed" in done.stdout


def test_fit_loss_falls(prefetched):
    keras.utils.set_random_seed(0)  # the initial weights: not whatever earlier tests left the RNG at
    model, _ = model_with_recorder(learning_rate=0.02)
    history = model.fit(prefetched(Indexed(8), workers=2), epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_fit_default_shuffle_gives_every_batch_exactly_once_per_epoch(prefetched):
    n, epochs = 12, 3
    seq = Indexed(n)
    ds = prefetched(seq, workers=3, depth=4)
    model, recorder = model_with_recorder()
    model.fit(ds, epochs=epochs, verbose=0)  # fit's default shuffle=True
    epochs_seen = per_epoch(recorder.train_seen, n)
    assert len(epochs_seen) == epochs
    for seen in epochs_seen:
        assert sorted(seen) == list(range(n)), seen
    assert len({tuple(seen) for seen in epochs_seen}) > 1, "fit(shuffle=True) should shuffle"
    # The Sequence loaded each index once per epoch, plus at most the epoch loaded ahead.
    assert all(epochs <= count <= epochs + 1 for count in Counter(seq.loaded).values())
    assert len(seq.loaded) <= epochs * n + ds.loader.depth
    assert [e["batches"] for e in ds.stats()["epochs"][:epochs]] == [n] * epochs


def test_fit_shuffle_false_keeps_order(prefetched):
    model, recorder = model_with_recorder()
    model.fit(prefetched(Indexed(6), workers=2), epochs=2, shuffle=False, verbose=0)
    assert recorder.train_seen == list(range(6)) * 2


def test_keras_starts_no_enqueuer(prefetched):
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    ds = prefetched(Indexed(4, workers=3, max_queue_size=5))
    assert (ds.workers, ds.use_multiprocessing) == (1, False)
    assert PyDatasetAdapter(ds, shuffle=True).enqueuer is None
    with pytest.raises(AttributeError, match="prefetch"):
        ds.workers = 4
    before = {t.name for t in threading.enumerate()}
    model, _ = model_with_recorder()
    model.fit(ds, epochs=1, verbose=0)
    assert not [t for t in threading.enumerate() if t.name.startswith("Worker_") and t.name not in before]


@tensorflow_only
@pytest.mark.parametrize("shuffle", [False, True])
def test_tensorflow_pipeline_leaves_loading_ahead_to_pyloader_with_the_same_batches(prefetched, shuffle):
    # Keras's tf.data pipeline over a PyDataset without an enqueuer adds prefetch(AUTOTUNE) and
    # tf.data's autotuning thread, whose wait (in the iterator's destructor) made fit return
    # seconds late; pyloader's dataset is read as an enqueuer, for which Keras turns tf.data's
    # prefetching and autotuning off. The batches are those of Keras's generator path.
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    n = 7
    ds = prefetched(Indexed(n), workers=3, depth=4)
    adapter = PyDatasetAdapter(ds, shuffle=shuffle)
    pipeline = adapter.get_tf_dataset()
    assert pipeline.options().autotune.enabled is False
    epochs = []
    for _ in range(3):
        adapter.on_epoch_begin()
        epochs.append([int(x[0, 0]) for x, _y in pipeline.as_numpy_iterator()])
        adapter.on_epoch_end()
    for seen in epochs:
        assert sorted(seen) == list(range(n)), epochs
    if not shuffle:
        assert epochs == [list(range(n))] * 3
    model, recorder = model_with_recorder()
    model.fit(ds, epochs=2, shuffle=shuffle, verbose=0)  # and through fit itself
    assert [sorted(s) for s in per_epoch(recorder.train_seen, n)] == [list(range(n))] * 2


@tensorflow_only
def test_tensorflow_spec_read_takes_loaded_batches_and_each_is_trained_once(prefetched):
    # Keras's get_tf_dataset reads batches 0 and 1 to learn their spec: Keras's own path loads
    # them in place, on the main thread, at every fit/evaluate/predict call. pyloader hands it the
    # first batches of the pass its workers loaded ahead, and serves them again to the generator.
    n, epochs = 7, 3
    seq = Indexed(n)
    ds = prefetched(seq, workers=2, depth=3)
    model, recorder = model_with_recorder()
    for epoch in range(epochs):  # one fit call per epoch: one spec read each
        model.fit(ds, initial_epoch=epoch, epochs=epoch + 1, verbose=0)
    assert seq.direct == []
    seen = per_epoch(recorder.train_seen, n)
    assert [sorted(s) for s in seen] == [list(range(n))] * epochs
    assert all(count <= epochs + 1 for count in Counter(seq.loaded).values()), Counter(seq.loaded)
    model.layers[-1].set_weights([np.array([[1.0], [0.0]], np.float32), np.zeros(1, np.float32)])
    out = model.predict(ds, verbose=0)  # in order, after shuffled fits, the spec read included
    np.testing.assert_array_equal(out[:, 0], np.repeat(np.arange(n, dtype=np.float32), ROWS))
    assert seq.direct == []


def test_unbuilt_model_peek_does_not_cost_a_pass(prefetched):
    # A model without Input reads one batch to build itself (in a Keras iteration of its own):
    # that batch is served again as the first of epoch 0 rather than abandoning pass 0.
    n = 10
    seq = Indexed(n)
    ds = prefetched(seq, workers=2, depth=3, shuffle=False)
    recorder = Recorder()
    model = keras.Sequential([recorder, keras.layers.Dense(1)])
    model.compile("sgd", "mse", run_eagerly=True)
    model.fit(ds, epochs=2, verbose=0)
    assert recorder.train_seen == list(range(n)) * 2
    # Loaded: epochs 0 and 1, and the head of epoch 2 loading ahead; no abandoned pass.
    assert max(Counter(seq.loaded).values()) <= 3, Counter(seq.loaded)


def test_early_stop_then_next_fit_still_exactly_once(prefetched):
    class StopAfter(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                self.model.stop_training = True

    n = 8
    ds = prefetched(Indexed(n), workers=2)
    model, recorder = model_with_recorder()
    model.fit(ds, epochs=3, verbose=0, callbacks=[StopAfter()])
    assert len(recorder.train_seen) == 4
    recorder.train_seen.clear()
    model.fit(ds, epochs=2, verbose=0)
    for seen in per_epoch(recorder.train_seen, n):
        assert sorted(seen) == list(range(n))


def test_steps_per_epoch_smaller_than_length_continues_the_pass(prefetched):
    n, steps = 9, 3
    model, recorder = model_with_recorder()
    model.fit(prefetched(Indexed(n), workers=2), epochs=6, steps_per_epoch=steps, verbose=0)
    assert len(recorder.train_seen) == 6 * steps
    passes = per_epoch(recorder.train_seen, n)  # three epochs of 3 steps make one pass
    for seen in passes:
        assert sorted(seen) == list(range(n)), passes


def test_initial_epoch(prefetched):
    n = 6
    model, recorder = model_with_recorder()
    history = model.fit(prefetched(Indexed(n), workers=2), initial_epoch=2, epochs=4, verbose=0)
    assert history.epoch == [2, 3]
    assert [sorted(s) for s in per_epoch(recorder.train_seen, n)] == [list(range(n))] * 2


def test_epoch_hooks_run_once_per_epoch_around_its_loads(prefetched):
    n, epochs = 10, 3
    seq = Hooked(n)
    model, _ = model_with_recorder()
    model.fit(prefetched(seq, workers=2, depth=3), epochs=epochs, verbose=0)
    log = list(seq.log)
    # Keras's own calls (one on_epoch_end per reset(), one pair per epoch) do not reach the
    # Sequence: pyloader calls the hooks where loading crosses epochs. So each consumed epoch is
    # exactly "begin, its n loads, end", and the epoch loaded ahead has begun (not ended: depth < n).
    assert log.count("end") == epochs and log.count("begin") == epochs + 1
    for e in range(epochs):
        block = log[e * (n + 2) : (e + 1) * (n + 2)]
        assert block[0] == "begin" and block[-1] == "end", log
        assert sorted(block[1:-1]) == list(range(n)), log
    assert log[epochs * (n + 2)] == "begin"


class Resizing(keras.utils.PyDataset):
    """Epoch e (counted by on_epoch_end) has lens[e] batches; batch i: x = rows of [i, e]. Asking
    for an index past the current length raises IndexError (and is logged in ``bad``)."""

    def __init__(self, lens: list[int]) -> None:
        super().__init__()
        self.lens = lens
        self.epoch = 0
        self.bad: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return self.lens[min(self.epoch, len(self.lens) - 1)]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            self.bad.append((self.epoch, i))
            raise IndexError(f"batch {i} of {len(self)} (epoch {self.epoch})")
        x = np.empty((ROWS, 2), np.float32)
        x[:, 0] = i
        x[:, 1] = self.epoch
        return x, np.ones((ROWS, 1), np.float32)

    def on_epoch_end(self) -> None:
        self.epoch += 1


class EpochRows(keras.layers.Layer):
    """Identity layer that records (Sequence epoch, index) of each training batch, per Keras epoch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.epochs: list[list[tuple[int, int]]] = []

    def call(self, x, training=None):
        values = concrete(x)
        if training and values is not None:
            self.epochs[-1].append((int(values[0, 1]), int(values[0, 0])))
        return x


# Keras (3.15, torch backend) reads the number of steps once per fit; a shorter epoch ends when its
# generator (which reads len() when it starts) runs out, with this warning.
@pytest.mark.filterwarnings("ignore:Your input ran out of data:UserWarning")
@pytest.mark.parametrize("path", ["thread", "process", "keras"])
def test_a_length_on_epoch_end_changes_gives_each_fit_epoch_every_batch_of_its_epoch_once(prefetched, path):
    lens = [4, 2, 3, 1, 4]
    seq = Resizing(lens)
    rows = EpochRows()
    model = keras.Sequential([keras.Input((2,)), rows, keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse", run_eagerly=True)
    begin = keras.callbacks.LambdaCallback(on_epoch_begin=lambda *_: rows.epochs.append([]))
    data = seq if path == "keras" else prefetched(seq, workers=2, depth=3, mode=path)
    model.fit(data, epochs=len(lens), verbose=0, shuffle=True, callbacks=[begin])
    assert seq.bad == [], "no index past its epoch's length was asked for"
    assert len(rows.epochs) == len(lens)
    seq_epochs = []
    for got in rows.epochs:
        (e,) = {e for e, _ in got}  # one Sequence epoch per fit epoch
        assert sorted(i for _, i in got) == list(range(lens[min(e, len(lens) - 1)])), rows.epochs
        seq_epochs.append(e)
    if path == "keras":
        # Keras's own path: its reset() after the model-building peek calls on_epoch_end once
        # more, so fit's epochs are the Sequence's epochs 1, 2, ...
        assert seq_epochs == list(range(1, len(lens) + 1))
    else:
        assert seq_epochs == list(range(len(lens)))


def test_pydataset_without_hooks_is_not_gated(prefetched):
    # Keras's PyDataset defines no-op hooks: they must not reach the engine (which would gate the
    # next epoch's loads on them).
    ds = prefetched(Indexed(4))
    assert type(ds.loader._sequence).__name__ == "_Source"
    assert type(prefetched(Hooked(4)).loader._sequence).__name__ == "_HookedSource"


class Unusual(Exception):
    """An exception type of the user's own."""


class FailsAt(Indexed):
    """Raises ``error(f"bad batch {i}")`` for batch ``at``, every time."""

    def __init__(self, n: int, at: int, error: type[Exception], **kwargs) -> None:
        super().__init__(n, **kwargs)
        self.at, self.error = at, error

    def __getitem__(self, i: int):
        if i == self.at:
            raise self.error(f"bad batch {i}")
        return super().__getitem__(i)


class FailsInFirstEpoch(Indexed):
    """Raises ``ValueError`` for batch ``at`` of the first epoch only. Its ``on_epoch_end`` ends
    that epoch, and pyloader runs it after the epoch's last batch was loaded and before any batch of
    the next one, so the failing call is that of epoch 0 (failing the first call of ``at`` would
    race with the next epoch, which loads ahead: its call may come first)."""

    def __init__(self, n: int, at: int, **kwargs) -> None:
        super().__init__(n, **kwargs)
        self.at = at
        self.epochs_ended = 0

    def __getitem__(self, i: int):
        if i == self.at and self.epochs_ended == 0:
            raise ValueError(f"bad batch {i}")
        return super().__getitem__(i)

    def on_epoch_end(self) -> None:
        self.epochs_ended += 1


def fit_error(ds, **fit_options) -> Exception:
    model, _ = model_with_recorder()
    try:
        model.fit(ds, epochs=1, verbose=0, **fit_options)
    except Exception as error:  # the clause a user would write, for both paths
        return error
    raise AssertionError("fit should raise")


def error_text(error: BaseException) -> str:
    return str(error) + "\n".join(getattr(error, "__notes__", []))


@pytest.mark.parametrize("error", [ValueError, KeyError, Unusual])
@pytest.mark.parametrize("shuffle", [False, True])
def test_getitem_error_reaches_fit_as_the_same_type_as_through_keras(prefetched, error, shuffle):
    # Side by side: the same PyDataset through Keras's own path and through prefetch. On torch and
    # jax the user's own type reaches fit; on tensorflow, tf.data turns it into one of its OpErrors
    # (ValueError: InvalidArgumentError, others: UnknownError) on both paths alike.
    own = fit_error(FailsAt(6, 3, error), shuffle=shuffle)
    ours = fit_error(prefetched(FailsAt(6, 3, error), workers=2), shuffle=shuffle)
    assert type(ours) is type(own), (type(ours), type(own))
    if BACKEND != "tensorflow":
        assert type(ours) is error
    assert "bad batch 3" in error_text(ours)
    assert "__getitem__(3)" in error_text(ours) and "batch index 3" in error_text(ours)


@pytest.mark.parametrize("error", [ValueError, Unusual])
def test_getitem_error_first_in_pyloaders_order_reaches_fit_as_through_keras(prefetched, error):
    # The failing batch opens pyloader's shuffled pass (where tensorflow's spec read takes its
    # batches) but is not among Keras's spec batches 0 and 1: Keras meets it in its generator, and
    # so must fit here (on tensorflow, as the OpError tf.data makes of it on Keras's path).
    n, at = 6, 3
    seed = next(s for s in range(1000)
                if next(iter(pyloader.Prefetcher(Indexed(n), workers=1, shuffle=True, seed=s)))[0][0, 0] == at)
    own = fit_error(FailsAt(n, at, error), shuffle=True)
    ours = fit_error(prefetched(FailsAt(n, at, error), workers=2, shuffle=True, seed=seed), shuffle=True)
    assert type(ours) is type(own), (type(ours), type(own))
    if BACKEND != "tensorflow":
        assert type(ours) is error
    assert f"bad batch {at}" in error_text(ours)
    assert f"batch index {at}" in error_text(ours)


def test_getitem_error_surfaces_from_fit_with_the_index(prefetched):
    n = 6
    ds = prefetched(FailsInFirstEpoch(n, 3), workers=2, shuffle=False)
    model, recorder = model_with_recorder()
    error = fit_error(ds)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        assert isinstance(error, tf.errors.InvalidArgumentError), type(error)  # tf.data's ValueError
    else:
        assert type(error) is ValueError
        assert error.__notes__[-1].startswith("pyloader: raised by __getitem__(3) of the Sequence, batch index 3")
    assert "bad batch 3" in error_text(error) and "batch index 3" in error_text(error)
    # The dataset recovers: the next fit starts a new pass and gets every batch once.
    recorder.train_seen.clear()
    model.fit(ds, epochs=1, verbose=0)
    assert recorder.train_seen == list(range(n))


# ---- evaluate / predict ----------------------------------------------------------------------------


def test_predict_rows_align_with_inputs_even_after_a_shuffled_fit(prefetched):
    n = 7
    ds = prefetched(Indexed(n), workers=3, depth=2)
    model, recorder = model_with_recorder()
    model.fit(ds, epochs=2, verbose=0)
    model.layers[-1].set_weights([np.array([[1.0], [0.0]], np.float32), np.zeros(1, np.float32)])
    out = model.predict(ds, verbose=0)
    assert out.shape == (n * ROWS, 1)
    np.testing.assert_array_equal(out[:, 0], np.repeat(np.arange(n, dtype=np.float32), ROWS))
    assert recorder.infer_seen == list(range(n))


def test_evaluate_sees_batches_in_order(prefetched):
    n = 6
    model, recorder = model_with_recorder()
    model.evaluate(prefetched(Indexed(n), workers=2), verbose=0)
    assert recorder.infer_seen == list(range(n))


def test_validation_data_as_a_sequence(prefetched):
    n, m, epochs = 6, 4, 3
    model, recorder = model_with_recorder()
    history = model.fit(prefetched(Indexed(n), workers=2), epochs=epochs, verbose=0,
                        validation_data=prefetched(Indexed(m), workers=2))
    assert len(history.history["val_loss"]) == epochs
    assert recorder.infer_seen == list(range(m)) * epochs
    for seen in per_epoch(recorder.train_seen, n):
        assert sorted(seen) == list(range(n))


# ---- batch contents ------------------------------------------------------------------------------


def weights_after_fit(ds, **fit_options) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """(weights before, weights after, last loss) of one epoch of fit on a fresh model."""
    model, _ = model_with_recorder(learning_rate=0.1)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(ds, epochs=1, verbose=0, **fit_options)
    return before, model.get_weights(), history.history["loss"][-1]


def test_sample_weight_batches(prefetched):
    before, after, loss = weights_after_fit(prefetched(Indexed(4, weights=True), workers=2))
    assert loss == 0.0
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)  # every sample weighted 0: nothing learned


def test_class_weight(prefetched):
    # y = 2i/10 + 1 rounds to classes 1..2 here: weighting both 0 zeroes the loss; 1 does not.
    before, after, loss = weights_after_fit(prefetched(Indexed(4), workers=2),
                                            class_weight={1: 0.0, 2: 0.0})
    assert loss == 0.0
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    _, after, loss = weights_after_fit(prefetched(Indexed(4), workers=2), class_weight={1: 1.0, 2: 1.0})
    assert loss > 0.0


class TwoInputs(keras.utils.PyDataset):
    """({"a": rows of i, "b": rows of -i (3 wide)}, y)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        a = np.full((ROWS, 1), i, np.float32)
        b = np.full((ROWS, 3), -i, np.float32)
        return {"a": a, "b": b}, np.full((ROWS, 1), i, np.float32)


def test_dict_inputs_for_a_multi_input_model(prefetched):
    n = 5
    a = keras.Input((1,), name="a")
    b = keras.Input((3,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(joined))
    model.compile("sgd", "mse")
    ds = prefetched(TwoInputs(n), workers=2)
    model.fit(ds, epochs=2, verbose=0)
    model.layers[-1].set_weights([np.array([[1.0], [0.0], [0.0], [0.0]], np.float32), np.zeros(1, np.float32)])
    out = model.predict(ds, verbose=0)
    np.testing.assert_array_equal(out[:, 0], np.repeat(np.arange(n, dtype=np.float32), ROWS))


class NativeTensors(Indexed):
    """Indexed, as the backend's own tensors (torch.Tensor, jax.Array, tf.Tensor)."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)


def test_backend_tensor_batches_train_and_predict(prefetched):
    n = 5
    ds = prefetched(NativeTensors(n), workers=2)
    model, recorder = model_with_recorder()
    model.fit(ds, epochs=2, verbose=0)
    assert [sorted(s) for s in per_epoch(recorder.train_seen, n)] == [list(range(n))] * 2
    model.layers[-1].set_weights([np.array([[1.0], [0.0]], np.float32), np.zeros(1, np.float32)])
    out = model.predict(ds, verbose=0)
    np.testing.assert_array_equal(out[:, 0], np.repeat(np.arange(n, dtype=np.float32), ROWS))


def framework_tensor(framework: str, x: np.ndarray):
    """``x`` as a tensor of ``framework`` (torch, jax or tensorflow), whatever Keras's backend."""
    if framework == "torch":
        import torch

        return torch.from_numpy(x.copy())
    if framework == "jax":
        import jax

        return jax.numpy.asarray(x)
    import tensorflow as tf

    return tf.constant(x)


class FrameworkTensors(Indexed):
    """Indexed, as tensors of a given framework (not necessarily Keras's backend)."""

    def __init__(self, n: int, framework: str, **kwargs) -> None:
        super().__init__(n, **kwargs)
        self.framework = framework

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return framework_tensor(self.framework, x), framework_tensor(self.framework, y)


def train_on_framework_tensors(framework: str, n: int = 5, epochs: int = 2) -> tuple[object, object]:
    """(Keras's own path, prefetch) on FrameworkTensors: the batches each epoch trained on, sorted,
    or the name of the exception type fit raised."""

    def train(ds) -> object:
        model, recorder = model_with_recorder()
        try:
            model.fit(ds, epochs=epochs, verbose=0)
        except Exception as error:  # noqa: BLE001 - compared side by side
            return type(error).__name__
        return [sorted(s) for s in per_epoch(recorder.train_seen, n)]

    theirs = train(FrameworkTensors(n, framework))
    with pk.prefetch(FrameworkTensors(n, framework), workers=2) as ds:
        ours = train(ds)
    return theirs, ours


@pytest.mark.parametrize("framework", ["torch", "jax", "tensorflow"])
def test_tensors_of_any_installed_framework_train_as_through_keras(framework):
    # Side by side with Keras's own path: a PyDataset returning torch, jax or tf tensors, on
    # whichever backend this run uses. Another framework than the backend is imported in a
    # subprocess: jax in this process would warn at every later fork (of other test files).
    import importlib.util

    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")
    if framework == BACKEND:
        theirs, ours = train_on_framework_tensors(framework)
    else:
        done = run_python(f"""
            import json, warnings
            warnings.simplefilter("ignore")
            import test_keras
            print("RESULT", json.dumps(test_keras.train_on_framework_tensors({framework!r})))
        """, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        theirs, ours = json.loads(done.stdout.split("RESULT", 1)[1])
    assert ours == theirs
    assert theirs == [list(range(5))] * 2  # Keras takes them all (so must prefetch)


def test_keras_utils_sequence_subclass(prefetched):
    class Old(keras.utils.Sequence):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.full((ROWS, 2), i, np.float32), np.zeros((ROWS, 1), np.float32)

    model, recorder = model_with_recorder()
    model.fit(prefetched(Old(), workers=2), epochs=2, verbose=0)
    assert [sorted(s) for s in per_epoch(recorder.train_seen, 4)] == [list(range(4))] * 2


def batches_of(n: int):
    """A generator of Indexed's batches 0..n-1."""
    for i in range(n):
        yield Indexed(n)[i]


def test_a_generator_is_read_ahead_by_one_thread_and_fit_gets_its_batches_in_order():
    n, epochs = 6, 2
    model, recorder = model_with_recorder()
    model.fit(pk.prefetch(batches_of(n * epochs)), steps_per_epoch=n, epochs=epochs, shuffle=False, verbose=0)
    ours = list(recorder.train_seen)
    model, recorder = model_with_recorder()
    model.fit(batches_of(n * epochs), steps_per_epoch=n, epochs=epochs, shuffle=False, verbose=0)  # Keras's own
    assert ours == recorder.train_seen
    assert sorted(ours)[-1] >= n  # the second epoch went on where the first stopped


def test_a_generator_error_reaches_fit_as_its_own_type():
    def failing():
        yield from batches_of(2)
        raise KeyError("bad batch 2")

    own = fit_error(failing(), steps_per_epoch=4, shuffle=False)
    ours = fit_error(pk.prefetch(failing()), steps_per_epoch=4, shuffle=False)
    assert type(ours) is type(own), (type(ours), type(own))
    assert "bad batch 2" in error_text(ours) and "shard 0" in error_text(ours)


def test_a_generator_over_several_workers_asks_for_shards():
    with pytest.raises(TypeError, match="shards"):
        pk.prefetch(batches_of(3), workers=4)


class Endless(Indexed):
    """Indexed without end: ``num_batches`` is None (Keras reads batches 0, 1, 2...)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(0, **kwargs)

    @property
    def num_batches(self):
        return None


@pytest.mark.parametrize("unbuilt", [False, True])
def test_infinite_pydataset_trains_with_steps_per_epoch_as_through_keras(prefetched, unbuilt):
    def seen(data) -> list[list[int]]:
        if unbuilt:  # reads one batch to build the model, in an iteration of its own
            recorder = Recorder()
            model = keras.Sequential([recorder, keras.layers.Dense(1)])
            model.compile("sgd", "mse", run_eagerly=True)
        else:
            model, recorder = model_with_recorder()
        fits = []
        for epochs in (3, 2):  # a second fit starts from batch 0 again, as Keras does (shuffle=True:
            # Keras warns that it cannot shuffle an infinite PyDataset)
            history = model.fit(data, epochs=epochs, steps_per_epoch=4, shuffle=False, verbose=0)
            assert len(history.history["loss"]) == epochs
            fits.append(list(recorder.train_seen))
            recorder.train_seen.clear()
        return fits

    own = seen(Endless())
    ds = prefetched(Endless(), workers=2, depth=3)
    assert ds.num_batches is None
    assert seen(ds) == own == [list(range(12)), list(range(8))], own
    batches = iter(ds)
    assert [int(next(batches)[0][0, 0]) for _ in range(3)] == [0, 1, 2]  # its own iteration too


def test_pydataset_without_len_or_num_batches_iterates_without_end_as_keras_does(prefetched):
    class NoLength(keras.utils.PyDataset):
        def __getitem__(self, i):
            return np.full((ROWS, 2), i, np.float32), np.zeros((ROWS, 1), np.float32)

    own = iter(NoLength())  # Keras's PyDataset.__iter__: batches 0, 1, 2... without end
    ours = iter(prefetched(NoLength(), workers=2))
    assert [int(next(own)[0][0, 0]) for _ in range(5)] == [int(next(ours)[0][0, 0]) for _ in range(5)]


# ---- options -------------------------------------------------------------------------------------


class Returns(keras.utils.PyDataset):
    """Batch i is ``make(i)``: whatever that is."""

    def __init__(self, make, n: int | None = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.make = make
        self.n = n

    @property
    def num_batches(self):
        return self.n

    def __getitem__(self, i: int):
        return self.make(i)


def yields_a_batch(i: int):
    yield np.ones((2, 11), np.int32) * i


NOT_ARRAYS = {
    "a generator": yields_a_batch,
    "None": lambda i: None,
    "a string": lambda i: f"batch {i}",
    "an object": lambda i: Unusual(i),
}


@pytest.mark.parametrize("n", [4, None], ids=["finite", "infinite"])
@pytest.mark.parametrize("what", list(NOT_ARRAYS))
def test_values_that_are_not_arrays_pass_through_as_through_keras(prefetched, what, n):
    # Keras's own PyDataset.__iter__ yields whatever __getitem__ returns (Keras's adapter tests
    # iterate a PyDataset whose __getitem__ is a generator function); so does prefetch.
    make = NOT_ARRAYS[what]

    def first(dataset, k: int = 4) -> list:
        return [v for _, v in zip(range(k), iter(dataset))]

    theirs = first(Returns(make, n))
    ours = first(prefetched(Returns(make, n), workers=2, shuffle=False))
    assert [type(v) for v in ours] == [type(v) for v in theirs]
    if what == "a generator":
        assert [next(v).tolist() for v in ours] == [next(v).tolist() for v in theirs]
    elif what == "an object":
        assert [v.args for v in ours] == [v.args for v in theirs]
    else:
        assert ours == theirs


def test_none_from_getitem_reaches_fit_as_keras_says_it(prefetched):
    model, _ = model_with_recorder()
    with pytest.raises(ValueError) as theirs:
        model.fit(Returns(lambda i: None), epochs=1, verbose=0)
    with pytest.raises(ValueError) as ours:
        model.fit(prefetched(Returns(lambda i: None), workers=2), epochs=1, verbose=0)
    assert "must return a tuple or a dict" in str(theirs.value)
    assert "must return a tuple or a dict" in str(ours.value)


def test_pydataset_settings_become_pyloader_defaults(prefetched):
    ds = prefetched(Indexed(4, workers=3, max_queue_size=5))
    assert (ds.loader.workers, ds.loader.depth, ds.loader.mode) == (3, 5, "thread")
    ds = prefetched(Indexed(4, workers=3, max_queue_size=5), workers=2, depth=7)
    assert (ds.loader.workers, ds.loader.depth) == (2, 7)
    assert prefetched(Indexed(4)).loader.workers == 1  # Keras's default workers=1


def test_max_queue_size_0_gets_the_default_depth_and_trains(prefetched):
    # Keras accepts max_queue_size=0 (its queue is then unbounded): pyloader loads 2 * workers ahead.
    n = 6
    ds = prefetched(Indexed(n, workers=3, max_queue_size=0))
    assert (ds.loader.workers, ds.loader.depth) == (3, 6)
    model, recorder = model_with_recorder()
    model.fit(ds, epochs=2, verbose=0)
    assert [sorted(s) for s in per_epoch(recorder.train_seen, n)] == [list(range(n))] * 2
    with pytest.raises(ValueError, match="depth"):  # pyloader's own option stays >= 1
        pk.prefetch(Indexed(n), depth=0)


def test_plain_sequence_gets_pyloader_defaults(prefetched):
    class Plain:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return np.zeros((2, 2), np.float32), np.zeros((2, 1), np.float32)

    # Not a PyDataset, so no settings of Keras's to follow: pyloader's defaults, autotuned in
    # thread mode (a Sequence made for Keras is loaded on threads unless the user asks otherwise).
    ds = prefetched(Plain())
    start = _tune.initial_workers(_tune.usable_cpus())
    assert (ds.loader.workers, ds.loader.depth, ds.loader.mode) == (start, _tune.initial_depth(start), "thread")
    tuned = ds.loader.stats()["autotune"]
    assert tuned is not None and tuned["mode"] == "thread"
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(ds, epochs=2, verbose=0)
    assert ds.loader.mode == "thread"  # never processes: mode was not left to autotune


def test_use_multiprocessing_maps_to_process_mode(prefetched):
    seq = Indexed(4, workers=2, use_multiprocessing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)  # jax's, at any fork
        ds = prefetched(seq)
    assert (ds.loader.mode, ds.loader.workers) == ("process", 2)
    assert prefetched(seq, mode="thread").loader.mode == "thread"  # explicit: no warning


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="workers"):
        pk.prefetch(Indexed(3), workers=0)
    with pytest.raises(ValueError, match="shuffle"):
        pk.prefetch(Indexed(3), shuffle="yes")
    with pytest.raises(TypeError, match="__getitem__"):
        pk.prefetch(object())


def test_direct_indexing_reads_the_sequence_and_keeps_fit_aligned(prefetched):
    n = 5
    ds = prefetched(Indexed(n), workers=2)
    x, _ = ds[3]
    assert isinstance(x, np.ndarray) and x[0, 0] == 3
    model, recorder = model_with_recorder()
    model.fit(ds, epochs=1, verbose=0)
    assert sorted(recorder.train_seen) == list(range(n))
    assert [int(b[0][0, 0]) for b in ds] == list(range(n))  # iterating: one pass, in order


@torch_only
def test_torch_batches_reach_the_model_without_a_keras_copy(prefetched, monkeypatch):
    import torch
    from keras.src.backend.torch import core

    calls: list[tuple[object, object]] = []
    convert = core.convert_to_tensor

    def from_the_data_loader() -> bool:  # get_torch_dataloader's converting __iter__ called us
        frame = sys._getframe(2)
        for _ in range(8):
            if frame is None:
                return False
            code = frame.f_code
            if code.co_name == "__iter__" and code.co_filename.endswith("data_adapter_utils.py"):
                return True
            frame = frame.f_back
        return False

    def spy(x, *args, **kwargs):
        out = convert(x, *args, **kwargs)
        if from_the_data_loader():
            calls.append((x, out))
        return out

    monkeypatch.setattr(core, "convert_to_tensor", spy)
    model, recorder = model_with_recorder()
    model.fit(prefetched(Indexed(3), workers=2), epochs=1, verbose=0)
    leaves = [(x, out) for x, out in calls if isinstance(x, (np.ndarray, torch.Tensor))]
    assert len(leaves) == 2 * 4, calls  # (x, y) of the batch read to build the model + 3 steps
    assert all(isinstance(x, torch.Tensor) and out is x for x, out in leaves)
    # and what the model computed on is that memory
    fed = {x.data_ptr() for x, _ in leaves}
    assert set(recorder.pointers[-3:]) <= fed


def test_core_package_does_not_import_keras(python_subprocess):
    result = python_subprocess("import sys, pyloader; print('keras' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_tf_keras_sequence_is_accepted(prefetched):
    pytest.importorskip("tensorflow", reason="tensorflow is not installed: tf.keras Sequences untested")
    tf_keras = pytest.importorskip("tf_keras", reason="tf_keras is not installed")

    class Old(tf_keras.utils.Sequence):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.full((ROWS, 2), i, np.float32), np.zeros((ROWS, 1), np.float32)

    ds = prefetched(Old())
    assert type(ds.loader._sequence).__name__ == "_Source"  # tf.keras's no-op hook is not gated
    model, recorder = model_with_recorder()
    model.fit(ds, epochs=2, verbose=0)
    assert [sorted(s) for s in per_epoch(recorder.train_seen, 4)] == [list(range(4))] * 2


def test_on_epoch_end_error_surfaces_from_fit(prefetched):
    class Breaks(Indexed):
        def on_epoch_end(self) -> None:
            raise RuntimeError("hook failed")

    model, _ = model_with_recorder()
    expected: type[Exception] = pyloader.EpochEndError
    if BACKEND == "tensorflow":  # the hook runs where loading crosses epochs, and its error reaches
        import tensorflow as tf  # Keras from __getitem__, inside tf.data, which wraps it

        expected = tf.errors.UnknownError
    with pytest.raises(expected, match="hook failed"):
        model.fit(prefetched(Breaks(4), workers=2), epochs=2, verbose=0)


def test_forced_shuffle_warns_when_keras_wants_order(prefetched):
    ds = prefetched(Indexed(4), workers=2, shuffle=True)
    model, recorder = model_with_recorder()
    with pytest.warns(UserWarning, match="shuffle=True"):
        model.predict(ds, verbose=0)
    assert sorted(recorder.infer_seen) == list(range(4))


def test_set_epoch_selects_the_shuffled_order(prefetched):
    n = 8

    def first_epoch_after(epoch: int) -> list[int]:
        ds = prefetched(Indexed(n), workers=2, seed=7)
        ds.set_epoch(epoch)
        model, recorder = model_with_recorder()
        model.fit(ds, epochs=1, verbose=0)
        return recorder.train_seen

    assert first_epoch_after(3) == first_epoch_after(3) != first_epoch_after(0)


def test_fit_epoch_times_runs_each_loader_setting():
    # The benchmark entry point (bench/keras_fit.py, python -m pyloader bench); smoke test only.
    from pyloader._bench.keras_fit import fit_epoch_times

    seq = Indexed(4)
    for loader in ("pyloader", "keras-threads"):
        times = fit_epoch_times(seq, loader=loader, workers=2, epochs=2)
        assert len(times) == 2 and all(t > 0 for t in times)
    with pytest.raises(ValueError, match="loader"):
        fit_epoch_times(seq, loader="nope")


def test_array_sequence_is_gathered_natively_every_sample_once_per_epoch(prefetched):
    samples, batch = 24, 4
    x = np.stack([np.arange(samples), np.zeros(samples)], axis=1).astype(np.float32)
    y = np.zeros((samples, 1), np.float32)
    arrays = pyloader.ArraySequence(x, y, batch_size=batch, shuffle=True, seed=1)
    ds = prefetched(arrays, workers=2)
    assert ds.loader._sequence is arrays  # not wrapped: the engine gathers it without Python
    model, recorder = model_with_recorder()
    model.fit(ds, epochs=2, verbose=0)
    rows = recorder.train_rows
    assert len(rows) == 2 * samples
    assert sorted(rows[:samples]) == sorted(rows[samples:]) == list(range(samples))
    assert rows[:samples] != rows[samples:]  # samples reshuffled per epoch

    ordered = prefetched(pyloader.ArraySequence(x, y, batch_size=batch), workers=2)
    model.layers[-1].set_weights([np.array([[1.0], [0.0]], np.float32), np.zeros(1, np.float32)])
    np.testing.assert_array_equal(model.predict(ordered, verbose=0)[:, 0], np.arange(samples))


# ---- process mode (use_multiprocessing=True) --------------------------------------------------------
#
# Each scenario runs in a fresh interpreter with a timeout (conftest.run_python): a hang or a stray
# process fails one test, not the suite. The scripts print "OK" at the end.

PROCESS_PRELUDE = '''
import gc, os, signal, sys, time
import numpy as np, keras, psutil
import pyloader, pyloader.keras as pk

ROWS = 4
BACKEND = keras.backend.backend()
''' + inspect.getsource(concrete) + '''

def busy(iterations):
    """Pure Python work: holds the GIL all along."""
    s = 0
    for k in range(iterations):
        s += k * k
    return s

class Samples(keras.utils.PyDataset):
    """Batch i holds the samples order[i*ROWS:(i+1)*ROWS]: x rows are [sample, pid of the process
    that loaded it, on_epoch_end calls that copy of the Sequence saw], y = 2 * sample / 100 + 1."""

    def __init__(self, n, *, spin=3000, sleep=0.0, **kwargs):
        super().__init__(**kwargs)
        self.n, self.spin, self.sleep = n, spin, sleep
        self.rng = np.random.default_rng(123)
        self.order = np.arange(n * ROWS)
        self.ends = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        busy(self.spin)
        if self.sleep:
            time.sleep(self.sleep)
        rows = self.order[i * ROWS:(i + 1) * ROWS]
        x = np.stack([rows, np.full(ROWS, os.getpid()), np.full(ROWS, self.ends)], axis=1)
        return x.astype(np.float32), (2 * rows / 100 + 1).astype(np.float32)[:, None]

class EndShuffled(Samples):
    """The classic Keras pattern: on_epoch_end reshuffles the samples, from a seeded RNG."""

    def on_epoch_end(self):
        self.ends += 1
        self.rng.shuffle(self.order)

class BeginShuffled(Samples):
    """Reshuffles in on_epoch_begin instead (so epoch 0 is shuffled too)."""

    def on_epoch_begin(self):
        self.ends += 1
        self.rng.shuffle(self.order)

class Recorder(keras.layers.Layer):
    """Records each training batch (its samples, loader pid, copy epoch); feeds sample / 100 on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches = []

    def call(self, x, training=None):
        values = concrete(x)
        if values is not None and training:
            rows = values.astype(np.int64)
            self.batches.append((tuple(rows[:, 0].tolist()), int(rows[0, 1]), int(rows[0, 2])))
        return x[:, 0:1] / 100

    def compute_output_shape(self, shape):
        return (shape[0], 1)

def model_with_recorder(learning_rate=0.05):
    recorder = Recorder()
    model = keras.Sequential([keras.Input((3,)), recorder, keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(learning_rate), "mse", run_eagerly=True)
    return model, recorder

class Steps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []  # (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append((self.epoch, batch))

def per_epoch(batches, n):
    return [batches[k:k + n] for k in range(0, len(batches), n)]

def check_every_sample_once_per_epoch(batches, n):
    for epoch in per_epoch(batches, n):
        assert len(epoch) == n, epoch
        assert sorted(s for samples, _, _ in epoch for s in samples) == list(range(n * ROWS)), epoch
'''


def run_keras_process(body: str, *, timeout: float = 180.0) -> str:
    r = run_python(PROCESS_PRELUDE + textwrap.dedent(body), timeout=timeout, env={"KERAS_BACKEND": BACKEND})
    assert r.returncode == 0 and "OK" in r.stdout, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


process_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process mode tests use fork")


@process_only
def test_process_mode_fit_on_gil_holding_getitem():
    run_keras_process("""
    n, epochs = 12, 2
    seq = Samples(n, spin=20000, workers=2, use_multiprocessing=True)
    ds = pk.prefetch(seq)
    assert (ds.loader.mode, ds.loader.workers) == ("process", 2), ds.loader
    model, recorder = model_with_recorder()
    steps = Steps()
    start = time.perf_counter()
    history = model.fit(ds, epochs=epochs, verbose=0, callbacks=[steps])
    seconds = time.perf_counter() - start
    assert ds.loader.mode == "process"  # still, after fit rebuilt it for its shuffled order
    assert len(steps.steps) == n * epochs and len(recorder.batches) == n * epochs, steps.steps
    check_every_sample_once_per_epoch(recorder.batches, n)
    losses = history.history["loss"]
    assert len(losses) == epochs and losses[-1] < losses[0], losses
    # Loaded by the worker processes, not here.
    pids = {pid for _, pid, _ in recorder.batches}
    assert os.getpid() not in pids and pids <= set(ds.loader.worker_pids()), (pids, ds.loader.worker_pids())
    # predict afterwards: in order (the Prefetcher is rebuilt for it), rows aligned
    model.layers[-1].set_weights([np.array([[100.0]], np.float32), np.zeros(1, np.float32)])
    out = model.predict(ds, verbose=0)
    np.testing.assert_allclose(out[:, 0], np.arange(n * ROWS), rtol=1e-5)
    ds.close()
    print(f"fit {seconds:.2f}s, {len(pids)} worker pids, losses {losses}")
    print("OK")
    """)


@process_only
def test_process_mode_epoch_hooks_reach_the_workers_batches_equal_thread_mode():
    out = run_keras_process("""
    def run(cls, mode, *, shuffle=True, initial_epoch=0, epochs=3, n=6):
        seq = cls(n, workers=2, use_multiprocessing=mode == "process")
        ds = pk.prefetch(seq, seed=5, depth=3)
        assert ds.loader.mode == mode
        if initial_epoch:
            ds.set_epoch(initial_epoch)
        model, recorder = model_with_recorder()
        model.fit(ds, epochs=epochs, initial_epoch=initial_epoch, shuffle=shuffle, verbose=0)
        ds.close()
        check_every_sample_once_per_epoch(recorder.batches, n)
        return [(samples, ends) for samples, _, ends in recorder.batches]

    for cls in (EndShuffled, BeginShuffled):
        for options in ({}, {"shuffle": False}, {"initial_epoch": 2, "epochs": 4}):
            thread = run(cls, "thread", **options)
            process = run(cls, "process", **options)
            assert process == thread, (cls.__name__, options, process, thread)
            # The reshuffles took effect: epochs differ, and each batch was loaded by a copy of
            # the Sequence that had seen every hook of the epochs before it.
            epochs = per_epoch(process, 6)
            assert len({tuple(e) for e in epochs}) == len(epochs), epochs
            ends = [{ends for _, ends in e} for e in epochs]
            assert all(len(e) == 1 for e in ends) and len({min(e) for e in ends}) == len(ends), ends
            print(cls.__name__, options, "epoch hook counts", [min(e) for e in ends])
    print("OK")
    """)
    assert "BeginShuffled" in out


@process_only
def test_process_mode_worker_killed_during_fit_loses_and_repeats_no_batch():
    out = run_keras_process("""
    n, epochs = 10, 3
    KILL_AT = {(0, 3): 0, (1, 5): 1, (2, 1): 0}  # (epoch, batch) -> worker slot to SIGKILL

    def run(mode):
        seq = EndShuffled(n, spin=2000, sleep=0.01, workers=2, use_multiprocessing=mode == "process")
        ds = pk.prefetch(seq, seed=11, depth=3)
        killed = []

        class Killer(Steps):
            def on_train_batch_end(self, batch, logs=None):
                super().on_train_batch_end(batch, logs)
                slot = KILL_AT.get((self.epoch, batch))
                if mode == "process" and slot is not None:
                    pid = ds.loader.worker_pids()[slot]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

        model, recorder = model_with_recorder()
        steps = Killer()
        history = model.fit(ds, epochs=epochs, verbose=0, callbacks=[steps])
        assert len(history.history["loss"]) == epochs
        assert len(steps.steps) == n * epochs, steps.steps
        check_every_sample_once_per_epoch(recorder.batches, n)
        distinct = {(k // n, samples) for k, (samples, _, _) in enumerate(recorder.batches)}
        assert len(distinct) == n * epochs, len(distinct)
        pids = ds.loader.worker_pids()
        ds.close()
        return recorder.batches, killed, pids

    thread, _, _ = run("thread")
    process, killed, pids = run("process")
    assert len(killed) == len(KILL_AT) and not set(killed) & set(pids), (killed, pids)
    # Replacements replayed the on_epoch_end reshuffles: the batches are thread mode's.
    assert [(s, e) for s, _, e in process] == [(s, e) for s, _, e in thread]
    loaders = {pid for _, pid, _ in process}
    print("killed", killed, "loaded by", sorted(loaders))
    assert loaders & set(killed) and loaders - set(killed), loaders  # before and after a kill
    assert psutil.Process().children(recursive=True) == []
    print("OK")
    """)
    assert "killed" in out


@process_only
def test_process_mode_options_reach_the_worker_processes(tmp_path):
    run_keras_process(f"""
    marks = {str(tmp_path)!r}

    def init(worker_id):
        open(os.path.join(marks, f"{{worker_id}}-{{os.getpid()}}"), "w").close()

    class Crashing(Samples):
        def __getitem__(self, i):
            if i == 1:
                os.kill(os.getpid(), signal.SIGSEGV)
            return super().__getitem__(i)

    ds = pk.prefetch(Crashing(3, workers=2, use_multiprocessing=True), shuffle=False, start_method="fork",
                     worker_init_fn=init, max_retries=0)
    it = iter(ds.loader)
    next(it)
    try:
        next(it)
    except pyloader.WorkerDiedError as e:
        assert e.index == 1 and str(e).count("SIGSEGV") == 1, e  # no retry: one death
    else:
        raise AssertionError("max_retries=0 should fail on the first death")
    ds.close()
    ids = sorted(int(name.split("-")[0]) for name in os.listdir(marks))
    # init ran in each worker, and in each replacement: batch 1 kills one worker in epoch 0 and, when
    # the plan has loaded epoch 1 ahead before close(), another one there (timing decides which)
    assert set(ids) == {{0, 1}} and len(ids) <= 4, ids
    try:
        pk.prefetch(Samples(2, workers=2, use_multiprocessing=True), start_method="nope")
    except ValueError as e:
        assert "'nope'" in str(e), e
    else:
        raise AssertionError("a bad start_method should be refused")
    print("OK")
    """)


def test_process_mode_leaves_no_child_process():
    run_keras_process("""
    me = psutil.Process()
    during = []

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            during.append(len(me.children(recursive=True)))

    # close(): fit with validation data, then predict (which rebuilds the Prefetcher)
    train = pk.prefetch(EndShuffled(6, workers=2, use_multiprocessing=True))
    val = pk.prefetch(Samples(3, workers=2, use_multiprocessing=True))
    model, _ = model_with_recorder()
    model.fit(train, epochs=2, verbose=0, validation_data=val, callbacks=[Count()])
    model.predict(train, verbose=0)
    assert set(during) == {6}, during  # each dataset: its zygote and 2 workers
    assert len(me.children(recursive=True)) == 6
    train.close()
    val.close()
    assert me.children(recursive=True) == [], me.children(recursive=True)

    # no close(): the dataset is dropped (and collected) after fit. Not on tensorflow, where tf.data's
    # registry of from_generator functions keeps Keras's adapter, and so the dataset, alive after
    # fit (Keras's own PyDataset too): there only close() can stop the workers.
    if BACKEND != "tensorflow":
        ds = pk.prefetch(BeginShuffled(5, workers=3, use_multiprocessing=True))
        model.fit(ds, epochs=2, verbose=0)
        assert len(me.children(recursive=True)) == 4
        del ds
        gc.collect()
        assert me.children(recursive=True) == [], me.children(recursive=True)

    # a context manager, and a fit that fails in __getitem__
    class Bad(Samples):
        def __getitem__(self, i):
            if i == 2:
                raise ValueError("bad batch 2")
            return super().__getitem__(i)

    with pk.prefetch(Bad(4, workers=2, use_multiprocessing=True), shuffle=False) as bad:
        try:
            model.fit(bad, epochs=1, verbose=0)
        except Exception as error:  # ValueError (tensorflow: tf.data's InvalidArgumentError)
            assert type(error).__name__ in ("ValueError", "InvalidArgumentError"), type(error)
            text = str(error) + "".join(getattr(error, "__notes__", []))
            assert "bad batch 2" in text and "batch index 2" in text, text
        else:
            raise AssertionError("fit should raise the ValueError")
    assert me.children(recursive=True) == [], me.children(recursive=True)
    print("OK")
    """)
