"""A gallery held in a Milvus collection: the same search interface as the in-process indexes, and live writes.

`MilvusIndex` answers `search(queries, k) -> (distances, indices)`, `search_within`, `items`, `ntotal`, `d`,
`kind` and `record` as `agw_light.search.index` does, with the same distances (1 - cosine for float rows,
Hamming bits for codes), dtypes and tie rule (equal distances in id order), so a caller can use either. What
differs: `indices` are the items' Milvus ids (int64 primary keys assigned at `add`, growing with insertion
order), not positions, since items come and go while others query (`add`, `delete`); `metadata` is None and
`items(ids)` gives paths, pids and cameras. Rows a search has no item for (a filter leaves fewer than k) are
padded as faiss pads: index -1, distance inf (float) or the int32 maximum (Hamming).

The same code runs embedded and on a server: `uri` is a Milvus Lite file (`gallery.db`, a local server process
started by pymilvus, one per file and process) or `http://host:19530` (a standalone server or a cluster,
`token` for a secured one). Index types follow the server kind: exact BIN_FLAT / FLAT on Lite (the only ones
it has for binary vectors), BIN_IVF_FLAT / HNSW with their parameters on a server (`DEFAULT_INDEXES`, or
`index=` at `create`).

Schema: id (INT64, primary, auto id), pid and camera (INT64), path (VARCHAR), timestamp (DOUBLE, seconds
since the epoch) and the vectors: `feature` (FLOAT_VECTOR, inner product of L2-normalised rows) for float
rows, `code` (BINARY_VECTOR, HAMMING) for codes. Codes are packed as `agw_light.search.codes.pack_codes`
packs them, for the gallery and the queries alike (padding bits up to a byte are zero). A code pyramid keeps
its longest level in `code` and, when the fit finds that a shortlist pays, one shorter level in `coarse`:
a search takes `candidates` items by the short code from Milvus and ranks them by the full code in process
(`fit_shortlist` chooses the level and count as the in-process index fits its stages).

The collection's description holds the format, the geometry and the caller's `record` (checkpoint SHA-256,
image size): `open(..., expect=...)` refuses a collection built by another model or of another code length,
naming both. Writes are acknowledged once Milvus holds them: Milvus Lite persists an acknowledged insert or
delete in its file (it survives the process being killed), a server in its write-ahead log. Reads are
`Strong`: a query sees every write acknowledged before it. An `add` that fails removes what it inserted, so
the gallery is left as before; a `delete` of an unknown id or path deletes nothing and says which.

pymilvus is imported only where a connection is made.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agw_light.checks import positive_int
from agw_light.search.codes import as_numpy, as_packed, as_words, code_bytes, gathered_hamming
from agw_light.search.fit import fit_shortlist
from agw_light.search.index import CoarseToFineIndex, GalleryIndex, within_distance
from agw_light.search.metadata import GalleryMetadata

FORMAT = "agw_light.search.milvus"
FORMAT_VERSION = 1
# Largest k (search limit) and result window (query) Milvus serves in one request.
MILVUS_MAX_K = 16384
# Ids per `id in [...]` query: Milvus Lite answers long lists in time superlinear in their length (20 us
# per id at 256, 35 at 1024, 760 at 8192 on 2 cores), and truncates answers beyond its result window.
FETCH_IDS = 256
# Bytes of vectors per insert request. Milvus Lite takes a request in time superlinear in its size for float
# vectors (1,000 2048-d rows: 0.19 s in requests of 1 MB, 3.0 s in requests of 8 MB, 2 cores); codes are
# insensitive. Far below gRPC's 64 MB message limit.
INSERT_BYTES = 1 << 20
PATH_MAX_BYTES = 4096
DEFAULT_TIMEOUT_S = 10.0
# Index type, build parameters and search parameters per server kind and vector kind. Lite has only the
# exact ones; on a server, IVF and HNSW trade recall for speed (nprobe / ef raise recall).
DEFAULT_INDEXES: dict[str, dict[str, dict[str, Any]]] = {
    "lite": {
        "binary": {"index_type": "BIN_FLAT", "params": {}, "search_params": {}},
        "float": {"index_type": "FLAT", "params": {}, "search_params": {}},
    },
    "server": {
        "binary": {"index_type": "BIN_IVF_FLAT", "params": {"nlist": 1024}, "search_params": {"nprobe": 64}},
        "float": {"index_type": "HNSW", "params": {"M": 16, "efConstruction": 256}, "search_params": {"ef": 128}},
    },
}
# Search cost model for `fit_shortlist`, ns per query, timed on Milvus Lite 2.5.1 at 100,000 items on 2 cores:
# a BIN_FLAT scan costs 3.5 per item plus 0.08 per code byte (0.38 ms at 32 bits, 2.4 ms at 2048 bits),
# and each shortlisted candidate about 28,000 (returned by the scan, ~8 us, then its full code fetched by id,
# ~20 us). Only the ratios matter.
_SCAN_NS_PER_ITEM, _SCAN_NS_PER_BYTE = 3.5, 0.08
_CANDIDATE_NS = 28_000.0
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_HAMMING_PAD = np.iinfo(np.int32).max


class MilvusIndex(GalleryIndex):
    """A gallery in a Milvus collection; make one with `create` (or `build_milvus_index`), reach it with `open`.

    `kind` is "float", "hamming" or "coarse_to_fine" as for the in-process indexes; `code_lengths` the
    pyramid's levels (empty for float rows); `d` the width `add` and `search` take (features, bits, or the
    concatenated pyramid). `shortlist` is (coarse level bits, candidates) or None (the full code is scanned).
    Safe to share between threads. Close it (or use it as a context manager) to drop the connection.
    """

    backend = "milvus"

    def __init__(self, connection: _Connection, collection: Any, settings: Mapping[str, Any]) -> None:
        super().__init__()
        self.uri, self.name = connection.uri, collection.name
        self._connection, self._collection = connection, collection
        self.kind = settings["kind"]
        self.d = int(settings["d"])
        self.code_lengths = tuple(int(bits) for bits in settings["code_lengths"])
        shortlist = settings.get("shortlist")
        self.shortlist = None if shortlist is None else (int(shortlist[0]), int(shortlist[1]))
        self.record = settings.get("record")
        self._search_params = dict(settings["index"].get("search_params", {}))
        self._full_bits = max(self.code_lengths) if self.code_lengths else None
        # Splits and packs pyramid codes exactly as the in-process index does (it holds no codes itself).
        self._layout = CoarseToFineIndex(self.code_lengths) if self.kind == "coarse_to_fine" else None

    @classmethod
    def create(
        cls,
        uri: str,
        collection: str,
        *,
        code_lengths: Sequence[int] | None = None,
        dim: int | None = None,
        record: Mapping[str, Any] | None = None,
        shortlist: tuple[int, int] | None = None,
        index: Mapping[str, Any] | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> MilvusIndex:
        """A new, empty collection `collection` at `uri`; an existing one of that name is an error.

        Args:
            uri: a Milvus Lite file (`*.db`, created with its folder) or `http(s)://host:port` of a server.
            collection: the collection's name (letters, digits, underscores).
            code_lengths: the model's code lengths (`ReIDModel.code_lengths`): one for Hamming rows, several
                for a pyramid; None or empty for float rows, which need `dim`.
            dim: feature width of float rows.
            record: JSON-able facts about the model (checkpoint SHA-256, image size), kept in the collection.
            shortlist: for a pyramid, (coarse level bits, candidates) from `fit_shortlist`; None scans the
                full code.
            index: {"index_type", "params", "search_params"} for the vector field; default `DEFAULT_INDEXES`.
            token: credentials of a secured server ("user:password" or an API key).
            timeout: seconds to wait for the server before failing with its address.
        """
        settings = _settings(code_lengths, dim, shortlist, record, index, server_kind(uri))
        connection = _Connection.open(uri, token, timeout, create=True)
        try:
            return cls(connection, _create_collection(connection, collection, settings), settings)
        except BaseException:
            connection.close()
            raise

    @classmethod
    def open(
        cls,
        uri: str,
        collection: str,
        *,
        expect: Mapping[str, Any] | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> MilvusIndex:
        """The gallery `collection` at `uri`, written by `create`.

        `expect`: what the caller's model requires, refused with both values named when the collection
        differs: the geometry keys "kind", "d", "code_lengths", and any key of the record (e.g. "checkpoint_sha256",
        "image_size"); a record key the collection lacks counts as a difference.
        """
        connection = _Connection.open(uri, token, timeout, create=False)
        try:
            handle, settings = _open_collection(connection, collection)
            index = cls(connection, handle, settings)
            if expect:
                index.check(expect)
            return index
        except BaseException:
            connection.close()
            raise

    def check(self, expect: Mapping[str, Any]) -> None:
        """Raises ValueError naming both values where the collection differs from `expect` (see `open`)."""
        stored = {"kind": self.kind, "d": self.d, "code_lengths": list(self.code_lengths), **(self.record or {})}
        differ = [key for key, value in expect.items() if _jsonable(stored.get(key)) != _jsonable(value)]
        if differ:
            built = ", ".join(f"{key}={stored.get(key)!r}" for key in differ)
            wanted = ", ".join(f"{key}={expect[key]!r}" for key in differ)
            raise ValueError(
                f"collection {self.name!r} at {self.uri} was built with {built}, but this model has {wanted}: "
                "its outputs would not match the gallery; use a collection built by this model"
            )

    def close(self) -> None:
        """Drops the connection (a Lite server stops once no connection of the process uses its file)."""
        self._connection.close()

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ntotal(self) -> int:
        rows = self._collection.query(expr="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add(
        self,
        codes: Any,
        metadata: GalleryMetadata | Mapping | None = None,
        *,
        timestamps: Any = None,
    ) -> np.ndarray:
        """Inserts gallery items and returns their ids (int64, in input order).

        Args:
            codes: (N, d) features or code values (bit = value > 0), packed uint8 codes, or a pyramid's
                per-level list, as the in-process index of this kind takes them.
            metadata: paths, pids and cameras (GalleryMetadata or a mapping); None stores "" and -1.
            timestamps: (N,) seconds since the epoch (when each image was taken); None: now.

        Everything is checked before the first write; if a write fails, the items already inserted are
        deleted again and the error re-raised, so the gallery holds what it held before.
        """
        vectors = self._vectors(codes, "codes")
        count = len(next(iter(vectors.values())))
        meta = GalleryMetadata.coerce(metadata, count) or GalleryMetadata([""] * count, [-1] * count, [-1] * count)
        for path in meta.paths:
            _check_path(path)
        stamps = np.full(count, time.time()) if timestamps is None else np.asarray(timestamps, dtype=np.float64)
        if stamps.shape != (count,) or not np.isfinite(stamps).all():
            raise ValueError(f"timestamps must be {count} finite numbers (seconds), got shape {stamps.shape}")
        row_bytes = sum(vector[0].nbytes for vector in vectors.values()) + 64
        step = max(1, INSERT_BYTES // row_bytes)
        inserted: list[int] = []
        try:
            for start in range(0, count, step):
                rows = slice(start, start + step)
                columns = [meta.pids[rows], meta.camids[rows], meta.paths[rows], stamps[rows].tolist()]
                columns += [_column(vector[rows]) for vector in vectors.values()]
                inserted.extend(self._collection.insert(columns).primary_keys)
        except Exception as error:
            if inserted:
                self._delete_ids(inserted)
            raise RuntimeError(
                f"collection {self.name!r} at {self.uri}: adding {count} items failed after {len(inserted)} "
                f"were written ({error}); those were removed again, the gallery is as before"
            ) from error
        return np.asarray(inserted, dtype=np.int64)

    def delete(self, ids: Any = None, *, paths: Sequence[str] | None = None) -> np.ndarray:
        """Deletes the items with these ids, or with these image paths, and returns the deleted ids.

        Every id (path) must be in the gallery: otherwise nothing is deleted and LookupError names the
        unknown ones. A path held by several items deletes them all.
        """
        if (ids is None) == (paths is None):
            raise ValueError("delete takes ids or paths, not both and not neither")
        if ids is not None:
            wanted = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
            found = self._fetch(wanted, [])[0]
            unknown = np.setdiff1d(wanted, found)
            if len(unknown):
                raise LookupError(
                    f"collection {self.name!r} at {self.uri} holds no item with id {unknown[:10].tolist()}; "
                    "nothing was deleted"
                )
        else:
            paths = [str(path) for path in paths]
            for path in paths:
                _check_path(path)
            rows = []
            for start in range(0, len(paths), FETCH_IDS):
                chunk = paths[start : start + FETCH_IDS]
                expr = "path in [" + ", ".join(_quoted(path) for path in chunk) + "]"
                rows += self._collection.query(expr=expr, output_fields=["id", "path"])
            missing = sorted(set(paths) - {row["path"] for row in rows})
            if missing:
                raise LookupError(
                    f"collection {self.name!r} at {self.uri} holds no item with path {missing[:10]}; "
                    "nothing was deleted"
                )
            found = np.unique(np.asarray([row["id"] for row in rows], dtype=np.int64))
        self._delete_ids(found.tolist())
        return found

    def _delete_ids(self, ids: list[int]) -> None:
        for start in range(0, len(ids), FETCH_IDS):
            self._collection.delete(expr=f"id in {[int(i) for i in ids[start : start + FETCH_IDS]]}")

    def search(
        self,
        queries: Any,
        k: int,
        *,
        cameras: Sequence[int] | None = None,
        since: float | None = None,
        until: float | None = None,
        query_cameras: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (num_queries, min(k, ntotal)), nearest first, ties in id order.

        Of several items tied at the k-th distance, Milvus chooses which it returns.

        Args:
            queries: as `add` takes codes.
            k: results per query, at most `MILVUS_MAX_K`.
            cameras: keep only gallery items of these cameras.
            since, until: keep only items with since <= timestamp <= until (seconds).
            query_cameras: (num_queries,) each query's camera: its own camera's items are left out, as re-id
                evaluation leaves them out. One Milvus search runs per distinct camera.

        Distances are float32 1 - cosine for float rows, int32 Hamming bits for codes; rows with fewer
        matches than columns are padded with index -1 (see the module docstring).
        """
        k = positive_int(k, "k")
        if k > MILVUS_MAX_K:
            raise ValueError(f"k={k}: Milvus returns at most {MILVUS_MAX_K} results per query")
        vectors = self._vectors(queries, "queries")
        num_queries = len(next(iter(vectors.values())))
        condition = _filter(cameras, since, until)
        distances = np.full((num_queries, k), np.inf)
        indices = np.full((num_queries, k), -1, dtype=np.int64)
        for rows, expr in _camera_groups(query_cameras, num_queries, condition):
            distances[rows], indices[rows] = self._search_rows({f: v[rows] for f, v in vectors.items()}, k, expr)
        columns = k if (indices >= 0).all() else min(k, self.ntotal)
        distances, indices = distances[:, :columns], indices[:, :columns]
        if self.kind == "float":
            return distances.astype(np.float32), indices
        return np.where(np.isinf(distances), _HAMMING_PAD, distances).astype(np.int32), indices

    def search_within(self, queries: Any, k: int, max_distance: float, **filters: Any) -> tuple[np.ndarray, np.ndarray]:
        """`search(queries, k, **filters)` keeping only the hits at distance <= max_distance, padded as
        `GalleryIndex.search_within` pads (float32 distances, inf and -1)."""
        return within_distance(*self.search(queries, k, **filters), max_distance)

    def items(self, indices: Any) -> GalleryMetadata:
        """Paths, pids and cameras of the items with these ids, in the order given; an unknown id is a
        LookupError."""
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        found, rows = self._fetch(np.unique(wanted), ["pid", "camera", "path"])
        unknown = np.setdiff1d(wanted, found)
        if len(unknown):
            raise LookupError(f"collection {self.name!r} at {self.uri} holds no item with id {unknown[:10].tolist()}")
        return GalleryMetadata(
            [row["path"] for row in rows], [row["pid"] for row in rows], [row["camera"] for row in rows]
        ).take(np.searchsorted(found, wanted).tolist())

    def _search_rows(self, vectors: dict[str, np.ndarray], k: int, expr: str) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) float64 distances (inf padding) and ids (-1 padding) for one filter expression."""
        if self.shortlist is None:
            field = "feature" if self.kind == "float" else "code"
            return _top_k(*self._milvus_search(field, vectors[field], k, expr), k)
        candidates = self._milvus_search("coarse", vectors["coarse"], max(self.shortlist[1], k), expr)[1]
        return self._rerank(vectors["code"], candidates, k)

    def _milvus_search(self, field: str, vectors: np.ndarray, limit: int, expr: str) -> tuple[np.ndarray, np.ndarray]:
        """(Q, limit) distances and ids as Milvus answers them (padded with inf and -1)."""
        metric = "IP" if field == "feature" else "HAMMING"
        result = self._collection.search(
            data=_column(vectors),
            anns_field=field,
            param={"metric_type": metric, "params": self._search_params},
            limit=min(limit, MILVUS_MAX_K),
            expr=expr or None,
        )
        lengths = np.fromiter((len(hits.ids) for hits in result), dtype=np.int64, count=len(vectors))
        flat_ids = np.fromiter(itertools.chain.from_iterable(hits.ids for hits in result), dtype=np.int64)
        flat_scores = np.fromiter(itertools.chain.from_iterable(hits.distances for hits in result), dtype=np.float64)
        rows = np.repeat(np.arange(len(vectors)), lengths)
        columns = np.arange(len(flat_ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        distances = np.full((len(vectors), limit), np.inf)
        ids = np.full((len(vectors), limit), -1, dtype=np.int64)
        # Inner products of unit rows become 1 - cosine in float32, as FloatIndex reports them.
        distances[rows, columns] = 1.0 - flat_scores.astype(np.float32) if metric == "IP" else flat_scores
        ids[rows, columns] = flat_ids
        return distances, ids

    def _rerank(self, query_codes: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of each query's candidate ids by the full code (fetched from Milvus), in process."""
        found, rows = self._fetch(np.unique(candidates[candidates >= 0]), ["code"])
        if not len(found):
            return np.full((len(candidates), k), np.inf), np.full((len(candidates), k), -1, dtype=np.int64)
        codes = np.frombuffer(b"".join(_binary(row["code"]) for row in rows), dtype=np.uint8).reshape(len(rows), -1)
        positions = np.minimum(np.searchsorted(found, candidates), len(found) - 1)
        present = (candidates >= 0) & (found[positions] == candidates)  # a candidate deleted meanwhile is gone
        distances = gathered_hamming(as_words(query_codes), as_words(codes), positions).astype(np.float64)
        return _top_k(np.where(present, distances, np.inf), np.where(present, candidates, -1), k)

    def _fetch(self, ids: np.ndarray, fields: list[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(the ids of `ids` that exist, sorted; their rows with `fields`) by `id in [...]` queries."""
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), FETCH_IDS):
            chunk = [int(i) for i in ids[start : start + FETCH_IDS]]
            rows += self._collection.query(expr=f"id in {chunk}", output_fields=["id", *fields])
        rows.sort(key=lambda row: row["id"])
        return np.asarray([row["id"] for row in rows], dtype=np.int64), rows

    def _vectors(self, values: Any, name: str) -> dict[str, np.ndarray]:
        """The vector fields of `values` by field name: unit float32 rows, or packed codes."""
        if self.kind == "float":
            features = as_numpy(values).astype(np.float32)
            if features.ndim != 2 or features.shape[1] != self.d:
                raise ValueError(f"{name} must have shape (N, {self.d}), got {features.shape}")
            norms = np.linalg.norm(features, axis=1, keepdims=True)
            return {"feature": np.ascontiguousarray(features / np.maximum(norms, 1e-12))}
        if self._layout is None:
            return {"code": as_packed(values, self.d, name)}
        per_level = dict(zip(self._layout.levels, self._layout.stage_codes(values, name), strict=True))
        vectors = {"code": per_level[self._full_bits]}
        if self.shortlist is not None:
            vectors["coarse"] = per_level[self.shortlist[0]]
        return vectors


def build_milvus_index(
    gallery_features: Any,
    code_lengths: Sequence[int] | None,
    *,
    uri: str,
    collection: str,
    metadata: Any = None,
    timestamps: Any = None,
    fit_queries: Any = None,
    fit_gallery: Any = None,
    target_recall: float = 0.99,
    record: Mapping[str, Any] | None = None,
    index: Mapping[str, Any] | None = None,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> MilvusIndex:
    """A new collection holding a gallery, as `agw_light.search.build_index` builds the in-process one.

    `gallery_features`: float features, or codes in any layout `MilvusIndex.add` takes (per-level packed too).
    The row kind follows `code_lengths` (None: float; one: Hamming; several: a pyramid). For a pyramid,
    `fit_queries` (validation codes, never test queries) and `fit_gallery` fit the shortlist with
    `fit_shortlist` on the gallery's codes in memory before the collection is made. Other arguments as for
    `MilvusIndex.create` and `MilvusIndex.add`.
    """
    shortlist = None
    if code_lengths and len(code_lengths) > 1:
        if fit_queries is None or len(fit_queries) == 0:
            raise ValueError("a code pyramid needs validation queries (fit_queries) to fit its shortlist")
        local = CoarseToFineIndex(code_lengths)
        local.add(gallery_features)
        shortlist = fit_shortlist(
            local,
            fit_queries,
            milvus_search_cost(local.ntotal),
            validation_gallery=fit_gallery,
            target_recall=target_recall,
        )
    milvus_index = MilvusIndex.create(
        uri,
        collection,
        code_lengths=code_lengths,
        dim=None if code_lengths else as_numpy(gallery_features).shape[1],
        record=record,
        shortlist=shortlist,
        index=index,
        token=token,
        timeout=timeout,
    )
    try:
        milvus_index.add(gallery_features, metadata, timestamps=timestamps)
    except BaseException:
        milvus_index.close()
        raise
    return milvus_index


def milvus_search_cost(ntotal: int) -> Callable[[int, int], float]:
    """`cost(bits, candidates)` for `fit_shortlist`: a Milvus scan of `ntotal` codes of `bits` bits, then
    `candidates` full codes fetched and ranked in process (see the constants above)."""

    def cost(bits: int, candidates: int) -> float:
        return ntotal * (_SCAN_NS_PER_ITEM + _SCAN_NS_PER_BYTE * code_bytes(bits)) + candidates * _CANDIDATE_NS

    return cost


class _Connection:
    """One pymilvus connection (an ORM alias of its own), with the address for errors."""

    def __init__(self, uri: str, alias: str) -> None:
        self.uri, self.alias = uri, alias

    @classmethod
    def open(cls, uri: str, token: str | None, timeout: float, *, create: bool) -> _Connection:
        from pymilvus import MilvusException, connections

        uri = str(uri)
        if server_kind(uri) == "lite":
            path = Path(uri).expanduser()
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.is_file():
                raise FileNotFoundError(f"{uri}: no Milvus Lite file there (create the gallery first)")
            uri = str(path.resolve())
        alias = f"agw-light-{uuid.uuid4().hex}"
        try:
            connections.connect(alias=alias, uri=uri, token=token or "", timeout=timeout)
        except MilvusException as error:
            raise ConnectionError(f"Milvus at {uri}: cannot connect ({error.message})") from error
        return cls(uri, alias)

    def close(self) -> None:
        from pymilvus import connections

        connections.disconnect(self.alias)


def server_kind(uri: str) -> str:
    """The kind of Milvus at `uri` (a key of `DEFAULT_INDEXES`): "lite" for a file (*.db), "server" for an address."""
    uri = str(uri)
    if uri.startswith(("http://", "https://", "tcp://")):
        return "server"
    if uri.endswith(".db"):
        return "lite"
    raise ValueError(f"uri={uri!r}: expected a Milvus Lite file (*.db) or a server address (http://host:19530)")


def _settings(
    code_lengths: Sequence[int] | None,
    dim: int | None,
    shortlist: tuple[int, int] | None,
    record: Mapping[str, Any] | None,
    index: Mapping[str, Any] | None,
    server_kind: str,
) -> dict[str, Any]:
    """The collection's description: format, geometry, index and record, checked."""
    lengths = [positive_int(bits, "code_lengths entry") for bits in (code_lengths or [])]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"code_lengths must be distinct positive ints, got {list(code_lengths or [])}")
    if lengths and dim is not None:
        raise ValueError("pass code_lengths for code rows or dim for float rows, not both")
    kind = "float" if not lengths else "hamming" if len(lengths) == 1 else "coarse_to_fine"
    if kind == "float":
        if dim is None:
            raise ValueError("float rows need dim (the feature width); code rows need code_lengths")
        d = positive_int(dim, "dim")
    else:
        d = sum(lengths)
    if shortlist is not None:
        bits, count = positive_int(shortlist[0], "shortlist bits"), positive_int(shortlist[1], "shortlist count")
        if kind != "coarse_to_fine" or bits not in lengths or bits == max(lengths):
            raise ValueError(f"shortlist={shortlist}: needs a code pyramid and one of its shorter levels {lengths}")
        shortlist = [bits, count]
    chosen = dict(index or DEFAULT_INDEXES[server_kind]["float" if kind == "float" else "binary"])
    if "index_type" not in chosen:
        raise ValueError(f"index={dict(chosen)}: needs index_type (and optionally params, search_params)")
    settings = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "d": d,
        "code_lengths": lengths,
        "shortlist": shortlist,
        "index": chosen,
        "record": record,
    }
    try:
        return json.loads(json.dumps(settings, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"record and index must be JSON-able ({error})") from error


def _create_collection(connection: _Connection, name: str, settings: dict[str, Any]) -> Any:
    from pymilvus import Collection, CollectionSchema, DataType, FieldSchema, MilvusException, utility

    _check_name(name)
    if utility.has_collection(name, using=connection.alias):
        raise FileExistsError(f"collection {name!r} at {connection.uri} exists already: open it, or choose a new name")
    fields = [
        FieldSchema("id", DataType.INT64, is_primary=True, auto_id=True),
        FieldSchema("pid", DataType.INT64),
        FieldSchema("camera", DataType.INT64),
        FieldSchema("path", DataType.VARCHAR, max_length=PATH_MAX_BYTES),
        FieldSchema("timestamp", DataType.DOUBLE),
    ]
    vector_fields = {}
    if settings["kind"] == "float":
        vector_fields["feature"] = ("IP", FieldSchema("feature", DataType.FLOAT_VECTOR, dim=settings["d"]))
    else:
        full = max(settings["code_lengths"])
        vector_fields["code"] = ("HAMMING", FieldSchema("code", DataType.BINARY_VECTOR, dim=8 * code_bytes(full)))
        if settings["shortlist"]:
            coarse = settings["shortlist"][0]
            vector_fields["coarse"] = (
                "HAMMING",
                FieldSchema("coarse", DataType.BINARY_VECTOR, dim=8 * code_bytes(coarse)),
            )
    fields += [field for _, field in vector_fields.values()]
    schema = CollectionSchema(fields, description=json.dumps(settings))
    try:
        collection = Collection(name, schema, using=connection.alias, consistency_level="Strong")
        for field, (metric, _) in vector_fields.items():
            # The shortlist's coarse scan is exact whatever the server: its count was fitted for an exact scan.
            spec = settings["index"] if field != "coarse" else DEFAULT_INDEXES["lite"]["binary"]
            params = {"index_type": spec["index_type"], "metric_type": metric, "params": spec.get("params", {})}
            collection.create_index(field, params)
        collection.load()
    except MilvusException as error:
        with contextlib.suppress(Exception):  # clean-up must not hide Milvus's reason
            utility.drop_collection(name, using=connection.alias)
        raise ValueError(f"collection {name!r} at {connection.uri}: Milvus refused it ({error.message})") from error
    return collection


def _open_collection(connection: _Connection, name: str) -> tuple[Any, dict[str, Any]]:
    from pymilvus import Collection, utility

    _check_name(name)
    if not utility.has_collection(name, using=connection.alias):
        held = utility.list_collections(using=connection.alias)
        raise LookupError(f"no collection {name!r} at {connection.uri} (it holds {sorted(held)})")
    collection = Collection(name, using=connection.alias)
    try:
        settings = json.loads(collection.description)
    except ValueError:
        settings = None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise ValueError(f"collection {name!r} at {connection.uri}: not an agw_light gallery (no {FORMAT} description)")
    if settings.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"collection {name!r} at {connection.uri}: format_version {settings.get('format_version')!r} is not "
            f"supported (expected {FORMAT_VERSION}); rebuild it with this version of agw_light"
        )
    collection.load()
    return collection, settings


