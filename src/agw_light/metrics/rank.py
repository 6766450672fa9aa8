"""Re-id ranking metrics (CMC, mAP, mINP) under the Market-1501 / DukeMTMC / MSMT17 protocol.

Protocol (as torchreid and fast-reid evaluate these datasets):

* For each query, gallery items with the query's pid *and* camera are removed ("junk"); every other gallery
  item stays, ranked by distance (smaller is closer).
* A true match is a remaining gallery item with the query's pid. Queries with no true match are skipped and
  counted in ``num_invalid_queries``.
* CMC at rank k: fraction of valid queries whose first true match is within the first k remaining items.
* AP: mean over the true matches of the precision at each match (torchreid's definition).
* INP (AGW paper, Ye et al. 2020): ``|G_i| / R_i^hard`` -- the number of true matches divided by the rank of
  the hardest (last) one. mAP and mINP are the means over valid queries.

Ties: gallery items at equal distance are ordered by gallery index (the order a stable argsort of each row
gives), so results are deterministic and independent of the chunking.

How, without sorting rows: all three metrics only need the rank of each true match among the kept items,
which is one plus the number of kept items before it. So every true match is compared with its whole row (a
vectorised count of the items before it, in cache-sized steps) and the junk before it is subtracted: one
comparison per distance and true match. float32 distances (and float64 ones float32 holds exactly) are first
packed with their gallery index into one float64 key per item, so that one comparison also breaks ties;
other float64 values are compared with the tie rule spelled out, several times slower.

It is numpy on one thread: on a busy machine, waiting for a starved second thread made the multi-threaded
torch bucket algorithm this replaced several times slower (docs/benchmarks.md, "Re-id evaluation").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agw_light.checks import positive_int
from agw_light.metrics.distance import pairwise_distance, prepare_features

# Distances per chunk of rows: bounds the chunk's float copy and its (rows x same-pid items) arrays.
CHUNK_ELEMENTS = 1 << 22
# Comparisons per vectorised step: small enough for their boolean result (1 MB) and the step's keys to stay in
# the L2 cache between the comparison and the count.
COMPARISONS_PER_STEP = 1 << 20
# Gallery index bits of a packed key: a sign and 31 bits of float32 order, then these, fill float64's 53 bits.
INDEX_BITS = 22


def _as_array(value: Any, name: str) -> np.ndarray:
    """Numpy arrays, tensors (any device) and sequences alike; CPU memory is shared, not copied."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()  # numpy has no bfloat16
        return value.cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise ValueError(f"{name} must be numeric, got an array of Python objects")
    return array


def _as_ids(value: Any, name: str, length: int, length_name: str) -> np.ndarray:
    ids = _as_array(value, name)
    if ids.ndim != 1 or ids.shape[0] != length:
        raise ValueError(
            f"{name} must have shape ({length_name},) = ({length},) to match distmat, got {tuple(ids.shape)}"
        )
    if ids.size and not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == bool):
        raise ValueError(f"{name} must hold integers (ids), got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _as_distances(dist: np.ndarray) -> np.ndarray:
    """float32 / float64 rows: narrower floats widen to float32, integers to float64 (exact below 2**53)."""
    if dist.dtype == bool or np.iscomplexobj(dist):
        raise ValueError(f"distmat must hold real distances, got dtype {dist.dtype}")
    if dist.dtype not in (np.float32, np.float64):
        dist = dist.astype(np.float32 if np.issubdtype(dist.dtype, np.floating) else np.float64)
    if np.isnan(dist).any():
        raise ValueError("distmat contains NaN: every distance must be a number to rank the gallery")
    return dist


def _packed_keys(dist: np.ndarray, index: np.ndarray) -> np.ndarray:
    """float64 keys in (distance, gallery index) order, no two equal; `dist` must hold float32 values.

    The float32 bit pattern read as an int32 follows the float order once the negatives' magnitude bits are
    flipped; times 2**INDEX_BITS plus the index, it stays an integer below 2**53, which float64 holds exactly.
    In-place steps: each temporary costs a pass over the rows.
    """
    as_float32 = dist.astype(np.float32)
    as_float32 += np.float32(0)  # turns -0.0 into 0.0: they tie
    bits = as_float32.view(np.int32)
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)
    keys = bits.astype(np.float64)
    keys *= float(1 << INDEX_BITS)
    keys += index
    return keys


def _count_true(flags: np.ndarray) -> np.ndarray:
    """Trues along the last axis. A numpy bool is the byte 0 or 1, so the popcount of 8 bytes read as one
    uint64 counts 8 flags at once, where `sum` adds them one by one."""
    whole_words = flags.shape[-1] // 8 * 8
    counts = np.bitwise_count(flags[..., :whole_words].view(np.uint64)).sum(-1, dtype=np.int32)
    return counts + flags[..., whole_words:].sum(-1, dtype=np.int32)


