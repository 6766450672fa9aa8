"""Gallery indexes: exact float (cosine) and Hamming search, and coarse-to-fine Hamming search.

All three index kinds return `(distances, indices)` of shape (num_queries, min(k, ntotal)), nearest first;
items at equal distance come in gallery-index order (the tie rule of `agw_light.metrics.evaluate_rank`), so
results are deterministic and comparable with a stable argsort. As in faiss, `ntotal` is the number of
items and `d` the width of one: features (`FloatIndex`), bits (`HammingIndex`) or the concatenated pyramid
code, sum(code_lengths) (`CoarseToFineIndex`). `clamp_k` says how a search treats k. `search_within` also
drops the hits beyond a distance threshold (the same-person threshold of an evaluation's verification figures).

Coarse-to-fine search (`CoarseToFineIndex`) runs over a code pyramid, levels sorted from the shortest code
to the longest. `candidates[s]` is how many items stay after stage s: the first stage scans the whole
gallery with its level's code (a faiss binary scan), each later stage re-ranks the survivors with a longer
code, and the longest code ranks the last survivors. A stage that would keep every item it is given is
skipped, so the whole scan moves to the first stage that prunes. Re-ranking gathers each query's candidate
codes for the whole query batch at once (`np.take`, XOR, popcount); large batches are re-ranked in slices
on as many threads as faiss uses. `agw_light.search.fit` chooses the candidate counts.

Every index saves itself into a folder and loads back (`save`, `load`, `load_index`), with an optional JSON
`record` of what built it; the format is `agw_light.search.storage`.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agw_light.checks import is_number, positive_int
from agw_light.search import storage
from agw_light.search.codes import (
    as_numpy,
    as_packed,
    as_words,
    check_packed,
    code_bytes,
    gathered_hamming,
    hamming_distances,
    split_levels,
)
from agw_light.search.metadata import GalleryMetadata

# Code bytes gathered per re-ranking step of a query block: bounds search memory near 32 MB.
GATHER_BYTES = 1 << 25
# Distance entries per block of `ranking_distances` (64 MB of float32), as in evaluate_retrieval.
RANKING_ENTRIES = 1 << 24
# Fewest queries worth handing to a re-ranking thread.
_MIN_ROWS_PER_THREAD = 32


class GalleryIndex(abc.ABC):
    """What every gallery index answers, in process or in a database: `search`, `search_within`, `items`.

    `kind` says how items are compared ("float", "hamming", "coarse_to_fine") and `backend` where they live;
    `metadata` is the in-process indexes' per-position list (None where items are addressed by id, as in
    `agw_light.search.milvus.MilvusIndex`), while `items` answers for both.
    """

    kind: ClassVar[str]
    backend: ClassVar[str] = "in_process"
    d: int  # width of one item: features, bits, or the concatenated code pyramid

    def __init__(self) -> None:
        self.metadata: GalleryMetadata | None = None
        self.record: dict[str, Any] | None = None  # what built the index, saved in its manifest

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Number of gallery items."""

    def __len__(self) -> int:
        return self.ntotal

    def clamp_k(self, k: int) -> int:
        """Columns that `search(queries, k)` returns: min(k, ntotal).

        k must be a positive int (a bool is not; anything else raises ValueError). More than ntotal is not
        an error, so an empty index returns (num_queries, 0) arrays.
        """
        return min(positive_int(k, "k"), self.ntotal)

    @abc.abstractmethod
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, gallery indices), each (num_queries, clamp_k(k)), nearest first."""

    def search_within(self, queries: Any, k: int, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
        """`search(queries, k)` keeping only the hits at distance <= max_distance (a same-person threshold).

        Returns float32 distances and int64 indices of shape (num_queries, clamp_k(k)), as faiss pads the
        results it has no item for: each row's kept hits come first, nearest first, and the rest of the row is
        padding, distance inf and index -1. `max_distance` uses the index's own distance (1 - cosine for
        `FloatIndex`, bits for the Hamming ones) and the rule of `agw_light.metrics.verification`, so a threshold
        it reports applies as is.
        """
        return within_distance(*self.search(queries, k), max_distance)

    def close(self) -> None:  # noqa: B027 - a no-op by design: an in-process index holds nothing outside
        """Releases what the index holds outside the process (a database connection); nothing in process."""

    def items(self, indices: Any) -> GalleryMetadata:
        """Path, person id and camera of the gallery items `indices` (what `search` returned, padding -1
        left out), in the order given; an index without metadata, or an index out of range, is a LookupError."""
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.metadata is None:
            raise LookupError("the index holds no gallery metadata (built without paths, pids and cameras)")
        unknown = positions[(positions < 0) | (positions >= len(self.metadata))]
        if len(unknown):
            raise LookupError(f"no gallery items {unknown[:5].tolist()}: the gallery holds 0 to {self.ntotal - 1}")
        return self.metadata.take(positions.tolist())


def within_distance(distances: np.ndarray, indices: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Search results with the hits beyond `max_distance` turned into padding (inf, -1); see `search_within`."""
    if not is_number(max_distance):
        raise ValueError(f"max_distance must be a number, got {max_distance!r}")
    if np.isnan(max_distance):
        raise ValueError("max_distance must be a number, got nan")
    beyond = distances > max_distance  # rows are sorted, so the padding is each row's tail
    return np.where(beyond, np.inf, distances).astype(np.float32), np.where(beyond, -1, indices)


