"""Byte-identical images shared between the splits of a dataset: test leaks a metric would not show.

A gallery holding a copy of a query (under another name, or listed without camera ids) is a true match at
distance 0 the protocol does not remove: R1 = 1.000 silently. A training image that is also a test image
is learnt before it is ranked. `find_duplicates` finds both by content hash at setup; `drop_duplicates`
removes the gallery copies and the training copies. Files are hashed only when another split holds a file
of the same size, so a dataset of distinct images costs one stat per file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from agw_light.data.datasets import ReIDDataset, Sample

# Pairs named in a warning; the counts cover them all.
LISTED_PAIRS = 3


@dataclass(frozen=True)
class Duplicates:
    """Byte-identical pairs across splits: (query path, gallery path) and (training path, test path)."""

    query_gallery: list[tuple[str, str]]
    train_test: list[tuple[str, str]]

    def __bool__(self) -> bool:
        return bool(self.query_gallery or self.train_test)

    def describe(self) -> str:
        """The counts and the first pairs of each kind, for a warning."""
        lines = []
        for pairs, what in (
            (self.query_gallery, "gallery images are byte-identical copies of a query (true matches at distance 0)"),
            (self.train_test, "training images are byte-identical to a query or gallery image (train/test overlap)"),
        ):
            if pairs:
                shown = "; ".join(f"{first} = {second}" for first, second in pairs[:LISTED_PAIRS])
                more = f" and {len(pairs) - LISTED_PAIRS} more" if len(pairs) > LISTED_PAIRS else ""
                lines.append(f"{len(pairs)} {what}: {shown}{more}")
        return "\n".join(lines)


def _digests(paths: Iterable[str], workers: int) -> dict[str, str]:
    def digest(path: str) -> str:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "blake2b").hexdigest()

    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(digest, unique), strict=True))


def find_duplicates(dataset: ReIDDataset, *, workers: int = 4) -> Duplicates:
    """Gallery images identical to a query (except the query's own listing, which the protocol removes as
    same pid and camera), and training images identical to a query or gallery image (same file included)."""
    splits = {split: getattr(dataset, split) for split in ("train", "query", "gallery")}
    sizes = {path: os.stat(path).st_size for samples in splits.values() for path, _, _ in samples}
    sizes_of = {split: {sizes[path] for path, _, _ in samples} for split, samples in splits.items()}
    test_sizes = sizes_of["query"] | sizes_of["gallery"]
    shared = (sizes_of["query"] & sizes_of["gallery"]) | (sizes_of["train"] & test_sizes)
    digests = _digests((path for path, size in sizes.items() if size in shared), workers)

    def by_digest(samples: list[Sample]) -> dict[str, list[Sample]]:
        found: dict[str, list[Sample]] = defaultdict(list)
        for sample in samples:
            if sample[0] in digests:
                found[digests[sample[0]]].append(sample)
        return found

    queries, test = by_digest(splits["query"]), by_digest(splits["query"] + splits["gallery"])
    query_gallery = [
        (query[0], item[0])
        for item in splits["gallery"]
        for query in queries.get(digests.get(item[0], ""), [])
        if (query[1], query[2]) != (item[1], item[2])
    ]
    train_test = [
        (item[0], next(iter(test[digests[item[0]]]))[0])
        for item in splits["train"]
        if item[0] in digests and digests[item[0]] in test
    ]
    return Duplicates(query_gallery, train_test)


def drop_duplicates(dataset: ReIDDataset, duplicates: Duplicates) -> ReIDDataset:
    """`dataset` without the gallery copies of queries and the training copies of test images (training
    labels renumbered from 0); queries are kept, they are what is measured."""
    gallery_copies = {gallery for _, gallery in duplicates.query_gallery}
    train_copies = {train for train, _ in duplicates.train_test}
    gallery = [sample for sample in dataset.gallery if sample[0] not in gallery_copies]
    train = [sample for sample in dataset.train if sample[0] not in train_copies]
    if not gallery or not train:
        split = "gallery" if not gallery else "training"
        raise ValueError(f"dataset {dataset.name!r}: dropping duplicates leaves no {split} image")
    labels = {pid: label for label, pid in enumerate(sorted({pid for _, pid, _ in train}))}
    train = [(path, labels[pid], camid) for path, pid, camid in train]
    return dataclasses.replace(dataset, train=train, gallery=gallery)
