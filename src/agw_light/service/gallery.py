"""A loaded gallery index and the model that built it, answering queries from uploaded image bytes.

The service must rank a query with the very model whose outputs fill the index: `GallerySearch.open` reads
the checkpoint path and SHA-256 the index's manifest records (`python -m agw_light.search build` writes
them) and refuses a checkpoint that is missing or whose bytes changed since the build. Queries may arrive on
many threads at once: at most `concurrent_queries` uploads are decoded and embedded at a time, on threads of
their own (the model already spreads one image over every core, and a decoded picture is the largest thing a
query holds), and the index is searched under a lock (a coarse-to-fine index builds its scan tables on first
use).

The gallery may also be a Milvus collection (`GallerySearch.open_milvus`): then it is live, `add_uploads`
embeds uploaded images with the same model and stores them (the image files in `upload_dir`, named by their
SHA-256, the items in the collection), and `delete` removes items by id. Items are addressed by their
Milvus ids instead of positions; a query may filter the gallery by camera and time
(`agw_light.search.filters`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agw_light.files import write_atomic
from agw_light.images import FORMATS_TEXT, IMAGE_FORMATS, ImageTooLarge, open_rgb
from agw_light.inference import Encoder
from agw_light.inference.checkpoint import load_checkpoint
from agw_light.search import GalleryMetadata, load_index
from agw_light.search.codes import as_numpy
from agw_light.search.filters import filtered_search
from agw_light.search.gallery import checkpoint_mismatch, open_gallery, read_record, recorded_checkpoint
from agw_light.search.index import GalleryIndex

log = logging.getLogger(__name__)
# The most pixels an upload is decoded to (conf/serve.yaml max_image_pixels): a person crop needs a few hundred
# pixels a side, and each decoded pixel costs the server about 8 bytes while the query is embedded.
DEFAULT_MAX_IMAGE_PIXELS = 1_000_000


class QueryImageError(ValueError):
    """An upload that is not a usable query image; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Hit:
    """One ranked gallery item: its position in the gallery list, or its id in a Milvus collection (what
    thumbnails are fetched and items deleted by)."""

    rank: int
    position: int
    distance: float
    pid: int | None
    camera: int | None
    name: str | None  # the image's file name, never its folder


