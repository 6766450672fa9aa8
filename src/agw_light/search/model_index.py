"""Indexes built from a trained model's outputs: which index kind its code lengths call for, and how to fill it.

Shared by evaluation (the table's search column) and the `python -m agw_light.search` CLI, so the search
time a user reads in the table is the search they run. The model says its code lengths
(`agw_light.models.ReIDModel.code_lengths`); this module takes them as plain arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from agw_light.protocol import DEFAULT_TARGET_RECALL
from agw_light.search.fit import fit_candidates
from agw_light.search.index import CoarseToFineIndex, FloatIndex, HammingIndex


def build_index(
    gallery_features: Any,
    code_lengths: Sequence[int] | None,
    *,
    metadata: Any = None,
    fit_queries: Any = None,
    fit_gallery: Any = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
) -> FloatIndex | HammingIndex | CoarseToFineIndex:
    """The index a head calls for: float (no codes), exact Hamming (one code) or coarse-to-fine (pyramid).

    Args:
        gallery_features: (N, D) eval outputs of the gallery (`agw_light.Encoder`'s): float features, or the
            relaxed codes of every pyramid level side by side.
        code_lengths: the model's `code_lengths` (None for a float feature).
        metadata: `GalleryMetadata` (paths, pids, cameras) stored with the index, or None.
        fit_queries, fit_gallery: outputs of a validation query/gallery split (never test queries), used to fit
            the coarse-to-fine candidate counts (`fit_candidates`); only their codes are used, no label.
        target_recall: the share of fit queries whose exact full-length top-1 the search must find.

    Returns:
        A `FloatIndex`, `HammingIndex` or `CoarseToFineIndex` holding the gallery (faiss-style ``search(queries,
        k) -> (distances, indices)``).
    """
    features = gallery_features.float().numpy() if isinstance(gallery_features, torch.Tensor) else gallery_features
    features = np.ascontiguousarray(features, dtype=np.float32)
    if not code_lengths:
        index: Any = FloatIndex(features.shape[1])
    elif len(code_lengths) == 1:
        index = HammingIndex(code_lengths[0])
    else:
        index = CoarseToFineIndex(code_lengths)
    index.add(features, metadata)
    if isinstance(index, CoarseToFineIndex):
        if fit_queries is None or len(fit_queries) == 0:
            raise ValueError("a coarse-to-fine index needs validation queries (fit_queries) to fit its candidates")
        queries = fit_queries.float().numpy() if isinstance(fit_queries, torch.Tensor) else fit_queries
        extra = fit_gallery.float().numpy() if isinstance(fit_gallery, torch.Tensor) else fit_gallery
        index.candidates = fit_candidates(index, queries, validation_gallery=extra, target_recall=target_recall)
    return index
