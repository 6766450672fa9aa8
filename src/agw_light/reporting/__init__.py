"""A sweep's results table: what `python -m agw_light.report <multirun dir> [--out DIR]` writes.

Every folder below the given one that holds `.hydra/config.yaml` is one training run (one table row). A
finished run has the `metrics.json` that `agw_light.train` writes last; any other run is reported with the
reason it did not finish (the first line of its `error.txt`, or a pointer to its `train.log`). Written to
the output folder (the multirun folder by default), each file atomically:

    results.md                      the seed table's columns plus mINP and the timing device, one table per
                                    dataset, the rows that did not finish, and the plots below
    results.csv                     the same rows, one per line, for scripts
    accuracy_vs_search_time.png     mAP against search ms per query (log axis), one point per row
    training_curves_<dataset>.png   train/loss and val/mAP or test/mAP against step, one line per row
    roc_<dataset>.png               same-person ROC curves (TPR against FPR, log axis) of the rows
                                    evaluated on that dataset, when their metrics hold one
    published_<dataset>.png         R1 and mAP per row beside the seed's published points, for each real
                                    dataset (Market-1501, DukeMTMC-reID, MSMT17) the sweep holds

results.md also sets each real dataset's rows beside the seed's published ones (R1, mAP and the difference;
`agw_light.reporting.published`), which the command prints too, and summarises rows run with several seeds
(`seed=0,1,2`, conf/experiment/seeds.yaml) as mean ± standard deviation, min and max.

A run evaluated on other datasets too (`eval.targets`) leaves metrics_<target>.json beside metrics.json:
those rows make a source x target table (R1 / mAP) in results.md and one CSV line each, whose "target"
column names the set evaluated ("dataset" stays the training set).

The timings are the ones each run measured when it was evaluated; the device that took them is named with
every row. Where a run sits in the table (row number, light model / feature / search) is derived from its
metrics.json (`agw_light.results.table_place`), which records the network and index that produced it.

The package follows those jobs: `runs` collects the run folders, `tables` writes the text, `plots` the PNGs;
`write_report` here puts them together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agw_light.files import write_text_atomic
from agw_light.reporting.plots import (
    dataset_curves,
    plot_accuracy_vs_search_time,
    plot_published_comparison,
    plot_roc_curves,
    plot_training_curves,
    published_datasets,
    roc_curves,
)
from agw_light.reporting.runs import RunFailure, RunRow, collect_runs, read_run, read_scalar_curves
from agw_light.reporting.tables import (
    csv_text,
    format_ms,
    markdown_text,
    published_comparison_lines,
    seed_summary_lines,
)

__all__ = [
    "NoFinishedRunsError",
    "ReportSummary",
    "RunFailure",
    "RunRow",
    "collect_runs",
    "format_ms",
    "read_run",
    "read_scalar_curves",
    "write_report",
]

log = logging.getLogger(__name__)

ACCURACY_PLOT = "accuracy_vs_search_time.png"


@dataclass(frozen=True)
class ReportSummary:
    """What `write_report` found and wrote: finished rows, failed runs, the files written (in order)."""

    rows: list[RunRow]
    failures: list[RunFailure]
    written: list[Path] = field(default_factory=list)

    def comparison_text(self) -> str:
        """The rows summarised over seeds and set beside the seed's published ones (empty when neither
        applies): what the report command prints."""
        return "\n".join([*seed_summary_lines(self.rows), *published_comparison_lines(self.rows)]).strip()


class NoFinishedRunsError(RuntimeError):
    """Nothing to tabulate: no run folder under the root, or none of them finished."""


def write_report(
    root: str | Path, out_dir: str | Path | None = None, *, warn: Callable[[str], None] | None = None
) -> ReportSummary:
    """Writes results.md, results.csv and the plots for the runs under `root` into `out_dir` (default: root).

    Raises FileNotFoundError when `root` is not a folder and NoFinishedRunsError when no run under it
    finished; nothing is written then. Failed runs are listed in the summary and in results.md.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected a Hydra multirun folder of agw_light.train)")
    warn = warn or log.warning
    rows, failures = collect_runs(root)
    if not rows:
        if not failures:
            raise NoFinishedRunsError(
                f"{root}: no run folder found (expected folders holding .hydra/config.yaml, as "
                f"`python -m agw_light.train -m ...` writes); nothing written"
            )
        listed = "\n".join(f"  {failure.describe()}" for failure in failures)
        raise NoFinishedRunsError(f"{root}: none of its {len(failures)} run(s) finished; nothing written\n{listed}")

    out_dir = Path(out_dir) if out_dir is not None else root
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    plot_accuracy_vs_search_time(rows, out_dir / ACCURACY_PLOT)
    written.append(out_dir / ACCURACY_PLOT)
    curve_files = {}
    for dataset, curves in sorted(dataset_curves(rows, failures, warn).items()):
        name = f"training_curves_{dataset}.png"
        plot_training_curves(curves, dataset, out_dir / name)
        curve_files[dataset] = name
        written.append(out_dir / name)
    roc_files = {}
    for dataset, curves in sorted(roc_curves(rows).items()):
        name = f"roc_{dataset}.png"
        plot_roc_curves(curves, dataset, out_dir / name)
        roc_files[dataset] = name
        written.append(out_dir / name)
    published_files = {}
    for dataset in published_datasets(rows):
        name = f"published_{dataset}.png"
        plot_published_comparison(rows, dataset, out_dir / name)
        published_files[dataset] = name
        written.append(out_dir / name)
    write_text_atomic(out_dir / "results.csv", csv_text(rows))
    written.append(out_dir / "results.csv")
    # Last, so its image links point at files that already exist.
    write_text_atomic(
        out_dir / "results.md",
        markdown_text(root, rows, failures, ACCURACY_PLOT, curve_files, roc_files, published_files),
    )
    written.append(out_dir / "results.md")
    return ReportSummary(rows, failures, written)
