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
below 0. Checkpoints are read with `weights_only=True`: a file holding code is refused, the code never runs. A query
may filter the gallery: only some cameras, only images taken in a time window (Milvus), not the query's own camera
(`agw_light.search.filters`).

With `backend="milvus"` the gallery is a Milvus collection (`uri`: a Milvus Lite file or a server address,
`collection`, `token`) instead of a folder, with the same record and the same result format (`index` is then
the item's Milvus id). Such a gallery is live: `add_to_gallery` embeds more images with the recorded model
(another model is refused, naming both), `delete_from_gallery` removes items by id or path. Each image's
timestamp is its file's modification time unless given.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agw_light.checks import is_integer, is_number, positive_int
from agw_light.protocol import DEFAULT_TARGET_RECALL

if TYPE_CHECKING:
    import numpy as np

    from agw_light.inference.checkpoint import LoadedCheckpoint
    from agw_light.search import GalleryMetadata
    from agw_light.search.index import GalleryIndex


class GalleryIndexError(ValueError):
    """A request the index or its model cannot answer, with what to do instead (the command prints it)."""


@contextmanager
def _refusals() -> Iterator[None]:
    """The gallery's refusals (unreachable server, unknown collection or item, another model, a failed write)
    as GalleryIndexError, whose one line the commands print."""
    try:
        yield
    except (ConnectionError, LookupError, ValueError, RuntimeError, FileNotFoundError, FileExistsError) as error:
        if isinstance(error, GalleryIndexError):
            raise
        raise GalleryIndexError(str(error)) from error


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


def labelled_images(
    location: Path, layout: str, *, camera_pattern: str | None = None, list_file: str | None = None
) -> list[tuple[str, int, int | None]]:
    """(path, pid, camera) of the images at `location` as the datasets' parsers read its layout
    (`agw_light.data.datasets.read_image_folder`); a note on stderr when no layout labels them."""
    from agw_light.data.datasets import read_image_folder

    read, samples = read_image_folder(location, layout, camera_pattern=camera_pattern, list_file=list_file)
    if read == "none":
        print(
            f"note: the names under {location} follow no layout agw_light knows: pids and cameras are recorded as "
            "-1 (pass layout=image_folders [camera_pattern=...] or layout=image_list list_file=...)",
            file=sys.stderr,
        )
    return samples


def gallery_metadata(paths: Sequence[Path], samples: Sequence[tuple[str, int, int | None]]) -> GalleryMetadata:
    """Paths, pids and cameras of embedded gallery images (-1 where the layout gives none)."""
    from agw_light.search import GalleryMetadata

    return GalleryMetadata(
        [str(path) for path in paths],
        [pid for _, pid, _ in samples],
        [-1 if camid is None else camid for _, _, camid in samples],
    )


def query_camera_ids(paths: Sequence[Path]) -> list[int]:
    """Each query image's camera, read from its Market/Duke-style name by the datasets' parser (exclude_own_camera
    needs it); a name without one is a GalleryIndexError naming it."""
    from agw_light.data.datasets import read_image_folder

    cameras = []
    for path in paths:
        try:
            _, ((_, _, camera),) = read_image_folder(path, "market")
        except ValueError as error:
            raise GalleryIndexError(f"exclude_own_camera=true: {path} names no camera ({error})") from error
        cameras.append(camera)
    return cameras


def file_times(paths: Sequence[Path]) -> list[float]:
    """When each image was taken, as far as a file tells: its modification time (seconds since the epoch)."""
    return [Path(path).stat().st_mtime for path in paths]


def milvus_index_settings(
    indexes: Mapping[str, Any] | None, uri: str, code_lengths: Sequence[int] | None
) -> dict[str, Any] | None:
    """The vector index of a new collection: `indexes[server kind][binary | float]` (conf/search/build.yaml's
    `milvus_index`), or None for the library's `DEFAULT_INDEXES`."""
    from agw_light.search.milvus import server_kind

    if indexes is None:
        return None
    kind, rows = server_kind(uri), "binary" if code_lengths else "float"
    try:
        return dict(indexes[kind][rows])
    except (KeyError, TypeError):
        raise GalleryIndexError(
            f"milvus_index has no {kind}.{rows} entry (index_type, params, search_params)"
        ) from None


def build_gallery_index(
    ckpt: str | Path,
    gallery: str | Path,
    out: str | Path | None = None,
    *,
    backend: str = "in_process",
    uri: str | None = None,
    collection: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    milvus_index: Mapping[str, Any] | None = None,
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
) -> tuple[Path | str, GalleryIndex]:
    """Embeds every image under `gallery` with the checkpoint's model and saves the index into `out` (or a new
    Milvus collection), with the pid and camera of each image as the gallery's layout gives them.

    Args:
        ckpt: the training checkpoint whose model embeds the gallery (recorded in the index).
        gallery: an image folder (searched recursively) or one image.
        out: the index folder to write (backend "in_process").
        backend: "in_process" (a folder) or "milvus" (a new collection `collection` at `uri`, `token` for a
            secured server, `timeout` seconds to reach it; `milvus_index` the vector index per server kind,
            see `milvus_index_settings`).
        layout, camera_pattern, list_file: how pids and cameras are read
            (`agw_light.data.datasets.read_image_folder`: auto, market, image_folders, image_list or none).
        device: where to embed (auto | cpu | cuda | cuda:N).
        batch_size: images embedded at once.
        height, width: the image size; None: the one the checkpoint records.
        fit_queries: gallery codes sampled as queries to fit the coarse-to-fine candidate counts.
        target_recall: the recall of the exact search those counts must keep.
        seed: draws that sample.

    Returns:
        Where the gallery is (the index folder, or the collection's name) and its index (close a Milvus one).
    """
    import numpy as np

    from agw_light.search import build_index
    from agw_light.search.gallery import BACKENDS, milvus_name, model_record

    if backend not in BACKENDS:
        raise GalleryIndexError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "in_process" and out is None:
        raise GalleryIndexError("backend=in_process needs out=<index dir> (or backend=milvus uri=... collection=...)")
    if backend == "milvus" and not (uri and collection):
        raise GalleryIndexError("backend=milvus needs uri=<gallery.db | http://host:19530> and collection=<name>")
    check_size(height, width)
    positive_int(batch_size, "batch_size")
    positive_int(fit_queries, "fit_queries")
    if not is_number(target_recall) or not 0 < target_recall <= 1:
        raise GalleryIndexError(f"target_recall={target_recall!r}: expected a number in (0, 1]")
    if not is_integer(seed):
        raise GalleryIndexError(f"seed={seed!r}: expected an integer")
    gallery = Path(gallery).expanduser().resolve()  # absolute paths: a query may run elsewhere
    samples = labelled_images(gallery, layout, camera_pattern=camera_pattern, list_file=list_file)
    loaded = load_model(ckpt)
    size = image_size(loaded, height, width)
    record = model_record(loaded.path, loaded.sha256, size)
    paths, features = embed_images(loaded, [path for path, _, _ in samples], size, batch_size=batch_size, device=device)
    metadata = gallery_metadata(paths, samples)
    sample = np.random.default_rng(seed).permutation(len(paths))[:fit_queries]
    code_lengths = loaded.network.code_lengths
    if backend == "milvus":
        from agw_light.search.milvus import build_milvus_index

        with _refusals():
            index = build_milvus_index(
                features,
                code_lengths,
                uri=uri,
                collection=collection,
                metadata=metadata,
                timestamps=file_times(paths),
                fit_queries=features[np.sort(sample)],
                target_recall=target_recall,
                record=record,
                index=milvus_index_settings(milvus_index, uri, code_lengths),
                token=token,
                timeout=timeout,
            )
        return milvus_name(uri, collection), index
    index = build_index(
        features, code_lengths, metadata=metadata, fit_queries=features[np.sort(sample)], target_recall=target_recall
    )
    return Path(index.save(out, record=record)), index


def query_gallery_index(
    index_dir: str | Path | None,
    image: str | Path,
    *,
    backend: str = "in_process",
    uri: str | None = None,
    collection: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    topk: int = 10,
    ckpt: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 128,
    height: int | None = None,
    width: int | None = None,
    allow_changed_model: bool = False,
    max_distance: float | None = None,
    cameras: Sequence[int] | None = None,
    since: float | None = None,
    until: float | None = None,
    exclude_own_camera: bool = False,
) -> list[dict[str, Any]]:
    """The ranked gallery of each query image: [{"query", "results": [{rank, index, distance, path}]}].

    Args:
        index_dir: a folder written by `build_gallery_index` (backend "in_process").
        image: one query image, or a folder of them.
        backend, uri, collection, token, timeout: as for `build_gallery_index`; `index` in the results is
            then the item's Milvus id.
        topk: hits per query.
        ckpt: the model that embeds the queries; None: the one the index records.
        device, batch_size: as for `build_gallery_index`.
        height, width: the image size; None: the one the index (else the checkpoint) records.
        allow_changed_model: query with a checkpoint whose SHA-256 differs from the recorded one (warned).
        max_distance: list only hits at distance <= max_distance (1 - cosine, or Hamming bits).
        cameras: list only gallery items of these cameras.
        since, until: list only items taken in [since, until] (seconds since the epoch; Milvus galleries).
        exclude_own_camera: leave out the items of each query's own camera (read from its Market/Duke-style
            file name, as evaluation leaves them out).

    Returns:
        One ranked list per query image, nearest first.
    """
    from agw_light.search.filters import filtered_search
    from agw_light.search.gallery import check_no_legacy_record, open_gallery, ranked_lists, read_record
    from agw_light.search.index import within_distance

    positive_int(topk, "topk")
    positive_int(batch_size, "batch_size")
    check_size(height, width)
    check_max_distance(max_distance)
    with _refusals():
        index, where = open_gallery(
            backend, index_dir=index_dir, uri=uri, collection=collection, token=token, timeout=timeout
        )
    try:
        if index.backend == "in_process":
            with _refusals():
                check_no_legacy_record(index, index_dir)
        record = read_record(index.record)
        loaded = _query_model(where, record, ckpt, allow_changed_model)
        if index.backend == "milvus":
            with _refusals():
                index.check({"code_lengths": list(loaded.network.code_lengths or [])})
        if record.get("image_size") and not (height or width):
            height, width = record["image_size"]
        size = image_size(loaded, height, width)
        paths, features = embed_images(loaded, image, size, batch_size=batch_size, device=device)
        query_cameras = None
        if exclude_own_camera:
            query_cameras = query_camera_ids(paths)
        filters = {"cameras": cameras, "since": since, "until": until, "query_cameras": query_cameras}
        try:
            distances, indices = filtered_search(index, features, int(topk), **filters)
        except ValueError as error:
            raise GalleryIndexError(str(error)) from error
        if max_distance is not None:
            try:
                distances, indices = within_distance(distances, indices, max_distance)
            except ValueError as error:
                raise GalleryIndexError(f"max_distance={max_distance!r}: {error}") from error
        return ranked_lists(paths, distances, indices, _item_paths(index, indices))
    finally:
        index.close()


def _item_paths(index: GalleryIndex, indices: np.ndarray) -> dict[int, str] | None:
    """Image path of each returned item (by position or Milvus id); None when the index holds no paths."""
    import numpy as np

    found = np.unique(indices[indices >= 0])
    if index.backend == "in_process" and index.metadata is None:
        return None
    return dict(zip(found.tolist(), index.items(found).paths, strict=True))


def add_to_gallery(
    image: str | Path,
    *,
    uri: str,
    collection: str,
    token: str | None = None,
    timeout: float = 10.0,
    ckpt: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 128,
    timestamp: float | None = None,
) -> tuple[np.ndarray, list[Path]]:
    """Embeds images with the model a Milvus gallery records and adds them to it.

    Args:
        image: one image file, or a folder of them (searched recursively).
        uri, collection, token, timeout: the gallery (a collection written by
            `build_gallery_index(backend="milvus")`) and how to reach it.
        ckpt: the model that embeds them; None: the one the collection records. A model other than the
            recorded one (SHA-256) or of another code length is refused, naming both.
        device, batch_size: as for `build_gallery_index`.
        timestamp: when the images were taken (seconds since the epoch); None: each file's modification time.

    Returns:
        The new items' ids and their image paths, in the same order.
    """
    from agw_light.search.gallery import open_gallery, read_record

    with _refusals():
        index, where = open_gallery("milvus", uri=uri, collection=collection, token=token, timeout=timeout)
    try:
        record = read_record(index.record)
        ckpt = ckpt or record.get("checkpoint")
        if ckpt is None:
            raise GalleryIndexError(f"{where} records no model: pass ckpt=<the checkpoint that built it>")
        loaded = load_model(ckpt)
        with _refusals():
            index.check({"checkpoint_sha256": loaded.sha256, "code_lengths": list(loaded.network.code_lengths or [])})
        size = image_size(loaded, *(record.get("image_size") or (None, None)))
        samples = labelled_images(Path(image).expanduser().resolve(), "auto")
        paths, outputs = embed_images(
            loaded, [path for path, _, _ in samples], size, batch_size=batch_size, device=device
        )
        times = file_times(paths) if timestamp is None else [float(timestamp)] * len(paths)
        with _refusals():
            ids = index.add(outputs, gallery_metadata(paths, samples), timestamps=times)
        return ids, paths
    finally:
        index.close()


def delete_from_gallery(
    *,
    uri: str,
    collection: str,
    token: str | None = None,
    timeout: float = 10.0,
    ids: Sequence[int] | None = None,
    paths: Sequence[str | Path] | None = None,
) -> np.ndarray:
    """Deletes items of a Milvus gallery by id or by image path (absolute, as `build` and `add` store them);
    an unknown id or path deletes nothing and is named in the GalleryIndexError. Returns the deleted ids."""
    from agw_light.search.gallery import open_gallery

    if (ids is None) == (paths is None):
        raise GalleryIndexError("delete takes ids=[...] or paths=[...] (one of them)")
    with _refusals():
        index, _ = open_gallery("milvus", uri=uri, collection=collection, token=token, timeout=timeout)
        try:
            if paths is not None:
                return index.delete(paths=[str(Path(path).expanduser().absolute()) for path in paths])
            return index.delete(ids)
        finally:
            index.close()


def _query_model(
    index_dir: str, record: dict[str, Any], ckpt: str | Path | None, allow_changed_model: bool
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
