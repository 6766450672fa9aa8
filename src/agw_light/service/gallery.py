"""A loaded gallery index and the model that built it, answering queries from uploaded image bytes.

The service must rank a query with the very model whose outputs fill the index: `GallerySearch.open` reads
the checkpoint path and SHA-256 the index's manifest records (`python -m agw_light.search build` writes
them) and refuses a checkpoint that is missing or whose bytes changed since the build. Queries may arrive on
many threads at once: at most `concurrent_queries` uploads are decoded and embedded at a time, on threads of
their own (the model already spreads one image over every core, and a decoded picture is the largest thing a
query holds), and the index is searched under a lock (a coarse-to-fine index builds its scan tables on first
use).
"""

from __future__ import annotations

import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agw_light.images import FORMATS_TEXT, ImageTooLarge, open_rgb
from agw_light.inference import Encoder
from agw_light.inference.checkpoint import load_checkpoint
from agw_light.search import SearchIndex, load_index
from agw_light.search.gallery import checkpoint_mismatch, read_record, recorded_checkpoint

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
    """One ranked gallery item: its position in the gallery list (what thumbnails are fetched by)."""

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

    def __init__(self, index: SearchIndex, encoder: Any, *, index_dir: Path, concurrent_queries: int = 1) -> None:
        self.index = index
        self.encoder = encoder
        self.index_dir = index_dir
        # Queries are decoded and embedded on these threads alone: the pictures they decode are then freed
        # into the malloc arenas of `concurrent_queries` threads, never spread over every request thread's.
        self._embedding = ThreadPoolExecutor(max_workers=concurrent_queries, thread_name_prefix="agw-query")
        self._searching = threading.Lock()

    @classmethod
    def open(
        cls, index_dir: str | Path, *, device: str = "auto", backend: str = "auto", concurrent_queries: int = 1
    ) -> GallerySearch:
        """Loads the index in `index_dir` and the checkpoint it records, refusing a missing or changed one.

        `device` and `backend` choose how queries are embedded (`agw_light.inference.Encoder`)."""
        index_dir = Path(index_dir)
        index = load_index(index_dir)
        if isinstance(concurrent_queries, bool) or not isinstance(concurrent_queries, int) or concurrent_queries < 1:
            raise ValueError(f"concurrent_queries={concurrent_queries!r}: expected a positive integer")
        checkpoint, image_size = recorded_checkpoint(index, index_dir)
        loaded = load_checkpoint(checkpoint)
        mismatch = checkpoint_mismatch(index.record, checkpoint, loaded.sha256, index_dir)
        if mismatch:
            raise ValueError(f"{mismatch}: rebuild the index")
        encoder = Encoder.from_loaded(loaded, image_size=image_size, device=device, backend=backend)
        trained = None if loaded.preprocessing is None else loaded.preprocessing.image_size
        if image_size is not None and trained is not None and image_size != trained:
            log.warning(
                "%s records image size %s (its gallery was embedded so), but checkpoint %s was trained at %s: queries "
                "are embedded at the index's size, as its gallery was; rebuild the index without a height/width "
                "override for the model's own size",
                index_dir / "manifest.json",
                list(image_size),
                loaded.path,
                list(trained),
            )
        return cls(index, encoder, index_dir=index_dir, concurrent_queries=concurrent_queries)

    def describe(self) -> dict[str, Any]:
        """What /health reports: the index's size, width and kind, and the model that fills it."""
        record = read_record(self.index.record)
        return {
            "status": "ok",
            "size": self.index.ntotal,
            "dimension": self.index.d,
            "index_kind": self.index.kind,
            "distance": self.encoder.distance,
            "checkpoint_sha256": record.get("checkpoint_sha256"),
            "image_size": list(self.encoder.image_size),
            "has_metadata": self.index.metadata is not None,
        }

    def search(self, image: Any, k: int, max_distance: float | None = None) -> list[Hit]:
        """The k nearest gallery items to `image` (a PIL image), nearest first, without those farther than
        `max_distance` (kept when equal)."""
        features = self._embedding.submit(self.encoder.encode, [image]).result()
        return self._ranked(features, k, max_distance)

    def search_upload(
        self, data: bytes, k: int, max_distance: float | None = None, *, max_bytes: int, max_pixels: int
    ) -> list[Hit]:
        """`search` for an uploaded file's bytes, decoded inside the `concurrent_queries` limit: N uploads
        arriving at once hold N compressed files and at most `concurrent_queries` decoded pictures (each at
        most `max_pixels`), never N of them. QueryImageError says why an upload is refused."""
        features = self._embedding.submit(self._decode_and_encode, data, max_bytes, max_pixels).result()
        return self._ranked(features, k, max_distance)

    def _decode_and_encode(self, data: bytes, max_bytes: int, max_pixels: int) -> Any:
        image = decode_query(data, max_bytes, max_pixels=max_pixels, draft_size=self.encoder.image_size)
        return self.encoder.encode([image])

    def _ranked(self, features: Any, k: int, max_distance: float | None) -> list[Hit]:
        with self._searching:
            distances, positions = self.index.search(features, k)
        metadata = self.index.metadata
        hits = []
        for distance, position in zip(distances[0].tolist(), positions[0].tolist(), strict=True):
            if position < 0:
                continue  # faiss pads a result shorter than k with position -1: no item
            if max_distance is not None and distance > max_distance:
                break  # nearest first: every later item is at least as far
            hits.append(
                Hit(
                    rank=len(hits) + 1,
                    position=position,
                    distance=float(distance),
                    pid=metadata.pids[position] if metadata else None,
                    camera=metadata.camids[position] if metadata else None,
                    name=Path(metadata.paths[position]).name if metadata else None,
                )
            )
        return hits

    def item_path(self, position: int) -> Path:
        """The image file of gallery item `position`: only ever a path from the index's own gallery list."""
        metadata = self.index.metadata
        if metadata is None:
            raise LookupError(f"the index {self.index_dir} holds no gallery paths (saved without metadata)")
        if not 0 <= position < len(metadata):
            raise LookupError(f"no gallery item {position}: the gallery holds items 0 to {len(metadata) - 1}")
        return Path(metadata.paths[position])


def hit_json(hit: Hit) -> dict[str, Any]:
    return asdict(hit)
