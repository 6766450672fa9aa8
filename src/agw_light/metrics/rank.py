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
gives), so results are deterministic and independent of the algorithm and of the chunking.

Why it is fast without sorting rows: only the ranks of the gallery items sharing the query's pid (true
matches and junk, "members": tens out of tens of thousands) matter. Each row's distances go into equal-width
buckets through a monotone map; a per-row bucket histogram counts the items in lower buckets, which all come
before a member. Only the items sharing a bucket with a member ("candidates", a few per member) are placed
exactly, by binary search on (distance, index). Each pass over the distances is one multi-threaded torch
op; rows go in chunks through reused buffers, so working memory stays near 50 MB for any matrix size.
Integer distances (Hamming) tie massively, which would make most items candidates; they are first replaced
by the tie-free keys distance * num_gallery + index, which order items the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agw_light.metrics.distance import pairwise_distance, prepare_features

# Distances per chunk: each of the few chunk-sized buffers is then 8-16 MB.
CHUNK_ELEMENTS = 1 << 21
# Most buckets per row: more buckets mean fewer candidates but a longer per-row cumulative sum.
MAX_BUCKETS = 4096


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    """Numpy arrays, tensors and sequences alike; numpy memory is shared, not copied."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    array = np.asarray(value)
    if array.dtype == object:
        raise ValueError(f"{name} must be numeric, got an array of Python objects")
    return torch.from_numpy(array)


def _as_ids(value: Any, name: str, length: int, length_name: str, device: torch.device) -> torch.Tensor:
    ids = _as_tensor(value, name)
    if ids.dim() != 1 or ids.shape[0] != length:
        raise ValueError(
            f"{name} must have shape ({length_name},) = ({length},) to match distmat, got {tuple(ids.shape)}"
        )
    if ids.numel() and (ids.is_floating_point() or ids.is_complex()):
        raise ValueError(f"{name} must hold integers (ids), got dtype {ids.dtype}")
    return ids.to(device=device, dtype=torch.int64)


class _Scratch:
    """Chunk-sized buffers reused from chunk to chunk: a fresh multi-MB allocation costs page faults that
    take as long as the arithmetic done in it."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        buffer = self._buffers.get(name)
        fits = buffer is not None and buffer.numel() >= like.numel()
        if not fits or buffer.dtype != dtype or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return buffer[: like.numel()].view(like.shape)


