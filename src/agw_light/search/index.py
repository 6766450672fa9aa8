"""Gallery indexes: exact float (cosine) and Hamming search, coarse-to-fine Hamming search, persistence.

All three index kinds return `(distances, indices)` of shape (num_queries, k), nearest first; items at equal
distance come in gallery-index order (the tie rule of `agw_light.metrics.evaluate_rank`), so results are
deterministic and comparable with a stable argsort.

Coarse-to-fine search (`CoarseToFineIndex`) runs over a code pyramid, levels sorted from the shortest code
to the longest. `candidates[s]` is how many items stay after stage s: the first stage scans the whole
gallery with its level's code (a faiss binary scan), each later stage re-ranks the survivors with a longer
code, and the longest code ranks the last survivors. A stage that would keep every item it is given is
skipped, so the whole scan moves to the first stage that prunes. Re-ranking gathers each query's candidate
codes for the whole query batch at once (`np.take`, XOR, popcount); large batches are re-ranked in slices
on as many threads as faiss uses.

Persistence: a folder with `manifest.json` (format, format_version, kind, geometry, count, candidates, and
the size and SHA-256 of every array file) and a data folder of `.npy` arrays. `save` writes the arrays into
a temporary folder, renames it into place, then atomically replaces `manifest.json`, which names the data
folder: an existing index is replaced only once the new one is complete, and a failed save leaves it
loadable. Only one process should save into a folder at a time.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agw_light.search.codes import (
    as_numpy,
    as_words,
    code_bytes,
    gathered_hamming,
    hamming_distances,
    pack_codes,
    split_levels,
)

FORMAT = "agw_light.search.index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Code bytes gathered per re-ranking step of a query block: bounds search memory near 32 MB.
_GATHER_BYTES = 1 << 25
# Fewest queries worth handing to a re-ranking thread.
_MIN_ROWS_PER_THREAD = 32
# Distance entries per block of `ranking_distances` (64 MB of float32), as in evaluate_retrieval.
_RANKING_ENTRIES = 1 << 24


@dataclass(frozen=True)
class GalleryMetadata:
    """What a search result points at: image path, person id and camera id of each gallery item."""

    paths: list[str]
    pids: list[int]
    camids: list[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", [str(path) for path in self.paths])
        object.__setattr__(self, "pids", [int(pid) for pid in self.pids])
        object.__setattr__(self, "camids", [int(camid) for camid in self.camids])
        if not len(self.paths) == len(self.pids) == len(self.camids):
            raise ValueError(
                "metadata paths, pids and camids must have one entry per item, got "
                f"{len(self.paths)}, {len(self.pids)} and {len(self.camids)}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __add__(self, other: GalleryMetadata) -> GalleryMetadata:
        return GalleryMetadata(self.paths + other.paths, self.pids + other.pids, self.camids + other.camids)

    @classmethod
    def coerce(
        cls, value: GalleryMetadata | Mapping[str, Sequence] | None, count: int
    ) -> GalleryMetadata | None:
        """`value` (GalleryMetadata or a mapping of paths, pids, camids), checked to hold `count` items."""
        if value is None:
            return None
        if isinstance(value, Mapping):
            missing = {"paths", "pids", "camids"} - set(value)
            if missing:
                raise ValueError(
                    f"metadata mapping lacks keys {sorted(missing)} (expected paths, pids, camids)"
                )
            value = cls(list(value["paths"]), list(value["pids"]), list(value["camids"]))
        if not isinstance(value, GalleryMetadata):
            raise TypeError(
                f"metadata must be a GalleryMetadata, a mapping or None, got {type(value).__name__}"
            )
        if len(value) != count:
            raise ValueError(f"metadata describes {len(value)} items but {count} codes were given")
        return value


class _Index(abc.ABC):
    """Metadata bookkeeping and the versioned, checksummed, atomically written folder format."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.metadata: GalleryMetadata | None = None

    @property
    @abc.abstractmethod
    def count(self) -> int:
        """Number of gallery items."""

    def __len__(self) -> int:
        return self.count

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
    def _settings(self) -> dict[str, Any]:
        """The JSON-able geometry that `_restore` needs (dims, bits, levels, candidates)."""

    @abc.abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]:
        """The arrays to save, by name."""

    @classmethod
    @abc.abstractmethod
    def _restore(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> _Index:
        """The index described by a manifest and its loaded arrays."""

    def save(self, directory: str | Path) -> Path:
        """Writes the index into `directory` (created if needed), replacing an index already there."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(
                f"{directory}: exists and is not a directory; cannot save an index there"
            )
        if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
            raise FileExistsError(
                f"{directory}: not empty and holds no {MANIFEST}; refusing to write an index over other files"
            )
        directory.mkdir(parents=True, exist_ok=True)
        arrays = self._arrays()
        if self.metadata is not None:
            arrays.update(_metadata_arrays(self.metadata))
        token = uuid.uuid4().hex[:12]
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
        try:
            files = {name: _write_array(staging / f"{name}.npy", array) for name, array in arrays.items()}
            _fsync_path(staging)
            data_dir = f"data-{token}"
            os.rename(staging, directory / data_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "count": self.count,
            "has_metadata": self.metadata is not None,
            **self._settings(),
            "data_dir": data_dir,
            "files": files,
        }
        manifest_tmp = directory / f".{MANIFEST}.{token}.tmp"
        try:
            with open(manifest_tmp, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(manifest_tmp, directory / MANIFEST)
        except BaseException:
            manifest_tmp.unlink(missing_ok=True)
            shutil.rmtree(directory / data_dir, ignore_errors=True)
            raise
        _fsync_path(directory)
        for stale in directory.iterdir():  # older data folders and leftovers of interrupted saves
            if stale.name == data_dir or not stale.name.startswith(("data-", ".tmp-", f".{MANIFEST}.")):
                continue
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> _Index:
        """The index saved in `directory`; a missing, truncated, corrupted or foreign file is an error."""
        manifest_path, manifest = _read_manifest(directory)
        if manifest["kind"] != cls.kind:
            raise ValueError(
                f"{manifest_path}: holds a {manifest['kind']!r} index, expected {cls.kind!r} "
                f"(load it with {_KINDS[manifest['kind']].__name__}.load or agw_light.search.load_index)"
                if manifest["kind"] in _KINDS
                else f"{manifest_path}: unknown index kind {manifest['kind']!r}, expected {cls.kind!r}"
            )
        return _load_checked(cls, manifest_path, manifest)


def load_index(directory: str | Path) -> FloatIndex | HammingIndex | CoarseToFineIndex:
    """Whichever index kind `directory` holds."""
    manifest_path, manifest = _read_manifest(directory)
    if manifest["kind"] not in _KINDS:
        raise ValueError(
            f"{manifest_path}: unknown index kind {manifest['kind']!r}, expected one of {sorted(_KINDS)}"
        )
    return _load_checked(_KINDS[manifest["kind"]], manifest_path, manifest)


class FloatIndex(_Index):
    """Exact cosine search over float features (rows 1-2): faiss inner product on L2-normalised rows."""

    kind = "float"

    def __init__(self, dim: int) -> None:
        import faiss

        super().__init__()
        self.dim = _positive_int(dim, "dim")
        self._index = faiss.IndexFlatIP(self.dim)

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        return self.count * self.dim * 4

    def add(self, features: Any, metadata: GalleryMetadata | Mapping | None = None) -> None:
        """Appends gallery features (N, dim), with their metadata when the index keeps metadata."""
        features = self._normalised(features, "features")
        self._attach_metadata(metadata, len(features), self.count)
        self._index.add(features)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(1 - cosine similarity as float32, gallery indices as int64), each (num_queries, min(k, count))."""
        queries = self._normalised(queries, "queries")
        k = min(_positive_int(k, "k"), self.count)
        if k == 0:
            return np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64)
        similarities, indices = self._index.search(queries, k)
        return np.subtract(1.0, similarities, dtype=np.float32), indices

    def _normalised(self, features: Any, name: str) -> np.ndarray:
        features = as_numpy(features).astype(np.float32)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (N, {self.dim}), got {features.shape}")
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return np.ascontiguousarray(features / np.maximum(norms, 1e-12))

    def _settings(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"features": self._index.reconstruct_n(0, self.count).reshape(self.count, self.dim)}

    @classmethod
    def _restore(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> FloatIndex:
        index = cls(settings["dim"])
        features = arrays["features"]
        _check_array(features, "features", np.float32, (None, index.dim))
        index._index.add(np.ascontiguousarray(features))  # stored normalised: re-normalising would round
        return index


class HammingIndex(_Index):
    """Exact Hamming top-k over bit-packed codes, a faiss binary flat scan (popcount over 64-bit words)."""

    kind = "hamming"

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = _positive_int(bits, "bits")
        self._index = _binary_flat(self.bits)

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        return self.count * code_bytes(self.bits)

    @property
    def codes(self) -> np.ndarray:
        """The packed gallery codes, (count, ceil(bits / 8)) uint8 (a copy)."""
        return self._index.reconstruct_n(0, self.count).reshape(self.count, code_bytes(self.bits))

    def add(self, codes: Any, metadata: GalleryMetadata | Mapping | None = None) -> None:
        """Appends codes: (N, bits) values (bit = value > 0) or (N, ceil(bits / 8)) packed uint8."""
        packed = as_packed(codes, self.bits, "codes")
        self._attach_metadata(metadata, len(packed), self.count)
        self._index.add(packed)

    def search(self, query_codes: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Hamming distances as int32, gallery indices as int64), each (num_queries, min(k, count))."""
        packed = as_packed(query_codes, self.bits, "query_codes")
        k = min(_positive_int(k, "k"), self.count)
        return _binary_search(self._index, packed, k)

    def _settings(self) -> dict[str, Any]:
        return {"bits": self.bits}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"codes": self.codes}

    @classmethod
    def _restore(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> HammingIndex:
        index = cls(settings["bits"])
        _check_array(arrays["codes"], "codes", np.uint8, (None, code_bytes(index.bits)))
        index._index.add(arrays["codes"])
        return index


class CoarseToFineIndex(_Index):
    """Coarse-to-fine Hamming search over a code pyramid (see the module docstring).

    `code_lengths` lists the levels in the order the codes arrive (the model's `head.code_lengths`, longest
    first); stages always run from the shortest to the longest. `candidates` has one count per stage but the
    last (len(code_lengths) - 1 numbers, non-increasing): how many items survive each stage; fit them with
    `fit_candidates` on validation codes.
    """

    kind = "coarse_to_fine"

    def __init__(self, code_lengths: Sequence[int], candidates: Sequence[int] | None = None) -> None:
        super().__init__()
        self.code_lengths = tuple(_positive_int(length, "code_lengths entry") for length in code_lengths)
        if not self.code_lengths or len(set(self.code_lengths)) != len(self.code_lengths):
            raise ValueError(f"code_lengths must be distinct positive ints, got {list(code_lengths)}")
        self.levels = tuple(sorted(self.code_lengths))
        self._packed = [np.zeros((0, code_bytes(bits)), dtype=np.uint8) for bits in self.levels]
        self._scans: dict[int, Any] = {}  # stage -> faiss scan index, built when a search first needs it
        self._candidates: tuple[int, ...] | None = None
        if candidates is not None:
            self.candidates = candidates

    @property
    def candidates(self) -> tuple[int, ...] | None:
        return self._candidates

    @candidates.setter
    def candidates(self, value: Sequence[int]) -> None:
        counts = tuple(_positive_int(count, "candidates entry") for count in value)
        if len(counts) != len(self.levels) - 1:
            raise ValueError(
                f"candidates needs {len(self.levels) - 1} counts (one per stage before the "
                f"{self.levels[-1]}-bit one, for levels {list(self.levels)}), got {list(value)}"
            )
        if any(later > earlier for earlier, later in itertools.pairwise(counts)):
            raise ValueError(f"candidates must not increase from stage to stage, got {list(counts)}")
        self._candidates = counts

    @property
    def count(self) -> int:
        return len(self._packed[0])

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes held, faiss scan copies included."""
        scans = sum(code_bytes(self.levels[stage]) * self.count for stage in self._scans)
        return sum(packed.nbytes for packed in self._packed) + scans

    def add(self, codes: Any, metadata: GalleryMetadata | Mapping | None = None) -> None:
        """Appends pyramid codes (see `_stage_codes` for the accepted layouts)."""
        per_stage = self._stage_codes(codes, "codes")
        self._attach_metadata(metadata, len(per_stage[0]), self.count)
        self._packed = [np.concatenate([old, new]) for old, new in zip(self._packed, per_stage, strict=True)]
        for stage, scan in self._scans.items():
            scan.add(per_stage[stage])

    def search(self, query_codes: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(full-length Hamming distances as int32, gallery indices as int64), each (Q, min(k, count)).

        Every stage keeps at least k items, so k results come back whatever the candidate counts.
        """
        k = min(_positive_int(k, "k"), self.count)
        queries = self._stage_codes(query_codes, "query_codes")
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
            return self._scan(last, block[last], k)
        first, kept = plan[0]
        survivors = self._scan(first, block[first], kept)[1]

        def rerank_rows(rows: slice) -> tuple[np.ndarray, np.ndarray]:
            alive = survivors[rows]
            for stage, keep in plan[1:]:
                alive = self._rerank(stage, block[stage][rows], alive, keep)[2]
            return self._rerank(last, block[last][rows], alive, k, sort=True)[1:]

        if pool is None:
            return rerank_rows(slice(None))
        bounds = np.linspace(0, len(survivors), threads + 1).astype(int)
        parts = list(pool.map(rerank_rows, [slice(a, b) for a, b in itertools.pairwise(bounds)]))
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])

    def ranking_distances(
        self, query_codes: Any, *, query_chunk: int | None = None
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yields (query rows, float32 (rows, count) distances) encoding the coarse-to-fine ranking.

        For evaluation with `agw_light.metrics.RankAccumulator`: sorting a row by these distances (ties by
        gallery index) gives the search's ranking of the whole gallery, so its first k items are what
        `search(..., k)` returns for any k up to the smallest candidate count. The last survivors get
        their full-length Hamming distance; an item dropped at a stage gets its distance at that stage plus
        an offset that puts it after every item that survived longer. Only one block of `query_chunk` rows
        exists at a time (default: 16M entries, 64 MB).
        """
        queries = self._stage_codes(query_codes, "query_codes")
        plan = self._plan(1)
        last = len(self.levels) - 1
        # Stage s owns the band [offsets[s], offsets[s] + bits_s]: later stages own lower bands.
        offsets = np.zeros(len(self.levels), dtype=np.float32)
        for stage in range(last - 1, -1, -1):
            offsets[stage] = offsets[stage + 1] + self.levels[stage + 1] + 1
        rows = query_chunk or max(1, _RANKING_ENTRIES // max(1, self.count))
        for start in range(0, len(queries[0]), rows):
            block = [codes[start : start + rows] for codes in queries]
            first = plan[0][0] if plan else last
            out = hamming_distances(block[first], self._packed[first]).astype(np.float32)
            out += offsets[first]
            if plan:
                row_ids = np.arange(len(out))[:, None]
                survivors = self._scan(first, block[first], plan[0][1])[1]
                for stage, keep in plan[1:]:
                    scored, _, kept = self._rerank(stage, block[stage], survivors, keep)
                    out[row_ids, survivors] = scored + offsets[stage]
                    survivors = kept
                out[row_ids, survivors] = gathered_hamming(
                    as_words(block[last]), as_words(self._packed[last]), survivors
                )
            yield slice(start, start + len(out)), out

    def _plan(self, k: int) -> list[tuple[int, int]]:
        if self._candidates is None:
            raise ValueError("candidates are not set: pass candidates= or assign fit_candidates(...) to them")
        return _pruning_plan(self.count, self._candidates, k)

    def _query_block(self, plan: list[tuple[int, int]]) -> int:
        """Queries per block such that one re-ranking gather stays within _GATHER_BYTES."""
        rerank_stages = [stage for stage, _ in plan[1:]] + [len(self.levels) - 1] if plan else []
        given = [keep for _, keep in plan]
        work = [n * code_bytes(self.levels[stage]) for stage, n in zip(rerank_stages, given, strict=True)]
        return max(1, _GATHER_BYTES // max([1, *work]))

    def _scan(self, stage: int, codes: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of the `keep` nearest gallery items at `stage`, by (distance, index)."""
        scan = self._scans.get(stage)
        if scan is None:
            scan = self._scans[stage] = _binary_flat(self.levels[stage])
            scan.add(self._packed[stage])
        return _binary_search(scan, codes, keep)

    def _rerank(
        self, stage: int, codes: np.ndarray, survivors: np.ndarray, keep: int, *, sort: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores `survivors` (Q, n) at `stage` and keeps the `keep` nearest of each row.

        Returns (the (Q, n) distances, the kept distances, the kept indices); kept items are sorted by
        (distance, index) when `sort`, else in no particular order.
        """
        scored = gathered_hamming(as_words(codes), as_words(self._packed[stage]), survivors)
        # Tie-free keys distance * count + index: selecting and sorting keys keeps the tie rule.
        keys = scored.astype(np.int64) * self.count + survivors
        if keep < keys.shape[1]:
            keys = np.take_along_axis(keys, np.argpartition(keys, keep - 1, axis=1)[:, :keep], axis=1)
        if sort:
            keys.sort(axis=1)
        return scored, (keys // self.count).astype(np.int32), keys % self.count

    def _stage_codes(self, codes: Any, name: str) -> list[np.ndarray]:
        """Packed codes per stage (shortest level first) from either layout the callers have.

        `codes` is the model's concatenated output, (N, sum(code_lengths)) laid out in `code_lengths`
        order, or a sequence with one array per level in `code_lengths` order, each (N, bits) values or
        (N, ceil(bits / 8)) packed uint8.
        """
        if isinstance(codes, Sequence) and not isinstance(codes, np.ndarray):
            if len(codes) != len(self.code_lengths):
                raise ValueError(
                    f"{name} must hold one array per level {list(self.code_lengths)}, got {len(codes)} arrays"
                )
            parts = list(codes)
        else:
            array = as_numpy(codes)
            if array.ndim != 2 or array.shape[1] != sum(self.code_lengths):
                raise ValueError(
                    f"{name} must be (N, {sum(self.code_lengths)}) concatenated codes of levels "
                    f"{list(self.code_lengths)} or a list of per-level arrays, got shape {array.shape}"
                )
            parts = split_levels(array, self.code_lengths)
        by_length = {
            bits: as_packed(part, bits, f"{name} level {bits}")
            for bits, part in zip(self.code_lengths, parts, strict=True)
        }
        if len({len(part) for part in by_length.values()}) != 1:
            raise ValueError(
                f"{name} levels hold different numbers of rows: {[len(p) for p in by_length.values()]}"
            )
        return [by_length[bits] for bits in self.levels]

    def _settings(self) -> dict[str, Any]:
        return {
            "code_lengths": list(self.code_lengths),
            "levels": list(self.levels),
            "candidates": None if self._candidates is None else list(self._candidates),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {f"codes_{bits}": packed for bits, packed in zip(self.levels, self._packed, strict=True)}

    @classmethod
    def _restore(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> CoarseToFineIndex:
        index = cls(settings["code_lengths"], settings["candidates"])
        for bits in index.levels:
            _check_array(arrays[f"codes_{bits}"], f"codes_{bits}", np.uint8, (None, code_bytes(bits)))
        index._packed = [arrays[f"codes_{bits}"] for bits in index.levels]
        if len({len(packed) for packed in index._packed}) != 1:
            raise ValueError(f"levels hold different numbers of codes: {[len(p) for p in index._packed]}")
        return index


def fit_candidates(
    index: CoarseToFineIndex,
    validation_queries: Any,
    *,
    validation_gallery: Any = None,
    target_recall: float = 0.99,
    k: int = 1,
) -> tuple[int, ...]:
    """Candidate counts per stage for `index`, fitted on validation codes without any label.

    The validation split comes from training identities, never from test queries or labels: its query
    codes are searched against the index's gallery codes joined, for the fit only, by the codes of its
    gallery images (`validation_gallery`, optional), so that validation queries have true matches among
    realistic impostors, as test queries do. The target is each query's exact full-length top-k over that
    joint gallery (a `HammingIndex` result). Only codes enter, so no label can change the outcome. Without
    a validation gallery the targets are other people's images, which short codes separate less well:
    the counts come out larger (safe but slower). With one, the joint gallery is larger than the index's,
    which again errs on the large side.

    The fit aims one standard error above target_recall (sqrt(r (1 - r) / targets)), as recall on new
    queries scatters around the validation recall. For each choice of first pruning stage f (earlier
    stages keep everything, so the gallery scan runs at level f), the allowed miss rate 1 - aim is split
    evenly over stages f, f+1, ...: each keeps the fewest items such that the targets lost so far stay
    within its cumulative share, rounded up to the grid 2^j, 3 * 2^(j-1). Of these schedules and the exact
    scan (no pruning), the one with the lowest estimated search cost (`_estimated_cost`) wins, so short
    levels too weak to prune cheaply are skipped. Its validation recall@k is at least the aim. Both code
    arguments take the layouts `CoarseToFineIndex.add` takes. Assign the result to `index.candidates`.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    queries = index._stage_codes(validation_queries, "validation_queries")
    gallery_size = index.count
    if validation_gallery is not None:
        joint = CoarseToFineIndex(index.code_lengths)
        extra = index._stage_codes(validation_gallery, "validation_gallery")
        joint._packed = [np.concatenate(pair) for pair in zip(index._packed, extra, strict=True)]
        index = joint
    if len(queries[0]) == 0 or index.count == 0:
        raise ValueError(
            f"fit_candidates needs validation queries and a non-empty index, got {len(queries[0])} queries "
            f"and {index.count} gallery items"
        )
    k = min(_positive_int(k, "k"), index.count)
    exact = HammingIndex(index.levels[-1])
    exact._index.add(index._packed[-1])
    targets = exact.search(queries[-1], k)[1]
    # One standard error of margin: recall on new queries scatters around the validation recall.
    aim = min(1.0, target_recall + np.sqrt(target_recall * (1.0 - target_recall) / targets.size))
    best = (index.count,) * (len(index.levels) - 1)  # no pruning: the exact full-length scan
    best_cost = _estimated_cost(index, best, k)
    for first in range(len(index.levels) - 1):
        counts = _fit_from(index, queries, targets, first, aim, k, best_cost)
        if counts is not None and _estimated_cost(index, counts, k) < best_cost:
            best, best_cost = counts, _estimated_cost(index, counts, k)
    return tuple(min(count, gallery_size) for count in best)


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
    count, num_stages = index.count, len(index.levels) - 1
    counts = [count] * first
    # alive[q, j]: target j of query q is still a candidate; survivors: (Q, n) candidates (None: all).
    alive = np.ones(targets.shape, dtype=bool)
    survivors = None
    if _estimated_cost(index, [*counts, k], k, final=False) >= cost_limit:
        return None  # even the cheapest scan at this level costs more than the best schedule
    for stage in range(first, num_stages):
        share = (stage - first + 1) / (num_stages - first)
        allowed_misses = int(np.floor((1.0 - target_recall) * share * alive.size + 1e-9))
        ranks = _target_ranks(index, queries, stage, survivors, targets)
        width = count if survivors is None else survivors.shape[1]
        needed = _smallest_count(ranks[alive], allowed_misses - int((~alive).sum()))
        keep = min(_round_up_to_grid(max(needed, k)), width)
        counts.append(keep)
        if _estimated_cost(index, counts, k, final=False) >= cost_limit:
            return None
        alive &= ranks < keep
        if keep < width:
            survivors = _keep_smallest(index, queries, stage, survivors, keep)
    return tuple(counts)


# Search cost model, ns per query on 2 cores, timed with faiss 1.15 at 82,161 codes on an AVX-512 x86 CPU:
# a faiss scan costs max(0.27, 0.011 * code bytes) per gallery item plus, per item kept, 45 (codes of at
# most 128 bits) or 150 (longer codes); re-ranking costs 4 + 0.23 * code bytes per candidate (gather,
# popcount, selection). Only the ratios matter when choosing between schedules.
_SCAN_NS_PER_ITEM, _SCAN_NS_PER_ITEM_BYTE = 0.27, 0.011
_SCAN_NS_PER_KEPT_SHORT, _SCAN_NS_PER_KEPT_LONG, _SHORT_CODE_BYTES = 45.0, 150.0, 16
_RERANK_NS_PER_ITEM, _RERANK_NS_PER_ITEM_BYTE = 4.0, 0.23


def _pruning_plan(count: int, candidates: Sequence[int], k: int) -> list[tuple[int, int]]:
    """(stage, items kept) for each stage that prunes; the first of them scans the whole gallery."""
    plan, alive = [], count
    for stage, candidate_count in enumerate(candidates):
        keep = min(max(candidate_count, k), alive)
        if keep < alive:
            plan.append((stage, keep))
            alive = keep
    return plan


def _estimated_cost(index: CoarseToFineIndex, counts: Sequence[int], k: int, *, final: bool = True) -> float:
    """Estimated search time per query of a schedule: one gallery scan, then re-ranking gathers.

    `counts` may cover only the first stages; `final=False` leaves out the last, full-length ranking, so
    the estimate of a partial schedule is a lower bound for every schedule that extends it.
    """
    plan, last = _pruning_plan(index.count, counts, k), len(index.levels) - 1
    if not plan and not final:
        return 0.0
    scan_stage, kept = plan[0] if plan else (last, k)
    scan_bytes = code_bytes(index.levels[scan_stage])
    per_kept = _SCAN_NS_PER_KEPT_SHORT if scan_bytes <= _SHORT_CODE_BYTES else _SCAN_NS_PER_KEPT_LONG
    cost = index.count * max(_SCAN_NS_PER_ITEM, _SCAN_NS_PER_ITEM_BYTE * scan_bytes) + per_kept * kept
    rerank_stages = [stage for stage, _ in plan[1:]] + ([last] if plan and final else [])
    for stage, (_, given) in zip(rerank_stages, plan, strict=False):
        cost += given * (_RERANK_NS_PER_ITEM + _RERANK_NS_PER_ITEM_BYTE * code_bytes(index.levels[stage]))
    return cost


def as_packed(codes: Any, bits: int, name: str) -> np.ndarray:
    """(N, bits) values (bit = value > 0) packed, or (N, ceil(bits / 8)) uint8 taken as packed already.

    Padding bits of packed input are cleared so that they can never count in a distance.
    """
    array = as_numpy(codes)
    width = code_bytes(bits)
    if array.ndim == 2 and array.shape[1] == bits:
        return pack_codes(array)
    if array.ndim == 2 and array.dtype == np.uint8 and array.shape[1] == width:
        packed = np.array(array, order="C")
        if bits % 8:
            packed[:, -1] &= np.uint8((0xFF << (8 - bits % 8)) & 0xFF)
        return packed
    raise ValueError(
        f"{name} must be (N, {bits}) code values (bit = value > 0) or (N, {width}) packed uint8, "
        f"got {array.dtype} of shape {array.shape}"
    )


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
    count, codes = index.count, as_words(index._packed[stage])
    width = count if survivors is None else survivors.shape[1]
    ranks = np.empty(targets.shape, dtype=np.int64)
    rows = max(1, _RANKING_ENTRIES // width)
    for start in range(0, len(targets), rows):
        stop = start + rows
        query_words, goals = as_words(queries[stage][start:stop]), targets[start:stop]
        if survivors is None:
            keys = hamming_distances(queries[stage][start:stop], index._packed[stage]).astype(np.int64)
            keys = keys * count + np.arange(count)
        else:
            keys = gathered_hamming(query_words, codes, survivors[start:stop]).astype(np.int64)
            keys = keys * count + survivors[start:stop]
        goal_keys = gathered_hamming(query_words, codes, goals).astype(np.int64) * count + goals
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
        return index._scan(stage, queries[stage], keep)[1]
    rows = max(1, _GATHER_BYTES // (survivors.shape[1] * code_bytes(index.levels[stage])))
    kept = []
    for start in range(0, len(survivors), rows):
        block = queries[stage][start : start + rows]
        kept.append(index._rerank(stage, block, survivors[start : start + rows], keep)[2])
    return np.concatenate(kept)


def _binary_flat(bits: int) -> Any:
    import faiss

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
    import faiss

    return max(1, faiss.omp_get_max_threads())


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_array(array: np.ndarray, name: str, dtype: Any, shape: tuple[int | None, ...]) -> None:
    fits = array.ndim == len(shape) and all(
        want is None or got == want for got, want in zip(array.shape, shape, strict=False)
    )
    if array.dtype != dtype or not fits:
        expected = tuple("N" if want is None else want for want in shape)
        raise ValueError(
            f"array {name!r} must be {np.dtype(dtype)} of shape {expected}, got {array.dtype} {array.shape}"
        )


def _metadata_arrays(metadata: GalleryMetadata) -> dict[str, np.ndarray]:
    encoded = [path.encode("utf-8") for path in metadata.paths]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(item) for item in encoded], out=offsets[1:])
    return {
        "meta_paths_utf8": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
        "meta_path_offsets": offsets,
        "meta_pids": np.asarray(metadata.pids, dtype=np.int64),
        "meta_camids": np.asarray(metadata.camids, dtype=np.int64),
    }


def _metadata_from_arrays(arrays: dict[str, np.ndarray], manifest_path: Path) -> GalleryMetadata:
    blob, offsets = arrays["meta_paths_utf8"].tobytes(), arrays["meta_path_offsets"]
    if offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{manifest_path}: metadata path offsets do not fit the path bytes")
    paths = [blob[begin:end].decode("utf-8") for begin, end in itertools.pairwise(offsets)]
    return GalleryMetadata(paths, arrays["meta_pids"].tolist(), arrays["meta_camids"].tolist())


def _write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Saves `array` as .npy (fsynced) and returns its manifest entry with the file's size and SHA-256."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "dtype": array.dtype.str,
        "shape": list(array.shape),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_manifest(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not found (expected an index folder written by save())")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path}: not valid JSON ({error}); the manifest is corrupted") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: not an agw_light search index (expected format {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
            "rebuild the index with this version of agw_light"
        )
    for key in ("kind", "count", "has_metadata", "data_dir", "files"):
        if key not in manifest:
            raise ValueError(f"{manifest_path}: missing key {key!r}")
    return manifest_path, manifest


def _load_checked(cls: type[_Index], manifest_path: Path, manifest: dict[str, Any]) -> Any:
    try:
        return _load_arrays_and_restore(cls, manifest_path, manifest)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path}: malformed manifest ({type(error).__name__}: {error})") from error


def _load_arrays_and_restore(cls: type[_Index], manifest_path: Path, manifest: dict[str, Any]) -> Any:
    data_dir = manifest_path.parent / manifest["data_dir"]
    arrays = {}
    for name, entry in manifest["files"].items():
        path = data_dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (listed in {manifest_path})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(
                f"{path}: {size} bytes, expected {entry['bytes']} as {manifest_path} records "
                "(truncated or replaced)"
            )
        digest = _sha256(path)
        if digest != entry["sha256"]:
            raise ValueError(
                f"{path}: checksum mismatch (sha256 {digest}, {manifest_path} records {entry['sha256']}); "
                "the file is corrupted"
            )
        arrays[name] = np.load(path, allow_pickle=False)
    try:
        index = cls._restore(manifest, arrays)
    except ValueError as error:
        raise ValueError(f"{manifest_path}: does not describe a valid {cls.kind!r} index: {error}") from error
    if index.count != manifest["count"]:
        raise ValueError(
            f"{manifest_path}: records {manifest['count']} items but the arrays hold {index.count}"
        )
    if manifest["has_metadata"]:
        index.metadata = _metadata_from_arrays(arrays, manifest_path)
        if len(index.metadata) != index.count:
            raise ValueError(
                f"{manifest_path}: metadata has {len(index.metadata)} items for {index.count} codes"
            )
    return index


_KINDS: dict[str, type[_Index]] = {
    index_class.kind: index_class for index_class in (FloatIndex, HammingIndex, CoarseToFineIndex)
}
