"""SearchIndex.search_within: hits beyond a distance threshold become faiss-style padding."""

from __future__ import annotations

import numpy as np
import pytest

from agw_light.search import CoarseToFineIndex, FloatIndex, HammingIndex


def _check_against_search(index, queries, k, max_distance):
    distances, indices = index.search(queries, k)
    within_d, within_i = index.search_within(queries, k, max_distance)
    assert within_d.dtype == np.float32 and within_i.dtype == np.int64 and within_d.shape == distances.shape
    for row in range(len(queries)):
        kept = distances[row] <= max_distance
        count = int(kept.sum())
        np.testing.assert_array_equal(within_i[row, :count], indices[row][kept])
        np.testing.assert_array_equal(within_d[row, :count], distances[row][kept].astype(np.float32))
        assert np.all(within_i[row, count:] == -1) and np.all(np.isinf(within_d[row, count:]))


@pytest.mark.parametrize("max_distance", [-1, 0, 3, 5, 64])
def test_hamming_integer_thresholds_keep_ties(max_distance):
    rng = np.random.default_rng(0)
    gallery, queries = rng.integers(0, 2, (50, 16)) * 2 - 1, rng.integers(0, 2, (4, 16)) * 2 - 1
    index = HammingIndex(16)
    index.add(gallery)
    _check_against_search(index, queries, 20, max_distance)
    distances, _ = index.search(queries, 50)
    # Inclusive: every gallery item at exactly the threshold is kept (when k reaches it).
    assert (index.search_within(queries, 50, max_distance)[1] >= 0).sum() == (distances <= max_distance).sum()


def test_float_and_coarse_to_fine_indexes():
    rng = np.random.default_rng(1)
    index = FloatIndex(8)
    index.add(rng.normal(size=(30, 8)))
    _check_against_search(index, rng.normal(size=(5, 8)), 10, 0.8)
    pyramid = CoarseToFineIndex([16, 8], candidates=[10])
    pyramid.add(rng.normal(size=(30, 24)))
    _check_against_search(pyramid, rng.normal(size=(5, 24)), 10, 6)


@pytest.mark.parametrize("bad", [None, True, "0.5", float("nan")])
def test_a_bad_threshold_is_named(bad):
    index = HammingIndex(8)
    index.add(np.ones((2, 8)))
    with pytest.raises(ValueError, match="max_distance must be a number"):
        index.search_within(np.ones((1, 8)), 1, bad)
