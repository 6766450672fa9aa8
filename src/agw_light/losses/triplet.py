"""Weighted regularized triplet (WRT), AGW's metric-learning loss on the pre-BNNeck feature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pairwise_euclidean(features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between all rows; clamped before the root so the gradient at 0 stays finite."""
    squared = features.pow(2).sum(dim=1)
    gram = features @ features.t()
    return (squared[:, None] + squared[None, :] - 2.0 * gram).clamp_min(1e-12).sqrt()


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row softmax over the entries where mask is True (zero elsewhere)."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)


class WeightedRegularizedTriplet(nn.Module):
    """Every positive and negative pair of the batch weighted by a softmax over its distance.

    Far positives and close negatives get the largest weights, so the loss focuses on hard pairs without
    hard-example mining and without a margin to tune: softplus(d_pos - d_neg) is the soft-margin form.
    As in the AGW authors' code the anchor counts among its own positives (at distance 0).
    """

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        distances = pairwise_euclidean(features.float())
        same = pids[:, None] == pids[None, :]
        if bool(same.all()):
            raise ValueError("weighted triplet loss needs at least two identities in a batch (check the PK sampler)")
        positive = (_masked_softmax(distances, same) * distances).sum(dim=1)
        negative = (_masked_softmax(-distances, ~same) * distances).sum(dim=1)
        return F.softplus(positive - negative).mean()
