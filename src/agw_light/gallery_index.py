"""Gallery indexes from image folders: embed a gallery with a checkpoint's model and save its index, or embed query
images with the model an index records and rank its gallery. `python -m agw_light.search` calls these.

`build` embeds every image under the gallery folder (recursively: agw_light.images.IMAGE_SUFFIXES) and saves the
index the model's head calls for (float cosine, exact Hamming or coarse-to-fine Hamming) with the image paths and
the pid and camera of each, read by the datasets' own parsers in the gallery's layout
(`agw_light.data.datasets.read_image_folder`: Market/Duke names, a folder per identity with a camera pattern, a
list file; -1 where a layout gives none), so the service can frame true matches. The coarse-to-fine candidate
counts are fitted on a sample of the gallery's own codes as queries (labels play no part; recall is measured
against the exact full-length search). The index's manifest records the checkpoint (absolute path, SHA-256) and
image size, saved atomically with the data, and the gallery paths are absolute, so the index answers from any
folder.

`query` embeds the query images with the model recorded at build time (or another checkpoint) and refuses one whose
SHA-256 differs from the recorded one unless told to allow it. Both check their settings before they load a model
or embed an image. A negative `max_distance` is refused here and by the service (HTTP 422) alike: no distance is
below 0. Checkpoints are read with `weights_only=True`: a file
holding code is refused, the code never runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agw_light.checks import is_integer, is_number, positive_int
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


def check_size(height: int | None, width: int | None) -> None:
    """height and width: each None (the recorded size) or a positive integer, checked before any work."""
    for name, side in (("height", height), ("width", width)):
        if side is not None:
            positive_int(side, name)


def check_max_distance(max_distance: float | None) -> None:
    """None, or a number >= 0: every distance (1 - cosine, Hamming bits) is >= 0, so a negative threshold is a
    mistake, refused by the command and the service (422) alike."""
    if max_distance is not None and (not is_number(max_distance) or not max_distance >= 0):
        raise GalleryIndexError(
            f"max_distance={max_distance!r}: expected a number >= 0 (1 - cosine, or Hamming bits), or null for no limit"
        )


def embed_images(
    loaded: LoadedCheckpoint,
    location: str | Path | list[str],
    size: tuple[int, int],
    *,
    batch_size: int,
    device: str,
):
    """(paths, outputs): the images at `location` (one file, a folder's images, sorted, or a list of image
    paths, in order) and the model's eval-mode
    output (feature or codes) for each, in order (`agw_light.inference.Encoder`, torch backend, the checkpoint's
    preprocessing at `size`: the outputs evaluation ranks)."""
    from agw_light.inference import Encoder

    encoder = Encoder.from_loaded(loaded, image_size=size, device=device, backend="torch")
    location = location if isinstance(location, list) else Path(location).expanduser()
    return encoder.encode_files(location, batch_size=batch_size, progress=True)


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
    layout: str = "auto",
    camera_pattern: str | None = None,
    list_file: str | None = None,
) -> tuple[Path, SearchIndex]:
    """Embeds every image under `gallery` with the checkpoint's model and saves the index into `out`, with the
    pid and camera of each image as the gallery's layout gives them.

    Args:
        ckpt: the training checkpoint whose model embeds the gallery (recorded in the index).
        gallery: an image folder (searched recursively) or one image.
        out: the index folder to write.
        layout, camera_pattern, list_file: how pids and cameras are read
            (`agw_light.data.datasets.read_image_folder`: auto, market, image_folders, image_list or none).
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

    from agw_light.data.datasets import read_image_folder
    from agw_light.search import GalleryMetadata, build_index
    from agw_light.search.gallery import model_record

    check_size(height, width)
    positive_int(batch_size, "batch_size")
    positive_int(fit_queries, "fit_queries")
    if not is_number(target_recall) or not 0 < target_recall <= 1:
        raise GalleryIndexError(f"target_recall={target_recall!r}: expected a number in (0, 1]")
    if not is_integer(seed):
        raise GalleryIndexError(f"seed={seed!r}: expected an integer")
    gallery = Path(gallery).expanduser().resolve()  # absolute paths: a query may run elsewhere
    read, samples = read_image_folder(gallery, layout, camera_pattern=camera_pattern, list_file=list_file)
    if read == "none":
        print(
            f"note: the names under {gallery} follow no layout agw_light knows: pids and cameras are recorded as -1 "
            "(pass layout=image_folders [camera_pattern=...] or layout=image_list list_file=...)",
            file=sys.stderr,
        )
    loaded = load_model(ckpt)
    size = image_size(loaded, height, width)
    record = model_record(loaded.path, loaded.sha256, size)
    paths, features = embed_images(loaded, [path for path, _, _ in samples], size, batch_size=batch_size, device=device)
    metadata = GalleryMetadata(
        [str(p) for p in paths],
        [pid for _, pid, _ in samples],
        [-1 if camid is None else camid for _, _, camid in samples],
    )
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
    from agw_light.search.gallery import check_no_legacy_record, ranked_lists, read_record

    positive_int(topk, "topk")
    positive_int(batch_size, "batch_size")
    check_size(height, width)
    check_max_distance(max_distance)
    index_dir = Path(index_dir)
    index = load_index(index_dir)
    try:
        check_no_legacy_record(index, index_dir)
    except ValueError as error:
        raise GalleryIndexError(str(error)) from None
    record = read_record(index.record)
    loaded = _query_model(index_dir, record, ckpt, allow_changed_model)
    if record.get("image_size") and not (height or width):
        height, width = record["image_size"]
    size = image_size(loaded, height, width)
    paths, features = embed_images(loaded, image, size, batch_size=batch_size, device=device)
    if max_distance is None:
        distances, indices = index.search(features, int(topk))
    else:
        distances, indices = index.search_within(features, int(topk), max_distance)
    return ranked_lists(paths, distances, indices, index.metadata.paths if index.metadata is not None else None)


def _query_model(
    index_dir: Path, record: dict[str, Any], ckpt: str | Path | None, allow_changed_model: bool
) -> LoadedCheckpoint:
    """The model that embeds queries: `ckpt` or the recorded one, refused if it is not the one that built the
    index (SHA-256) unless `allow_changed_model`."""
    from agw_light.search.gallery import checkpoint_mismatch

    ckpt = ckpt or record.get("checkpoint")
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
