"""Atomic file writes, folder locks and content hashes: what a user keeps appears whole under its final name or
not at all, and one run at a time writes into a folder.

Every output a user keeps (checkpoints, metrics.json, error.txt, results.md/csv, plots, ranked lists) goes
through here, so an interrupted run never leaves half a file in place of a good one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

# write_atomic's temp files: ".<final name>.<12 hex digits>.tmp" beside the final file.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Calls `write` on a temp file beside `path`, flushes it to disk, then renames it over `path`.

    The temp file lives in the target folder, so the rename never crosses a filesystem (a cross-device move
    copies and can be cut short). The data is fsynced before the rename and the folder after it, so a crash
    or power loss leaves the old file or the new one, never a truncated one. On any failure (full disk,
    interrupt) the temp file is removed and the previous file stays. The temp file is opened with mode 0o666
    (less the umask), not mkstemp's owner-only 0o600, so shared results stay readable as ordinary files are.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def fsync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable (the folder entry is what a crash would otherwise lose)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems (e.g. a few network mounts) refuse fsync on a directory
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Removes write_atomic temp files a killed process left anywhere under `folder`; returns them.

    Only safe while the caller holds the folder's lock (`hold_folder_lock`): another writer's temp file is
    indistinguishable from a stale one.
    """
    stale = [path for path in Path(folder).rglob(".*.tmp") if _TEMP_NAME.match(path.name) and path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class FolderLocked(RuntimeError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def hold_folder_lock(folder: str | Path, name: str = ".lock") -> Iterator[Path]:
    """Holds an exclusive lock on `folder` (flock on `folder/name`) until the block ends or the process dies.

    A second holder fails at once with FolderLocked naming the folder and the holding process (pid, host,
    command, start time, which the holder writes into the lock file). The lock file is left in place: removing
    it would let a process that opened it before the removal lock a file nobody else sees.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / name
    fd = open_lock_file(lock_path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "it has not named itself yet"
            raise FolderLocked(f"{folder} is in use by another run ({holder}); lock file {lock_path}") from None
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.pwrite(fd, f"{holder}: {' '.join(sys.argv)}\n".encode(), 0)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def open_lock_file(path: Path, flags: int) -> int:
    """A descriptor of lock file `path` (created if missing), never through a symbolic link: a link planted in
    its place would make the lock holder truncate and overwrite whatever file it points to."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise OSError(
            error.errno, f"lock file {path} is a symbolic link; refusing to follow it (remove the link)"
        ) from None


def refuse_foreign_output(
    out: str | Path, inputs: Sequence[str | Path], kind: str, is_own: Callable[[Path], bool]
) -> Path:
    """`out` as a Path, once it is known that writing it loses nothing: it is none of the command's `inputs`
    (the same file by any path or link) and, if it exists, it is a file of the command's own `kind`
    (`is_own`), an earlier output that the user asked to replace.

    Raises:
        ValueError: `out` is an input, or an existing file or folder that is not of `kind`.
    """
    out = Path(out).expanduser()
    if not out.exists():
        return out
    for source in inputs:
        if Path(source).expanduser().exists() and os.path.samefile(out, Path(source).expanduser()):
            raise ValueError(
                f"out={out} is the input {source}: writing it would replace the input; choose another out="
            )
    if not out.is_file() or not is_own(out):
        raise ValueError(
            f"out={out} exists and is not {kind}; refusing to replace it (choose another out=, or move the file)"
        )
    return out


def is_json_object(path: Path) -> bool:
    """Whether `path` holds one JSON object (a metrics file), read as UTF-8."""
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def file_sha256(path: str | Path) -> str:
    """Content hash recorded beside results, so a changed checkpoint is caught rather than silently used."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
