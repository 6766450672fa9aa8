"""Generic layouts for a dataset of one's own: list files, or a folder per identity.

Both return split -> [(absolute image path, pid, camid or None)]; `ReIDDataset.from_samples` turns that into
a dataset (training pids relabelled, a camera of its own for every image without a camera id). Every bad
line or file is an error naming the file (and line) and what was expected, found before any training.

List files (`read_image_lists`), one per split, each line ``<path> <pid> [<camid>]``:

* pid and the optional camid are the last whitespace-separated fields and the path is the rest of the line,
  so a path may hold spaces; the path is relative to the root (or absolute), pid and camid are non-negative
  integers in ASCII digits below 2^63; a list that is not UTF-8 is an error naming its line;
* a line whose first non-blank character is ``#`` is a comment, blank lines are skipped (a ``#`` later in
  a line is part of it: file names may hold one);
* either every line of every list has a camid or none has;
* every listed image must exist; an image listed twice in one split is an error, and so is an image whose
  pid differs between the query and gallery lists (listing a query image in the gallery too is fine).

One list file alone (`read_image_list`) follows the rules of one split: what a gallery index reads its labels
from.

A folder per identity (`scan_identity_folders`; one split folder alone: `scan_identity_folder`):
``<root>/<split>/<pid>/<image>``, pid folders named by non-negative integers; the camera comes from an optional
regular expression with one group of digits searched in the file name (e.g. ``c(\\d+)``). Files that are not
images (by extension) are skipped, hidden entries (``.name``) too; a file directly in a split folder is an
error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from agw_light.images import IMAGE_SUFFIXES

# (path, pid, camid or None: no camera id known).
LayoutSample = tuple[str, int, int | None]

SPLITS = ("train", "query", "gallery")
LIST_LINE_TEXT = "'<path> <pid> [<camid>]': a path (spaces allowed), then non-negative integers"
NON_NEGATIVE_INTEGER = re.compile(r"[0-9]+")  # ASCII digits: `\d` would take any script's digits
MAX_ID = 2**63 - 1


def _dataset_root(root: str | Path, layout: str, expected: str) -> str:
    path = os.path.abspath(Path(root).expanduser())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{layout} root {path!r} does not exist or is not a folder; expected {expected}")
    return path


def checked_id(value: str, name: str, where: str, expected: str = LIST_LINE_TEXT) -> int:
    """`value` as an id: ASCII digits only (not `١٢`) and within a 64-bit integer, where tensors hold ids."""
    if not NON_NEGATIVE_INTEGER.fullmatch(value):
        raise ValueError(f"{where}: {name} {value!r} is not a non-negative integer; expected {expected}")
    number = int(value)
    if number > MAX_ID:
        raise ValueError(f"{where}: {name} {value} is larger than {MAX_ID}, the largest id a 64-bit integer holds")
    return number


def _decoded_lines(list_path: str) -> list[str]:
    """The list file's lines, or a ValueError naming the file and the line that is not UTF-8."""
    with open(list_path, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8-sig").splitlines()  # a BOM (some editors write one) is not part of the path
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{list_path}, line {line}: byte {data[error.start]:#04x} is not UTF-8 text; save the list as UTF-8"
        ) from None


def _parse_line(text: str, root: str, where: str) -> LayoutSample:
    """One data line, read from the right: pid and optional camid are the last fields, the path (which may
    hold spaces) is the rest. When both readings name an existing file the line is ambiguous: an error."""
    fields = text.rsplit(maxsplit=2)
    if len(fields) < 2:
        raise ValueError(f"{where}: no pid in {text!r}; expected {LIST_LINE_TEXT}")
    readings = [(fields[0], fields[1], fields[2])] if len(fields) == 3 else []
    path, pid = text.rsplit(maxsplit=1)
    readings.append((path, pid, None))
    existing = [reading for reading in readings if os.path.isfile(os.path.join(root, reading[0]))]
    if len(existing) > 1:
        raise ValueError(
            f"{where}: {text!r} reads as image {existing[0][0]!r} with a camid and as image {existing[1][0]!r} "
            "without one, and both exist; rename one of them"
        )
    path, pid, camid = existing[0] if existing else readings[0]
    sample = (
        os.path.normpath(os.path.join(root, path)),
        checked_id(pid, "pid", where),
        None if camid is None else checked_id(camid, "camid", where),
    )
    if not existing:
        raise FileNotFoundError(
            f"{where}: image {sample[0]!r} does not exist (paths are relative to the root {root!r})"
        )
    return sample


def _read_list(list_path: str, root: str) -> list[tuple[int, LayoutSample]]:
    """(line number, sample) of every data line of one list file."""
    rows = []
    for line_number, line in enumerate(_decoded_lines(list_path), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            rows.append((line_number, _parse_line(text, root, f"{list_path}, line {line_number}")))
    return rows


def read_image_lists(
    root: str | Path, *, train: str = "train.txt", query: str = "query.txt", gallery: str = "gallery.txt"
) -> dict[str, list[LayoutSample]]:
    """The three list files (relative to `root`, or absolute) as split -> samples; see the module docstring."""
    files = {"train": train, "query": query, "gallery": gallery}
    expected = "a folder holding the list files " + ", ".join(files.values())
    root = _dataset_root(root, "image_list", expected)
    splits: dict[str, list[LayoutSample]] = {}
    first_line: dict[bool, str] = {}  # has a camid -> where the first such line is
    seen: dict[str, dict[str, tuple[str, int]]] = {}  # split -> image -> (where, pid)
    for split, name in files.items():
        images = seen.setdefault(split, {})
        splits[split] = _checked_list(root, name, split, expected, first_line, images)
        if split == "gallery":
            for image, (where, pid) in images.items():
                if image in seen["query"] and seen["query"][image][1] != pid:
                    other, other_pid = seen["query"][image]
                    raise ValueError(f"{where}: image {image!r} has pid {pid}, but pid {other_pid} at {other}")
    return splits


def read_image_list(root: str | Path, list_file: str) -> list[LayoutSample]:
    """One list file (relative to `root`, or absolute) with the rules of one split of `read_image_lists`:
    ``<path> <pid> [<camid>]`` per line, paths relative to `root`, a camid on every line or on none, no image
    listed twice. What `python -m agw_light.search build layout=image_list` reads a gallery's labels from."""
    expected = f"a folder holding the list file {list_file}"
    return _checked_list(_dataset_root(root, "image_list", expected), list_file, "gallery", expected, {}, {})


def _checked_list(
    root: str,
    name: str,
    split: str,
    expected: str,
    first_line: dict[bool, str],
    images: dict[str, tuple[str, int]],
) -> list[LayoutSample]:
    """The samples of one list file, each line checked; `first_line` (has a camid -> where first seen) and
    `images` (image -> (where, pid)) carry what the lists read before it held, and gain this one's."""
    list_path = os.path.join(root, name)
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"image_list {split} list {list_path!r} does not exist; expected {expected}")
    rows = _read_list(list_path, root)
    if not rows:
        raise ValueError(f"{list_path}: lists no image; expected lines {LIST_LINE_TEXT}")
    for line_number, (image, pid, camid) in rows:
        where = f"{list_path}, line {line_number}"
        first_line.setdefault(camid is not None, where)
        if len(first_line) > 1:
            has, lacks = first_line[True], first_line[False]
            raise ValueError(
                f"{where}: mixes lines with and without a camid ({has} has one, {lacks} has none); give every "
                "line of every list a camid, or none"
            )
        if image in images:
            raise ValueError(
                f"{where}: image {image!r} is listed twice in the {split} list (first at {images[image][0]})"
            )
        images[image] = (where, pid)
    return [sample for _, sample in rows]


def _camera_regex(camera_pattern: str) -> re.Pattern[str]:
    try:
        regex = re.compile(camera_pattern)
    except re.error as error:
        raise ValueError(f"camera_pattern {camera_pattern!r} is not a regular expression: {error}") from error
    if regex.groups != 1:
        raise ValueError(
            f"camera_pattern {camera_pattern!r} has {regex.groups} groups; expected exactly one, around the camera "
            r"number (e.g. 'c(\d+)')"
        )
    return regex


def _camera(regex: re.Pattern[str], image: str) -> int:
    match = regex.search(os.path.basename(image))
    if match is None or match[1] is None or not NON_NEGATIVE_INTEGER.fullmatch(match[1]):
        found = "no match" if match is None else f"group {match[1]!r}"
        raise ValueError(
            f"image {image!r}: camera_pattern {regex.pattern!r} finds {found} in the file name; expected its group "
            "to match the camera number (a non-negative integer)"
        )
    return checked_id(match[1], "camera", f"image {image!r}", "a non-negative integer")


def scan_identity_folders(
    root: str | Path,
    *,
    train: str = "train",
    query: str = "query",
    gallery: str = "gallery",
    camera_pattern: str | None = None,
) -> dict[str, list[LayoutSample]]:
    """``<root>/<split>/<pid>/<image>`` as split -> samples (names sorted); see the module docstring."""
    folders = {"train": train, "query": query, "gallery": gallery}
    expected = (
        f"{', '.join(f + '/' for f in folders.values())} in it, each holding a folder per identity named by its pid"
    )
    root = _dataset_root(root, "image_folders", expected)
    regex = None if camera_pattern is None else _camera_regex(camera_pattern)
    splits: dict[str, list[LayoutSample]] = {}
    for split, folder in folders.items():
        split_dir = os.path.join(root, folder)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"image_folders {split} folder {split_dir!r} does not exist; expected {expected}")
        splits[split] = _scan_split_folder(split_dir, split, regex, expected)
    return splits