def _precedes(
    value: np.ndarray, index: np.ndarray, other_value: np.ndarray, other_index: np.ndarray, tie_free: bool
) -> np.ndarray:
    """Whether (value, index) comes before (other_value, other_index), broadcast; tie-free keys need no index."""
    before = value < other_value
    if not tie_free:
        before |= (value == other_value) & (index < other_index)
    return before


class RankAccumulator:
    """The protocol's sums over rows fed piece by piece, for callers that never hold the whole matrix.

    `evaluate_rank` feeds it its own matrix; `evaluate_retrieval` feeds it distance blocks as they are
    computed. `result()` returns the `evaluate_rank` dictionary of all rows added. Runs on the CPU: tensors
    on another device are copied over one chunk of rows at a time.
    """

    def __init__(self, g_pids: Any, g_camids: Any, max_rank: int = 50, *, num_gallery: int | None = None) -> None:
        positive_int(max_rank, "max_rank")
        self.num_gallery = len(g_pids) if num_gallery is None else num_gallery
        self.max_rank = int(max_rank)
        self.g_pids = _as_ids(g_pids, "g_pids", self.num_gallery, "num_gallery")
        self.g_camids = _as_ids(g_camids, "g_camids", self.num_gallery, "num_gallery")
        # Gallery grouped by pid (stable: each group lists its gallery indices in increasing order).
        self._by_pid = np.argsort(self.g_pids, kind="stable")
        self._group_pids, self._group_starts, self._group_sizes = np.unique(
            self.g_pids[self._by_pid], return_index=True, return_counts=True
        )
        self._first_rank_counts = np.zeros(self.max_rank + 1, dtype=np.int64)
        self._ap_sum = 0.0
        self._inp_sum = 0.0
        self.num_valid = 0
        self.num_invalid = 0

    def add(self, distmat: Any, q_pids: Any, q_camids: Any) -> None:
        """Adds the rows of `distmat` (queries x the whole gallery) of the given queries."""
        is_tensor = isinstance(distmat, torch.Tensor)
        dist = distmat.detach() if is_tensor else _as_array(distmat, "distmat")
        if dist.ndim != 2 or dist.shape[1] != self.num_gallery:
            raise ValueError(
                f"distmat must have shape (num_query, num_gallery) with num_gallery = {self.num_gallery}, "
                f"got {tuple(dist.shape)}"
            )
        num_query = dist.shape[0]
        q_pids = _as_ids(q_pids, "q_pids", num_query, "num_query")
        q_camids = _as_ids(q_camids, "q_camids", num_query, "num_query")
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, self.num_gallery))
        for start in range(0, num_query, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            chunk = _as_distances(_as_array(dist[rows], "distmat") if is_tensor else dist[rows])
            self._add_chunk(chunk, q_pids[rows], q_camids[rows])

    def result(self) -> dict[str, Any]:
        """The `evaluate_rank` dictionary of every row added so far."""
        valid = self.num_valid
        if valid == 0:
            cmc, mean_ap, mean_inp = np.zeros(self.max_rank), 0.0, 0.0
        else:
            cmc = np.cumsum(self._first_rank_counts[: self.max_rank]) / valid
            mean_ap, mean_inp = self._ap_sum / valid, self._inp_sum / valid
        return {
            "cmc": cmc.astype(np.float64),
            "mAP": float(mean_ap),
            "mINP": float(mean_inp),
            "num_valid_queries": int(valid),
            "num_invalid_queries": int(self.num_invalid),
        }

    def _add_chunk(self, dist: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray) -> None:
        member, is_match, is_junk = self._same_pid_members(q_pids, q_camids)
        num_matches = is_match.sum(1)
        valid = num_matches > 0
        self.num_invalid += int((~valid).sum())
        if not valid.any():
            return
        # Packed keys need float32 values and gallery indices below 2**INDEX_BITS.
        tie_free = self.num_gallery <= 1 << INDEX_BITS and (
            dist.dtype == np.float32 or np.array_equal(dist.astype(np.float32), dist)
        )
        member_value = np.take_along_axis(dist, member, 1)
        if tie_free:
            member_value = _packed_keys(member_value, member)
        # True matches first in each row, so the comparisons with whole rows skip junk and padding.
        match_first = np.argsort(~is_match, axis=1, kind="stable")[:, : int(num_matches.max())]
        match, match_value = (np.take_along_axis(array, match_first, 1) for array in (member, member_value))
        is_match = np.take_along_axis(is_match, match_first, 1)
        members = (member, member_value, is_junk)
        rank = self._kept_items_before(dist, tie_free, match, match_value, num_matches, members) + 1
        rank = np.sort(np.where(is_match, rank, self.num_gallery + 1), axis=1)[valid]
        num_matches = num_matches[valid]
        match_number = np.arange(1, rank.shape[1] + 1)
        precision = np.where(match_number <= num_matches[:, None], match_number / rank, 0.0)
        hardest = rank[np.arange(len(rank)), num_matches - 1]
        self._ap_sum += float((precision.sum(1) / num_matches).sum())
        self._inp_sum += float((num_matches / hardest).sum())
        self._first_rank_counts += np.bincount(
            np.minimum(rank[:, 0], self.max_rank + 1) - 1, minlength=self.max_rank + 1
        )
        self.num_valid += int(valid.sum())

    def _same_pid_members(self, q_pids: np.ndarray, q_camids: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each query's same-pid gallery indices in a (rows, largest group) array, with match and junk masks
        (padding is neither)."""
        rows = len(q_pids)
        if len(self._group_pids) == 0:
            empty = np.zeros((rows, 0), dtype=bool)
            return np.zeros((rows, 0), dtype=np.int64), empty, empty
        group = np.minimum(np.searchsorted(self._group_pids, q_pids), len(self._group_pids) - 1)
        sizes = np.where(self._group_pids[group] == q_pids, self._group_sizes[group], 0)
        slots = np.arange(sizes.max())
        is_member = slots < sizes[:, None]
        member = self._by_pid[np.minimum(self._group_starts[group][:, None] + slots, self.num_gallery - 1)]
        same_camera = self.g_camids[member] == q_camids[:, None]
        return member, is_member & ~same_camera, is_member & same_camera

    def _kept_items_before(
        self,
        dist: np.ndarray,
        tie_free: bool,
        match: np.ndarray,
        match_value: np.ndarray,
        num_matches: np.ndarray,
        members: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> np.ndarray:
        """For each true match, the number of kept gallery items before it in (distance, gallery index) order:
        the items of its row before it, less the junk among them.

        Steps of rows (and of matches, for a row with very many) hold at most COMPARISONS_PER_STEP comparisons.
        """
        member, member_value, is_junk = members
        rows, width = match.shape
        columns = np.arange(self.num_gallery, dtype=np.float64 if tie_free else np.int64)
        matches_per_step = max(1, min(width, COMPARISONS_PER_STEP // self.num_gallery))
        rows_per_step = max(1, COMPARISONS_PER_STEP // (matches_per_step * self.num_gallery))
        before = np.zeros((rows, width), dtype=np.int64)
        for start in range(0, rows, rows_per_step):
            step = slice(start, start + rows_per_step)
            values = _packed_keys(dist[step], columns) if tie_free else dist[step]
            for first in range(0, int(num_matches[step].max()), matches_per_step):
                slots = slice(first, first + matches_per_step)
                this_value, this_index = match_value[step, slots, None], match[step, slots, None]
                items = _precedes(values[:, None, :], columns, this_value, this_index, tie_free)
                junk = _precedes(member_value[step, None], member[step, None], this_value, this_index, tie_free)
                before[step, slots] = _count_true(items) - (junk & is_junk[step, None]).sum(2)
        return before


def evaluate_rank(
    distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, max_rank: int = 50
) -> dict[str, Any]:
    """CMC / mAP / mINP of a query x gallery distance matrix (numpy or torch; smaller = closer).

    Gallery items at equal distance rank in gallery-index order (as a stable argsort orders them).

    Returns {"cmc": float64 array of length max_rank, "mAP", "mINP": floats in [0, 1],
    "num_valid_queries", "num_invalid_queries": ints}. `max_rank` may exceed the gallery size: CMC keeps its
    definition there, so those entries are 1.0 (a valid query's first match lies within the gallery). With
    no valid query, cmc is zeros and mAP = mINP = 0.0, so results of query chunks merge by weighting with
    num_valid_queries (or feed the chunks to one `RankAccumulator`). Runs on the CPU.
    """
    dist = distmat if isinstance(distmat, torch.Tensor) else _as_array(distmat, "distmat")
    if dist.ndim != 2:
        raise ValueError(f"distmat must have shape (num_query, num_gallery), got {tuple(dist.shape)}")
    accumulator = RankAccumulator(g_pids, g_camids, max_rank, num_gallery=dist.shape[1])
    accumulator.add(dist, q_pids, q_camids)
    return accumulator.result()


def evaluate_retrieval(
    query: Any,
    gallery: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    distance: str = "cosine",
    max_rank: int = 50,
    query_chunk: int | None = None,
) -> dict[str, Any]:
    """`evaluate_rank` of query / gallery features under `distance`, one block of query rows at a time.

    Only a (query_chunk x num_gallery) block of distances exists at once (default: 16M entries, 64 MB in
    float32), so MSMT17-sized evaluation never builds its 4 GB matrix. Distances are computed on the query
    features' device; the ranking runs on the CPU.
    """
    query = prepare_features(query, distance)
    gallery = prepare_features(gallery, distance).to(query.device)
    if len(q_pids) != len(query):
        raise ValueError(f"q_pids must have one entry per query feature ({len(query)}), got {len(q_pids)}")
    rows = query_chunk or max(1, (1 << 24) // max(1, len(gallery)))
    accumulator = RankAccumulator(g_pids, g_camids, max_rank, num_gallery=len(gallery))
    for start in range(0, len(query), rows):
        block = pairwise_distance(query[start : start + rows], gallery, distance, prepared=True)
        accumulator.add(block, q_pids[start : start + rows], q_camids[start : start + rows])
    return accumulator.result()
