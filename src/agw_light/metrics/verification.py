"""Same-person decisions: TPR at fixed FPR over all query x gallery pairs, with the distance threshold.

The rule verified is "same person iff distance <= threshold". Pairs are every query x gallery pair except
those of the same identity seen by the same camera, which the ranking protocol excludes too (a query's
same-camera shots of itself are near duplicates, not a re-identification); a pair of the same pid is
positive, of different pids negative (distractor identities included).

At MSMT17 size (11,659 x 82,161, about 958M pairs) the pairs are never held at once: distances are computed
one block of query rows at a time and counted into histograms, one for positives and one for negatives.
Bin i holds the pairs with thresholds[i - 1] < distance <= thresholds[i], so the cumulative counts are the
exact numbers of pairs accepted at each grid threshold, and TPR / FPR at those thresholds are exact (up to
the float rounding of the distance itself). Memory: the prepared (normalised or sign) copy of the features and
one block of BLOCK_PAIRS distances, whatever the number of pairs (docs/benchmarks.md). The grid:

- hamming: one bin per integer 0..bits, so thresholds are integers and every achievable decision is on it;
- cosine (1 - cos, in [0, 2]): 2**16 bins of width 3.05e-5 (two int64 histograms of 512 KB). The grid only
  limits which thresholds can be chosen: at a target FPR the best grid threshold loses, against the best
  threshold anywhere, at most the positives lying within one bin width below it (the tests check this bound
  against an all-pairs sort). A threshold finer than 3e-5 in cosine distance would not carry over from one
  test set to another anyway, so exact thresholds (a second pass over the pairs) would buy nothing usable;
- euclidean: 2**16 bins over [0, max |q| + max |g|] (an upper bound of every distance, by the triangle
  inequality).

A first, virtual threshold below every distance (-1 for hamming, -width otherwise) accepts no pair, so the
ROC curve starts at (0, 0) and a target FPR that no threshold reaches reports TPR 0 at it. fast-reid's ROC
evaluation collects the scores of all pairs and reports the TPR of the FPR nearest each target; here the
threshold is the largest one whose FPR does not exceed the target, and it is reported with the rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agw_light.checks import positive_int
from agw_light.metrics.distance import pairwise_distance, prepare_features
from agw_light.protocol import FPR_TARGETS

FLOAT_BINS = 1 << 16
# Pairs counted per block: the block's distances and bin indices take 12 bytes a pair (48 MB).
BLOCK_PAIRS = 1 << 22
# Points of the ROC curve kept for metrics.json and the report's plot.
ROC_POINTS = 100


@dataclass(frozen=True)
class PairHistograms:
    """Positive and negative pair counts per distance bin (see the module docstring for the bins)."""

    thresholds: np.ndarray  # (bins,) float64, increasing; bin i: thresholds[i-1] < distance <= thresholds[i]
    positives: np.ndarray  # (bins,) int64
    negatives: np.ndarray  # (bins,) int64
    excluded: int  # same pid, same camera: left out, as the ranking protocol leaves them out
    integer: bool  # thresholds are integers (Hamming)

    def rates(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR) of the rule distance <= thresholds[i], for every i."""
        num_positive, num_negative = int(self.positives.sum()), int(self.negatives.sum())
        if num_positive == 0 or num_negative == 0:
            raise ValueError(
                f"verification needs positive and negative pairs, got {num_positive} positive and "
                f"{num_negative} negative (same-pid same-camera pairs are excluded)"
            )
        return np.cumsum(self.negatives) / num_negative, np.cumsum(self.positives) / num_positive


