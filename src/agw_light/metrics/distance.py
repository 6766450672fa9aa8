"""Query x gallery distances for re-id retrieval: cosine, Euclidean and Hamming (smaller = closer).

Each metric first maps features to a prepared form (unit vectors, +-1 codes, or plain floats) so that
callers evaluating in query chunks prepare the gallery once; the distance itself is one matrix product
written into the output in place, so the memory used is the output plus the inputs. For large sets,
`agw_light.metrics.evaluate_retrieval` computes the distances in blocks of query rows instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

METRICS = ("cosine", "euclidean", "hamming")
# float32 holds every integer below 2**24 exactly: Hamming distances of shorter codes are exact.
_EXACT_FLOAT32_INTEGERS = 1 << 24


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"distance metric must be one of {METRICS}, got {metric!r}")


def _as_features(features: Any, name: str) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        tensor = features.detach()
    else:
        tensor = torch.from_numpy(np.asarray(features))
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (num_items, feature_dim), got {list(tensor.shape)}")
    if tensor.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    return tensor


def prepare_features(features: Any, metric: str) -> torch.Tensor:
    """The form `pairwise_distance(..., prepared=True)` expects.

    cosine: L2-normalised rows; hamming: +-1 codes (bit = feature > 0); euclidean: the features. Floats
    narrower than float32 are widened, float64 stays float64.
    """
    _check_metric(metric)
    tensor = _as_features(features, "features")
    if tensor.dtype != torch.float64:
        tensor = tensor.float()
    if metric == "cosine":
        return torch.nn.functional.normalize(tensor, dim=1)
    if metric == "hamming":
        codes = torch.where(tensor > 0, 1.0, -1.0)
        return codes.to(torch.float64 if tensor.shape[1] >= _EXACT_FLOAT32_INTEGERS else torch.float32)
    return tensor


def pairwise_distance(query: Any, gallery: Any, metric: str = "cosine", *, prepared: bool = False) -> torch.Tensor:
    """(num_query, num_gallery) distances on the query's device (numpy or torch inputs).

    cosine: 1 - cosine similarity, in [0, 2]. euclidean: the L2 distance (not squared), via
    |q|^2 + |g|^2 - 2 q.g clamped at 0, so nearly equal points carry float32 rounding (~1e-3 absolute).
    hamming: the number of differing sign bits (bit = feature > 0), exact integers stored as float32.
    `prepared=True` skips `prepare_features` for inputs that went through it already.
    """
    _check_metric(metric)
    query, gallery = _as_features(query, "query"), _as_features(gallery, "gallery")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery must have the same feature dimension, got {query.shape[1]} and {gallery.shape[1]}"
        )
    if not prepared:
        query, gallery = prepare_features(query, metric), prepare_features(gallery, metric)
    dtype = torch.promote_types(query.dtype, gallery.dtype)
    query, gallery = query.to(dtype), gallery.to(device=query.device, dtype=dtype)
    if metric == "cosine":
        return torch.mm(query, gallery.T).neg_().add_(1.0)
    if metric == "hamming":  # agreements - disagreements = q.g, so disagreements = (bits - q.g) / 2
        return torch.mm(query, gallery.T).neg_().add_(query.shape[1]).mul_(0.5)
    squared = torch.addmm((gallery * gallery).sum(1)[None], query, gallery.T, alpha=-2.0)
    return squared.add_((query * query).sum(1)[:, None]).clamp_(min=0).sqrt_()
