"""Candidate counts for coarse-to-fine search, fitted on validation codes against a search cost model.

The fit replays the search stage by stage through `CoarseToFineIndex`'s public stage accessors
(`stage_codes`, `level_codes`, `scan`, `rerank`) and the shared `pruning_plan`, so the survivors it counts
are the survivors the search keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from agw_light.protocol import DEFAULT_TARGET_RECALL
from agw_light.search.codes import as_words, code_bytes, gathered_hamming, hamming_distances
from agw_light.search.index import GATHER_BYTES, RANKING_ENTRIES, CoarseToFineIndex, HammingIndex, pruning_plan

# Search cost model, ns per query on 2 cores, timed with faiss 1.15 at 82,161 codes on an AVX-512 x86 CPU:
# a faiss scan costs max(0.27, 0.011 * code bytes) per gallery item plus, per item kept, 45 (codes of at
# most 128 bits) or 150 (longer codes); re-ranking costs 4 + 0.23 * code bytes per candidate (gather,
# popcount, selection). Only the ratios matter when choosing between schedules.
_SCAN_NS_PER_ITEM, _SCAN_NS_PER_ITEM_BYTE = 0.27, 0.011
_SCAN_NS_PER_KEPT_SHORT, _SCAN_NS_PER_KEPT_LONG, _SHORT_CODE_BYTES = 45.0, 150.0, 16
_RERANK_NS_PER_ITEM, _RERANK_NS_PER_ITEM_BYTE = 4.0, 0.23


def fit_candidates(
    index: CoarseToFineIndex,
    validation_queries: Any,
    *,
    validation_gallery: Any = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    k: int = 1,
) -> tuple[int, ...]:
    """Candidate counts per stage for `index`, fitted on validation codes without any label.

    The validation split comes from training identities, never from test queries or labels: its query
    codes are searched against the index's gallery codes joined, for the fit only, by the codes of its
    gallery images (`validation_gallery`, optional), so that validation queries have true matches among
    realistic impostors, as test queries do. The target is each query's exact full-length top-k over that
    joint gallery (a `HammingIndex` result; k is clamped to its size as `search` clamps it). Only codes
    enter, so no label can change the outcome. Without a validation gallery the targets are other people's
    images, which short codes separate less well: the counts come out larger (safe but slower). With one,
    the joint gallery is larger than the index's, which again errs on the large side.

    The fit aims one standard error above target_recall (sqrt(r (1 - r) / targets)), as recall on new
    queries scatters around the validation recall. For each choice of first pruning stage f (earlier
    stages keep everything, so the gallery scan runs at level f), the allowed miss rate 1 - aim is split
    evenly over stages f, f+1, ...: each keeps the fewest items such that the targets lost so far stay
    within its cumulative share, rounded up to the grid 2^j, 3 * 2^(j-1). Of these schedules and the exact
    scan (no pruning), the one with the lowest estimated search cost (`_estimated_cost`) wins, so short
    levels too weak to prune cheaply are skipped. Its validation recall@k is at least the aim. Both code
    arguments take the layouts `CoarseToFineIndex.add` takes. Assign the result to `index.candidates`.
    """
    index, queries, targets, aim, gallery_size = _fit_problem(
        index, validation_queries, validation_gallery, target_recall, k
    )
    k = targets.shape[1]  # clamped to the joint gallery
    last = len(index.levels) - 1
    best = (index.ntotal,) * last  # no pruning: the exact full-length scan
    best_cost = _estimated_cost(index, best, k)
    for first in range(last):
        counts = _fit_from(index, queries, targets, first, aim, k, best_cost)
        if counts is not None and _estimated_cost(index, counts, k) < best_cost:
            best, best_cost = counts, _estimated_cost(index, counts, k)
    return tuple(min(count, gallery_size) for count in best)


def fit_shortlist(
    index: CoarseToFineIndex,
    validation_queries: Any,
    cost: Callable[[int, int], float],
    *,
    validation_gallery: Any = None,
    target_recall: float = 0.99,
    k: int = 1,
) -> tuple[int, int] | None:
    """Two-stage search for a backend that scans one short code and ranks its candidates by the full code.

    (level bits, candidate count) of the cheapest such search, or None when the exact full-length scan is
    cheaper. For each level shorter than the longest, the count is fitted as `fit_candidates` fits a stage
    (same validation codes and joint gallery, same one-standard-error aim above `target_recall`, same grid),
    for a pyramid of that level and the full one only, since the backend skips the levels between. `cost(bits,
    count)` estimates a search that scans the `bits`-bit codes and ranks `count` candidates, `cost(full bits,
    0)` the exact scan; the backend supplies it (`agw_light.search.milvus` from timings of Milvus).
    """
    index, queries, targets, aim, gallery_size = _fit_problem(
        index, validation_queries, validation_gallery, target_recall, k
    )
    k = targets.shape[1]  # clamped to the joint gallery
    last = len(index.levels) - 1
    best, best_cost = None, cost(index.levels[last], 0)
    for stage in range(last):
        pair = CoarseToFineIndex.from_stage_codes(
            (index.levels[stage], index.levels[last]), [index.level_codes(stage), index.level_codes(last)]
        )
        counts = _fit_from(pair, [queries[stage], queries[last]], targets, 0, aim, k, np.inf)
        count = min(counts[0], gallery_size)
        if count < gallery_size and cost(index.levels[stage], count) < best_cost:
            best, best_cost = (index.levels[stage], count), cost(index.levels[stage], count)
    return best


def _fit_problem(
    index: CoarseToFineIndex, validation_queries: Any, validation_gallery: Any, target_recall: float, k: int
) -> tuple[CoarseToFineIndex, list[np.ndarray], np.ndarray, float, int]:
    """What both fits search: (the index joined by the validation gallery, the validation queries per stage,
    their exact full-length top-k there (k clamped to its size), the recall to aim at, the index's own gallery size)."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    queries = index.stage_codes(validation_queries, "validation_queries")
    gallery_size = index.ntotal
    if validation_gallery is not None:
        extra = index.stage_codes(validation_gallery, "validation_gallery")
        joint = [np.concatenate([index.level_codes(stage), codes]) for stage, codes in enumerate(extra)]
        index = CoarseToFineIndex.from_stage_codes(index.code_lengths, joint)
    if len(queries[0]) == 0 or index.ntotal == 0:
        raise ValueError(
            f"fit_candidates needs validation queries and a non-empty index, got {len(queries[0])} queries "
            f"and {index.ntotal} gallery items"
        )
    k = index.clamp_k(k)
    last = len(index.levels) - 1
    exact = HammingIndex(index.levels[last])
    exact.add(index.level_codes(last))
    targets = exact.search(queries[last], k)[1]
    # One standard error of margin: recall on new queries scatters around the validation recall.
    aim = min(1.0, target_recall + np.sqrt(target_recall * (1.0 - target_recall) / targets.size))
    return index, queries, targets, aim, gallery_size


def _fit_from(
    index: CoarseToFineIndex,
    queries: list[np.ndarray],
    targets: np.ndarray,
    first: int,
    target_recall: float,
    k: int,
    cost_limit: float,
) -> tuple[int, ...] | None:
    """The schedule whose first pruning stage is `first` (see `fit_candidates`); None once its estimated
    cost reaches `cost_limit`, the cost of the best schedule so far."""
    ntotal, num_stages = index.ntotal, len(index.levels) - 1
    counts = [ntotal] * first
    # alive[q, j]: target j of query q is still a candidate; survivors: (Q, n) candidates (None: all).
    alive = np.ones(targets.shape, dtype=bool)
    survivors = None
    if _estimated_cost(index, [*counts, k], k, final=False) >= cost_limit:
        return None  # even the cheapest scan at this level costs more than the best schedule
    for stage in range(first, num_stages):
        share = (stage - first + 1) / (num_stages - first)
        allowed_misses = int(np.floor((1.0 - target_recall) * share * alive.size + 1e-9))
        ranks = _target_ranks(index, queries, stage, survivors, targets)
        width = ntotal if survivors is None else survivors.shape[1]
        needed = _smallest_count(ranks[alive], allowed_misses - int((~alive).sum()))
        keep = min(_round_up_to_grid(max(needed, k)), width)
        counts.append(keep)
        if _estimated_cost(index, counts, k, final=False) >= cost_limit:
            return None
        alive &= ranks < keep
        if keep < width:
            survivors = _keep_smallest(index, queries, stage, survivors, keep)
    return tuple(counts)


def _estimated_cost(index: CoarseToFineIndex, counts: Sequence[int], k: int, *, final: bool = True) -> float:
    """Estimated search time per query of a schedule: one gallery scan, then re-ranking gathers.

    `counts` may cover only the first stages; `final=False` leaves out the last, full-length ranking, so
    the estimate of a partial schedule is a lower bound for every schedule that extends it.
    """
    plan, last = pruning_plan(index.ntotal, counts, k), len(index.levels) - 1
    if not plan and not final:
        return 0.0
    scan_stage, kept = plan[0] if plan else (last, k)
    scan_bytes = code_bytes(index.levels[scan_stage])
    per_kept = _SCAN_NS_PER_KEPT_SHORT if scan_bytes <= _SHORT_CODE_BYTES else _SCAN_NS_PER_KEPT_LONG
    cost = index.ntotal * max(_SCAN_NS_PER_ITEM, _SCAN_NS_PER_ITEM_BYTE * scan_bytes) + per_kept * kept
    rerank_stages = [stage for stage, _ in plan[1:]] + ([last] if plan and final else [])
    for stage, (_, given) in zip(rerank_stages, plan, strict=False):
        cost += given * (_RERANK_NS_PER_ITEM + _RERANK_NS_PER_ITEM_BYTE * code_bytes(index.levels[stage]))
    return cost


def _target_ranks(
    index: CoarseToFineIndex,
    queries: list[np.ndarray],
    stage: int,
    survivors: np.ndarray | None,
    targets: np.ndarray,
) -> np.ndarray:
    """(Q, k) rank of each target among the current candidates by (stage distance, gallery index).

    A target that is no longer a candidate gets a rank no count reaches (its miss is counted already).
    """
    ntotal, gallery = index.ntotal, index.level_codes(stage)
    codes = as_words(gallery)
    width = ntotal if survivors is None else survivors.shape[1]
    ranks = np.empty(targets.shape, dtype=np.int64)
    rows = max(1, RANKING_ENTRIES // width)
    for start in range(0, len(targets), rows):
        stop = start + rows
        query_words, goals = as_words(queries[stage][start:stop]), targets[start:stop]
        if survivors is None:
            keys = hamming_distances(queries[stage][start:stop], gallery).astype(np.int64)
            keys = keys * ntotal + np.arange(ntotal)
        else:
            keys = gathered_hamming(query_words, codes, survivors[start:stop]).astype(np.int64)
            keys = keys * ntotal + survivors[start:stop]
        goal_keys = gathered_hamming(query_words, codes, goals).astype(np.int64) * ntotal + goals
        for column in range(goals.shape[1]):
            goal = goal_keys[:, column : column + 1]
            # Keys are unique within a row: a target is a candidate iff its key occurs among them.
            present = (keys == goal).any(axis=1)
            ranks[start:stop, column] = np.where(present, (keys < goal).sum(axis=1), np.iinfo(np.int64).max)
    return ranks


def _smallest_count(ranks: np.ndarray, budget: int) -> int:
    """Fewest survivors that lose at most `budget` of the targets with these ranks."""
    ranks = np.sort(ranks)
    if budget >= len(ranks):
        return 1
    # Keeping n items saves exactly the targets ranked below n: keep all but the `budget` worst.
    return int(ranks[len(ranks) - max(budget, 0) - 1]) + 1


def _round_up_to_grid(count: int) -> int:
    """The smallest value of the form 2^j or 3 * 2^(j-1) that is at least `count`."""
    power = 1
    while power < count:
        if power >= 2 and power * 3 // 2 >= count:
            return power * 3 // 2
        power *= 2
    return power


def _keep_smallest(
    index: CoarseToFineIndex, queries: list[np.ndarray], stage: int, survivors: np.ndarray | None, keep: int
) -> np.ndarray:
    """The `keep` best candidates per query at `stage`, chosen exactly as the search chooses them."""
    if survivors is None:
        return index.scan(stage, queries[stage], keep)[1]
    rows = max(1, GATHER_BYTES // (survivors.shape[1] * code_bytes(index.levels[stage])))
    kept = []
    for start in range(0, len(survivors), rows):
        block = queries[stage][start : start + rows]
        kept.append(index.rerank(stage, block, survivors[start : start + rows], keep)[2])
    return np.concatenate(kept)
