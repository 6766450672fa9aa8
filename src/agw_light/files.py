"""Atomic file writes and content hashes: what a user keeps appears whole under its final name or not at all.

Every output a user keeps (metrics.json, error.txt, results.md/csv, plots, ranked lists) goes through here, so
an interrupted run never leaves half a file in place of a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Calls `write` on a temp file beside `path`, then renames it over `path`.

    The temp file is opened with mode 0o666 (less the umask), not mkstemp's owner-only 0o600, so shared
    results stay readable as ordinary files are.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
