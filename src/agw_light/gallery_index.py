"""Gallery indexes from image folders: embed a gallery with a checkpoint's model and save its index, or embed query
images with the model an index records and rank its gallery. `python -m agw_light.search` calls these.

`build` embeds every image under the gallery folder (recursively: agw_light.images.IMAGE_SUFFIXES) and saves the
index the model's head calls for (float cosine, exact Hamming or coarse-to-fine Hamming) with the image paths (and
pid / camera parsed from Market- or Duke-style names, else -1). The coarse-to-fine candidate counts are fitted on a
sample of the gallery's own codes as queries (no labels exist here; recall is measured against the exact full-length
search). The index's manifest records the checkpoint (absolute path, SHA-256) and image size, saved atomically with
the data, and the gallery paths are absolute, so the index answers from any folder.

`query` embeds the query images with the model recorded at build time (or another checkpoint) and refuses one whose
SHA-256 differs from the recorded one unless told to allow it. Checkpoints are read with `weights_only=True`: a file
holding code is refused, the code never runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agw_light.protocol import DEFAULT_TARGET_RECALL

if TYPE_CHECKING:
    from agw_light.inference.checkpoint import LoadedCheckpoint
    from agw_light.search import SearchIndex


class GalleryIndexError(ValueError):
    """A request the index or its model cannot answer, with what to do instead (the command prints it)."""


def load_model(checkpoint: str | Path) -> LoadedCheckpoint:
    """A checkpoint (agw_light's, trained or converted), read once: the one place these commands read one."""
    from agw_light.inference.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)


def image_size(loaded: LoadedCheckpoint, height: int | None, width: int | None) -> tuple[int, int]:
    """The given size, else the one the checkpoint records; an error asking for it when neither exists."""
    recorded = None if loaded.preprocessing is None else loaded.preprocessing.image_size
    height = height or (recorded[0] if recorded else None)
    width = width or (recorded[1] if recorded else None)
    if not height or not width:
        raise GalleryIndexError("the checkpoint does not record its image size: pass height=... width=...")
    return int(height), int(width)


def embed_images(
    loaded: LoadedCheckpoint, location: str | Path, size: tuple[int, int], *, batch_size: int, device: str
):
    """(paths, outputs): the images at `location` (one file, or a folder's images, sorted) and the model's eval-mode
    output (feature or codes) for each, in order (`agw_light.inference.Encoder`, torch backend, the checkpoint's
    preprocessing at `size`: the outputs evaluation ranks)."""
    from agw_light.inference import Encoder

    encoder = Encoder.from_loaded(loaded, image_size=size, device=device, backend="torch")
    return encoder.encode_files(Path(location).expanduser(), batch_size=batch_size, progress=True)


def build_gallery_index(
    ckpt: str | Path,
    gallery: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 128,
    height: int | None = None,
    width: int | None = None,
    fit_queries: int = 1000,
    target_recall: float = DEFAULT_TARGET_RECALL,
    seed: int = 0,
) -> tuple[Path, SearchIndex]:
    """Embeds every image under `gallery` with the checkpoint's model and saves the index into `out`.

    Args:
        ckpt: the training checkpoint whose model embeds the gallery (recorded in the index).
        gallery: an image folder (searched recursively) or one image.
        out: the index folder to write.
        device: where to embed (auto | cpu | cuda | cuda:N).
        batch_size: images embedded at once.
        height, width: the image size; None: the one the checkpoint records.
        fit_queries: gallery codes sampled as queries to fit the coarse-to-fine candidate counts.
        target_recall: the recall of the exact search those counts must keep.
        seed: draws that sample.

    Returns:
        The index folder and the index saved there.
    """
    import numpy as np

    from agw_light.search import GalleryMetadata, build_index
    from agw_light.search.gallery import model_record, reid_labels

    loaded = load_model(ckpt)
    size = image_size(loaded, height, width)
    record = model_record(loaded.path, loaded.sha256, size)
    gallery = Path(gallery).expanduser().resolve()  # absolute paths: a query may run elsewhere
    paths, features = embed_images(loaded, gallery, size, batch_size=batch_size, device=device)
    labels = [reid_labels(path) for path in paths]
    metadata = GalleryMetadata([str(p) for p in paths], [pid for pid, _ in labels], [cam for _, cam in labels])
    sample = np.random.default_rng(seed).permutation(len(paths))[:fit_queries]
    index = build_index(
        features,
        loaded.network.code_lengths,
        metadata=metadata,
        fit_queries=features[np.sort(sample)],
        target_recall=target_recall,
    )
    return Path(index.save(out, record=record)), index


def query_gallery_index(
    index_dir: str | Path,
    image: str | Path,
    *,
    topk: int = 10,
    ckpt: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 128,
    height: int | None = None,
    width: int | None = None,
    allow_changed_model: bool = False,
    max_distance: float | None = None,
) -> list[dict[str, Any]]:
    """The ranked gallery of each query image: [{"query", "results": [{rank, index, distance, path}]}].

    Args:
        index_dir: a folder written by `build_gallery_index`.
        image: one query image, or a folder of them.
        topk: hits per query.
        ckpt: the model that embeds the queries; None: the one the index records.
        device, batch_size: as for `build_gallery_index`.
        height, width: the image size; None: the one the index (else the checkpoint) records.
        allow_changed_model: query with a checkpoint whose SHA-256 differs from the recorded one (warned).
        max_distance: list only hits at distance <= max_distance (1 - cosine, or Hamming bits).

    Returns:
        One ranked list per query image, nearest first.
    """
    from agw_light.search import load_index
    from agw_light.search.gallery import check_no_legacy_record, ranked_lists

    index_dir = Path(index_dir)
    index = load_index(index_dir)
    try:
        check_no_legacy_record(index, index_dir)
    except ValueError as error:
        raise GalleryIndexError(str(error)) from None
    record = index.record or {}
    loaded = _query_model(index_dir, record, ckpt, allow_changed_model)
    if record.get("image_size") and not (height or width):
        height, width = record["image_size"]
    size = image_size(loaded, height, width)
    paths, features = embed_images(loaded, image, size, batch_size=batch_size, device=device)
    if max_distance is None:
        distances, indices = index.search(features, int(topk))
    else:
        try:
            distances, indices = index.search_within(features, int(topk), max_distance)
        except ValueError as error:
            raise GalleryIndexError(f"max_distance={max_distance!r}: {error}") from error
    return ranked_lists(paths, distances, indices, index.metadata.paths if index.metadata is not None else None)


def _query_model(
    index_dir: Path, record: dict[str, Any], ckpt: str | Path | None, allow_changed_model: bool
) -> LoadedCheckpoint:
    """The model that embeds queries: `ckpt` or the recorded one, refused if it is not the one that built the
    index (SHA-256) unless `allow_changed_model`."""
    from agw_light.search.gallery import checkpoint_mismatch

    ckpt = ckpt or record.get("ckpt")
    if ckpt is None:
        raise GalleryIndexError(f"{index_dir}: the index records no model (saved without one): pass ckpt=<checkpoint>")
    loaded = load_model(ckpt)
    mismatch = checkpoint_mismatch(record, loaded.path, loaded.sha256, index_dir)
    if mismatch:
        if not allow_changed_model:
            raise GalleryIndexError(
                f"{mismatch}. Rebuild the index, or pass allow_changed_model=true to query it anyway"
            )
        print(f"warning: {mismatch}; querying anyway (allow_changed_model=true)", file=sys.stderr)
    return loaded