def pair_histograms(
    query: Any,
    gallery: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    distance: str = "cosine",
    bins: int = FLOAT_BINS,
    block_pairs: int = BLOCK_PAIRS,
) -> PairHistograms:
    """Histograms of the distances of all query x gallery pairs, computed one block of query rows at a time.

    Features are numpy or torch (computed on the query's device); `bins` applies to cosine and euclidean
    (hamming has one bin per integer distance). Each block is counted whole, in one histogram of every pair;
    the same-pid pairs (a few per query: the gallery shots of its identity) are gathered by index and counted
    apart, as positives or, under the query's camera, excluded; negatives are the rest. So the labels cost no
    pass over the block.
    """
    query = prepare_features(query, distance)
    gallery = prepare_features(gallery, distance).to(query.device)
    q_pids, q_camids = (
        _as_ids(ids, name, len(query), query.device) for ids, name in ((q_pids, "q_pids"), (q_camids, "q_camids"))
    )
    g_pids, g_camids = (
        _as_ids(ids, name, len(gallery), query.device) for ids, name in ((g_pids, "g_pids"), (g_camids, "g_camids"))
    )
    positive_int(bins, "bins")
    if distance == "hamming":
        bins, upper = query.shape[1], float(query.shape[1])
    elif distance == "cosine":
        upper = 2.0
    else:
        upper = float(query.norm(dim=1).max() + gallery.norm(dim=1).max()) if len(query) and len(gallery) else 0.0
        upper = upper or 1.0
    scale = bins / upper
    members = _SamePidMembers(g_pids, g_camids)
    every, positive, excluded = (np.zeros(bins + 1, dtype=np.int64) for _ in range(3))
    rows = max(1, block_pairs // max(1, len(gallery)))
    for start in range(0, len(query), rows):
        block = slice(start, start + rows)
        scaled = _scaled_distances(query[block], gallery, distance, scale)
        member, is_member, same_camera = members.of(q_pids[block], q_camids[block])
        member_bins = _bin_index(scaled.gather(1, member), bins)
        every += _bincount(_bin_index(scaled, bins), bins + 1)
        positive += _bincount(member_bins[is_member & ~same_camera], bins + 1)
        excluded += _bincount(member_bins[is_member & same_camera], bins + 1)
    # Bin 0 is the virtual threshold below every distance: it holds no pair.
    zero = np.zeros(1, dtype=np.int64)
    return PairHistograms(
        thresholds=np.arange(-1, bins + 1, dtype=np.float64) * (upper / bins),
        positives=np.concatenate([zero, positive]),
        negatives=np.concatenate([zero, every - positive - excluded]),
        excluded=int(excluded.sum()),
        integer=distance == "hamming",
    )


def _scaled_distances(query: torch.Tensor, gallery: torch.Tensor, distance: str, scale: float) -> torch.Tensor:
    """distance * scale of every pair, in one matrix product for cosine and hamming (no pass to scale it)."""
    if distance == "cosine":  # scale * (1 - q.g)
        offset, factor = scale, -scale
    elif distance == "hamming":  # (bits - q.g) / 2 on +-1 codes: exact integers (scale is 1)
        offset, factor = query.shape[1] / 2, -0.5
    else:
        return pairwise_distance(query, gallery, distance, prepared=True).mul_(scale)
    offset_tensor = torch.full((1, 1), offset, dtype=query.dtype, device=query.device)
    return torch.addmm(offset_tensor, query, gallery.T, alpha=factor)


def _bin_index(scaled: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin of each scaled distance: i such that i - 1 < value <= i, clamped to [0, bins] (float rounding can
    take a distance a hair below 0 or above its bound)."""
    return scaled.ceil_().clamp_(0, bins).to(torch.int64)


def _bincount(values: torch.Tensor, length: int) -> np.ndarray:
    """Counts of each value in [0, length); numpy's on the CPU (several times faster than torch's there)."""
    if values.device.type == "cpu":
        return np.bincount(values.numpy().ravel(), minlength=length)
    return torch.bincount(values.view(-1), minlength=length).cpu().numpy()


class _SamePidMembers:
    """Each query's same-pid gallery indices, gathered without comparing it with the whole gallery."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor) -> None:
        self.by_pid = torch.argsort(g_pids, stable=True)
        self.pids, self.sizes = torch.unique_consecutive(g_pids[self.by_pid], return_counts=True)
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.g_camids = g_camids

    def of(self, q_pids: torch.Tensor, q_camids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(member indices (rows, largest group), is a member (not padding), is under the query's camera)."""
        rows = len(q_pids)
        if len(self.pids) == 0:
            empty = torch.zeros((rows, 0), dtype=torch.bool, device=q_pids.device)
            return torch.zeros((rows, 0), dtype=torch.int64, device=q_pids.device), empty, empty
        group = torch.searchsorted(self.pids, q_pids).clamp_(max=len(self.pids) - 1)
        sizes = torch.where(self.pids[group] == q_pids, self.sizes[group], 0)
        slots = torch.arange(int(sizes.max()) if rows else 0, device=q_pids.device)
        is_member = slots < sizes[:, None]
        member = self.by_pid[(self.starts[group][:, None] + slots).clamp_(max=len(self.by_pid) - 1)]
        return member, is_member, self.g_camids[member] == q_camids[:, None]


def tpr_at_fpr(histograms: PairHistograms, targets: tuple[float, ...] = FPR_TARGETS) -> list[dict[str, Any]]:
    """For each target FPR: the largest grid threshold whose FPR does not exceed it, with its TPR and FPR."""
    fpr, tpr = histograms.rates()
    results = []
    for target in targets:
        if not 0 < target <= 1:
            raise ValueError(f"target FPR must lie in (0, 1], got {target!r}")
        # fpr is non-decreasing and fpr[0] = 0 (the virtual threshold), so the index exists.
        index = int(np.searchsorted(fpr, target, side="right")) - 1
        results.append(
            {
                "target_fpr": float(target),
                "fpr": float(fpr[index]),
                "tpr": float(tpr[index]),
                "threshold": _threshold(histograms, index),
            }
        )
    return results


def roc_points(histograms: PairHistograms, points: int = ROC_POINTS) -> dict[str, list]:
    """About `points` points of the ROC curve, spread evenly over log FPR (plus both ends), for plots.

    Each point is exact (a grid threshold and its rates), so the downsampled curve lies on the full one.
    """
    fpr, tpr = histograms.rates()
    smallest = max(float(fpr[fpr > 0].min()) if (fpr > 0).any() else 1.0, 1e-12)
    grid = np.geomspace(smallest, 1.0, max(2, points - 1))
    chosen = np.unique(np.concatenate([[0], np.searchsorted(fpr, grid, side="right") - 1, [len(fpr) - 1]]))
    return {
        "fpr": [float(value) for value in fpr[chosen]],
        "tpr": [float(value) for value in tpr[chosen]],
        "threshold": [_threshold(histograms, int(index)) for index in chosen],
    }


def evaluate_verification(
    query: Any,
    gallery: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    distance: str = "cosine",
    targets: tuple[float, ...] = FPR_TARGETS,
    bins: int = FLOAT_BINS,
) -> dict[str, Any]:
    """The verification figures of a query / gallery split, as metrics.json keeps them.

    Returns {"verification": [{"target_fpr", "fpr", "tpr", "threshold"}, ...], "roc": {"fpr", "tpr",
    "threshold"} lists, "positive_pairs", "negative_pairs", "excluded_pairs"}; thresholds are ints for hamming.
    """
    histograms = pair_histograms(query, gallery, q_pids, g_pids, q_camids, g_camids, distance=distance, bins=bins)
    return {
        "verification": tpr_at_fpr(histograms, targets),
        "roc": roc_points(histograms),
        "positive_pairs": int(histograms.positives.sum()),
        "negative_pairs": int(histograms.negatives.sum()),
        "excluded_pairs": histograms.excluded,
    }


def _threshold(histograms: PairHistograms, index: int) -> int | float:
    value = histograms.thresholds[index]
    return round(value) if histograms.integer else float(value)


def _as_ids(ids: Any, name: str, expected: int, device: torch.device) -> torch.Tensor:
    tensor = ids.detach() if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids))
    if tensor.dim() != 1 or len(tensor) != expected:
        raise ValueError(f"{name} must have one entry per feature ({expected}), got shape {list(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.int64)
