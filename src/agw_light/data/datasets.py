"""Re-id datasets as plain lists of (image path, pid, camid), parsed from the published folder layouts.

Only file names and list files are read -- no image is opened or stat'ed -- so even MSMT17's 126k images
parse in well under a second, and the result is the same on every run (names are sorted). `verify_images`
is the separate, opt-out check that every listed image decodes.

Conventions shared by every parser (those of torchreid and fast-reid, so numbers are comparable):

* Training pids are relabelled to 0..N-1 in the sorted order of the original pids, so they can index a
  classifier; query and gallery keep their original pids, which only need to compare equal.
* Camera ids are 0-based. An image without a camera id (a dataset of one's own may have none) gets a
  camera of its own: a negative id unique to its path (-1, -2, ...). The standard protocol, which drops the
  gallery images of the query's identity under the query's camera, then drops only the query's own image
  (where the gallery lists it too) and keeps every other image of its identity as a true match.
* Market-1501: pid -1 ("junk" detections) is dropped everywhere; pid 0 (distractors) stays in the gallery,
  where it makes retrieval harder, and is dropped from training, where it is not an identity.
"""

from __future__ import annotations

import importlib
import inspect
import operator
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agw_light.data.layouts import (
    MAX_ID,
    NON_NEGATIVE_INTEGER,
    LayoutSample,
    read_image_list,
    read_image_lists,
    scan_identity_folder,
    scan_identity_folders,
)
from agw_light.images import FORMATS_TEXT, IMAGE_FORMATS, list_image_files

Sample = tuple[str, int, int]

SPLITS = ("train", "query", "gallery")

MARKET_FOLDER = "Market-1501-v15.09.15"
DUKE_FOLDER = "DukeMTMC-reID"
# Market-1501 and DukeMTMC-reID share the split folder names.
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

MARKET_NAME = re.compile(r"(-1|\d+)_c(\d+)s\d+_\d+_\d+\.jpg", re.ASCII)
MARKET_NAME_TEXT = "'<pid>_c<camera>s<sequence>_<frame>_<box>.jpg' (e.g. '0002_c1s1_000451_03.jpg')"
DUKE_NAME = re.compile(r"(\d+)_c(\d+)_f\d+\.jpg", re.ASCII)
DUKE_NAME_TEXT = "'<pid>_c<camera>_f<frame>.jpg' (e.g. '0001_c2_f0046182.jpg')"
# Market-1501 layout pids (DukeMTMC-reID has neither): junk detections and distractor people.
JUNK_PID = -1
DISTRACTOR_PID = 0

# MSMT17 version folder -> (image folder of train+val lists, image folder of query+gallery lists).
MSMT_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
# Split -> list files, in order; training merges list_val into list_train as torchreid and fast-reid do.
MSMT_LISTS = {
    "train": ("list_train.txt", "list_val.txt"),
    "query": ("list_query.txt",),
    "gallery": ("list_gallery.txt",),
}
# One list line: '<folder>/<pid>_<index>_<camera>_<rest>.jpg <pid>'; groups: path, file-name pid, camera, label.
MSMT_LINE = re.compile(r"((?:\S*/)?(\d+)_\d+_(\d+)_[^\s/]*\.jpg)\s+(\d+)\s*", re.ASCII)
MSMT_LINE_TEXT = "'<folder>/<pid>_<index>_<camera>_<rest>.jpg <pid>' (e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0')"
MSMT_NUM_CAMS = 15
# Images per task of verify_images' thread pool.
VERIFY_BLOCK = 256


