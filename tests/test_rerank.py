"""k-reciprocal re-ranking against a dense, step-by-step implementation of the paper written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agw_light.metrics.rerank import rerank_blocks


def dense_rerank(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """Zhong et al. 2017 with full P x P matrices, one point at a time, in float64 (cosine features)."""
    points = np.concatenate([query, gallery]).astype(np.float64)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    num, num_query = len(points), len(query)
    squared = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    original = squared / squared.max(axis=1, keepdims=True)
    order = np.argsort(original, axis=1, kind="stable")

    def k_reciprocal(i: int, k: int) -> set[int]:
        return {int(j) for j in order[i, : k + 1] if i in order[j, : k + 1]}

    vectors = np.zeros((num, num))
    for i in range(num):
        own = k_reciprocal(i, k1)
        expanded = set(own)
        for candidate in own:
            half = k_reciprocal(candidate, int(np.around(k1 / 2)))
            if len(half & own) > 2 / 3 * len(half):
                expanded |= half
        members = sorted(expanded)
        weights = np.exp(-original[i, members])
        vectors[i, members] = weights / weights.sum()
    if k2 > 1:
        vectors = np.stack([vectors[order[i, :k2]].mean(0) for i in range(num)])
    final = np.empty((num_query, num - num_query))
    for q in range(num_query):
        for g in range(num_query, num):
            jaccard = 1 - np.minimum(vectors[q], vectors[g]).sum() / np.maximum(vectors[q], vectors[g]).sum()
            final[q, g - num_query] = (1 - lambda_value) * jaccard + lambda_value * original[q, g]
    return final


def features(seed: int = 0, num_query: int = 15, num_gallery: int = 40, dim: int = 8):
    generator = np.random.default_rng(seed)
    # A few clusters, so the k-reciprocal sets and their expansions are not trivial.
    centres = generator.normal(size=(5, dim))
    labels = generator.integers(0, 5, num_query + num_gallery)
    points = (centres[labels] + 0.6 * generator.normal(size=(num_query + num_gallery, dim))).astype(np.float32)
    return points[:num_query], points[num_query:]


def reranked(query, gallery, **settings) -> np.ndarray:
    blocks = list(rerank_blocks(torch.from_numpy(query), torch.from_numpy(gallery), **settings))
    starts = [rows.start for rows, _ in blocks]
    assert starts == sorted(starts) and blocks[-1][0].stop == len(query)
    assert all(block.dtype == torch.float32 and block.shape[1] == len(gallery) for _, block in blocks)
    return torch.cat([block for _, block in blocks]).numpy()


@pytest.mark.parametrize(
    ("k1", "k2", "lambda_value"), [(20, 6, 0.3), (4, 2, 0.3), (3, 1, 0.0), (5, 3, 1.0), (7, 4, 0.5)]
)
def test_matches_dense_step_by_step_implementation(k1, k2, lambda_value):
    query, gallery = features(seed=k1)
    expected = dense_rerank(query, gallery, k1, k2, lambda_value)
    actual = reranked(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)
    if lambda_value < 1:  # the re-ranking changes the order, not just the scale
        original = dense_rerank(query, gallery, k1, k2, 1.0)
        assert (actual.argsort(1) != original.argsort(1)).any()


def test_blocks_smaller_than_the_query_set_give_the_same_distances():
    query, gallery = features(seed=3)
    whole = reranked(query, gallery, k1=6, k2=3)
    blocked = list(rerank_blocks(query, gallery, k1=6, k2=3, block_size=4, pair_budget=10))
    assert [rows for rows, _ in blocked] == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 15)]
    np.testing.assert_allclose(torch.cat([block for _, block in blocked]).numpy(), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"k1": 0}, "k1=0"),
        ({"k1": 2.5}, "k1=2.5"),
        ({"k2": True}, "k2=True"),
        ({"k2": -1}, "k2=-1"),
        ({"lambda_value": 1.5}, "lambda_value=1.5"),
        ({"lambda_value": math.nan}, "lambda_value=nan"),
        ({"lambda_value": "0.3"}, "lambda_value='0.3'"),
        ({"block_size": 0}, "block_size must be a positive integer, got 0"),
        ({"pair_budget": None}, "pair_budget must be a positive integer, got None"),
    ],
)
def test_bad_settings_are_refused_with_their_name(settings, message):
    query, gallery = features()
    with pytest.raises(ValueError, match=message):
        rerank_blocks(query, gallery, **settings)


def test_mismatched_or_empty_sets_are_refused():
    query, gallery = features()
    with pytest.raises(ValueError, match="same feature dimension"):
        rerank_blocks(query, gallery[:, :4])
    with pytest.raises(ValueError, match="needs queries and gallery items"):
        rerank_blocks(query[:0], gallery)
