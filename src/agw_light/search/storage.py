"""The on-disk format of an index: a versioned, checksummed folder written atomically.

A saved index is a folder with `manifest.json` and a data folder of `.npy` arrays. The manifest records
format, format_version, kind, count (the index's `ntotal`), has_metadata, the index's `settings()` (its
geometry: dim, bits, code_lengths, levels, candidates), the data folder's name, the size, SHA-256, dtype
and shape of every array file, and an optional JSON `record` of the caller's (what built the index: `search
build` stores its checkpoint there, so the model and the data it made are one atomic unit). Gallery metadata
travels as four arrays (`meta_*`): the UTF-8 bytes of all paths with their offsets, person ids and camera ids.

`save` writes the arrays into a temporary folder, renames it into place, then atomically replaces
`manifest.json`, which names the data folder: a reader sees the old index or the new one, never a mix, and
a failed save leaves the old one loadable. Two lock files in the folder (`fcntl.flock`, dropped by the OS
if the process dies) make this hold under concurrency: a save holds `.save.lock` exclusively from its
first write to its cleanup, so concurrent saves run one after another (the last one wins, each complete);
`load` holds `.read.lock` shared while it reads the manifest and the arrays, and a save deletes older data
folders only if it gets `.read.lock` exclusively at once; otherwise a reader may still be using them and a
later save removes them. A save never waits for readers.

This module knows no index class: an index provides `kind`, `ntotal`, `metadata`, `record`, `settings()`, `arrays()`
and `restore()` (the `Storable` protocol), and `load` is given the classes it may build, by kind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from agw_light.files import file_sha256, fsync_folder, open_lock_file
from agw_light.search.metadata import GalleryMetadata

FORMAT = "agw_light.search.index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAVE_LOCK = ".save.lock"
READ_LOCK = ".read.lock"
# What saves create in an index folder; anything else there is someone else's file.
# np.load parses each .npy header with ast.literal_eval, and CPython before 3.11.8 (gh-106905) can fail with
# "SystemError: AST constructor recursion depth mismatch" when threads parse at once: loads of one process
# read their arrays one at a time (a load is I/O and checksums, seconds at most, not a hot path).
_NPY_READ = threading.Lock()
_OWN_PREFIXES = ("data-", ".tmp-", f".{MANIFEST}.")
_OWN_NAMES = (MANIFEST, SAVE_LOCK, READ_LOCK)
# A manifest's entry for one array file: key -> JSON type.
_ENTRY_TYPES = {"file": str, "bytes": int, "sha256": str, "dtype": str, "shape": list}


class Storable(Protocol):
    """What `save` and `load` need from an index."""

    kind: ClassVar[str]
    metadata: GalleryMetadata | None
    record: dict[str, Any] | None

    @property
    def ntotal(self) -> int: ...

    def settings(self) -> dict[str, Any]:
        """The JSON-able geometry that `restore` needs, stored as top-level manifest keys."""

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to save, by name."""

    @classmethod
    def restore(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> Storable:
        """The index (without metadata) described by a manifest and its loaded arrays."""


def save(index: Storable, directory: str | Path, record: Mapping[str, Any] | None = None) -> Path:
    """Writes `index` and `record` into `directory` (created if needed), replacing an index already there.

    `record` (None or a JSON-able dict) becomes `index.record` once saved, as `load` restores it. Concurrent
    saves into one folder run one after another.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: exists and is not a directory; cannot save an index there")
    if directory.is_dir() and not (directory / MANIFEST).is_file():
        foreign = sorted(p.name for p in directory.iterdir() if not _is_own(p.name))
        if foreign:
            raise FileExistsError(
                f"{directory}: holds {foreign[:3]} and no {MANIFEST}; refusing to write an index over other files"
            )
    record = _checked_record(record, "record")
    arrays = index.arrays()
    if index.metadata is not None:
        arrays.update(_metadata_arrays(index.metadata))
    directory.mkdir(parents=True, exist_ok=True)
    with _flock(directory / SAVE_LOCK, fcntl.LOCK_EX):
        token = uuid.uuid4().hex[:12]
        data_dir = f"data-{token}"
        files = _write_data(directory, data_dir, arrays)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": index.kind,
            "count": index.ntotal,
            "has_metadata": index.metadata is not None,
            **index.settings(),
            "data_dir": data_dir,
            "files": files,
            "record": record,
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
        fsync_folder(directory)
        _remove_leftovers(directory, keep=data_dir)
    index.record = record
    return directory


def load(directory: str | Path, kinds: Mapping[str, type[Storable]], expected: type[Storable] | None = None) -> Any:
    """The index saved in `directory`, restored by `kinds[its kind]`, or by `expected` if it holds that kind.

    A missing, truncated, corrupted or foreign file is an error that names the file. The read holds the
    folder's read lock, so a concurrent save cannot delete the data folder under it.
    """
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not found (expected an index folder written by save())")
    with _flock(manifest_path.parent / READ_LOCK, fcntl.LOCK_SH, read_only_ok=True):
        manifest = _read_manifest(manifest_path)
        index = _restore(manifest_path, manifest, kinds, expected)
    index.record = _checked_record(manifest.get("record"), f"{manifest_path}: record")
    return index


def _restore(
    manifest_path: Path, manifest: dict[str, Any], kinds: Mapping[str, type[Storable]], expected: type[Storable] | None
) -> Any:
    kind = manifest["kind"]
    if expected is not None and kind != expected.kind:
        raise ValueError(
            f"{manifest_path}: holds a {kind!r} index, expected {expected.kind!r} "
            f"(load it with {kinds[kind].__name__}.load or agw_light.search.load_index)"
            if kind in kinds
            else f"{manifest_path}: unknown index kind {kind!r}, expected {expected.kind!r}"
        )
    if expected is None and kind not in kinds:
        raise ValueError(f"{manifest_path}: unknown index kind {kind!r}, expected one of {sorted(kinds)}")
    try:
        return _load_arrays_and_restore(expected or kinds[kind], manifest_path, manifest)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path}: malformed manifest ({type(error).__name__}: {error})") from error


def check_array(array: np.ndarray, name: str, dtype: Any, shape: tuple[int | None, ...]) -> None:
    """Raises unless a loaded array has `dtype` and `shape` (None: any length on that axis)."""
    fits = array.ndim == len(shape) and all(
        want is None or got == want for got, want in zip(array.shape, shape, strict=False)
    )
    if array.dtype != dtype or not fits:
        expected = tuple("N" if want is None else want for want in shape)
        raise ValueError(
            f"array {name!r} must be {np.dtype(dtype)} of shape {expected}, got {array.dtype} {array.shape}"
        )


def _is_own(name: str) -> bool:
    return name in _OWN_NAMES or name.startswith(_OWN_PREFIXES)


def _checked_record(record: Any, what: str) -> dict[str, Any] | None:
    """A copy of `record` (None, or a JSON object), so that the manifest can hold it; else a ValueError."""
    if record is None:
        return None
    try:
        if not isinstance(record, Mapping):
            raise TypeError(f"expected a JSON object, got {type(record).__name__}")
        return json.loads(json.dumps(dict(record), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: must be None or a JSON-able dict ({error})") from error


@contextlib.contextmanager
def _flock(path: Path, operation: int, read_only_ok: bool = False) -> Iterator[bool]:
    """Holds `fcntl.flock(operation)` on `path` (created if missing) and says whether it got it.

    Only a non-blocking request (LOCK_NB) can be refused. The lock belongs to this open file, so threads
    exclude each other as processes do, and the OS drops it when the process dies. With `read_only_ok`, a
    folder this process may not write, holding no lock file yet, is read unlocked: no save has run there
    since saves began to lock.
    """
    try:
        descriptor = open_lock_file(path, os.O_RDONLY)
    except OSError as error:
        if not (read_only_ok and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
            raise
        yield True
        return
    try:
        try:
            fcntl.flock(descriptor, operation)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(descriptor)  # releases the lock


def _write_data(directory: Path, data_dir: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Writes `arrays` into a temporary folder, renamed to `directory / data_dir` once complete; their entries."""
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        files = {name: _write_array(staging / f"{name}.npy", array) for name, array in arrays.items()}
        fsync_folder(staging)
        os.rename(staging, directory / data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files


def _remove_leftovers(directory: Path, keep: str) -> None:
    """Removes what interrupted saves left, and older data folders unless a reader may still be using them.

    Runs under the save lock, so no other save is writing here.
    """
    for path in directory.iterdir():
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path)
        elif path.name.startswith(f".{MANIFEST}."):
            path.unlink()
    with _flock(directory / READ_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB) as no_readers:
        if no_readers:
            for path in directory.iterdir():
                if path.name.startswith("data-") and path.name != keep:
                    shutil.rmtree(path)


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
        "sha256": file_sha256(path),
        "dtype": array.dtype.str,
        "shape": list(array.shape),
    }


