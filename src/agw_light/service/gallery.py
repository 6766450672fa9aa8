"""A loaded gallery index and the model that built it, answering queries from uploaded image bytes.

The service must rank a query with the very model whose outputs fill the index: `GallerySearch.open` reads
the checkpoint path and SHA-256 the index's manifest records (`python -m agw_light.search build` writes
them) and refuses a checkpoint that is missing or whose bytes changed since the build. Queries may arrive on
many threads at once: decoding runs freely, at most `concurrent_queries` images are embedded at a time (the
model already spreads one image over every core), and the index is searched under a lock (a coarse-to-fine
index builds its scan tables on first use).
"""

from __future__ import annotations

import io
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agw_light.inference import Encoder
from agw_light.search import SearchIndex, load_index
from agw_light.search.gallery import recorded_checkpoint

# Pillow refuses images above this many pixels (a decompression bomb in a few kilobytes of PNG).
MAX_QUERY_PIXELS = 40_000_000


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


def decode_query(data: bytes, max_bytes: int) -> Any:
    """The uploaded bytes as an RGB PIL image, or QueryImageError (empty, too large, not an image)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise QueryImageError("the uploaded file is empty: send a JPEG, PNG or BMP image")
    if len(data) > max_bytes:
        raise QueryImageError(f"the upload exceeds the limit of {max_bytes} bytes", status=413)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_QUERY_PIXELS:
                raise QueryImageError(
                    f"the image is {image.width}x{image.height} pixels, more than the limit of {MAX_QUERY_PIXELS}",
                    status=413,
                )
            return image.convert("RGB")
    except QueryImageError:
        raise
    except UnidentifiedImageError as error:
        raise QueryImageError("the upload is not a readable image (no image format recognised)", status=415) from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise QueryImageError(f"the upload is not a readable image ({error})", status=415) from error


class GallerySearch:
    """An index plus the encoder of its checkpoint: `search(image, k)` ranks the gallery for one image."""

    def __init__(self, index: SearchIndex, encoder: Any, *, index_dir: Path, concurrent_queries: int = 1) -> None:
        self.index = index
        self.encoder = encoder
        self.index_dir = index_dir
        self._encoding = threading.BoundedSemaphore(concurrent_queries)
        self._searching = threading.Lock()

    @classmethod
    def open(
        cls, index_dir: str | Path, *, device: str = "auto", backend: str = "auto", concurrent_queries: int = 1
    ) -> GallerySearch:
        """Loads the index in `index_dir` and the checkpoint it records, refusing a missing or changed one.

        `device` and `backend` choose how queries are embedded (`agw_light.inference.Encoder`)."""
        index_dir = Path(index_dir)
        index = load_index(index_dir)
        checkpoint, image_size = recorded_checkpoint(index, index_dir)
        if isinstance(concurrent_queries, bool) or not isinstance(concurrent_queries, int) or concurrent_queries < 1:
            raise ValueError(f"concurrent_queries={concurrent_queries!r}: expected a positive integer")
        encoder = Encoder.from_checkpoint(checkpoint, image_size=image_size, device=device, backend=backend)
        return cls(index, encoder, index_dir=index_dir, concurrent_queries=concurrent_queries)

    def describe(self) -> dict[str, Any]:
        """What /health reports: the index's size, width and kind, and the model that fills it."""
        record = self.index.record or {}
        return {
            "status": "ok",
            "size": self.index.ntotal,
            "dimension": self.index.d,
            "index_kind": self.index.kind,
            "distance": self.encoder.distance,
            "checkpoint_sha256": record.get("ckpt_sha256"),
            "image_size": list(self.encoder.image_size),
            "has_metadata": self.index.metadata is not None,
        }

    def search(self, image: Any, k: int, max_distance: float | None = None) -> list[Hit]:
        """The k nearest gallery items to `image` (a PIL image), nearest first, without those farther than
        `max_distance` (kept when equal)."""
        with self._encoding:
            features = self.encoder.encode([image])
        with self._searching:
            distances, positions = self.index.search(features, k)
        metadata = self.index.metadata
        hits = []
        for rank, (distance, position) in enumerate(zip(distances[0].tolist(), positions[0].tolist(), strict=True)):
            if max_distance is not None and distance > max_distance:
                break  # nearest first: every later item is at least as far
            hits.append(
                Hit(
                    rank=rank + 1,
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