@dataclass(frozen=True)
class ReIDDataset:
    """One re-id benchmark: ``root`` is the folder the splits were read from.

    A combination of datasets (`combine_datasets`) lists them in ``parts``: it trains on all their training
    splits and tests on the first one's query and gallery.
    """

    name: str
    root: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    parts: tuple[ReIDDataset, ...] = field(default=(), compare=False)

    @classmethod
    def from_samples(
        cls,
        name: str,
        root: str | Path,
        train: Sequence[LayoutSample],
        query: Sequence[LayoutSample],
        gallery: Sequence[LayoutSample],
    ) -> ReIDDataset:
        """A dataset from (path, pid, camid or None) lists: what a parser of one's own returns.

        Training pids are relabelled 0..N-1 in sorted order (they index the classifier); query and gallery
        keep theirs. A camid of None (unknown) becomes a camera of the image's own, a negative id unique to
        its path, so the same file listed as query and in the gallery gets the same one (module docstring).
        """
        own_cameras: dict[str, int] = {}
        splits = {}
        for split, samples in (("train", train), ("query", query), ("gallery", gallery)):
            if not samples:
                raise ValueError(f"dataset {name!r}: the {split} split has no images")
            rows = []
            for position, sample in enumerate(samples):
                path, pid, camid = _checked_sample(name, split, position, sample)
                rows.append(
                    (path, pid, own_cameras.setdefault(path, -1 - len(own_cameras)) if camid is None else camid)
                )
            splits[split] = rows
        return cls(name, str(root), _relabel(splits["train"]), splits["query"], splits["gallery"])

    @property
    def num_train_pids(self) -> int:
        return len({pid for _, pid, _ in self.train})

    @property
    def num_cams(self) -> int:
        """Known cameras (an image without a camera id has a negative camid of its own and is not counted)."""
        return len({camid for split in SPLITS for _, _, camid in getattr(self, split) if camid >= 0})

    def statistics(self) -> dict[str, tuple[int, int, int]]:
        """Split -> (ids, images, known cameras): the numbers papers publish, to check a copy is complete."""
        stats = {}
        for split in SPLITS:
            samples = getattr(self, split)
            stats[split] = (
                len({pid for _, pid, _ in samples}),
                len(samples),
                len({camid for _, _, camid in samples if camid >= 0}),
            )
        return stats

    def summary(self) -> str:
        """A table of `statistics`; names the parts of a combination and the images without camera ids."""
        header = ("subset", "# ids", "# images", "# cameras")
        stats = self.statistics()
        rows = [
            (split, str(ids), str(images), str(cams) if cams else "none")
            for split, (ids, images, cams) in stats.items()
        ]
        widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            first, *numbers = cells
            return " | ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(numbers, widths[1:], strict=True)])

        title = f"Dataset {self.name} ({self.root})"
        if self.parts:
            title = (
                f"Dataset {self.name}: trains on the training splits of "
                + ", ".join(f"{part.name} ({part.root})" for part in self.parts)
                + f" (identity and camera labels offset per dataset); query and gallery of {self.parts[0].name}"
            )
        rule = "-+-".join("-" * width for width in widths)
        lines = [title, line(header), rule, *map(line, rows)]
        unknown = {split: sum(camid < 0 for _, _, camid in getattr(self, split)) for split in SPLITS}
        if any(unknown.values()):
            counts = ", ".join(f"{count} of {stats[split][1]} {split}" for split, count in unknown.items() if count)
            lines.append(
                f"no camera ids for {counts} images: each such image is its own camera, so evaluation drops only a "
                "query's own image from the gallery, never other images of its identity"
            )
        return "\n".join(lines)


def _checked_sample(dataset: str, split: str, position: int, sample: object) -> Sample | tuple[str, int, None]:
    """(path, pid, camid or None) with integer ids; anything else is an error naming the sample."""
    where = f"dataset {dataset!r}, {split} sample {position}"
    try:
        path, pid, camid = sample  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {sample!r} is not a (path, pid, camid) triple") from None
    expected = f"{where}: {sample!r} needs an integer pid and a camid >= 0 (None when unknown)"
    if isinstance(pid, bool) or isinstance(camid, bool):
        raise ValueError(expected)
    try:
        pid = operator.index(pid)
        camid = None if camid is None else operator.index(camid)
    except TypeError:
        raise ValueError(expected) from None
    if (camid is not None and camid < 0) or not -MAX_ID <= pid <= MAX_ID or (camid or 0) > MAX_ID:
        raise ValueError(f"{expected}, within a 64-bit integer")
    return os.fspath(path), pid, camid


class UnreadableImagesError(OSError):
    """Images that do not decode, all of them at once: `problems` holds (path, reason) in the order given."""

    def __init__(self, problems: list[tuple[str, str]], total: int, *, max_listed: int = 20) -> None:
        self.problems = problems
        lines = [f"  {path}: {reason}" for path, reason in problems[:max_listed]]
        if len(problems) > max_listed:
            lines.append(f"  ... and {len(problems) - max_listed} more")
        super().__init__(
            f"{len(problems)} of {total} images cannot be read (fix or remove them; for the generated set, delete "
            "its cache folder to draw it again):\n" + "\n".join(lines)
        )