def _read_manifest(manifest_path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path}: not valid JSON ({error}); the manifest is corrupted") from error
    except RecursionError:
        raise ValueError(f"{manifest_path}: JSON nested too deeply; the manifest is corrupted") from None
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
    if not isinstance(manifest["files"], dict) or not all(isinstance(e, dict) for e in manifest["files"].values()):
        raise ValueError(f"{manifest_path}: 'files' must map each array name to its entry (an object)")
    for name, entry in manifest["files"].items():
        for key, kind in _ENTRY_TYPES.items():
            if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                raise ValueError(
                    f"{manifest_path}: files.{name}.{key} is {entry.get(key)!r}; expected a {kind.__name__}"
                )
        if entry["bytes"] < 0 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry["shape"]
        ):
            raise ValueError(f"{manifest_path}: files.{name}: negative size or shape {entry['shape']!r}")
    return manifest


def confined(folder: Path, name: Any, what: str) -> Path:
    """`folder / name`, where `name` must be a plain file name whose file, links followed, lies in `folder`.

    A manifest names its data folder and array files; a crafted one (`../../etc`, an absolute path, a
    symbolic link out of the folder) must not make a load read outside the index folder.
    """
    plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    path = folder / name if plain else None
    if path is None or not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(
            f"{what} {name!r} is not a file name inside {folder} (a manifest names files of its own folder)"
        )
    return path