def _filter(cameras: Sequence[int] | None, since: float | None, until: float | None) -> str:
    """The Milvus boolean expression of the filters ("" keeps everything)."""
    terms = []
    if cameras is not None:
        terms.append(f"camera in {[int(camera) for camera in cameras]}")
    for bound, operator in ((since, ">="), (until, "<=")):
        if bound is not None:
            value = float(bound)
            if not math.isfinite(value):
                raise ValueError(f"time bounds must be finite seconds, got {bound!r}")
            terms.append(f"timestamp {operator} {value!r}")
    return " and ".join(terms)


def _camera_groups(
    query_cameras: Sequence[int] | None, num_queries: int, condition: str
) -> list[tuple[np.ndarray | slice, str]]:
    """(query rows, expression) per search call: all rows at once, or one call per distinct query camera."""
    if query_cameras is None:
        return [(slice(None), condition)]
    cameras = np.asarray(query_cameras, dtype=np.int64).reshape(-1)
    if len(cameras) != num_queries:
        raise ValueError(f"query_cameras needs one camera per query ({num_queries}), got {len(cameras)}")
    groups = []
    for camera in np.unique(cameras):
        own = f"camera != {int(camera)}"
        groups.append((np.flatnonzero(cameras == camera), f"({condition}) and {own}" if condition else own))
    return groups


def _top_k(distances: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest (distance, id) pairs of each row, sorted (padding, inf / -1, last), padded to k."""
    order = np.lexsort((ids, distances), axis=-1)[:, :k]
    distances, ids = np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)
    missing = k - distances.shape[1]
    if missing > 0:
        distances = np.pad(distances, ((0, 0), (0, missing)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=-1)
    return distances, ids


def _column(vectors: np.ndarray) -> list[Any]:
    """A vector column as pymilvus takes it: bytes per code, lists of floats per feature."""
    return [row.tobytes() for row in vectors] if vectors.dtype == np.uint8 else vectors.tolist()


def _binary(value: Any) -> bytes:
    """A binary vector as a query returns it (bytes, or a one-element list of bytes)."""
    return value[0] if isinstance(value, list) else value


def _quoted(text: str) -> str:
    """A string literal of Milvus's expression language."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_path(path: str) -> None:
    if len(path.encode("utf-8")) > PATH_MAX_BYTES or any(ord(char) < 32 for char in path):
        raise ValueError(f"path {path[:80]!r}: at most {PATH_MAX_BYTES} UTF-8 bytes and no control characters")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"collection={name!r}: letters, digits and underscores, not starting with a digit")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
