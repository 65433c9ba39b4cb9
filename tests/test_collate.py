"""pyloader.stack: the worker collates samples straight into slot memory, like the collate() reference."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pyloader
from pyloader import _C

Pair = collections.namedtuple("Pair", "a b")


class Samples:
    """Batch i stacks the samples made by make(i, k) for k in range(size)."""

    def __init__(self, n, size, make):
        self.n, self.size, self.make = n, size, make

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return pyloader.stack([self.make(i, k) for k in range(self.size)])


def sample(i, k):
    image = np.arange(12, dtype=np.float32).reshape(3, 4) * (i + 1) + k
    return {
        "image": image.T,  # not contiguous
        "label": i * 10 + k,
        "weight": float(k) / 2,
        "flag": k % 2 == 0,
        "id": np.int16(k),
        "name": f"s{k}",
        "pair": Pair(np.array([k, i], np.uint8), (k, [np.float64(k)])),
    }


def assert_same(got, want):
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            assert_same(got[k], want[k])
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    else:
        assert got == want


def test_stacked_batches_equal_the_collate_reference():
    seq = Samples(7, 5, sample)
    with pyloader.Prefetcher(seq, workers=3) as loader:
        for i, batch in enumerate(loader):
            assert_same(batch, pyloader.collate([sample(i, k) for k in range(5)]))
            assert batch["image"].shape == (5, 4, 3)
            assert batch["label"].dtype == np.int64 and batch["weight"].dtype == np.float64
            assert batch["flag"].dtype == np.bool_ and batch["id"].dtype == np.int16
            assert batch["name"] == [f"s{k}" for k in range(5)]


def test_stacked_arrays_are_views_into_slot_memory():
    with pyloader.Prefetcher(Samples(2, 3, sample), workers=1) as loader:
        batch = next(iter(loader))
    assert isinstance(batch["image"].base, _C.Lease)
    assert isinstance(batch["label"].base, _C.Lease)  # numbers too are written into the slot


def test_samples_of_different_shapes_fail_naming_the_batch_and_the_sample():
    def ragged(i, k):
        return np.zeros(3 if k < 2 else 4)

    with pyloader.Prefetcher(Samples(3, 4, ragged), workers=1) as loader:
        with pytest.raises(pyloader.BatchError,
                           match=r"batch 0: sample 2 has an array of shape \(4,\) where sample 0 has \(3,\)"):
            list(loader)


def test_samples_of_different_structures_or_keys_fail():
    def keys(i, k):
        return {"a": 1} if k == 0 else {"b": 1}

    def kinds(i, k):
        return (1, 2) if k == 0 else [1, 2]

    for make, match in ((keys, "dict keys"), (kinds, "different structure")):
        with pyloader.Prefetcher(Samples(1, 2, make), workers=1) as loader:
            with pytest.raises(pyloader.BatchError, match=match) as info:
                list(loader)
            assert info.value.index == 0 and isinstance(info.value.__cause__, ValueError)


def test_an_empty_stack_fails_naming_the_batch():
    with pyloader.Prefetcher(Samples(1, 0, sample), workers=1) as loader:
        with pytest.raises(pyloader.BatchError, match="batch 0 has no samples"):
            list(loader)


def test_collate_outside_a_prefetcher_refuses_mismatches():
    with pytest.raises(ValueError, match="equal shapes"):
        pyloader.collate([np.zeros(2), np.zeros(3)])
    with pytest.raises(ValueError, match="no samples"):
        pyloader.collate([])


leaves = st.one_of(
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=3),
)


@settings(max_examples=40, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
    dtype=st.sampled_from([np.uint8, np.int32, np.float64, np.complex64, np.bool_]),
    extra=leaves,
    batch=st.integers(1, 6),
)
def test_native_stack_matches_collate_for_random_samples(shape, dtype, extra, batch):
    rng = np.random.default_rng(0)

    def make(i, k):
        x = (rng.random(shape) * 100).astype(dtype)
        return (x, {"extra": extra, "k": k})

    samples = [make(0, k) for k in range(batch)]
    seq = Samples(1, batch, lambda i, k: samples[k])
    with pyloader.Prefetcher(seq, workers=1) as loader:
        (got,) = list(loader)
    assert_same(got, pyloader.collate(samples))