def _load_arrays_and_restore(cls: type[Storable], manifest_path: Path, manifest: dict[str, Any]) -> Any:
    data_dir = confined(manifest_path.parent, manifest["data_dir"], f"{manifest_path}: data_dir")
    arrays = {}
    for name, entry in manifest["files"].items():
        path = confined(data_dir, entry["file"], f"{manifest_path}: files.{name}.file")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (listed in {manifest_path})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(
                f"{path}: {size} bytes, expected {entry['bytes']} as {manifest_path} records (truncated or replaced)"
            )
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise ValueError(
                f"{path}: checksum mismatch (sha256 {digest}, {manifest_path} records {entry['sha256']}); "
                "the file is corrupted"
            )
        _check_npy_header(path, entry, manifest_path)
        with _NPY_READ:
            arrays[name] = np.load(path, allow_pickle=False)
    try:
        index = cls.restore(manifest, arrays)
    except ValueError as error:
        raise ValueError(f"{manifest_path}: does not describe a valid {cls.kind!r} index: {error}") from error
    if index.ntotal != manifest["count"]:
        raise ValueError(f"{manifest_path}: records {manifest['count']} items but the arrays hold {index.ntotal}")
    if manifest["has_metadata"]:
        index.metadata = _metadata_from_arrays(arrays, manifest_path)
        if len(index.metadata) != index.ntotal:
            raise ValueError(f"{manifest_path}: metadata has {len(index.metadata)} items for {index.ntotal} codes")
    return index


def _check_npy_header(path: Path, entry: dict[str, Any], manifest_path: Path) -> None:
    """Raises unless the .npy header declares the dtype and shape the manifest records, and exactly the bytes
    the file holds: a header declaring 10^12 rows must not make np.load allocate them."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(handle)
        except (ValueError, SyntaxError, TypeError) as error:
            raise ValueError(f"{path}: not a readable .npy file ({error})") from error
        offset = handle.tell()
    expected = offset + dtype.itemsize * int(np.prod(shape, dtype=object))
    if dtype.hasobject or dtype.str != entry["dtype"] or list(shape) != entry["shape"] or expected != entry["bytes"]:
        raise ValueError(
            f"{path}: its header declares {dtype.str} {list(shape)} ({expected} bytes), but {manifest_path} records "
            f"{entry['dtype']} {entry['shape']} in {entry['bytes']} bytes"
        )