def _image_problem(path: str) -> str | None:
    """Why the image cannot be decoded, or None. Opening alone parses only the header and passes a truncated
    JPEG, so the pixels are decoded too, at 1/8 scale (draft mode): the whole entropy-coded stream is still
    read, so truncation fails as it would in the loaders, for no more than a full decode costs."""
    from PIL import Image

    try:
        with Image.open(path, formats=list(IMAGE_FORMATS)) as image:
            image.draft(None, (1, 1))
            image.load()
    except Image.UnidentifiedImageError:
        return f"not an image of the formats read ({FORMATS_TEXT})"
    except Exception as error:  # any failure means the loaders would fail on this file later
        return f"{type(error).__name__}: {error}"
    return None


def verify_images(paths: Sequence[str], *, workers: int = 4) -> None:
    """Decodes every image in a thread pool; raises one `UnreadableImagesError` listing all that fail.

    Run before training, so a bad file is reported in seconds, not when the loaders first reach it (for a
    gallery image: the final evaluation, after all training). PIL releases the GIL while it decodes pixels,
    so threads overlap that part; parsing the header is Python and does not overlap.
    """
    if workers < 1:
        raise ValueError(f"verify_images needs workers >= 1, got {workers}")
    # Blocks of paths, not a task per image: MSMT17's 126k images would otherwise queue 126k futures at once.
    blocks = [paths[start : start + VERIFY_BLOCK] for start in range(0, len(paths), VERIFY_BLOCK)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(lambda block: [(path, _image_problem(path)) for path in block], blocks)
        problems = [(path, reason) for block in found for path, reason in block if reason is not None]
    if problems:
        raise UnreadableImagesError(problems, len(paths))


def _relabel(samples: list[Sample]) -> list[Sample]:
    labels = {pid: label for label, pid in enumerate(sorted({pid for _, pid, _ in samples}))}
    return [(path, labels[pid], camid) for path, pid, camid in samples]


def _check_root(root: str | Path, dataset: str, expected: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset} root {str(path)!r} does not exist or is not a folder; {expected}")
    return path


def _missing(folder: Path, folders: tuple[str, ...], files: tuple[str, ...] = ()) -> list[str]:
    return [f"{name}/" for name in folders if not (folder / name).is_dir()] + [
        name for name in files if not (folder / name).is_file()
    ]


def _locate_folder_layout(root: str | Path, dataset: str, folder: str) -> Path:
    """The dataset folder, whether ``root`` holds it or is it."""
    subfolders = tuple(SPLIT_FOLDERS.values())
    expected = (
        f"expected {folder}/ with sub-folders {', '.join(s + '/' for s in subfolders)} inside it "
        "(or those sub-folders directly in the root)"
    )
    path = _check_root(root, dataset, expected)
    for candidate in (path / folder, path):
        if not _missing(candidate, subfolders):
            return candidate
    if (path / folder).is_dir():
        missing = ", ".join(_missing(path / folder, subfolders))
        raise FileNotFoundError(f"{dataset} folder {str(path / folder)!r} lacks {missing}; {expected}")
    raise FileNotFoundError(f"{str(path)!r} is not a {dataset} root: {expected}")


def _scan_split(split_dir: str, pattern: re.Pattern[str], pattern_text: str, num_cams: int | None) -> list[Sample]:
    """Every .jpg in the folder (other files, e.g. Windows' Thumbs.db, are not images and are skipped)."""
    names = sorted(entry.name for entry in os.scandir(split_dir) if entry.name.endswith(".jpg"))
    return [
        (path, *_name_labels(path, ((pattern, num_cams),), pattern_text))
        for path in (f"{split_dir}{os.sep}{name}" for name in names)
    ]


def _name_labels(path: str, patterns: Sequence[tuple[re.Pattern[str], int | None]], expected: str) -> tuple[int, int]:
    """(pid, 0-based camera) of a file name matching one of `patterns` (each with its camera count, None: any
    number), else a ValueError naming the file and the `expected` form."""
    name = os.path.basename(path)
    for pattern, num_cams in patterns:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        camera = int(match[2])
        if camera < 1 or (num_cams is not None and camera > num_cams):
            limit = f"1..{num_cams}" if num_cams is not None else ">= 1"
            raise ValueError(f"image {path!r} has camera c{camera}; expected a camera in {limit}")
        return int(match[1]), camera - 1
    raise ValueError(f"cannot parse image name {path!r}: expected {expected}")


def _parse_folder_layout(
    root: str | Path,
    *,
    name: str,
    dataset: str,
    folder: str,
    pattern: re.Pattern[str],
    pattern_text: str,
    num_cams: int | None,
) -> ReIDDataset:
    dataset_dir = os.path.abspath(_locate_folder_layout(root, dataset, folder))
    splits = {}
    for split, subfolder in SPLIT_FOLDERS.items():
        split_dir = os.path.join(dataset_dir, subfolder)
        samples = [
            sample
            for sample in _scan_split(split_dir, pattern, pattern_text, num_cams)
            if sample[1] != JUNK_PID and not (split == "train" and sample[1] == DISTRACTOR_PID)
        ]
        if not samples:
            raise ValueError(f"{dataset} split {split!r} has no usable images in {split_dir!r}")
        splits[split] = samples
    return ReIDDataset(name, dataset_dir, _relabel(splits["train"]), splits["query"], splits["gallery"])


def parse_market1501(root: str | Path) -> ReIDDataset:
    """``root`` holds Market-1501-v15.09.15/ or is it."""
    return _parse_folder_layout(
        root,
        name="market1501",
        dataset="Market-1501",
        folder=MARKET_FOLDER,
        pattern=MARKET_NAME,
        pattern_text=MARKET_NAME_TEXT,
        num_cams=6,
    )


def parse_dukemtmcreid(root: str | Path) -> ReIDDataset:
    """``root`` holds DukeMTMC-reID/ or is it."""
    return _parse_folder_layout(
        root,
        name="dukemtmcreid",
        dataset="DukeMTMC-reID",
        folder=DUKE_FOLDER,
        pattern=DUKE_NAME,
        pattern_text=DUKE_NAME_TEXT,
        num_cams=8,
    )


def _locate_msmt17(root: str | Path) -> tuple[Path, str, str]:
    """(dataset folder, train image folder, test image folder) of the one MSMT17 version under ``root``."""
    list_files = tuple(name for names in MSMT_LISTS.values() for name in names)
    layouts = [f"{version}/ with {train}/, {test}/" for version, (train, test) in MSMT_VERSIONS.items()]
    expected = (
        f"expected {' or '.join(layouts)} and {', '.join(list_files)} inside it (or that content directly in the root)"
    )
    path = _check_root(root, "MSMT17", expected)
    versions = [version for version in MSMT_VERSIONS if (path / version).is_dir()]
    if len(versions) > 1:
        raise ValueError(
            f"MSMT17 root {str(path)!r} holds both {' and '.join(versions)}; pass the version folder to use as the root"
        )
    if versions:
        version_dir = path / versions[0]
        missing = _missing(version_dir, MSMT_VERSIONS[versions[0]], list_files)
        if missing:
            raise FileNotFoundError(f"MSMT17 folder {str(version_dir)!r} lacks {', '.join(missing)}; {expected}")
        return (version_dir, *MSMT_VERSIONS[versions[0]])
    for image_folders in MSMT_VERSIONS.values():
        if not _missing(path, image_folders, list_files):
            return (path, *image_folders)
    raise FileNotFoundError(f"{str(path)!r} is not an MSMT17 root: {expected}")


def _read_msmt_list(list_path: str, image_dir: str) -> list[Sample]:
    """Pids come from the list; images are not stat'ed (126k of them), a missing one fails at loading."""
    prefix = image_dir + os.sep
    samples = []
    with open(list_path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            match = MSMT_LINE.fullmatch(line)
            if match is None:
                raise ValueError(
                    f"{list_path}, line {line_number}: cannot parse {line.strip()!r}; expected {MSMT_LINE_TEXT}"
                )
            name_pid, camera, label = int(match[2]), int(match[3]), int(match[4])
            if not 1 <= camera <= MSMT_NUM_CAMS:
                raise ValueError(
                    f"{list_path}, line {line_number}: camera {camera} in {match[1]!r}; "
                    f"expected a camera in 1..{MSMT_NUM_CAMS}"
                )
            # The release names every image after its pid; a label that says otherwise is a damaged list,
            # and training on it would silently teach wrong identities.
            if label != name_pid:
                raise ValueError(
                    f"{list_path}, line {line_number}: label {label} disagrees with pid {name_pid} of the file "
                    f"name {match[1]!r}"
                )
            samples.append((prefix + match[1], label, camera - 1))
    return samples


def parse_msmt17(root: str | Path) -> ReIDDataset:
    """``root`` holds MSMT17_V1/ or MSMT17_V2/ or is one of them; train merges list_train and list_val."""
    dataset_dir, train_folder, test_folder = _locate_msmt17(root)
    dataset_dir = Path(os.path.abspath(dataset_dir))
    splits = {}
    for split, list_names in MSMT_LISTS.items():
        image_dir = str(dataset_dir / (train_folder if split == "train" else test_folder))
        samples = [
            sample for list_name in list_names for sample in _read_msmt_list(str(dataset_dir / list_name), image_dir)
        ]
        if not samples:
            raise ValueError(
                f"MSMT17 split {split!r} has no images: {' and '.join(list_names)} in {str(dataset_dir)!r} list none"
            )
        splits[split] = samples
    return ReIDDataset("msmt17", str(dataset_dir), _relabel(splits["train"]), splits["query"], splits["gallery"])


def parse_image_list(root: str | Path, **list_files: str) -> ReIDDataset:
    """A dataset of one's own as list files, ``<path> <pid> [<camid>]`` per line (`layouts.read_image_lists`):
    ``list_files`` may rename ``train``, ``query`` and ``gallery`` (defaults: train.txt, query.txt, gallery.txt)."""
    splits = read_image_lists(root, **list_files)
    return ReIDDataset.from_samples("image_list", os.path.abspath(Path(root).expanduser()), **splits)


def parse_image_folders(root: str | Path, **options: str | None) -> ReIDDataset:
    """A dataset of one's own as ``<root>/<split>/<pid>/<image>`` (`layouts.scan_identity_folders`): ``options``
    may rename the ``train``, ``query`` and ``gallery`` folders and give a ``camera_pattern`` (e.g. ``c(\\d+)``)."""
    splits = scan_identity_folders(root, **options)
    return ReIDDataset.from_samples("image_folders", os.path.abspath(Path(root).expanduser()), **splits)


def parse_synthetic(root: str | Path, **generator_options) -> ReIDDataset:
    """The generated set: drawn under ``root`` (a cache) with ``generator_options`` if not there yet, then read
    in its Market-1501 layout (any number of cameras)."""
    from agw_light.data.synthetic import generate_synthetic

    return _parse_folder_layout(
        generate_synthetic(root, **generator_options),
        name="synthetic",
        dataset="synthetic (Market-1501 layout)",
        folder=MARKET_FOLDER,
        pattern=MARKET_NAME,
        pattern_text=MARKET_NAME_TEXT,
        num_cams=None,
    )


# How `read_image_folder` reads pids and cameras, and the names of the layouts it knows.
FOLDER_LAYOUTS = ("auto", "market", "image_folders", "image_list", "none")
REID_NAMES = ((MARKET_NAME, None), (DUKE_NAME, None))
REID_NAMES_TEXT = f"a Market-1501 name {MARKET_NAME_TEXT} or a DukeMTMC-reID name {DUKE_NAME_TEXT}"


def read_image_folder(
    folder: str | Path,
    layout: str = "auto",
    *,
    camera_pattern: str | None = None,
    list_file: str | None = None,
) -> tuple[str, list[LayoutSample]]:
    """The images of one folder with the pid and camera a dataset layout gives them: what a gallery index
    records, read by the parsers the datasets use (no second parser).

    Layouts: "market", every image below `folder` named as Market-1501 or DukeMTMC-reID name theirs
    (``<pid>_c<camera>...``); "image_folders", ``<folder>/<pid>/<image>`` with the camera from `camera_pattern`
    (`layouts.scan_identity_folder`); "image_list", the images `list_file` lists, ``<path> <pid> [<camid>]``
    per line, paths relative to `folder` (`layouts.read_image_list`); "none", every image below `folder`
    without labels. "auto" picks image_list when `list_file` is given, image_folders when `camera_pattern` is,
    else market when every name is one, else image_folders when every image lies in a pid folder, else none.

    Args:
        folder: the image folder (absolute paths are returned).
        layout: one of FOLDER_LAYOUTS.
        camera_pattern: image_folders' regular expression with one group around the camera number.
        list_file: image_list's list file, relative to `folder` or absolute.

    Returns:
        (the layout read, [(absolute path, pid or -1 for none, 0-based camera or None when unknown)]).

    Raises:
        ValueError: an unknown layout, an option the layout does not take, or an image the layout cannot label
            (named, with the form expected).
    """
    if layout not in FOLDER_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(FOLDER_LAYOUTS)}")
    for option, value, takes in (
        ("camera_pattern", camera_pattern, "image_folders"),
        ("list_file", list_file, "image_list"),
    ):
        if value is not None and layout not in ("auto", takes):
            raise ValueError(f"{option}={value!r} is read by layout={takes} only, not layout={layout}")
    if camera_pattern is not None and list_file is not None:
        raise ValueError("camera_pattern and list_file belong to two layouts (image_folders, image_list): give one")
    root = os.path.abspath(Path(folder).expanduser())
    if layout == "image_list" or (layout == "auto" and list_file is not None):
        if list_file is None:
            raise ValueError("layout=image_list needs list_file=<list of '<path> <pid> [<camid>]' lines>")
        return "image_list", read_image_list(root, list_file)
    if layout == "image_folders" or (layout == "auto" and camera_pattern is not None):
        return "image_folders", scan_identity_folder(root, camera_pattern=camera_pattern)
    paths = [str(path) for path in list_image_files(root)]
    if layout == "market" or (layout == "auto" and all(_is_reid_name(path) for path in paths)):
        return "market", [(path, *_name_labels(path, REID_NAMES, REID_NAMES_TEXT)) for path in paths]
    if layout == "auto" and all(_in_pid_folder(path, root) for path in paths):
        return "image_folders", scan_identity_folder(root)
    return "none", [(path, -1, None) for path in paths]


def _is_reid_name(path: str) -> bool:
    name = os.path.basename(path)
    return any(pattern.fullmatch(name) for pattern, _ in REID_NAMES)


def _in_pid_folder(path: str, root: str) -> bool:
    """Whether `path` is ``<root>/<pid>/<image>``."""
    parent = os.path.dirname(path)
    return os.path.dirname(parent) == root and NON_NEGATIVE_INTEGER.fullmatch(os.path.basename(parent)) is not None


# A parser reads the dataset under its root (first argument) with its own keyword arguments.
Parser = Callable[..., ReIDDataset]
PARSERS: dict[str, Parser] = {
    "market1501": parse_market1501,
    "dukemtmcreid": parse_dukemtmcreid,
    "msmt17": parse_msmt17,
    "image_list": parse_image_list,
    "image_folders": parse_image_folders,
    "synthetic": parse_synthetic,
}
BUILT_IN_DATASETS = tuple(PARSERS)


def register_dataset(name: str, parser: Parser, *, replace: bool = False) -> None:
    """Makes ``build_dataset(name, root, **kwargs)`` (and so ``dataset.name=<name>``) call ``parser(root, **kwargs)``.

    Registering the same function again (a module imported twice) is harmless; another parser under a taken name
    needs ``replace``, and the built-in names cannot be taken.

    Args:
        name: the dataset's name, as `build_dataset` and the config's ``dataset.name`` take it.
        parser: ``parser(root, **kwargs) -> ReIDDataset``, best built with `ReIDDataset.from_samples`.
        replace: allow another parser to take a name already registered.

    Raises:
        ValueError: an empty or built-in name, or a name taken by another parser without `replace`.
        TypeError: a parser that is not callable.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"register_dataset needs a non-empty name without surrounding spaces, got {name!r}")
    if not callable(parser):
        raise TypeError(f"register_dataset({name!r}, ...) needs a callable parser, got {parser!r}")
    if name in BUILT_IN_DATASETS:
        raise ValueError(
            f"dataset name {name!r} is built in ({', '.join(BUILT_IN_DATASETS)}); register yours under another"
        )
    known = PARSERS.get(name)
    # The same function again, e.g. from a module imported twice (a reload makes a new function object).
    same = known is parser or (known is not None and _qualified_name(known) == _qualified_name(parser))
    if known is not None and not same and not replace:
        raise ValueError(
            f"dataset name {name!r} is already registered to {_qualified_name(known)}; pass replace=True to replace it"
        )
    PARSERS[name] = parser


def _qualified_name(function: Callable) -> str:
    return f"{getattr(function, '__module__', None)}.{getattr(function, '__qualname__', repr(function))}"


def import_dataset_modules(modules: Sequence[str]) -> None:
    """Imports the modules that register datasets of one's own (they call `register_dataset` when imported)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or not (module == error.name or module.startswith(error.name + ".")):
                raise  # the module itself imports something missing: its own error says what
            raise ModuleNotFoundError(
                f"cannot import {module!r}, named to register datasets: {error}; it must be importable (installed, "
                "or its folder on PYTHONPATH; `python -m` adds the current folder)",
                name=error.name,
            ) from error


def _unexpected_arguments(name: str, parser: Parser, kwargs: dict) -> None:
    """Raises TypeError naming keyword arguments the parser does not take (a typo in a config key)."""
    try:
        parameters = list(inspect.signature(parser).parameters.values())[1:]  # the first one is the root
    except (TypeError, ValueError):  # no signature to read: the call itself will tell
        return
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        takes = f"takes keyword arguments {', '.join(accepted)}" if accepted else "takes no keyword arguments"
        raise TypeError(f"dataset {name!r} {takes}; got unexpected {', '.join(unexpected)}")


def build_dataset(name: str, root: str | Path, **kwargs) -> ReIDDataset:
    """The dataset ``name`` (built in or registered) under ``root``; ``kwargs`` go to its parser (the
    generated set: the generator's parameters; image_list: list files; image_folders: folders, camera_pattern)."""
    parser = PARSERS.get(name)
    if parser is None:
        raise ValueError(
            f"unknown dataset {name!r}; valid names: {', '.join(PARSERS)} (a dataset of your own: register its "
            "parser with agw_light.data.register_dataset in a module that dataset.register names)"
        )
    _unexpected_arguments(name, parser, kwargs)
    dataset = parser(root, **kwargs)
    if not isinstance(dataset, ReIDDataset):
        raise TypeError(f"the parser of dataset {name!r} returned {type(dataset).__name__}, expected a ReIDDataset")
    labels = sorted({pid for _, pid, _ in dataset.train})
    if labels != list(range(len(labels))):
        raise ValueError(
            f"the parser of dataset {name!r} returned training pids that are not 0..{len(labels) - 1}: they index the "
            "classifier (ReIDDataset.from_samples relabels them)"
        )
    return dataset


@dataclass(frozen=True)
class DatasetSource:
    """A dataset to build: its name (built in or registered), root and parser keyword arguments."""

    name: str
    root: str
    kwargs: dict = field(default_factory=dict)

    def build(self) -> ReIDDataset:
        return build_dataset(self.name, self.root, **self.kwargs)


def combine_datasets(datasets: Sequence[ReIDDataset]) -> ReIDDataset:
    """Trains on every dataset's training split, tests on the first one's query and gallery (the training
    part of torchreid's and fast-reid's "combineall").

    Identities and cameras are offset per dataset, so no two datasets share a label: the class count is the
    sum of their training identities, the known cameras follow each other, and images without camera ids keep
    negative ids of their own. The first dataset keeps its labels, so its training and test cameras agree.
    """
    if not datasets:
        raise ValueError("combine_datasets needs at least one dataset")
    if len(datasets) == 1:
        return datasets[0]
    train: list[Sample] = []
    owners: dict[str, str] = {}
    pid_offset = camera_offset = own_camera_offset = 0
    for dataset in datasets:
        for path, pid, camid in dataset.train:
            if path in owners:
                raise ValueError(
                    f"image {path!r} is in the training splits of both {owners[path]} and {dataset.name}: combine "
                    "datasets with distinct images (a dataset named twice?)"
                )
            owners[path] = dataset.name
            camid = camid + camera_offset if camid >= 0 else camid - own_camera_offset
            train.append((path, pid + pid_offset, camid))
        pid_offset += max(pid for _, pid, _ in dataset.train) + 1
        camera_offset += max((camid for _, _, camid in dataset.train if camid >= 0), default=-1) + 1
        own_camera_offset -= min((camid for _, _, camid in dataset.train if camid < 0), default=0)
    first = datasets[0]
    name = "+".join(dataset.name for dataset in datasets)
    return ReIDDataset(name, first.root, train, first.query, first.gallery, parts=tuple(datasets))
