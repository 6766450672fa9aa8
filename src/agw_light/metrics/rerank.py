"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) with sparse k-reciprocal vectors, one query block at a time.

The semantics are those of the AGW authors' code (ReID-Survey, utils/re_ranking.py), the paper's procedure over
all P = Q + G query and gallery points:

1. Original distance d(i, j): the squared Euclidean distance of the prepared features (`prepare_features`:
   unit vectors for "cosine", so 2 x the cosine distance; +-1 codes for "hamming", so 4 x the Hamming
   distance; the raw features for "euclidean"), divided by the largest d(i, .) over all P points. The division
   cancels the constant factors: for cosine and Hamming it is the model's own distance, scaled per row.
2. N(i, k): the k + 1 nearest points of i (itself included). R(i, k): the j in N(i, k) with i in N(j, k).
3. Expansion: R*(i) = R(i, k1) joined with R(c, round(k1 / 2)) for each c in R(i, k1) whose half-size set
   has more than 2/3 of its points in R(i, k1) (round half to even, as numpy's `around`).
4. V(i, j) = exp(-d(i, j)) / (sum of exp(-d(i, l)) over l in R*(i)) for j in R*(i), else 0; rows sum to 1.
5. Local query expansion: V(i) becomes the mean of V(j) over the k2 nearest j of i (itself included);
   skipped when k2 = 1.
6. Jaccard distance: 1 - m / (2 - m), m = sum over l of min(V(q, l), V(g, l)) (the sum of maxima is 2 - m).
7. final(q, g) = (1 - lambda) * jaccard(q, g) + lambda * d(q, g).

fast-reid's `compute_jaccard_distance` differs in details: k1 nearest points including itself (not k1 + 1),
softmax weights of the unnormalised distance, and it mixes in its evaluator's own distance.

Memory: the usual implementation holds several P x P matrices (about 35 GB in float32 at MSMT17 size). Here
distances exist one block of rows at a time (`block_size` x P floats) and only the nearest max(k1 + 1, k2)
of each point are kept; V is stored sparse (its nonzeros, about k1 per row, and a few times more after query
expansion); the Jaccard sums are scattered from an inverted index of the gallery's V in chunks of at most
`pair_budget` (query entry, gallery entry) pairs. Ties in the nearest-neighbour order are broken arbitrarily,
as by the reference's unstable argsort.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from agw_light.checks import is_integer, is_number, positive_int
from agw_light.metrics.distance import prepare_features

DEFAULT_K1 = 20
DEFAULT_K2 = 6
DEFAULT_LAMBDA = 0.3
# Query (and, for the neighbour lists, all) rows whose distances to all points exist at once: 512 x 94k float32
# is 190 MB at MSMT17 size.
DEFAULT_BLOCK_SIZE = 512
# (query entry, gallery entry) pairs scattered at once into the Jaccard sums (about 40 bytes each), and the
# entries of the dense (rows x gallery) sums they are scattered into.
DEFAULT_PAIR_BUDGET = 1 << 22
# Elements of the neighbour-list steps' temporaries (index arrays, gathered feature rows).
STEP_ELEMENTS = 1 << 22


class SparseRows(NamedTuple):
    """Rows of a sparse matrix in CSR form: row i's columns (increasing) and values at indptr[i]:indptr[i + 1]."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray


def check_rerank_settings(
    k1: Any, k2: Any, lambda_value: Any, *, names: tuple[str, str, str] = ("k1", "k2", "lambda_value")
) -> None:
    """Raises a ValueError naming the setting (by `names`) unless k1, k2 >= 1 are integers and lambda in [0, 1]."""
    for value, name in zip((k1, k2), names[:2], strict=True):
        if not is_integer(value) or value < 1:
            raise ValueError(f"{name}={value!r}: expected an integer >= 1 (neighbours of the k-reciprocal re-ranking)")
    if not is_number(lambda_value) or not 0 <= lambda_value <= 1:
        raise ValueError(
            f"{names[2]}={lambda_value!r}: expected a number in [0, 1] (the weight of the original distance)"
        )


def rerank_blocks(
    query: Any,
    gallery: Any,
    *,
    metric: str = "cosine",
    k1: int = DEFAULT_K1,
    k2: int = DEFAULT_K2,
    lambda_value: float = DEFAULT_LAMBDA,
    block_size: int = DEFAULT_BLOCK_SIZE,
    pair_budget: int = DEFAULT_PAIR_BUDGET,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(query rows, re-ranked float32 distances of those rows to the whole gallery), block after block.

    The neighbour lists and k-reciprocal vectors of all points are built when this is called (the costly
    part: every point against every point); the blocks are then computed as they are consumed, so a
    `RankAccumulator` can rank them without the query x gallery matrix ever existing whole. Smaller = closer.
    Runs on the CPU.
    """
    check_rerank_settings(k1, k2, lambda_value)
    positive_int(block_size, "block_size")
    positive_int(pair_budget, "pair_budget")
    points = _prepared_points(query, gallery, metric)
    num_query = len(query)
    squared_norms = (points * points).sum(1)
    neighbours, row_max = _nearest_neighbours(points, squared_norms, max(k1 + 1, k2), block_size)
    weights = _k_reciprocal_weights(points, squared_norms, row_max, neighbours, k1)
    if k2 > 1:
        weights = _local_query_expansion(weights, neighbours[:, : min(k2, neighbours.shape[1])])
    return _final_blocks(points, squared_norms, row_max, weights, num_query, lambda_value, block_size, pair_budget)


def _prepared_points(query: Any, gallery: Any, metric: str) -> torch.Tensor:
    """Query then gallery rows after `prepare_features`, on the CPU, prepared a chunk at a time into one tensor
    (not whole copies of both)."""
    query, gallery = (_as_tensor(features, name) for features, name in ((query, "query"), (gallery, "gallery")))
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery must have the same feature dimension, got {query.shape[1]} and {gallery.shape[1]}"
        )
    if len(query) == 0 or len(gallery) == 0:
        raise ValueError(f"re-ranking needs queries and gallery items, got {len(query)} and {len(gallery)}")
    dtype = torch.promote_types(prepare_features(query[:1], metric).dtype, prepare_features(gallery[:1], metric).dtype)
    points = torch.empty(len(query) + len(gallery), query.shape[1], dtype=dtype)
    step = max(1, STEP_ELEMENTS // query.shape[1])
    for offset, features in ((0, query), (len(query), gallery)):
        for start in range(0, len(features), step):
            chunk = features[start : start + step]
            points[offset + start : offset + start + len(chunk)] = prepare_features(chunk, metric).cpu()
    return points


def _as_tensor(features: Any, name: str) -> torch.Tensor:
    tensor = features.detach() if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (num_items, feature_dim), got {list(tensor.shape)}")
    return tensor


def _distance_block(points: torch.Tensor, squared_norms: torch.Tensor, rows: slice, columns: slice) -> torch.Tensor:
    """d (unnormalised) of points[rows] to points[columns]: |a|^2 + |b|^2 - 2 a.b, clamped at 0."""
    block = torch.addmm(squared_norms[None, columns], points[rows], points[columns].T, alpha=-2.0)
    return block.add_(squared_norms[rows, None]).clamp_(min=0)


def _nearest_neighbours(
    points: torch.Tensor, squared_norms: torch.Tensor, k: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(the k nearest points of every point, nearest first; the largest d of each row), block by block."""
    num = len(points)
    k = min(k, num)
    neighbours = np.empty((num, k), dtype=np.int64)
    row_max = np.empty(num, dtype=np.float64)
    for start in range(0, num, block_size):
        rows = slice(start, min(start + block_size, num))
        block = _distance_block(points, squared_norms, rows, slice(0, num))
        row_max[rows] = block.max(1).values.numpy()
        neighbours[rows] = torch.topk(block, k, dim=1, largest=False, sorted=True).indices.numpy()
    # A point at distance 0 from every point keeps its distances at 0 rather than dividing by 0.
    row_max[row_max == 0] = 1.0
    return neighbours, row_max


def _reciprocal(neighbours: np.ndarray, k: int) -> np.ndarray:
    """(P, k) mask: whether neighbours[i, a], among the first k of i, also has i among its own first k."""
    num = len(neighbours)
    mask = np.empty((num, k), dtype=bool)
    step = max(1, STEP_ELEMENTS // (k * k))
    for start in range(0, num, step):
        ids = np.arange(start, min(start + step, num))
        mask[ids] = (neighbours[neighbours[ids, :k], :k] == ids[:, None, None]).any(2)
    return mask


def _pair_distances(
    points: torch.Tensor, squared_norms: torch.Tensor, rows: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """d (unnormalised) of the pairs (rows[n], columns[n]), float64."""
    out = np.empty(len(rows), dtype=np.float64)
    step = max(1, STEP_ELEMENTS // points.shape[1])
    for start in range(0, len(rows), step):
        row = torch.from_numpy(rows[start : start + step])
        column = torch.from_numpy(columns[start : start + step])
        dots = torch.linalg.vecdot(points[row], points[column])
        out[start : start + step] = (squared_norms[row] + squared_norms[column] - 2 * dots).clamp_(min=0).numpy()
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """arange(start, start + length) of every pair, concatenated, without a Python loop."""
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(int(lengths.sum()))


def _to_sparse_rows(counts: list[np.ndarray], indices: list[np.ndarray], values: list[np.ndarray]) -> SparseRows:
    indptr = np.zeros(sum(map(len, counts)) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=indptr[1:])
    return SparseRows(indptr, np.concatenate(indices), np.concatenate(values))


def _k_reciprocal_weights(
    points: torch.Tensor, squared_norms: torch.Tensor, row_max: np.ndarray, neighbours: np.ndarray, k1: int
) -> SparseRows:
    """V of every point (steps 2-4): exp(-d) weights over its expanded k-reciprocal set, summing to 1."""
    num = len(neighbours)
    k_full, k_half = min(k1 + 1, num), min(round(k1 / 2) + 1, num)
    reciprocal, half_reciprocal = _reciprocal(neighbours, k_full), _reciprocal(neighbours, k_half)
    counts, indices, values = [], [], []
    # The largest temporary: the (rows, k_full, k_half, k_full) membership test of the half-size sets.
    step = max(1, STEP_ELEMENTS // (k_full * k_half * k_full))
    for start in range(0, num, step):
        ids = np.arange(start, min(start + step, num))
        forward = neighbours[ids, :k_full]
        own = np.where(reciprocal[ids], forward, -1)  # R(i, k1), padded with -1
        half, in_half = neighbours[forward, :k_half], half_reciprocal[forward]  # R(c, k1/2) of every c
        overlap = ((half[..., None] == own[:, None, None, :]).any(3) & in_half).sum(2)
        expands = reciprocal[ids] & (overlap > 2 / 3 * in_half.sum(2))
        added = np.where(expands[..., None] & in_half, half, -1).reshape(len(ids), -1)
        members = np.concatenate([own, added], axis=1)
        members = np.sort(np.where(members < 0, num, members), axis=1)
        keep = members < num
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]
        row_counts = keep.sum(1)
        owners, columns = np.repeat(ids, row_counts), members[keep]
        weight = np.exp(-_pair_distances(points, squared_norms, owners, columns) / row_max[owners])
        local = np.repeat(np.arange(len(ids)), row_counts)
        weight /= np.bincount(local, weights=weight, minlength=len(ids))[local]
        counts.append(row_counts)
        indices.append(columns)
        values.append(weight)
    return _to_sparse_rows(counts, indices, values)


def _local_query_expansion(weights: SparseRows, nearest: np.ndarray) -> SparseRows:
    """Step 5: row i becomes the mean of the rows of its nearest points (`nearest[i]`)."""
    num, k = nearest.shape
    lengths = np.diff(weights.indptr)
    counts, indices, values = [], [], []
    step = max(1, STEP_ELEMENTS // (k * max(1, int(lengths.max()))))
    for start in range(0, num, step):
        rows = min(step, num - start)
        sources = nearest[start : start + rows].ravel()
        positions = _ranges(weights.indptr[sources], lengths[sources])
        owner = np.repeat(np.repeat(np.arange(rows), k), lengths[sources])
        keys, inverse = np.unique(owner * num + weights.indices[positions], return_inverse=True)
        counts.append(np.bincount(keys // num, minlength=rows))
        indices.append(keys % num)
        values.append(np.bincount(inverse, weights=weights.values[positions]) / k)
    return _to_sparse_rows(counts, indices, values)


def _gallery_columns(weights: SparseRows, num_query: int) -> SparseRows:
    """The gallery rows of V as columns (an inverted index): for each point l, the gallery items g (numbered
    from 0) with V(g, l) > 0, and those values."""
    first = weights.indptr[num_query]
    rows = np.repeat(np.arange(len(weights.indptr) - 1 - num_query), np.diff(weights.indptr[num_query:]))
    columns = weights.indices[first:]
    order = np.argsort(columns, kind="stable")
    indptr = np.zeros(len(weights.indptr), dtype=np.int64)
    np.cumsum(np.bincount(columns, minlength=len(weights.indptr) - 1), out=indptr[1:])
    return SparseRows(indptr, rows[order], weights.values[first:][order])


def _final_blocks(
    points: torch.Tensor,
    squared_norms: torch.Tensor,
    row_max: np.ndarray,
    weights: SparseRows,
    num_query: int,
    lambda_value: float,
    block_size: int,
    pair_budget: int,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Steps 6-7 for `block_size` queries at a time; the Jaccard sums of a block in chunks of rows whose
    (query entry, gallery entry) pairs fit in `pair_budget`."""
    num_gallery = len(points) - num_query
    by_column = _gallery_columns(weights, num_query)
    column_sizes = np.diff(by_column.indptr)
    gallery = slice(num_query, len(points))
    for start in range(0, num_query, block_size):
        rows = slice(start, min(start + block_size, num_query))
        block = _distance_block(points, squared_norms, rows, gallery)
        block /= torch.from_numpy(row_max[rows, None]).float()
        block *= lambda_value
        first, last = weights.indptr[rows.start], weights.indptr[rows.stop]
        entry_columns, entry_values = weights.indices[first:last], weights.values[first:last]
        entry_row = np.repeat(np.arange(rows.stop - rows.start), np.diff(weights.indptr[rows.start : rows.stop + 1]))
        entry_pairs = column_sizes[entry_columns]
        row_pairs = np.cumsum(np.bincount(entry_row, weights=entry_pairs, minlength=rows.stop - rows.start))
        rows_per_chunk = max(1, pair_budget // num_gallery)  # bounds the chunk's dense (rows, gallery) sums
        chunk_start = 0
        while chunk_start < len(row_pairs):
            done = row_pairs[chunk_start - 1] if chunk_start else 0
            chunk_stop = int(np.searchsorted(row_pairs, done + pair_budget, side="right"))
            chunk_stop = max(chunk_start + 1, min(chunk_stop, chunk_start + rows_per_chunk))
            in_chunk = (entry_row >= chunk_start) & (entry_row < chunk_stop)
            sizes = entry_pairs[in_chunk]
            positions = _ranges(by_column.indptr[entry_columns[in_chunk]], sizes)
            smaller = np.minimum(np.repeat(entry_values[in_chunk], sizes), by_column.values[positions])
            slots = np.repeat(entry_row[in_chunk] - chunk_start, sizes) * num_gallery + by_column.indices[positions]
            del positions
            overlap = np.bincount(slots, weights=smaller, minlength=(chunk_stop - chunk_start) * num_gallery)
            del smaller, slots
            overlap = torch.from_numpy(overlap).float().view(chunk_stop - chunk_start, num_gallery)
            overlap /= 2 - overlap  # the Jaccard similarity: the sum of minima over the sum of maxima
            block[chunk_start:chunk_stop].add_(overlap, alpha=lambda_value - 1).add_(1 - lambda_value)
            chunk_start = chunk_stop
        yield rows, block