class RankAccumulator:
    """The protocol's sums over rows fed piece by piece, for callers that never hold the whole matrix.

    `evaluate_rank` feeds it its own matrix; `evaluate_retrieval` feeds it distance blocks as they are
    computed. `result()` returns the `evaluate_rank` dictionary of all rows added.
    """

    def __init__(
        self,
        g_pids: Any,
        g_camids: Any,
        max_rank: int = 50,
        *,
        num_gallery: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(max_rank, bool) or not isinstance(max_rank, int | np.integer) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
        self.device = torch.device(device)
        self.num_gallery = len(g_pids) if num_gallery is None else num_gallery
        self.max_rank = int(max_rank)
        self.g_pids = _as_ids(g_pids, "g_pids", self.num_gallery, "num_gallery", self.device)
        self.g_camids = _as_ids(g_camids, "g_camids", self.num_gallery, "num_gallery", self.device)
        # Gallery grouped by pid (stable: each group lists its gallery indices in increasing order).
        self._by_pid = torch.sort(self.g_pids, stable=True).indices
        grouped_pids = self.g_pids[self._by_pid]
        self._group_pids, self._group_sizes = torch.unique_consecutive(grouped_pids, return_counts=True)
        self._group_starts = torch.cumsum(self._group_sizes, 0) - self._group_sizes
        self._first_rank_counts = torch.zeros(self.max_rank + 1, dtype=torch.int64, device=self.device)
        self._ap_sum = 0.0
        self._inp_sum = 0.0
        self._scratch = _Scratch()
        self.num_valid = 0
        self.num_invalid = 0

    def add(self, distmat: Any, q_pids: Any, q_camids: Any) -> None:
        """Adds the rows of `distmat` (queries x the whole gallery) of the given queries."""
        dist = _as_tensor(distmat, "distmat")
        if dist.dim() != 2 or dist.shape[1] != self.num_gallery:
            raise ValueError(
                f"distmat must have shape (num_query, num_gallery) with num_gallery = {self.num_gallery}, "
                f"got {tuple(dist.shape)}"
            )
        if dist.dtype == torch.bool or dist.is_complex():
            raise ValueError(f"distmat must hold real distances, got dtype {dist.dtype}")
        num_query = dist.shape[0]
        q_pids = _as_ids(q_pids, "q_pids", num_query, "num_query", self.device)
        q_camids = _as_ids(q_camids, "q_camids", num_query, "num_query", self.device)
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, self.num_gallery))
        for start in range(0, num_query, rows_per_chunk):
            stop = start + rows_per_chunk
            self._add_chunk(dist[start:stop].to(self.device), q_pids[start:stop], q_camids[start:stop])

    def result(self) -> dict[str, Any]:
        """The `evaluate_rank` dictionary of every row added so far."""
        valid = self.num_valid
        if valid == 0:
            cmc, mean_ap, mean_inp = np.zeros(self.max_rank), 0.0, 0.0
        else:
            cmc = torch.cumsum(self._first_rank_counts[: self.max_rank], 0).cpu().numpy() / valid
            mean_ap, mean_inp = self._ap_sum / valid, self._inp_sum / valid
        return {
            "cmc": cmc.astype(np.float64),
            "mAP": float(mean_ap),
            "mINP": float(mean_inp),
            "num_valid_queries": int(valid),
            "num_invalid_queries": int(self.num_invalid),
        }

    def _add_chunk(self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor) -> None:
        dist = self._working_copy(dist)
        value_range = _value_range(dist)
        if self._tie_free_keys_are_exact(dist, value_range):
            dist, value_range = self._tie_free_keys(dist, value_range)
        members = self._same_pid_members(dist, q_pids, q_camids)
        if members is None:
            self.num_invalid += len(q_pids)
            return
        member_dist, member_index, is_real, is_match, is_junk = members
        num_matches = is_match.sum(1)
        valid = num_matches > 0
        self.num_invalid += int((~valid).sum())
        if not bool(valid.any()):
            return
        # 1-based rank of each true match among the kept (non-junk) gallery items.
        closer_items = self._count_closer_items(dist, value_range, member_dist, member_index, is_real)
        junk_before = torch.cumsum(is_junk, 1) - is_junk.long()
        rank = (closer_items - junk_before + 1)[valid]
        is_match, num_matches = is_match[valid], num_matches[valid].double()
        match_number = torch.cumsum(is_match, 1)
        precision = torch.where(is_match, match_number.double() / rank.double(), 0.0)
        hardest = torch.where(is_match, rank, 0).amax(1)
        first = torch.where(is_match, rank, self.max_rank + 1).amin(1).clamp_(max=self.max_rank + 1)
        self._ap_sum += float((precision.sum(1) / num_matches).sum())
        self._inp_sum += float((num_matches / hardest.double()).sum())
        self._first_rank_counts += torch.bincount(first - 1, minlength=self.max_rank + 1)
        self.num_valid += int(valid.sum())

    def _tie_free_keys_are_exact(self, dist: torch.Tensor, value_range: tuple[float, float, bool]) -> bool:
        """Whether all distances are integers small enough for distance * num_gallery + index to be exact."""
        low, high, all_finite = value_range
        largest_key = (max(abs(low), abs(high)) + 1) * dist.shape[1]
        if not all_finite or largest_key >= 2**53 or not torch.equal(dist[0], dist[0].round()):
            return False  # the first row rules out most non-integer data at once
        return torch.equal(dist, torch.round(dist, out=self._scratch.get("rounded", dist)))

    def _tie_free_keys(
        self, dist: torch.Tensor, value_range: tuple[float, float, bool]
    ) -> tuple[torch.Tensor, tuple[float, float, bool]]:
        """distance * num_gallery + index: the (distance, index) order with no two keys equal, exact in
        float64 for integer distances."""
        num_gallery = dist.shape[1]
        keys = self._scratch.get("keys", dist, torch.float64).copy_(dist).mul_(num_gallery)
        keys.add_(torch.arange(num_gallery, device=dist.device, dtype=torch.float64))
        low, high, _ = value_range
        return keys, (low * num_gallery, (high + 1) * num_gallery, True)

    def _working_copy(self, dist: torch.Tensor) -> torch.Tensor:
        """Contiguous float32 / float64 rows; narrower floats widen to float32, integers to float64."""
        if dist.dtype in (torch.float32, torch.float64) and dist.is_contiguous():
            return dist
        dtype = dist.dtype if dist.dtype in (torch.float32, torch.float64) else torch.float32
        dtype = dtype if dist.is_floating_point() else torch.float64
        return self._scratch.get("working", dist, dtype).copy_(dist)

    def _same_pid_members(self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor):
        """Each query's same-pid gallery items (true matches and junk), sorted by (distance, index).

        (rows, width) tensors padded to the largest group: distances (padding +inf), gallery indices (padding
        num_gallery, so it sorts after every real item), and real / match / junk masks; None when no query of
        the chunk has a same-pid gallery item.
        """
        num_gallery = dist.shape[1]
        if len(self._group_pids) == 0:
            return None
        group = torch.searchsorted(self._group_pids, q_pids).clamp_(max=len(self._group_pids) - 1)
        sizes = torch.where(self._group_pids[group] == q_pids, self._group_sizes[group], 0)
        width = int(sizes.max())
        if width == 0:
            return None
        slots = torch.arange(width, device=dist.device)
        is_real = slots < sizes[:, None]
        index = self._by_pid[(self._group_starts[group][:, None] + slots).clamp_(max=num_gallery - 1)]
        member_dist = torch.where(is_real, dist.gather(1, index), float("inf"))
        # Stable: members at equal distance keep their increasing gallery-index order.
        member_dist, order = torch.sort(member_dist, dim=1, stable=True)
        index, is_real = index.gather(1, order), is_real.gather(1, order)
        same_cam = self.g_camids[index] == q_camids[:, None]
        index = torch.where(is_real, index, num_gallery)
        return member_dist, index, is_real, is_real & ~same_cam, is_real & same_cam

    def _count_closer_items(
        self,
        dist: torch.Tensor,
        value_range: tuple[float, float, bool],
        member_dist: torch.Tensor,
        member_index: torch.Tensor,
        is_real: torch.Tensor,
    ) -> torch.Tensor:
        """For each member, the number of gallery items before it in (distance, gallery index) order.

        Items in member-free buckets are counted from a per-row bucket histogram; items sharing a bucket
        with a member ("candidates", members included) are placed among the members exactly.
        """
        rows, num_gallery = dist.shape
        width = member_dist.shape[1]
        buckets, num_buckets = self._buckets(dist, *value_range)
        flat_buckets = buckets.add_(torch.arange(rows, device=dist.device)[:, None] * num_buckets).view(-1)
        in_range = member_index.clamp(max=num_gallery - 1)  # padding takes any bucket, masked by is_real
        member_buckets = flat_buckets.view(rows, num_gallery).gather(1, in_range)
        flagged = torch.zeros(rows * num_buckets, dtype=torch.bool, device=dist.device)
        flagged[member_buckets[is_real]] = True
        # Items in member-free buckets below a member's bucket all come before it.
        histogram = torch.bincount(flat_buckets, minlength=rows * num_buckets).masked_fill_(flagged, 0)
        in_lower_buckets = histogram.view(rows, num_buckets).cumsum_(1).view(-1)[member_buckets]

        is_candidate = self._scratch.get("flags", flat_buckets, torch.bool)
        candidates = torch.take(flagged, flat_buckets, out=is_candidate).nonzero().squeeze(1)
        cand_row, cand_index = candidates // num_gallery, candidates % num_gallery
        cand_members_before = _members_before(
            member_dist, member_index, cand_row, cand_index, dist.view(-1)[candidates], num_gallery
        )
        # Candidate c is at or before member t exactly when at most t members precede c.
        bins = width + 1
        cand_histogram = torch.bincount(cand_row * bins + cand_members_before, minlength=rows * bins)
        cands_at_or_before = cand_histogram.view(rows, bins).cumsum_(1)[:, :width]
        return in_lower_buckets + cands_at_or_before - 1

    def _buckets(
        self, dist: torch.Tensor, low: float, high: float, all_finite: bool
    ) -> tuple[torch.Tensor, int]:
        """int64 bucket in [0, num_buckets) of each distance: equal-width buckets over [low, high].

        The map only has to be monotone non-decreasing for exact ranks (an item in a lower bucket is strictly
        closer); equal widths suit the smooth distance distributions of real features.
        """
        num_buckets = max(1, min(MAX_BUCKETS, dist.shape[1] // 4))
        buckets = self._scratch.get("buckets", dist, torch.int64)
        spread = high - low
        if num_buckets == 1 or not 0 < spread < float("inf"):
            return buckets.zero_(), num_buckets
        if spread >= torch.finfo(dist.dtype).max:
            dist = dist.double()
        shifted = torch.sub(dist, low, out=self._scratch.get("shifted", dist))
        if not all_finite:
            shifted.clamp_(0, spread)
        # In [0, num_buckets - 1] up to a rounding far below 1, so truncation stays in range.
        return buckets.copy_(shifted.mul_((num_buckets - 1) / spread)), num_buckets


def _value_range(dist: torch.Tensor) -> tuple[float, float, bool]:
    """(lowest finite, highest finite, whether all are finite); NaN is refused: it cannot be ranked."""
    low, high = (float(value) for value in torch.aminmax(dist)) if dist.numel() else (0.0, 0.0)
    if np.isnan(low) or np.isnan(high):
        raise ValueError("distmat contains NaN: every distance must be a number to rank the gallery")
    if np.isfinite(low) and np.isfinite(high):
        return low, high, True
    finite = dist[torch.isfinite(dist)]  # rare: +-inf entries, which go to the end buckets
    low, high = (float(value) for value in torch.aminmax(finite)) if finite.numel() else (0.0, 0.0)
    return low, high, False


def _members_before(
    member_dist: torch.Tensor,
    member_index: torch.Tensor,
    cand_row: torch.Tensor,
    cand_index: torch.Tensor,
    cand_dist: torch.Tensor,
    num_gallery: int,
) -> torch.Tensor:
    """For each candidate, how many members of its row precede it in (distance, gallery index) order.

    A batched binary search needs one row of values per row of members, so the candidates are laid out in
    a padded (rows, most candidates in a row) block first.
    """
    rows, width = member_dist.shape
    per_row = torch.bincount(cand_row, minlength=rows)
    row_start = torch.cumsum(per_row, 0) - per_row
    slot = torch.arange(len(cand_row), device=cand_row.device) - row_start[cand_row]
    block = (rows, int(per_row.max()))
    padded_dist = member_dist.new_full(block, float("inf"))
    padded_dist[cand_row, slot] = cand_dist
    closer = torch.searchsorted(member_dist, padded_dist)[cand_row, slot]
    # Among members at exactly the candidate's distance, count those with a lower gallery index: members
    # keyed by (start of their run of equal distances, index) are increasing along each row.
    stride = num_gallery + 1
    member_key = torch.searchsorted(member_dist, member_dist) * stride + member_index
    padded_key = member_index.new_zeros(block)
    padded_key[cand_row, slot] = closer * stride + cand_index
    tie_aware = torch.searchsorted(member_key, padded_key)[cand_row, slot]
    is_tied = member_dist[cand_row, closer.clamp(max=width - 1)] == cand_dist
    return torch.where(is_tied, tie_aware, closer)


def evaluate_rank(
    distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, max_rank: int = 50
) -> dict[str, Any]:
    """CMC / mAP / mINP of a query x gallery distance matrix (numpy or torch; smaller = closer).

    Gallery items at equal distance rank in gallery-index order (as a stable argsort orders them).

    Returns {"cmc": float64 array of length max_rank, "mAP", "mINP": floats in [0, 1],
    "num_valid_queries", "num_invalid_queries": ints}. `max_rank` may exceed the gallery size: CMC keeps its
    definition there, so those entries are 1.0 (a valid query's first match lies within the gallery). With
    no valid query, cmc is zeros and mAP = mINP = 0.0, so results of query chunks merge by weighting with
    num_valid_queries (or feed the chunks to one `RankAccumulator`). Runs on the distance matrix's device.
    """
    dist = _as_tensor(distmat, "distmat")
    if dist.dim() != 2:
        raise ValueError(f"distmat must have shape (num_query, num_gallery), got {tuple(dist.shape)}")
    accumulator = RankAccumulator(g_pids, g_camids, max_rank, num_gallery=dist.shape[1], device=dist.device)
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
    float32), so MSMT17-sized evaluation never builds its 4 GB matrix. Runs on the query features' device.
    """
    query = prepare_features(query, distance)
    gallery = prepare_features(gallery, distance).to(query.device)
    if len(q_pids) != len(query):
        raise ValueError(f"q_pids must have one entry per query feature ({len(query)}), got {len(q_pids)}")
    rows = query_chunk or max(1, (1 << 24) // max(1, len(gallery)))
    accumulator = RankAccumulator(g_pids, g_camids, max_rank, num_gallery=len(gallery), device=query.device)
    for start in range(0, len(query), rows):
        block = pairwise_distance(query[start : start + rows], gallery, distance, prepared=True)
        accumulator.add(block, q_pids[start : start + rows], q_camids[start : start + rows])
    return accumulator.result()
