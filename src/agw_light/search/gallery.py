"""A saved gallery index's link to its images and to the model that filled it.

An index built from images (`python -m agw_light.search build`) records the checkpoint that embedded them
(absolute path and SHA-256) and the image size in its manifest, under the keys metrics.json uses for the same
things ("checkpoint", "checkpoint_sha256", "image_size"; indexes written before issue 21 say "ckpt" and
"ckpt_sha256", still read). Whoever embeds queries for it (the search command, the service) must use that same
model, or its outputs will not match the index: one check here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agw_light.search.index import GalleryIndex, SearchIndex

# Record keys of indexes written before issue 21 -> today's (metrics.json's names for the same things).
LEGACY_RECORD_KEYS = {"ckpt": "checkpoint", "ckpt_sha256": "checkpoint_sha256"}
# Where agw_light before the record moved into the manifest kept the model, outside the atomic save.
LEGACY_MODEL_RECORD = "model.json"
# Where a gallery lives: an index folder loaded into this process, or a Milvus collection (Lite file or server).
BACKENDS = ("in_process", "milvus")


def model_record(checkpoint: str | Path, sha256: str, image_size: tuple[int, int]) -> dict[str, Any]:
    """The manifest's record of the model that embeds a gallery: absolute path, SHA-256 (of the bytes the model
    was loaded from) and image size."""
    return {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": sha256, "image_size": list(image_size)}


def read_record(record: dict[str, Any] | None) -> dict[str, Any]:
    """An index's record under today's keys: an older index's "ckpt" / "ckpt_sha256" read as "checkpoint" /
    "checkpoint_sha256" (a key in today's name wins); None (no record) reads as {}."""
    record = dict(record or {})
    for old, new in LEGACY_RECORD_KEYS.items():
        if old in record:
            record.setdefault(new, record.pop(old))
    return record


def checkpoint_mismatch(
    record: dict[str, Any], checkpoint: str | Path, actual: str, index_dir: str | Path
) -> str | None:
    """Why `checkpoint` (whose bytes hash to `actual`) is not the one recorded as having built the index, or None
    when it is, or when the record names no SHA-256."""
    record = read_record(record)
    recorded = record.get("checkpoint_sha256")
    if not recorded or actual == recorded:
        return None
    return (
        f"checkpoint {checkpoint}: SHA-256 {actual}, but the index {index_dir} was built by a checkpoint with "
        f"SHA-256 {recorded} ({record.get('checkpoint')}); its outputs would not match the index"
    )


def check_no_legacy_record(index: SearchIndex, index_dir: str | Path) -> None:
    """Refuses an index of an older agw_light, whose model record lay outside the atomic save."""
    legacy = Path(index_dir) / LEGACY_MODEL_RECORD
    if not index.record and legacy.is_file():
        raise ValueError(
            f"{legacy}: this index was built by an older agw_light, which kept the model record outside the "
            "index (it may describe another build); rebuild it with `search build`"
        )


def recorded_checkpoint(
    index: GalleryIndex, index_dir: str | Path, *, record_holder: str | None = None
) -> tuple[Path, tuple[int, int] | None]:
    """(checkpoint, image size) recorded in the index's manifest; the caller loads the checkpoint once and checks
    its hash with `checkpoint_mismatch`.

    Args:
        index: the loaded index (`load_index(index_dir)`, or a `MilvusIndex`).
        index_dir: its folder (or what names a collection), named in errors.
        record_holder: what holds the record, named in errors; None: the folder's manifest.json.

    Returns:
        The recorded checkpoint's path and image size (None when the record has none).
    """
    record = read_record(index.record)
    manifest = record_holder or Path(index_dir) / "manifest.json"
    if not record.get("checkpoint") or not record.get("checkpoint_sha256"):
        raise ValueError(
            f"{manifest}: records no checkpoint and SHA-256 (the index was not written by `python -m "
            "agw_light.search build`): the model that fills it is unknown; rebuild it with that command"
        )
    checkpoint = Path(record["checkpoint"])
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint}: not found; the index {index_dir} was built by it (SHA-256 "
            f"{record['checkpoint_sha256']}): restore that file or rebuild the index"
        )
    size = record.get("image_size")
    if size is None:
        return checkpoint, None
    if not (
        isinstance(size, list) and len(size) == 2 and all(type(side) is int and 0 < side <= 10_000 for side in size)
    ):
        raise ValueError(f"{manifest}: image_size {size!r} is not [height, width] in pixels (two positive integers)")
    return checkpoint, (size[0], size[1])


def ranked_lists(
    queries: Sequence[Path], distances: Any, indices: Any, gallery_paths: Sequence[str] | Mapping[int, str] | None
) -> list[dict[str, Any]]:
    """One {"query", "results": [{rank, index, distance, path}]} per query, nearest first; the -1 padding of a
    search within a distance is left out. `index` is the item's position (in process) or id (Milvus), and
    `gallery_paths` maps it to the image path."""
    return [
        {
            "query": str(path),
            "results": [
                {
                    "rank": rank + 1,
                    "index": int(i),
                    "distance": float(d),
                    "path": gallery_paths[int(i)] if gallery_paths else None,
                }
                for rank, (d, i) in enumerate(zip(distances[row], indices[row], strict=True))
                if i >= 0
            ],
        }
        for row, path in enumerate(queries)
    ]


def open_gallery(
    backend: str = "in_process",
    *,
    index_dir: str | Path | None = None,
    uri: str | None = None,
    collection: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
) -> tuple[GalleryIndex, str]:
    """(the gallery, what names it in messages): the index folder `index_dir` loaded in process, or the Milvus
    collection `collection` at `uri` (close it when done).

    Args:
        backend: "in_process" (needs `index_dir`) or "milvus" (needs `uri` and `collection`; `token` for a
            secured server, `timeout` seconds to reach it).
    """
    if backend == "in_process":
        if index_dir is None:
            raise ValueError("backend=in_process needs index=<index dir> (or backend=milvus uri=... collection=...)")
        from agw_light.search.index import load_index

        index = load_index(index_dir)
        check_no_legacy_record(index, index_dir)
        return index, str(index_dir)
    if backend == "milvus":
        if not uri or not collection:
            raise ValueError("backend=milvus needs uri=<gallery.db | http://host:19530> and collection=<name>")
        from agw_light.search.milvus import MilvusIndex

        return MilvusIndex.open(uri, collection, token=token, timeout=timeout), milvus_name(uri, collection)
    raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")


def milvus_name(uri: str, collection: str) -> str:
    """How messages name a Milvus collection."""
    return f"collection {collection!r} at {uri}"
