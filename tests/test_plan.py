"""The plan: a pure function of (seed, epoch, shard, length), with DistributedSampler semantics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyloader._plan import Plan, resolve_shard


def test_unshuffled_plan_is_identity():
    assert Plan(5, False, 0).indices(3).tolist() == [0, 1, 2, 3, 4]


def test_shuffled_plan_is_a_permutation_that_changes_per_epoch_and_repeats_per_seed():
    p = Plan(100, True, 7)
    a, b = p.indices(0), p.indices(1)
    assert sorted(a.tolist()) == list(range(100))
    assert a.tolist() != b.tolist()
    assert Plan(100, True, 7).indices(0).tolist() == a.tolist()
    assert Plan(100, True, 8).indices(0).tolist() != a.tolist()


@given(n=st.integers(0, 60), world=st.integers(1, 7), drop_last=st.booleans(), shuffle=st.booleans(),
       epoch=st.integers(0, 3))
def test_shards_are_even_and_cover_every_batch(n, world, drop_last, shuffle, epoch):
    shards = [Plan(n, shuffle, 3, r, world, drop_last).indices(epoch) for r in range(world)]
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1, "every rank gets the same number of batches"
    union = np.concatenate(shards) if shards else np.array([])
    if drop_last:
        assert len(set(union.tolist())) == len(union) == (n // world) * world  # disjoint
    elif n:
        assert set(union.tolist()) == set(range(n))  # padded by wrapping: covers everything
        assert len(union) == -(-n // world) * world


def test_shards_match_torch_distributed_sampler():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DistributedSampler

    for n, world, drop_last in [(10, 3, False), (10, 3, True), (2, 4, False), (9, 3, False)]:
        for rank in range(world):
            s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
            assert Plan(n, False, 0, rank, world, drop_last).indices(0).tolist() == list(s)
    del torch


@pytest.mark.parametrize("bad", [(1, 1), (-1, 2), (0, 0), (0, 1, 2), "x", 3, (0.5, 2)])
def test_bad_shards_raise_value_error_showing_the_value(bad):
    with pytest.raises(ValueError, match="shard"):
        resolve_shard(bad)


def test_auto_shard_reads_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_shard("auto") == (1, 3)
    monkeypatch.delenv("RANK")
    assert resolve_shard("auto") == (0, 1)