def scan_identity_folder(folder: str | Path, *, camera_pattern: str | None = None) -> list[LayoutSample]:
    """One split folder of `scan_identity_folders`, ``<folder>/<pid>/<image>``, as samples (names sorted), the
    camera read with `camera_pattern` (None: unknown). What `python -m agw_light.search build
    layout=image_folders` reads a gallery's labels from."""
    expected = "a folder per identity in it, named by its pid"
    regex = None if camera_pattern is None else _camera_regex(camera_pattern)
    return _scan_split_folder(_dataset_root(folder, "image_folders", expected), "gallery", regex, expected)


def _scan_split_folder(split_dir: str, split: str, regex: re.Pattern[str] | None, expected: str) -> list[LayoutSample]:
    samples: list[LayoutSample] = []
    for entry in sorted(os.scandir(split_dir), key=lambda entry: entry.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise ValueError(f"{entry.path!r} is a file in the {split} folder; expected only identity folders")
        if not NON_NEGATIVE_INTEGER.fullmatch(entry.name):
            raise ValueError(
                f"identity folder {entry.path!r}: {entry.name!r} is not a pid; expected a folder per identity "
                "named by its non-negative integer id"
            )
        for name in sorted(os.listdir(entry.path)):
            image = os.path.join(entry.path, name)
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES) or not os.path.isfile(image):
                continue
            pid = checked_id(entry.name, "pid", f"identity folder {entry.path!r}", "a folder named by its pid")
            samples.append((image, pid, None if regex is None else _camera(regex, image)))
    if not samples:
        raise ValueError(f"image_folders {split} folder {split_dir!r} holds no image; expected {expected}")
    return samples