class SearchIndex(GalleryIndex):
    """An in-process index: metadata bookkeeping, saving and loading (see `agw_light.search.storage`)."""

    def _attach_metadata(self, metadata: Any, added: int, previous: int) -> None:
        metadata = GalleryMetadata.coerce(metadata, added)
        if previous and (metadata is None) != (self.metadata is None):
            state = "has" if self.metadata is not None else "has no"
            raise ValueError(
                f"the index {state} metadata for its {previous} items: add() must then "
                f"{'pass' if self.metadata is not None else 'omit'} metadata too"
            )
        if metadata is not None:
            self.metadata = metadata if self.metadata is None else self.metadata + metadata

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """The JSON-able geometry that `restore` needs (dim, bits, levels, candidates), saved in the manifest."""

    @abc.abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to save, by name (metadata apart)."""

    @classmethod
    @abc.abstractmethod
    def restore(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> SearchIndex:
        """The index (without metadata) that a saved manifest and its loaded arrays describe."""

    def save(self, directory: str | Path, record: Mapping[str, Any] | None = None) -> Path:
        """Writes the index into `directory` (created if needed), replacing an index already there.

        `record`: JSON-able facts saved in the same manifest, so they cannot describe another build (`search
        build` records its checkpoint); None keeps the index's own `record`, as loaded or last saved.
        """
        return storage.save(self, directory, self.record if record is None else record)

    @classmethod
    def load(cls, directory: str | Path) -> SearchIndex:
        """The index of this kind saved in `directory`; a missing, corrupted or foreign file is an error."""
        return storage.load(directory, _KINDS, expected=cls)


def load_index(directory: str | Path) -> FloatIndex | HammingIndex | CoarseToFineIndex:
    """Whichever index kind `directory` holds."""
    return storage.load(directory, _KINDS)


class FloatIndex(SearchIndex):
    """Exact cosine search over float features (rows 1-2): faiss inner product on L2-normalised rows."""

    kind = "float"

    def __init__(self, d: int) -> None:
        """`d`: feature dimension."""
        faiss = import_faiss()

        super().__init__()
        self.d = positive_int(d, "d")
        self._index = faiss.IndexFlatIP(self.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        return self.ntotal * self.d * 4

    def add(self, features: Any, metadata: GalleryMetadata | Mapping | None = None) -> None:
        """Appends gallery features (N, d), with their metadata when the index keeps metadata."""
        features = self._normalised(features, "features")
        self._attach_metadata(metadata, len(features), self.ntotal)
        self._index.add(features)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(1 - cosine similarity as float32, gallery indices as int64), each (num_queries, clamp_k(k)).

        k must be a positive int; k > ntotal gives ntotal columns (see `clamp_k`).
        """
        queries = self._normalised(queries, "queries")
        k = self.clamp_k(k)
        if k == 0:
            return np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64)
        similarities, indices = self._index.search(queries, k)
        return np.subtract(1.0, similarities, dtype=np.float32), indices

    def _normalised(self, features: Any, name: str) -> np.ndarray:
        features = as_numpy(features).astype(np.float32)
        if features.ndim != 2 or features.shape[1] != self.d:
            raise ValueError(f"{name} must have shape (N, {self.d}), got {features.shape}")
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return np.ascontiguousarray(features / np.maximum(norms, 1e-12))

    def settings(self) -> dict[str, Any]:
        return {"dim": self.d}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"features": self._index.reconstruct_n(0, self.ntotal).reshape(self.ntotal, self.d)}

    @classmethod
    def restore(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> FloatIndex:
        index = cls(settings["dim"])
        features = arrays["features"]
        storage.check_array(features, "features", np.float32, (None, index.d))
        index._index.add(np.ascontiguousarray(features))  # stored normalised: re-normalising would round
        return index


class HammingIndex(SearchIndex):
    """Exact Hamming top-k over bit-packed codes, a faiss binary flat scan (popcount over 64-bit words)."""

    kind = "hamming"

    def __init__(self, d: int) -> None:
        """`d`: code length in bits."""
        super().__init__()
        self.d = positive_int(d, "d")
        self._index = _binary_flat(self.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        return self.ntotal * code_bytes(self.d)

    @property
    def codes(self) -> np.ndarray:
        """The packed gallery codes, (ntotal, ceil(d / 8)) uint8 (a copy)."""
        return self._index.reconstruct_n(0, self.ntotal).reshape(self.ntotal, code_bytes(self.d))

    def add(self, codes: Any, metadata: GalleryMetadata | Mapping | None = None) -> None:
        """Appends codes: (N, d) values (bit = value > 0) or (N, ceil(d / 8)) packed uint8."""
        packed = as_packed(codes, self.d, "codes")
        self._attach_metadata(metadata, len(packed), self.ntotal)
        self._index.add(packed)

    def search(self, query_codes: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Hamming distances as int32, gallery indices as int64), each (num_queries, clamp_k(k)).

        k must be a positive int; k > ntotal gives ntotal columns (see `clamp_k`).
        """
        packed = as_packed(query_codes, self.d, "query_codes")
        return _binary_search(self._index, packed, self.clamp_k(k))

    def settings(self) -> dict[str, Any]:
        return {"bits": self.d}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"codes": self.codes}

    @classmethod
    def restore(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> HammingIndex:
        index = cls(settings["bits"])
        storage.check_array(arrays["codes"], "codes", np.uint8, (None, code_bytes(index.d)))
        index._index.add(arrays["codes"])
        return index


class CoarseToFineIndex(SearchIndex):
    """Coarse-to-fine Hamming search over a code pyramid (see the module docstring).

    `code_lengths` lists the levels in the order the codes arrive (the model's `head.code_lengths`, longest
    first); `levels` sorts them, and stage s uses level `levels[s]`, from the shortest to the longest.
    `candidates` has one count per stage but the last (len(code_lengths) - 1 numbers, non-increasing): how
    many items survive each stage; fit them with `fit_candidates` on validation codes. `d` is the width of
    the concatenated codes `add` and `search` take, sum(code_lengths).

    `stage_codes`, `level_codes`, `scan` and `rerank` expose the stages one at a time, so that the fit can
    replay exactly what a search does.
    """

    kind = "coarse_to_fine"

    def __init__(self, code_lengths: Sequence[int], candidates: Sequence[int] | None = None) -> None:
        super().__init__()
        self.code_lengths = tuple(positive_int(length, "code_lengths entry") for length in code_lengths)
        if not self.code_lengths or len(set(self.code_lengths)) != len(self.code_lengths):
            raise ValueError(f"code_lengths must be distinct positive ints, got {list(code_lengths)}")
        self.levels = tuple(sorted(self.code_lengths))
        self.d = sum(self.code_lengths)
        self._packed = [np.zeros((0, code_bytes(bits)), dtype=np.uint8) for bits in self.levels]
        self._scans: dict[int, Any] = {}  # stage -> faiss scan index, built when a search first needs it
        self._candidates: tuple[int, ...] | None = None
        if candidates is not None:
            self.candidates = candidates

    @classmethod
    def from_stage_codes(cls, code_lengths: Sequence[int], stage_codes: Sequence[np.ndarray]) -> CoarseToFineIndex:
        """An index (no metadata, no candidates) over packed codes already split per stage, shortest level
        first as `stage_codes` returns them; the arrays are used as they are, not copied or re-packed."""
        index = cls(code_lengths)
        if len(stage_codes) != len(index.levels):
            raise ValueError(f"stage_codes needs one array per level {list(index.levels)}, got {len(stage_codes)}")
        pairs = zip(index.levels, stage_codes, strict=True)
        index._set_codes([check_packed(codes, bits, f"{bits}-bit stage codes") for bits, codes in pairs])
        return index

    @property
    def candidates(self) -> tuple[int, ...] | None:
        return self._candidates

    @candidates.setter
    def candidates(self, value: Sequence[int]) -> None:
        counts = tuple(positive_int(count, "candidates entry") for count in value)
        if len(counts) != len(self.levels) - 1:
            raise ValueError(
                f"candidates needs {len(self.levels) - 1} counts (one per stage before the "
                f"{self.levels[-1]}-bit one, for levels {list(self.levels)}), got {list(value)}"
            )
        if any(later > earlier for earlier, later in itertools.pairwise(counts)):
            raise ValueError(f"candidates must not increase from stage to stage, got {list(counts)}")
        self._candidates = counts

    @property
    def ntotal(self) -> int:
        return len(self._packed[0])

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes held, faiss scan copies included."""
        scans = sum(code_bytes(self.levels[stage]) * self.ntotal for stage in self._scans)
        return sum(packed.nbytes for packed in self._packed) + scans

    def level_codes(self, stage: int) -> np.ndarray:
        """The packed gallery codes of stage `stage` (level `levels[stage]`): a read-only view, not a copy."""
        view = self._packed[stage].view()
        view.flags.writeable = False
        return view

    def add(self, codes: Any, metadata: GalleryMetadata | Mapping | None = None) -> None:
        """Appends pyramid codes (see `stage_codes` for the accepted layouts)."""
        per_stage = self.stage_codes(codes, "codes")
        self._attach_metadata(metadata, len(per_stage[0]), self.ntotal)
        self._packed = [np.concatenate([old, new]) for old, new in zip(self._packed, per_stage, strict=True)]
        for stage, scan in self._scans.items():
            scan.add(per_stage[stage])

    def search(self, query_codes: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(full-length Hamming distances as int32, gallery indices as int64), each (Q, clamp_k(k)).

        k must be a positive int; k > ntotal gives ntotal columns (see `clamp_k`). Every stage keeps at least
        k items whatever the candidate counts, so k results come back; candidates must be set unless the
        index is empty.
        """
        k = self.clamp_k(k)
        queries = self.stage_codes(query_codes, "query_codes")
        num_queries = len(queries[0])
        distances = np.empty((num_queries, k), dtype=np.int32)
        indices = np.empty((num_queries, k), dtype=np.int64)
        if k == 0:
            return distances, indices
        plan = self._plan(k)
        rows = self._query_block(plan)
        # Re-ranking is numpy work on one core per call: split large query blocks over the cores faiss uses.
        threads = min(_threads(), num_queries // _MIN_ROWS_PER_THREAD)
        with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
            for start in range(0, num_queries, rows):
                block = [codes[start : start + rows] for codes in queries]
                found = self._search_block(block, plan, k, pool, threads)
                distances[start : start + rows], indices[start : start + rows] = found
        return distances, indices

    def _search_block(
        self, block: list[np.ndarray], plan: list[tuple[int, int]], k: int, pool: Any, threads: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of one query block: the scan over the whole gallery, then the re-ranking stages."""
        last = len(self.levels) - 1
        if not plan:
            return self.scan(last, block[last], k)
        first, kept = plan[0]
        survivors = self.scan(first, block[first], kept)[1]

        def rerank_rows(rows: slice) -> tuple[np.ndarray, np.ndarray]:
            alive = survivors[rows]
            for stage, keep in plan[1:]:
                alive = self.rerank(stage, block[stage][rows], alive, keep)[2]
            return self.rerank(last, block[last][rows], alive, k, sort=True)[1:]

        if pool is None:
            return rerank_rows(slice(None))
        bounds = np.linspace(0, len(survivors), threads + 1).astype(int)
        parts = list(pool.map(rerank_rows, [slice(a, b) for a, b in itertools.pairwise(bounds)]))
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])

    def ranking_distances(
        self, query_codes: Any, *, query_chunk: int | None = None
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yields (query rows, float32 (rows, ntotal) distances) encoding the coarse-to-fine ranking.

        For evaluation with `agw_light.metrics.RankAccumulator`: sorting a row by these distances (ties by
        gallery index) gives the search's ranking of the whole gallery, so its first k items are what
        `search(..., k)` returns for any k up to the smallest candidate count. The last survivors get
        their full-length Hamming distance; an item dropped at a stage gets its distance at that stage plus
        an offset that puts it after every item that survived longer. Only one block of `query_chunk` rows
        exists at a time (default: 16M entries, 64 MB).
        """
        queries = self.stage_codes(query_codes, "query_codes")
        plan = self._plan(1)
        last = len(self.levels) - 1
        # Stage s owns the band [offsets[s], offsets[s] + bits_s]: later stages own lower bands.
        offsets = np.zeros(len(self.levels), dtype=np.float32)
        for stage in range(last - 1, -1, -1):
            offsets[stage] = offsets[stage + 1] + self.levels[stage + 1] + 1
        rows = query_chunk or max(1, RANKING_ENTRIES // max(1, self.ntotal))
        for start in range(0, len(queries[0]), rows):
            block = [codes[start : start + rows] for codes in queries]
            first = plan[0][0] if plan else last
            out = hamming_distances(block[first], self._packed[first]).astype(np.float32)
            out += offsets[first]
            if plan:
                row_ids = np.arange(len(out))[:, None]
                survivors = self.scan(first, block[first], plan[0][1])[1]
                for stage, keep in plan[1:]:
                    scored, _, kept = self.rerank(stage, block[stage], survivors, keep)
                    out[row_ids, survivors] = scored + offsets[stage]
                    survivors = kept
                out[row_ids, survivors] = gathered_hamming(
                    as_words(block[last]), as_words(self._packed[last]), survivors
                )
            yield slice(start, start + len(out)), out

    def _plan(self, k: int) -> list[tuple[int, int]]:
        if self._candidates is None:
            raise ValueError("candidates are not set: pass candidates= or assign fit_candidates(...) to them")
        return pruning_plan(self.ntotal, self._candidates, k)

    def _query_block(self, plan: list[tuple[int, int]]) -> int:
        """Queries per block such that one re-ranking gather stays within GATHER_BYTES."""
        rerank_stages = [stage for stage, _ in plan[1:]] + [len(self.levels) - 1] if plan else []
        given = [keep for _, keep in plan]
        work = [n * code_bytes(self.levels[stage]) for stage, n in zip(rerank_stages, given, strict=True)]
        return max(1, GATHER_BYTES // max([1, *work]))

    def scan(self, stage: int, codes: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of the `keep` nearest gallery items at `stage`, by (distance, index).

        `codes`: the queries' packed codes of that stage (`stage_codes(...)[stage]`). The faiss scan index
        of a stage is built on first use and kept.
        """
        scan = self._scans.get(stage)
        if scan is None:
            scan = self._scans[stage] = _binary_flat(self.levels[stage])
            scan.add(self._packed[stage])
        return _binary_search(scan, codes, keep)

    def rerank(
        self, stage: int, codes: np.ndarray, survivors: np.ndarray, keep: int, *, sort: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores `survivors` (Q, n gallery indices) at `stage` and keeps the `keep` nearest of each row.

        `codes`: the queries' packed codes of that stage. Returns (the (Q, n) distances, the kept distances,
        the kept indices); kept items are sorted by (distance, index) when `sort`, else in no particular order.
        """
        ntotal = self.ntotal
        scored = gathered_hamming(as_words(codes), as_words(self._packed[stage]), survivors)
        # Tie-free keys distance * ntotal + index: selecting and sorting keys keeps the tie rule.
        keys = scored.astype(np.int64) * ntotal + survivors
        if keep < keys.shape[1]:
            keys = np.take_along_axis(keys, np.argpartition(keys, keep - 1, axis=1)[:, :keep], axis=1)
        if sort:
            keys.sort(axis=1)
        return scored, (keys // ntotal).astype(np.int32), keys % ntotal

    def stage_codes(self, codes: Any, name: str = "codes") -> list[np.ndarray]:
        """Packed codes per stage (shortest level first) from either layout the callers have.

        `codes` is the model's concatenated output, (N, d) laid out in `code_lengths` order, or a sequence
        with one array per level in `code_lengths` order, each (N, bits) values or (N, ceil(bits / 8)) packed
        uint8. `name` names the argument in errors.
        """
        if isinstance(codes, Sequence) and not isinstance(codes, np.ndarray):
            if len(codes) != len(self.code_lengths):
                raise ValueError(
                    f"{name} must hold one array per level {list(self.code_lengths)}, got {len(codes)} arrays"
                )
            parts = list(codes)
        else:
            array = as_numpy(codes)
            if array.ndim != 2 or array.shape[1] != self.d:
                raise ValueError(
                    f"{name} must be (N, {self.d}) concatenated codes of levels "
                    f"{list(self.code_lengths)} or a list of per-level arrays, got shape {array.shape}"
                )
            parts = split_levels(array, self.code_lengths)
        by_length = {
            bits: as_packed(part, bits, f"{name} level {bits}")
            for bits, part in zip(self.code_lengths, parts, strict=True)
        }
        if len({len(part) for part in by_length.values()}) != 1:
            raise ValueError(f"{name} levels hold different numbers of rows: {[len(p) for p in by_length.values()]}")
        return [by_length[bits] for bits in self.levels]

    def _set_codes(self, per_stage: list[np.ndarray]) -> None:
        """Replaces the codes of an index that has no scan index yet, once every level holds as many."""
        if len({len(packed) for packed in per_stage}) != 1:
            raise ValueError(f"levels hold different numbers of codes: {[len(p) for p in per_stage]}")
        self._packed = per_stage

    def settings(self) -> dict[str, Any]:
        return {
            "code_lengths": list(self.code_lengths),
            "levels": list(self.levels),
            "candidates": None if self._candidates is None else list(self._candidates),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"codes_{bits}": packed for bits, packed in zip(self.levels, self._packed, strict=True)}

    @classmethod
    def restore(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> CoarseToFineIndex:
        index = cls(settings["code_lengths"], settings["candidates"])
        for bits in index.levels:
            storage.check_array(arrays[f"codes_{bits}"], f"codes_{bits}", np.uint8, (None, code_bytes(bits)))
        index._set_codes([arrays[f"codes_{bits}"] for bits in index.levels])
        return index


def pruning_plan(ntotal: int, candidates: Sequence[int], k: int) -> list[tuple[int, int]]:
    """(stage, items kept) for each stage that prunes; the first of them scans the whole gallery.

    Every stage keeps at least k items, and a stage that would keep all it is given does not run.
    """
    plan, alive = [], ntotal
    for stage, candidate_count in enumerate(candidates):
        keep = min(max(candidate_count, k), alive)
        if keep < alive:
            plan.append((stage, keep))
            alive = keep
    return plan


def import_faiss() -> Any:
    """faiss, imported with its loader's logger at WARNING: it reports each CPU-specific build it tries at
    INFO, ending in a ModuleNotFoundError line that reads as an error though the fallback build loads."""
    logging.getLogger("faiss").setLevel(max(logging.getLogger("faiss").getEffectiveLevel(), logging.WARNING))
    import faiss

    return faiss


def _binary_flat(bits: int) -> Any:
    faiss = import_faiss()

    return faiss.IndexBinaryFlat(8 * code_bytes(bits))


def _binary_search(index: Any, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss binary flat search with the faster of its two top-k methods.

    faiss keeps the top k in a heap or counts items per distance; timed at 82,161 codes on 2 cores (faiss
    1.15), counting wins for codes of at most 64 bits and, for longer codes, once k reaches bits / 2.
    Both order ties by gallery index.
    """
    if k == 0:
        return np.zeros((len(codes), 0), dtype=np.int32), np.zeros((len(codes), 0), dtype=np.int64)
    index.use_heap = index.d > 64 and k < index.d // 2
    return index.search(codes, k)


def _threads() -> int:
    faiss = import_faiss()

    return max(1, faiss.omp_get_max_threads())


_KINDS: dict[str, type[SearchIndex]] = {
    index_class.kind: index_class for index_class in (FloatIndex, HammingIndex, CoarseToFineIndex)
}
