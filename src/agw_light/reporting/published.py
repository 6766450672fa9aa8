"""The seed's published rows, which a sweep on a real dataset is meant to reproduce, and how ours compare.

Source: light-reid's AGW table, the README of light-reid's `examples/agw` ("implement and speedup AGW with
light-reid"), also in docs/reference-implementations.md#the-reference-table: R1 and mAP of rows 1-5 on
each of the three datasets (TITAN XP; the times are not compared: they depend on the machine).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from agw_light.reporting.runs import RunRow

PUBLISHED_SOURCE = "light-reid's AGW README (examples/agw; docs/reference-implementations.md)"


@dataclass(frozen=True)
class PublishedRow:
    R1: float
    mAP: float


# dataset name (conf/dataset/<name>.yaml) -> table row -> the published R1 and mAP.
PUBLISHED_ROWS: dict[str, dict[int, PublishedRow]] = {
    "dukemtmcreid": {
        1: PublishedRow(0.886, 0.786),
        2: PublishedRow(0.856, 0.743),
        3: PublishedRow(0.875, 0.776),
        4: PublishedRow(0.878, 0.758),
        5: PublishedRow(0.851, 0.722),
    },
    "market1501": {
        1: PublishedRow(0.945, 0.865),
        2: PublishedRow(0.931, 0.836),
        3: PublishedRow(0.942, 0.859),
        4: PublishedRow(0.942, 0.852),
        5: PublishedRow(0.922, 0.809),
    },
    "msmt17": {
        1: PublishedRow(0.757, 0.528),
        2: PublishedRow(0.729, 0.489),
        3: PublishedRow(0.768, 0.539),
        4: PublishedRow(0.762, 0.519),
        5: PublishedRow(0.713, 0.462),
    },
}


@dataclass(frozen=True)
class RowSummary:
    """One table row of one dataset over its runs (several when a sweep repeated it with other seeds)."""

    dataset: str
    row: int | None
    light: str
    seeds: tuple[int | None, ...]
    R1: tuple[float, ...]
    mAP: tuple[float, ...]

    @property
    def runs(self) -> int:
        return len(self.R1)

    @staticmethod
    def mean(values: Sequence[float]) -> float:
        return statistics.fmean(values)

    @staticmethod
    def spread(values: Sequence[float]) -> float:
        """The sample standard deviation over the runs (NaN for a single run: no spread measured)."""
        return statistics.stdev(values) if len(values) > 1 else math.nan


def summarise_rows(rows: Sequence[RunRow]) -> list[RowSummary]:
    """The runs grouped by (dataset, table row, light), in the order `collect_runs` gives them."""
    groups: dict[tuple[str, int | None, str], list[RunRow]] = {}
    for run in rows:
        groups.setdefault((run.dataset, run.row, run.light), []).append(run)
    return [
        RowSummary(
            dataset,
            row,
            light,
            tuple(run.seed for run in runs),
            tuple(float(run.metrics["R1"]) for run in runs),
            tuple(float(run.metrics["mAP"]) for run in runs),
        )
        for (dataset, row, light), runs in groups.items()
    ]


def published_row(summary: RowSummary) -> PublishedRow | None:
    """The seed's row this summary reproduces, or None (a dataset or row the seed did not publish)."""
    return PUBLISHED_ROWS.get(summary.dataset, {}).get(summary.row) if summary.row is not None else None