def decode_query(data: bytes, max_bytes: int, *, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Any:
    """The uploaded bytes as an RGB PIL image, or QueryImageError (empty, too large, not an allowed image).

    The header is checked against `max_pixels` before any pixel is decoded; a JPEG is decoded at the
    smallest reduced scale that still covers `draft_size` (height, width), the model's input size."""
    if not data:
        raise QueryImageError(f"the uploaded file is empty: send a {FORMATS_TEXT} image")
    if len(data) > max_bytes:
        raise QueryImageError(f"the upload exceeds the limit of {max_bytes} bytes", status=413)
    try:
        return open_rgb(io.BytesIO(data), max_pixels=max_pixels, draft_size=draft_size)
    except ImageTooLarge as error:
        size = f"is {error.width}x{error.height} pixels" if error.width else "declares more pixels than Pillow allows"
        raise QueryImageError(
            f"the image {size}, more than the limit of {max_pixels} pixels (max_image_pixels): send a crop of "
            "the person, a few hundred pixels a side",
            status=413,
        ) from error
    except OSError as error:
        raise QueryImageError(
            f"the upload is not a readable image (expected {FORMATS_TEXT}; {_reason(error)})", status=415
        ) from error


def _reason(error: OSError) -> str:
    """Pillow's own words for a damaged file, without the repr of our in-memory buffer."""
    from PIL import UnidentifiedImageError

    cause = error.__cause__
    if cause is None or isinstance(cause, UnidentifiedImageError) or "BytesIO" in str(cause):
        return "no allowed image format recognised"
    return str(cause)


class GallerySearch:
    """An index plus the encoder of its checkpoint: `search(image, k)` ranks the gallery for one image."""

    def __init__(
        self,
        index: GalleryIndex,
        encoder: Any,
        *,
        index_dir: str | Path,
        concurrent_queries: int = 1,
        upload_dir: str | Path | None = None,
    ) -> None:
        self.index = index
        self.encoder = encoder
        self.index_dir = index_dir  # the index folder, or what names the Milvus collection
        self.upload_dir = None if upload_dir is None else Path(upload_dir).expanduser().absolute()
        # Queries are decoded and embedded on these threads alone: the pictures they decode are then freed
        # into the malloc arenas of `concurrent_queries` threads, never spread over every request thread's.
        self._embedding = ThreadPoolExecutor(max_workers=concurrent_queries, thread_name_prefix="agw-query")
        # An in-process coarse-to-fine index builds its scan tables on first use; a Milvus one is thread-safe.
        in_process = getattr(index, "backend", "in_process") == "in_process"
        self._searching = threading.Lock() if in_process else contextlib.nullcontext()

    @classmethod
    def open(
        cls, index_dir: str | Path, *, device: str = "auto", backend: str = "auto", concurrent_queries: int = 1
    ) -> GallerySearch:
        """Loads the index in `index_dir` and the checkpoint it records, refusing a missing or changed one.

        `device` and `backend` choose how queries are embedded (`agw_light.inference.Encoder`)."""
        index_dir = Path(index_dir)
        index = load_index(index_dir)
        encoder = _recorded_encoder(index, index_dir, None, device, backend, concurrent_queries)
        return cls(index, encoder, index_dir=index_dir, concurrent_queries=concurrent_queries)

    @classmethod
    def open_milvus(
        cls,
        uri: str,
        collection: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        upload_dir: str | Path | None = None,
        device: str = "auto",
        backend: str = "auto",
        concurrent_queries: int = 1,
    ) -> GallerySearch:
        """The Milvus collection `collection` at `uri` (written by `search build backend=milvus`) and the
        checkpoint it records, refusing a missing or changed one; uploads are stored in `upload_dir`. `token`
        and `timeout` (seconds) reach the server."""
        index, where = open_gallery("milvus", uri=uri, collection=collection, token=token, timeout=timeout)
        try:
            encoder = _recorded_encoder(index, where, f"{where}'s record", device, backend, concurrent_queries)
        except BaseException:
            index.close()
            raise
        return cls(index, encoder, index_dir=where, concurrent_queries=concurrent_queries, upload_dir=upload_dir)

    def close(self) -> None:
        """Stops the embedding threads and drops a Milvus connection."""
        self._embedding.shutdown()
        self.index.close()

    @property
    def writable(self) -> bool:
        """Whether items can be added and deleted (a Milvus collection; an index folder is read-only)."""
        return getattr(self.index, "backend", "in_process") == "milvus"

    def describe(self) -> dict[str, Any]:
        """What /health reports: the index's size, width and kind, and the model that fills it."""
        record = read_record(self.index.record)
        return {
            "status": "ok",
            "size": self.index.ntotal,
            "dimension": self.index.d,
            "index_kind": self.index.kind,
            "backend": self.index.backend,
            "writable": self.writable,
            "distance": self.encoder.distance,
            "checkpoint_sha256": record.get("checkpoint_sha256"),
            "image_size": list(self.encoder.image_size),
            "has_metadata": self.writable or self.index.metadata is not None,
        }

    def search(self, image: Any, k: int, max_distance: float | None = None, **filters: Any) -> list[Hit]:
        """The k nearest gallery items to `image` (a PIL image), nearest first, without those farther than
        `max_distance` (kept when equal); `filters` as `agw_light.search.filters.filtered_search` takes them
        (cameras, since, until, query_cameras)."""
        features = self._embedding.submit(self.encoder.encode, [image]).result()
        return self._ranked(features, k, max_distance, filters)

    def search_upload(
        self,
        data: bytes,
        k: int,
        max_distance: float | None = None,
        *,
        max_bytes: int,
        max_pixels: int,
        **filters: Any,
    ) -> list[Hit]:
        """`search` for an uploaded file's bytes, decoded inside the `concurrent_queries` limit: N uploads
        arriving at once hold N compressed files and at most `concurrent_queries` decoded pictures (each at
        most `max_pixels`), never N of them. QueryImageError says why an upload is refused."""
        features = self._embedding.submit(self._decode_and_encode, data, max_bytes, max_pixels).result()
        return self._ranked(features, k, max_distance, filters)

    def add_uploads(
        self,
        uploads: Sequence[bytes],
        *,
        max_bytes: int,
        max_pixels: int,
        pid: int = -1,
        camera: int = -1,
        timestamp: float | None = None,
    ) -> list[int]:
        """Adds uploaded images to a Milvus gallery and returns their new ids, in order.

        Each upload is decoded and embedded as a query is (inside the `concurrent_queries` limit; a bad one is
        a QueryImageError before anything is written), its bytes are stored in `upload_dir` as
        `<SHA-256><suffix>` (atomically; the item's path), and the items are added with `pid`, `camera` and
        `timestamp` (None: now). If the collection refuses the write, the image files it created are removed
        again: the gallery and the folder are as before.
        """
        if not self.writable or self.upload_dir is None:
            raise LookupError(
                f"{self.index_dir}: this gallery is read-only (serve a Milvus collection with upload_dir)"
            )
        outputs = [
            self._embedding.submit(self._decode_and_encode, data, max_bytes, max_pixels).result() for data in uploads
        ]
        codes = np.concatenate([as_numpy(output) for output in outputs])
        created, paths = [], []
        try:
            for data in uploads:
                path = self.upload_dir / f"{hashlib.sha256(data).hexdigest()}{_suffix(data)}"
                if not path.exists():
                    write_atomic(path, lambda handle, data=data: handle.write(data))
                    created.append(path)
                paths.append(str(path))
            count = len(paths)
            metadata = GalleryMetadata(paths, [pid] * count, [camera] * count)
            stamps = None if timestamp is None else [float(timestamp)] * count
            return self.index.add(codes, metadata, timestamps=stamps).tolist()
        except BaseException:
            for path in created:
                path.unlink(missing_ok=True)
            raise

    def delete(self, item_id: int) -> None:
        """Deletes item `item_id` of a Milvus gallery (LookupError when there is none; its image file stays)."""
        if not self.writable:
            raise LookupError(f"{self.index_dir}: this gallery is read-only (an index folder)")
        self.index.delete([item_id])

    def _decode_and_encode(self, data: bytes, max_bytes: int, max_pixels: int) -> Any:
        image = decode_query(data, max_bytes, max_pixels=max_pixels, draft_size=self.encoder.image_size)
        return self.encoder.encode([image])

    def _ranked(self, features: Any, k: int, max_distance: float | None, filters: dict[str, Any]) -> list[Hit]:
        with self._searching:
            distances, positions = filtered_search(self.index, features, k, **filters)
        # faiss (and Milvus, when a filter leaves fewer than k) pads a short result with -1: no item.
        kept = [
            (float(distance), position)
            for distance, position in zip(distances[0].tolist(), positions[0].tolist(), strict=True)
            if position >= 0 and (max_distance is None or distance <= max_distance)
        ]
        items = None
        if kept and (self.writable or self.index.metadata is not None):
            items = self.index.items([position for _, position in kept])
        return [
            Hit(
                rank=rank + 1,
                position=position,
                distance=distance,
                pid=items.pids[rank] if items else None,
                camera=items.camids[rank] if items else None,
                name=Path(items.paths[rank]).name if items else None,
            )
            for rank, (distance, position) in enumerate(kept)
        ]

    def item_path(self, position: int) -> Path:
        """The image file of gallery item `position` (a Milvus id for a collection): only ever a path from the
        gallery's own list, never one a request names."""
        if self.writable:
            path = self.index.items([position]).paths[0]  # LookupError for an unknown id
            if not path:
                raise LookupError(f"gallery item {position} records no image file")
            return Path(path)
        metadata = self.index.metadata
        if metadata is None:
            raise LookupError(f"the index {self.index_dir} holds no gallery paths (saved without metadata)")
        if not 0 <= position < len(metadata):
            raise LookupError(f"no gallery item {position}: the gallery holds items 0 to {len(metadata) - 1}")
        return Path(metadata.paths[position])


def hit_json(hit: Hit) -> dict[str, Any]:
    return asdict(hit)


def _recorded_encoder(
    index: GalleryIndex,
    where: str | Path,
    record_holder: str | None,
    device: str,
    backend: str,
    concurrent_queries: int,
) -> Encoder:
    """The encoder of the checkpoint `index` records, refusing a missing or changed checkpoint."""
    if isinstance(concurrent_queries, bool) or not isinstance(concurrent_queries, int) or concurrent_queries < 1:
        raise ValueError(f"concurrent_queries={concurrent_queries!r}: expected a positive integer")
    checkpoint, image_size = recorded_checkpoint(index, where, record_holder=record_holder)
    loaded = load_checkpoint(checkpoint)
    mismatch = checkpoint_mismatch(index.record, checkpoint, loaded.sha256, where)
    if mismatch:
        raise ValueError(f"{mismatch}: rebuild the index")
    encoder = Encoder.from_loaded(loaded, image_size=image_size, device=device, backend=backend)
    trained = None if loaded.preprocessing is None else loaded.preprocessing.image_size
    if image_size is not None and trained is not None and image_size != trained:
        log.warning(
            "%s records image size %s (its gallery was embedded so), but checkpoint %s was trained at %s: queries "
            "are embedded at the index's size, as its gallery was; rebuild the index without a height/width "
            "override for the model's own size",
            record_holder or Path(where) / "manifest.json",
            list(image_size),
            loaded.path,
            list(trained),
        )
    return encoder


def _suffix(data: bytes) -> str:
    """The file suffix of an uploaded image's format (already checked to be one of `IMAGE_FORMATS`)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return IMAGE_FORMATS[image.format][0]
