"""Built-in benchmark workloads: Sequences that need nothing downloaded.

Each workload is a *Sequence* (``__len__`` = number of batches, ``__getitem__(i)`` = batch ``i``,
a tuple ``(x, y)`` of numpy arrays) that stands in for one kind of real input pipeline:

========  =====================================================================================
latency   a GIL-releasing wait per batch (remote storage stand-in) plus light numpy
tiny      almost free batches: what remains is the loader's own per-batch overhead
gather    in-memory fancy indexing: 256 random rows of 3x64x64 uint8 from a ~500 MB array
python    per-sample pure-Python work that holds the GIL
decode    per-sample JPEG decoding with Pillow from in-memory bytes (Pillow releases the GIL)
========  =====================================================================================

Per-sample workloads (``Workload.per_sample``) are map-style datasets of *samples* for loaders that
batch them, like ``torch.utils.data.DataLoader`` (``len`` is the number of samples; the dataset's
``sample_batch_size`` is the batch size to use):

==============  ===============================================================================
samples-decode  one JPEG decoded with Pillow per sample (GIL released while decoding)
samples-array   a ``TensorDataset`` over in-memory uint8 images and int64 labels
samples-rows    a Python ``__getitem__`` returning one row of in-memory numpy arrays
==============  ===============================================================================

A workload is described by a :class:`Workload` (name, description, builder) in the
:data:`WORKLOADS` registry; ``build(quick=...)`` makes the Sequence. ``quick=True`` shrinks every
workload (small arrays, few batches) so that a whole ``--quick`` run takes seconds. Building may be
expensive (the ``gather`` array is ~500 MB): the harness builds each workload once per measurement
subprocess, outside the timed region. Sequences are plain top-level classes, so they pickle for
loaders that start worker processes. Every batch depends only on its index, never on the worker
that made it.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

__all__ = [
    "DecodeSequence",
    "GatherSequence",
    "LargeSequence",
    "LatencySequence",
    "PythonSequence",
    "SampleDecodeDataset",
    "SampleRowsDataset",
    "TinySequence",
    "WORKLOADS",
    "Workload",
    "build_workload",
]


class _Batches:
    """A Sequence's length: ``batches``, set by the subclass's constructor."""

    batches: int

    def __len__(self) -> int:
        return self.batches


class LatencySequence(_Batches):
    """Each batch waits ``delay_s`` with the GIL released, then does a little numpy.

    Args:
        batches: Number of batches.
        delay_s: Seconds each ``__getitem__`` sleeps (``time.sleep`` releases the GIL).
        rows: Rows of the float32 ``x`` array (1024 columns).
    """

    def __init__(self, *, batches: int, delay_s: float, rows: int = 64) -> None:
        self.batches = batches
        self.delay_s = delay_s
        self.rows = rows

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(self.delay_s)
        x = np.full((self.rows, 1024), float(index), dtype=np.float32)
        x *= 0.5
        y = np.arange(self.rows, dtype=np.int64) + index
        return x, y

    def __repr__(self) -> str:
        return f"LatencySequence(batches={self.batches}, delay_s={self.delay_s}, rows={self.rows})"


class TinySequence(_Batches):
    """Almost free batches: a 16-float array and a 1-element label array.

    Args:
        batches: Number of batches.
    """

    def __init__(self, *, batches: int) -> None:
        self.batches = batches

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full(16, index, dtype=np.float32), np.array([index], dtype=np.int64)

    def __repr__(self) -> str:
        return f"TinySequence(batches={self.batches})"


class LargeSequence(_Batches):
    """Ready-made large batches: the same ``mb`` MB float32 array, returned as is.

    Loading costs nothing, so the time per batch is what moving a batch to the consumer costs
    (the hand-off): for process workers, getting its bytes out of the worker process.

    Args:
        batches: Number of batches.
        mb: Batch size in megabytes (1e6 bytes).
    """

    def __init__(self, *, batches: int, mb: float = 3.0) -> None:
        self.batches = batches
        self.mb = mb
        self.data = np.random.default_rng(0).random(int(mb * 1e6) // 4, dtype=np.float32)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.data

    def __repr__(self) -> str:
        return f"LargeSequence(batches={self.batches}, mb={self.mb})"


class GatherSequence:
    """Fancy indexing into an in-memory array: ``data[idx], labels[idx]``.

    The row indices of every batch are drawn once at construction from ``seed``, so batch ``i``
    is the same whichever worker loads it. ``data``, ``labels`` and ``indices`` are public so that
    loaders with a native array source can gather the same rows without calling Python.

    Args:
        rows: Rows of the ``(rows, 3, 64, 64)`` uint8 array (12 KiB each).
        batch_size: Rows per batch.
        batches: Number of batches.
        seed: Seed for the contents and the row indices.
    """

    def __init__(self, *, rows: int, batch_size: int, batches: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        row_shape = (3, 64, 64)
        row_bytes = int(np.prod(row_shape))
        # Tile a 1 MiB random block: filling 500 MB from the generator would triple setup time.
        block = rng.integers(0, 256, size=1 << 20, dtype=np.uint8)
        flat = np.empty(rows * row_bytes, dtype=np.uint8)
        whole = flat.size // block.size * block.size
        flat[:whole].reshape(-1, block.size)[:] = block
        flat[whole:] = block[: flat.size - whole]
        self.data = flat.reshape((rows, *row_shape))
        self.labels = rng.integers(0, 1000, size=rows, dtype=np.int64)
        self.indices = rng.integers(0, rows, size=(batches, batch_size), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices[index]
        return self.data[idx], self.labels[idx]

    def __repr__(self) -> str:
        return (
            f"GatherSequence(rows={len(self.data)}, batch_size={self.indices.shape[1]}, "
            f"batches={len(self)}, nbytes={self.data.nbytes})"
        )


def _python_work(seed: int, iterations: int) -> list[float]:
    """Pure-Python per-sample work (tokenizing / augmentation stand-in); holds the GIL."""
    acc = seed & 0xFFFF
    feats = [0.0] * 8
    for k in range(iterations):
        acc = (acc * 31 + k) & 0xFFFF
        feats[k & 7] += acc / 65536.0
    return feats


class PythonSequence(_Batches):
    """Per-sample pure-Python work that holds the GIL, collated into arrays.

    Args:
        batches: Number of batches.
        batch_size: Samples per batch.
        iterations: Python loop iterations per sample (~70 ns each).
    """

    def __init__(self, *, batches: int, batch_size: int, iterations: int) -> None:
        self.batches = batches
        self.batch_size = batch_size
        self.iterations = iterations

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        base = index * self.batch_size
        rows = [_python_work(base + k, self.iterations) for k in range(self.batch_size)]
        x = np.asarray(rows, dtype=np.float32)
        y = np.arange(base, base + self.batch_size, dtype=np.int64)
        return x, y

    def __repr__(self) -> str:
        return (
            f"PythonSequence(batches={self.batches}, batch_size={self.batch_size}, "
            f"iterations={self.iterations})"
        )


def _make_jpegs(count: int, size: int, seed: int) -> list[bytes]:
    """Encode ``count`` distinct ``size`` x ``size`` RGB JPEGs (gradients plus noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for k in range(count):
        planes = [(xx * (k % 3 + 1) + yy) % 256, (xx + yy * (k % 5 + 1)) % 256, (xx * yy + k) % 256]
        img = np.stack(planes, axis=-1).astype(np.int16)
        img += rng.integers(-24, 24, size=img.shape, dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    return images


class DecodeSequence(_Batches):
    """Per-sample JPEG decoding with Pillow from in-memory bytes, stacked into NHWC uint8.

    Args:
        batches: Number of batches.
        batch_size: Images per batch.
        size: Height and width of the images.
        images: Distinct encoded images to cycle through.
        seed: Seed for the image contents.
    """

    def __init__(
        self, *, batches: int, batch_size: int, size: int, images: int = 64, seed: int = 0
    ) -> None:
        self.batches = batches
        self.batch_size = batch_size
        self.size = size
        self.jpegs = _make_jpegs(images, size, seed)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        out = np.empty((self.batch_size, self.size, self.size, 3), dtype=np.uint8)
        labels = np.empty(self.batch_size, dtype=np.int64)
        for k in range(self.batch_size):
            j = (index * self.batch_size + k) % len(self.jpegs)
            with Image.open(io.BytesIO(self.jpegs[j])) as im:
                out[k] = np.asarray(im.convert("RGB"))
            labels[k] = j
        return out, labels

    def __repr__(self) -> str:
        return (
            f"DecodeSequence(batches={self.batches}, batch_size={self.batch_size}, "
            f"size={self.size}, images={len(self.jpegs)})"
        )


class SampleDecodeDataset:
    """Per-sample JPEG decoding with Pillow from in-memory bytes: ``(HWC uint8 image, label)``.

    Args:
        samples: Number of samples.
        size: Height and width of the images.
        images: Distinct encoded images to cycle through.
        sample_batch_size: Samples per batch for a batching loader.
        seed: Seed for the image contents.
    """

    def __init__(self, *, samples: int, size: int, images: int, sample_batch_size: int, seed: int = 0) -> None:
        self.samples = samples
        self.size = size
        self.sample_batch_size = sample_batch_size
        self.jpegs = _make_jpegs(images, size, seed)

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        j = index % len(self.jpegs)
        with Image.open(io.BytesIO(self.jpegs[j])) as im:
            return np.asarray(im.convert("RGB")), j

    def __repr__(self) -> str:
        return (
            f"SampleDecodeDataset(samples={self.samples}, size={self.size}, "
            f"images={len(self.jpegs)}, sample_batch_size={self.sample_batch_size})"
        )


def _image_rows(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` 3x64x64 uint8 images (a tiled random block, as in GatherSequence) and labels."""
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, size=1 << 20, dtype=np.uint8)
    flat = np.resize(block, rows * 3 * 64 * 64)
    return flat.reshape(rows, 3, 64, 64), rng.integers(0, 1000, size=rows, dtype=np.int64)


class SampleRowsDataset:
    """A Python ``__getitem__`` over in-memory arrays: sample ``i`` is ``(data[i], int(labels[i]))``.

    Args:
        rows: Samples (3x64x64 uint8 each).
        sample_batch_size: Samples per batch for a batching loader.
        seed: Seed for the contents.
    """

    def __init__(self, *, rows: int, sample_batch_size: int, seed: int = 0) -> None:
        self.data, self.labels = _image_rows(rows, seed)
        self.sample_batch_size = sample_batch_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.data[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"SampleRowsDataset(rows={len(self.data)}, sample_batch_size={self.sample_batch_size})"


def _tensor_dataset(rows: int, sample_batch_size: int, seed: int = 0) -> Any:
    """A ``torch.utils.data.TensorDataset`` of images and labels (torch imported lazily)."""
    import torch
    from torch.utils.data import TensorDataset

    data, labels = _image_rows(rows, seed)
    dataset = TensorDataset(torch.from_numpy(data), torch.from_numpy(labels))
    dataset.sample_batch_size = sample_batch_size
    return dataset


class DecodeShard:
    """A shard of the ``stream-decode`` workload: ``count`` samples ``(HWC uint8 image, label)``,
    each a JPEG decoded with Pillow from in-memory bytes."""

    def __init__(self, jpegs: list[bytes], first: int, count: int) -> None:
        self.jpegs = jpegs
        self.first = first
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        from PIL import Image

        for j in range(self.first, self.first + self.count):
            k = j % len(self.jpegs)
            with Image.open(io.BytesIO(self.jpegs[k])) as im:
                yield np.asarray(im.convert("RGB")), k


@dataclasses.dataclass(frozen=True)
class TinyShard:
    """A shard of the ``stream-tiny`` workload: ``count`` tiny items (a Python int each)."""

    first: int
    count: int

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.first + self.count))


class StreamWorkload:
    """A streamed workload: shards of items, batched ``batch_size`` items at a time.

    A loader reads it as a stream: pyloader as a :class:`pyloader.Stream` over the shards (batches
    per shard, round-robin), torch as an ``IterableDataset`` whose workers each read every
    ``num_workers``-th shard and batch their items. Each shard holds a multiple of ``batch_size``
    items, so both make ``len(self)`` full batches for any number of workers.
    """

    stream = True

    def __init__(self, shards: list[Any], batch_size: int) -> None:
        assert all(len(s) % batch_size == 0 for s in shards), "shards of whole batches"
        self.shards = shards
        self.batch_size = batch_size

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards) // self.batch_size

    def torch_dataset(self) -> Any:
        from ._iterable import ShardedIterable

        return ShardedIterable(self.shards)

    def __repr__(self) -> str:
        return (f"StreamWorkload({len(self.shards)} shards of {type(self.shards[0]).__name__}, "
                f"{len(self)} batches of {self.batch_size})")


def _decode_stream(shards: int, per_shard: int, size: int, images: int, batch_size: int) -> StreamWorkload:
    jpegs = _make_jpegs(images, size, 0)
    return StreamWorkload([DecodeShard(jpegs, k * per_shard, per_shard) for k in range(shards)], batch_size)


def _tiny_stream(shards: int, per_shard: int, batch_size: int) -> StreamWorkload:
    return StreamWorkload([TinyShard(k * per_shard, per_shard) for k in range(shards)], batch_size)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A named workload of the benchmark.

    Attributes:
        name: Name used on the command line and in results.
        description: One line for ``--list`` and the report.
        build: ``build(quick)`` returns a fresh Sequence; ``quick=True`` is the smoke-test size.
        requires: Modules the workload imports (it is skipped with a note if one is missing).
        per_sample: The Sequence is a map-style dataset of samples (with ``sample_batch_size``),
            for loaders that batch samples; other loaders skip it.
        stream: The workload is a :class:`StreamWorkload` (shards of items), for loaders that
            read streams; other loaders skip it.
    """

    name: str
    description: str
    build: Callable[[bool], Any]
    requires: tuple[str, ...] = ()
    per_sample: bool = False
    stream: bool = False


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "latency",
            "10 ms GIL-releasing wait per batch (remote storage stand-in) + light numpy",
            lambda quick: LatencySequence(batches=24 if quick else 200,
                                          delay_s=0.002 if quick else 0.010),
        ),
        Workload(
            "tiny",
            "almost free batches: the loader's own per-batch overhead",
            lambda quick: TinySequence(batches=200 if quick else 5000),
        ),
        Workload(
            "large",
            "ready-made 3 MB float32 batches: the cost of handing a big batch to the consumer",
            lambda quick: LargeSequence(batches=20 if quick else 400, mb=3.0),
        ),
        Workload(
            "gather",
            "256 random rows of 3x64x64 uint8 fancy-indexed from a ~500 MB in-memory array",
            lambda quick: GatherSequence(rows=1024 if quick else 40_690, batch_size=256,
                                         batches=16 if quick else 1000),
        ),
        Workload(
            "python",
            "per-sample pure-Python work holding the GIL (32 samples/batch, ~0.4 ms each)",
            lambda quick: PythonSequence(batches=16 if quick else 200, batch_size=32,
                                         iterations=300 if quick else 4000),
        ),
        Workload(
            "decode",
            "per-sample JPEG decode with Pillow from in-memory bytes (32 x 256x256 per batch)",
            lambda quick: DecodeSequence(batches=8 if quick else 100,
                                         batch_size=8 if quick else 32,
                                         size=64 if quick else 256,
                                         images=16 if quick else 64),
            requires=("PIL",),
        ),
        Workload(
            "samples-decode",
            "per-sample dataset: one 128x128 JPEG decoded with Pillow per sample (GIL released), "
            "32 samples/batch",
            lambda quick: SampleDecodeDataset(samples=64 if quick else 3200, size=32 if quick else 128,
                                              images=8 if quick else 64,
                                              sample_batch_size=8 if quick else 32),
            requires=("PIL",),
            per_sample=True,
        ),
        Workload(
            "samples-array",
            "per-sample TensorDataset of 3x64x64 uint8 images + int64 labels (~245 MB), "
            "256 samples/batch, shuffled",
            lambda quick: _tensor_dataset(1024 if quick else 20_000, 64 if quick else 256),
            requires=("torch",),
            per_sample=True,
        ),
        Workload(
            "samples-rows",
            "per-sample Python __getitem__ returning (row of a 3x64x64 uint8 array, int label), "
            "256 samples/batch, shuffled",
            lambda quick: SampleRowsDataset(rows=1024 if quick else 20_000,
                                            sample_batch_size=64 if quick else 256),
            per_sample=True,
        ),
        Workload(
            "stream-decode",
            "streamed: 8 shards of samples, one 128x128 JPEG decoded with Pillow per sample (GIL "
            "released), 32 samples/batch",
            lambda quick: _decode_stream(8, 32 if quick else 384, 32 if quick else 128,
                                         8 if quick else 64, 8 if quick else 32),
            requires=("PIL",),
            stream=True,
        ),
        Workload(
            "stream-tiny",
            "streamed: 8 shards of tiny items (a Python int each), 256 items/batch: the loader's "
            "own per-item overhead",
            lambda quick: _tiny_stream(8, 512 if quick else 8192, 256),
            stream=True,
        ),
    ]
}


def build_workload(name: str, *, quick: bool = False) -> Any:
    """Build the Sequence of a registered workload.

    Args:
        name: A key of :data:`WORKLOADS`.
        quick: Build the small smoke-test version.

    Returns:
        A fresh Sequence.

    Raises:
        ValueError: If ``name`` is not a registered workload.
    """
    try:
        workload = WORKLOADS[name]
    except KeyError:
        raise ValueError(
            f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}"
        ) from None
    return workload.build(quick)
