"""Verification figures against an all-pairs, sort-based reference written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agw_light.metrics.verification import evaluate_verification, pair_histograms, roc_points, tpr_at_fpr


def reference_pairs(query, gallery, q_pids, g_pids, q_cams, g_cams, distance):
    """Distances and labels of every kept pair, with plain numpy loops over pairs."""
    distances, positive = [], []
    for i in range(len(query)):
        for j in range(len(gallery)):
            if q_pids[i] == g_pids[j] and q_cams[i] == g_cams[j]:
                continue
            if distance == "hamming":
                value = float(np.sum((query[i] > 0) != (gallery[j] > 0)))
            else:
                a, b = query[i] / np.linalg.norm(query[i]), gallery[j] / np.linalg.norm(gallery[j])
                value = 1.0 - float(a @ b)
            distances.append(value)
            positive.append(q_pids[i] == g_pids[j])
    return np.array(distances), np.array(positive)


def reference_best(distances, positive, target):
    """The largest threshold among the pair distances (or none) with FPR <= target, and its TPR/FPR, by sorting."""
    best = (-np.inf, 0.0, 0.0)
    for threshold in np.sort(np.unique(distances)):
        accepted = distances <= threshold
        fpr = accepted[~positive].mean()
        if fpr <= target:
            best = (threshold, accepted[positive].mean(), fpr)
    return best


def random_split(seed, num_query=12, num_gallery=40, dim=8, ids=5, cams=3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    q_pids, g_pids = rng.integers(0, ids, num_query), rng.integers(0, ids, num_gallery)
    query = centres[q_pids] + rng.normal(scale=0.8, size=(num_query, dim))
    gallery = centres[g_pids] + rng.normal(scale=0.8, size=(num_gallery, dim))
    return query, gallery, q_pids, g_pids, rng.integers(0, cams, num_query), rng.integers(0, cams, num_gallery)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hamming_matches_all_pairs_reference_with_ties(seed):
    query, gallery, q_pids, g_pids, q_cams, g_cams = random_split(seed)
    distances, positive = reference_pairs(query, gallery, q_pids, g_pids, q_cams, g_cams, "hamming")
    assert len(np.unique(distances)) < len(distances) / 5  # 8-bit codes: many ties
    histograms = pair_histograms(query, gallery, q_pids, g_pids, q_cams, g_cams, distance="hamming")
    assert histograms.positives.sum() == positive.sum() and histograms.negatives.sum() == (~positive).sum()
    assert histograms.excluded == int(np.sum((q_pids[:, None] == g_pids) & (q_cams[:, None] == g_cams)))
    for target in (0.01, 0.05, 0.2, 0.5):
        (result,) = tpr_at_fpr(histograms, (target,))
        threshold, tpr, fpr = reference_best(distances, positive, target)
        assert isinstance(result["threshold"], int)
        # The reference picks among pair distances; the integer grid also holds thresholds between them.
        assert result["tpr"] == pytest.approx(tpr) and result["fpr"] == pytest.approx(fpr)
        assert np.mean(distances[positive] <= result["threshold"]) == pytest.approx(result["tpr"])
        if threshold == -np.inf:
            assert result["threshold"] == -1 and result["tpr"] == 0.0
        else:  # the largest integer threshold within the target: one more exceeds it
            assert threshold <= result["threshold"] < 8
            assert np.mean(distances[~positive] <= result["threshold"] + 1) > target


def test_hamming_hand_computed():
    # One query (pid 0, cam 0) against 4 gallery codes of 2 bits; gallery 0 is the same pid and camera: excluded.
    query = np.array([[1.0, 1.0]])
    gallery = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [1.0, 1.0]])
    g_pids, g_cams = np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1])
    histograms = pair_histograms(query, gallery, [0], g_pids, [0], g_cams, distance="hamming")
    assert histograms.excluded == 1
    np.testing.assert_array_equal(histograms.thresholds, [-1, 0, 1, 2])
    np.testing.assert_array_equal(histograms.positives, [0, 0, 1, 1])
    np.testing.assert_array_equal(histograms.negatives, [0, 1, 0, 0])
    # The only negative sits at distance 0: FPR 0 needs the virtual threshold -1, which accepts nothing.
    assert tpr_at_fpr(histograms, (0.5,)) == [{"target_fpr": 0.5, "fpr": 0.0, "tpr": 0.0, "threshold": -1}]
    assert tpr_at_fpr(histograms, (1.0,))[0] == {"target_fpr": 1.0, "fpr": 1.0, "tpr": 1.0, "threshold": 2}


@pytest.mark.parametrize("seed", [0, 3])
def test_cosine_grid_rates_are_exact_and_near_the_best_threshold(seed):
    query, gallery, q_pids, g_pids, q_cams, g_cams = random_split(seed, dim=16)
    distances, positive = reference_pairs(query, gallery, q_pids, g_pids, q_cams, g_cams, "cosine")
    bins = 1 << 12
    histograms = pair_histograms(
        torch.from_numpy(query), gallery, q_pids, g_pids, q_cams, g_cams, distance="cosine", bins=bins, block_pairs=50
    )
    fpr, tpr = histograms.rates()
    # At every grid threshold the rates are those of the rule distance <= threshold.
    for index in range(0, len(fpr), 97):
        accepted = distances <= histograms.thresholds[index]
        assert fpr[index] == pytest.approx(accepted[~positive].mean())
        assert tpr[index] == pytest.approx(accepted[positive].mean())
    width = 2.0 / bins
    for target in (0.02, 0.1, 0.3):
        (result,) = tpr_at_fpr(histograms, (target,))
        best_threshold, best_tpr, _ = reference_best(distances, positive, target)
        assert result["fpr"] <= target
        # The grid threshold loses at most the positives within one bin below the best threshold.
        lost = np.mean((distances[positive] > best_threshold - width) & (distances[positive] <= best_threshold))
        assert best_tpr - lost - 1e-12 <= result["tpr"] <= best_tpr


def test_blocks_and_devices_do_not_change_counts():
    query, gallery, q_pids, g_pids, q_cams, g_cams = random_split(5)
    whole = pair_histograms(query, gallery, q_pids, g_pids, q_cams, g_cams, distance="cosine", bins=256)
    blocks = pair_histograms(query, gallery, q_pids, g_pids, q_cams, g_cams, distance="cosine", bins=256, block_pairs=1)
    np.testing.assert_array_equal(whole.positives, blocks.positives)
    np.testing.assert_array_equal(whole.negatives, blocks.negatives)


def test_roc_points_lie_on_the_curve_and_summary_keys():
    query, gallery, q_pids, g_pids, q_cams, g_cams = random_split(7, num_query=20, num_gallery=60)
    histograms = pair_histograms(query, gallery, q_pids, g_pids, q_cams, g_cams, distance="hamming")
    fpr, tpr = histograms.rates()
    points = roc_points(histograms, points=10)
    assert points["fpr"][0] == 0.0 and points["tpr"][0] == 0.0 and points["fpr"][-1] == 1.0
    assert len(points["fpr"]) <= 11 and np.all(np.diff(points["fpr"]) >= 0)
    for f, t, threshold in zip(points["fpr"], points["tpr"], points["threshold"], strict=True):
        assert (f, t) == (fpr[threshold + 1], tpr[threshold + 1])  # hamming: bin of threshold t is t + 1
    summary = evaluate_verification(query, gallery, q_pids, g_pids, q_cams, g_cams, distance="hamming")
    assert [entry["target_fpr"] for entry in summary["verification"]] == [1e-4, 1e-3, 1e-2]
    assert summary["positive_pairs"] + summary["negative_pairs"] + summary["excluded_pairs"] == 20 * 60


def test_one_sided_pairs_are_an_error():
    with pytest.raises(ValueError, match="positive and negative pairs"):
        tpr_at_fpr(pair_histograms(np.ones((2, 4)), np.ones((3, 4)), [0, 0], [0, 0, 0], [0, 0], [1, 1, 1]))
