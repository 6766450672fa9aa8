"""What a search result points at: the image path, person id and camera id of each gallery item."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GalleryMetadata:
    """Image path, person id and camera id of each gallery item, one entry per item in index order."""

    paths: list[str]
    pids: list[int]
    camids: list[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", [str(path) for path in self.paths])
        object.__setattr__(self, "pids", [int(pid) for pid in self.pids])
        object.__setattr__(self, "camids", [int(camid) for camid in self.camids])
        if not len(self.paths) == len(self.pids) == len(self.camids):
            raise ValueError(
                "metadata paths, pids and camids must have one entry per item, got "
                f"{len(self.paths)}, {len(self.pids)} and {len(self.camids)}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __add__(self, other: GalleryMetadata) -> GalleryMetadata:
        return GalleryMetadata(self.paths + other.paths, self.pids + other.pids, self.camids + other.camids)

    def take(self, positions: Sequence[int]) -> GalleryMetadata:
        """The entries at `positions` (in range), in that order."""
        return GalleryMetadata(
            [self.paths[i] for i in positions], [self.pids[i] for i in positions], [self.camids[i] for i in positions]
        )

    @classmethod
    def coerce(cls, value: GalleryMetadata | Mapping[str, Sequence] | None, count: int) -> GalleryMetadata | None:
        """`value` (GalleryMetadata or a mapping of paths, pids, camids), checked to hold `count` items."""
        if value is None:
            return None
        if isinstance(value, Mapping):
            missing = {"paths", "pids", "camids"} - set(value)
            if missing:
                raise ValueError(f"metadata mapping lacks keys {sorted(missing)} (expected paths, pids, camids)")
            value = cls(list(value["paths"]), list(value["pids"]), list(value["camids"]))
        if not isinstance(value, GalleryMetadata):
            raise TypeError(f"metadata must be a GalleryMetadata, a mapping or None, got {type(value).__name__}")
        if len(value) != count:
            raise ValueError(f"metadata describes {len(value)} items but {count} codes were given")
        return value
