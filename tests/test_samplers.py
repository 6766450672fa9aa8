"""PKSampler: batch structure, epoch length, determinism, Lightning's set_epoch hook and the DDP split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agw_light.data.samplers import PKSampler


def pids_with_counts(counts: list[int], seed: int = 0) -> np.ndarray:
    """Identity labels (arbitrary, non-contiguous values) with the given image counts, in shuffled order."""
    labels = np.repeat(np.arange(len(counts)) * 7 + 3, counts)
    return np.random.default_rng(seed).permutation(labels)


def max_steps_brute_force(image_counts: list[int], k: int, slots_per_step: int) -> int:
    """The most steps of `slots_per_step` distinct identities, trying every step count."""
    chunks = [max(n // k, 1) for n in image_counts]
    best = 0
    for steps in range(1, sum(chunks) + 1):
        if sum(min(c, steps) for c in chunks) >= slots_per_step * steps:
            best = steps
    return best


def assert_pk_batch(batch: list[int], pids: np.ndarray, p: int, k: int) -> np.ndarray:
    """Checks one batch is p blocks of k indices of one identity each, identities distinct; returns them."""
    assert len(batch) == p * k
    assert all(0 <= i < len(pids) for i in batch)
    blocks = pids[np.asarray(batch)].reshape(p, k)
    assert (blocks == blocks[:, :1]).all(), blocks
    assert len(set(blocks[:, 0].tolist())) == p, blocks
    return blocks[:, 0]


@pytest.mark.parametrize(
    ("counts", "k", "batch_size"),
    [
        ([2, 5, 1, 11, 4, 9, 3, 8, 6, 7], 4, 8),
        ([16] * 12, 4, 16),
        ([1, 1, 1, 2, 3, 30, 2, 5], 2, 6),
        ([3, 3, 3, 3, 3], 1, 3),
    ],
)
def test_every_batch_holds_p_distinct_identities_with_k_images_each(counts, k, batch_size):
    pids = pids_with_counts(counts)
    sampler = PKSampler(pids, num_instances=k, batch_size=batch_size, seed=3)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) > 0
        for batch in batches:
            assert_pk_batch(batch, pids, batch_size // k, k)


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_epoch_length_is_the_most_steps_of_distinct_identities(num_replicas):
    rng = np.random.default_rng(11)
    for _ in range(30):
        counts = rng.integers(1, 25, size=rng.integers(6, 20)).tolist()
        counts[0] = int(rng.integers(1, 120))  # sometimes one identity dominates
        k, p = int(rng.integers(1, 5)), 2
        if len(counts) < p * num_replicas:
            continue
        pids = pids_with_counts(counts)
        sampler = PKSampler(pids, num_instances=k, batch_size=p * k, num_replicas=num_replicas)
        assert len(sampler) == max_steps_brute_force(counts, k, p * num_replicas)
        assert len(list(sampler)) == len(sampler)


def test_epoch_length_by_hand():
    # chunks of 4: [0, 1, 0, 2] -> [1, 1, 1, 2] (short identities give one chunk): 5 chunks, 2 per batch.
    assert len(PKSampler(pids_with_counts([2, 5, 1, 11]), num_instances=4, batch_size=8)) == 2
    # One identity owns 10 of 12 chunks, but a batch takes it once: only 2 batches of 2 distinct identities.
    assert len(PKSampler(pids_with_counts([40, 4, 4]), num_instances=4, batch_size=8)) == 2
    # Market-1501-like: 751 identities x 17 images, chunks of 4 -> 751 * 4 = 3004 chunks // 16 per batch.
    assert len(PKSampler(pids_with_counts([17] * 751), num_instances=4, batch_size=64)) == 3004 // 16


def test_every_image_is_used_once_when_sizes_divide_evenly():
    pids = pids_with_counts([8, 4, 12, 8, 4, 4, 8, 8])  # 14 chunks of 4, 2 per batch: nothing left over
    sampler = PKSampler(pids, num_instances=4, batch_size=8, seed=5)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        used = np.concatenate([np.asarray(b) for b in sampler])
        assert np.array_equal(np.sort(used), np.arange(len(pids)))


def test_identities_with_fewer_than_k_images_repeat_their_images():
    pids = np.array([0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])  # identity 0: one image, identity 1: three
    sampler = PKSampler(pids, num_instances=4, batch_size=8, seed=0)
    blocks = [np.asarray(b).reshape(2, 4) for b in sampler]
    rows = {int(pids[row[0]]): sorted(row.tolist()) for block in blocks for row in block}
    assert rows[0] == [0, 0, 0, 0]
    assert set(rows[1]) == {1, 2, 3} and len(rows[1]) == 4  # every image used, one of them twice


def test_the_left_out_tail_changes_between_epochs():
    pids = np.array([0] * 5 + [1] * 4 + [2] * 4 + [3] * 4)  # identity 0 loses one of its 5 images per epoch
    sampler = PKSampler(pids, num_instances=4, batch_size=8, seed=0)
    seen = set()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        seen.update(i for b in sampler for i in b if i < 5)
    assert seen == {0, 1, 2, 3, 4}


def test_order_depends_only_on_seed_and_epoch():
    pids = pids_with_counts([6, 9, 4, 13, 7, 5, 8, 10, 3, 12])
    sampler = PKSampler(pids, num_instances=2, batch_size=8, seed=7)
    first = list(sampler)
    assert list(sampler) == first  # iterating again without set_epoch repeats the epoch
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first

    resumed = PKSampler(pids, num_instances=2, batch_size=8, seed=7)  # fresh object, as after a restart
    resumed.set_epoch(1)
    assert list(resumed) == second
    other_seed = PKSampler(pids, num_instances=2, batch_size=8, seed=8)
    assert list(other_seed) != first


def test_lightning_set_epoch_reaches_the_batch_sampler():
    from lightning_fabric.utilities.data import _set_sampler_epoch

    pids = pids_with_counts([4] * 6)
    sampler = PKSampler(pids, num_instances=2, batch_size=4)
    loader = torch.utils.data.DataLoader(torch.arange(len(pids)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 5)
    assert sampler.epoch == 5
    reference = PKSampler(pids, num_instances=2, batch_size=4)
    reference.set_epoch(5)
    assert [b.tolist() for b in loader] == list(reference)


def test_ddp_ranks_get_equal_lengths_and_disjoint_identities_per_step():
    counts = np.random.default_rng(2).integers(1, 20, size=40).tolist()
    pids = pids_with_counts(counts)
    k = 4
    single = PKSampler(pids, num_instances=k, batch_size=16, seed=1)
    ranks = [PKSampler(pids, num_instances=k, batch_size=16, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    # Two ranks together make as many batches per epoch as one process, give or take a batch.
    assert abs(2 * len(ranks[0]) - len(single)) <= 1
    for epoch in range(3):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        per_rank = [list(sampler) for sampler in ranks]
        for batch_0, batch_1 in zip(*per_rank, strict=True):
            ids_0 = assert_pk_batch(batch_0, pids, 4, k)
            ids_1 = assert_pk_batch(batch_1, pids, 4, k)
            assert not set(ids_0.tolist()) & set(ids_1.tolist())
        assert per_rank[0] != per_rank[1]


def test_ddp_ranks_split_every_image_between_them():
    pids = pids_with_counts([8, 4, 12, 8, 4, 4, 8, 8, 4, 4])  # 16 chunks: 4 steps of 2 ranks x 2 identities
    ranks = [PKSampler(pids, num_instances=4, batch_size=8, seed=9, num_replicas=2, rank=r) for r in range(2)]
    used = np.concatenate([np.asarray(b) for sampler in ranks for b in sampler])
    assert np.array_equal(np.sort(used), np.arange(len(pids)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_instances": 4, "batch_size": 30}, r"batch_size=30 must be a multiple of num_instances=4"),
        ({"num_instances": 0, "batch_size": 8}, r"num_instances must be a positive integer, got 0"),
        ({"num_instances": 2, "batch_size": 12}, r"at least 6 distinct identities .* pids holds 5"),
        ({"num_instances": 2, "batch_size": 6, "num_replicas": 2}, r"at least 6 .* x 2 replica.* holds 5"),
        ({"num_instances": 2, "batch_size": 4, "num_replicas": 2, "rank": 2}, r"rank must be .* got 2"),
        ({"num_instances": 2, "batch_size": 4, "seed": -1}, r"seed must be a non-negative integer, got -1"),
    ],
)
def test_bad_arguments_are_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PKSampler(pids_with_counts([4] * 5), **kwargs)


def test_pids_must_be_a_non_empty_list_of_integers():
    with pytest.raises(ValueError, match="pids must be a non-empty 1-D sequence"):
        PKSampler([], num_instances=2, batch_size=4)
    with pytest.raises(ValueError, match="dtype float64"):
        PKSampler([0.5, 1.5], num_instances=1, batch_size=1)


def test_set_epoch_rejects_negative_epochs():
    with pytest.raises(ValueError, match="epoch must be a non-negative integer, got -1"):
        PKSampler(pids_with_counts([4] * 5), num_instances=2, batch_size=4).set_epoch(-1)
