"""Filtered search on either backend: keep only gallery items of some cameras, within a time window, or not
of the query's own camera (as re-id evaluation leaves a query's own camera out).

A Milvus collection filters in the database (`MilvusIndex.search`'s keyword arguments). An in-process index
filters by its metadata's cameras: it searches deep enough that k items survive the filter (k plus the
number of items the filter removes for a query), then keeps each row's first k survivors, so the answer is
the exact filtered top-k. It stores no timestamps, so a time window needs the Milvus backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agw_light.search.index import GalleryIndex, within_distance


def filtered_search(
    index: GalleryIndex,
    queries: Any,
    k: int,
    *,
    max_distance: float | None = None,
    cameras: Sequence[int] | None = None,
    since: float | None = None,
    until: float | None = None,
    query_cameras: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) as `index.search` (or `search_within` with `max_distance`) returns them, of the
    gallery items that pass the filters; rows with fewer survivors than columns are padded (inf / -1).

    Args:
        index: an in-process index or a `MilvusIndex`.
        queries: as `index.search` takes them.
        k: results per query.
        max_distance: keep only hits at distance <= max_distance.
        cameras: keep only gallery items of these cameras.
        since, until: keep only items taken in [since, until] (seconds since the epoch; Milvus only).
        query_cameras: each query's camera, whose items are left out of its results.
    """
    filters = {"cameras": cameras, "since": since, "until": until, "query_cameras": query_cameras}
    filters = {name: value for name, value in filters.items() if value is not None}
    if index.backend == "milvus":
        if max_distance is None:
            return index.search(queries, k, **filters)
        return index.search_within(queries, k, max_distance, **filters)
    if since is not None or until is not None:
        raise ValueError(
            "a time window (since=, until=) needs a gallery that stores when each image was taken: "
            "backend=milvus; the in-process index stores no timestamps"
        )
    if filters:
        distances, indices = _camera_filtered(index, queries, k, cameras, query_cameras)
    else:
        distances, indices = index.search(queries, k)
    return (distances, indices) if max_distance is None else within_distance(distances, indices, max_distance)


def _camera_filtered(
    index: GalleryIndex, queries: Any, k: int, cameras: Sequence[int] | None, query_cameras: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of the in-process index among the items the camera filters keep."""
    if index.metadata is None:
        raise ValueError("camera filters need the gallery's cameras: this index was saved without metadata")
    columns = index.clamp_k(k)
    gallery_cameras = np.asarray(index.metadata.camids, dtype=np.int64)
    kept = np.ones(len(gallery_cameras), dtype=bool) if cameras is None else np.isin(gallery_cameras, cameras)
    removed = np.full(1, len(kept) - int(kept.sum()))
    own = None
    if query_cameras is not None:
        own = np.asarray(query_cameras, dtype=np.int64).reshape(-1)
        kept_cameras, kept_counts = np.unique(gallery_cameras[kept], return_counts=True)
        if len(kept_cameras):  # each query also loses the kept items of its own camera
            at = np.minimum(np.searchsorted(kept_cameras, own), len(kept_cameras) - 1)
            removed = removed + np.where(kept_cameras[at] == own, kept_counts[at], 0)
    depth = min(index.ntotal, columns + int(removed.max()))
    distances, indices = index.search(queries, max(depth, 1))
    if own is not None and len(own) != len(indices):
        raise ValueError(f"query_cameras needs one camera per query ({len(indices)}), got {len(own)}")
    valid = indices >= 0
    survives = valid & kept[np.where(valid, indices, 0)]
    if own is not None:
        survives &= gallery_cameras[np.where(valid, indices, 0)] != own[:, None]
    order = np.argsort(~survives, axis=1, kind="stable")[:, :columns]  # survivors first, in rank order
    chosen = np.take_along_axis(survives, order, 1)
    padding = np.inf if np.issubdtype(distances.dtype, np.floating) else np.iinfo(np.int32).max
    distances = np.where(chosen, np.take_along_axis(distances, order, 1), padding).astype(distances.dtype)
    return distances, np.where(chosen, np.take_along_axis(indices, order, 1), -1)
