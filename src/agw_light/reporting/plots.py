"""The sweep's plots: mAP against search time, same-person ROC curves and training curves, written as PNG.

matplotlib is imported inside each function, so collecting and tabulating runs never loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agw_light.files import write_atomic
from agw_light.reporting.published import PUBLISHED_ROWS, RowSummary, published_row, summarise_rows
from agw_light.reporting.runs import EPOCH_LOSS_TAG, RunFailure, RunRow, read_scalar_curves
from agw_light.reporting.tables import VERIFICATION_FPRS


def plot_accuracy_vs_search_time(rows: Sequence[RunRow], path: Path) -> None:
    """mAP against search ms per query on a log axis: the table's accuracy/speed trade-off at a glance."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    markers = "osD^vP*X"
    for number, dataset in enumerate(sorted({run.dataset for run in rows})):
        points = [run for run in rows if run.dataset == dataset]
        times = [run.metrics["search_ms_per_query"] for run in points]
        axes.scatter(
            times, [run.metrics["mAP"] for run in points], marker=markers[number % len(markers)], label=dataset, s=40
        )
        for run, time_ms in zip(points, times, strict=True):
            axes.annotate(
                run.label, (time_ms, run.metrics["mAP"]), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
    if all(run.metrics["search_ms_per_query"] > 0 for run in rows):
        axes.set_xscale("log")
    axes.margins(x=0.12, y=0.1)  # room for the point labels at the edges
    axes.set_xlabel("search ms per query (log scale)")
    axes.set_ylabel("mAP")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="dataset")
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=120))


def published_datasets(rows: Sequence[RunRow]) -> list[str]:
    """The datasets among `rows` with at least one row the seed published, in name order."""
    return sorted({summary.dataset for summary in summarise_rows(rows) if published_row(summary) is not None})


def plot_published_comparison(rows: Sequence[RunRow], dataset: str, path: Path) -> None:
    """R1 and mAP per table row of `dataset`: ours (mean, with the seeds' standard deviation as error bars)
    and the seed's published points (crosses)."""
    from matplotlib.figure import Figure

    summaries = [summary for summary in summarise_rows(rows) if summary.dataset == dataset and summary.row]
    figure = Figure(figsize=(8, 3.8), layout="constrained")
    for number, metric in enumerate(("R1", "mAP")):
        axes = figure.add_subplot(1, 2, number + 1)
        values = [getattr(summary, metric) for summary in summaries]
        axes.errorbar(
            [summary.row for summary in summaries],
            [RowSummary.mean(value) for value in values],
            yerr=[0.0 if len(value) < 2 else RowSummary.spread(value) for value in values],
            fmt="o",
            capsize=3,
            label="ours",
        )
        published = PUBLISHED_ROWS[dataset]
        axes.scatter(
            sorted(published),
            [getattr(published[row], metric) for row in sorted(published)],
            marker="x",
            color="black",
            s=50,
            label="published",
        )
        axes.set_xticks(sorted(published))
        axes.set_xlabel("table row")
        axes.set_ylabel(metric)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"{dataset}: ours beside the seed's published rows")
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=120))


def plot_roc_curves(curves: dict[str, dict[str, list]], dataset: str, path: Path) -> None:
    """TPR against FPR (log axis), one line per row evaluated on `dataset` (keyed by its label)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for label, roc in curves.items():
        points = [(fpr, tpr) for fpr, tpr in zip(roc["fpr"], roc["tpr"], strict=True) if fpr > 0]
        if points:
            axes.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 30 else None)
    axes.set_xscale("log")
    for fpr in VERIFICATION_FPRS:
        axes.axvline(fpr, color="grey", linewidth=0.6, linestyle=":")
    axes.set_xlabel("false positive rate (log scale)")
    axes.set_ylabel("true positive rate")
    axes.set_title(f"same-person ROC, evaluated on {dataset}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


def roc_curves(rows: Sequence[RunRow]) -> dict[str, dict[str, dict[str, list]]]:
    """evaluated dataset -> row label (with its training set when that differs) -> ROC points."""
    by_dataset: dict[str, dict[str, dict[str, list]]] = {}
    labels_seen: dict[tuple[str, str], int] = {}
    for run in rows:
        for target, metrics in run.evaluations():
            if "roc" not in metrics:
                continue
            label = run.label if target == run.dataset else f"{run.label} (trained on {run.dataset})"
            repeat = labels_seen[target, label] = labels_seen.get((target, label), 0) + 1
            by_dataset.setdefault(target, {})[label if repeat == 1 else f"{label} #{repeat}"] = metrics["roc"]
    return by_dataset


# The panels of the training-curve plot, in order.
CURVE_PANELS = ("train/loss", "val/mAP", "test/mAP")


def plot_training_curves(curves: dict[str, dict[str, tuple[list, list]]], dataset: str, path: Path) -> None:
    """`training_curves_figure` written as a PNG."""
    figure = training_curves_figure(curves, dataset)
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


def training_curves_figure(curves: dict[str, dict[str, tuple[list, list]]], dataset: str) -> Any:
    """train/loss and val/mAP or test/mAP (those logged) against step, one line per run (keyed by its label).

    A run that logged no step value of train/loss (every epoch shorter than trainer.log_every_n_steps) shows its
    per-epoch means (train/epoch_loss) instead, marked so in the legend. The rows sum different loss terms
    (cross-entropy, triplet, distillation, code losses), so their totals differ by orders of magnitude: the loss
    axis is logarithmic, said in its title, and each line compares with itself over time.
    """
    from matplotlib.figure import Figure

    losses = {label: _loss_curve(run_curves) for label, run_curves in curves.items()}
    panels = [tag for tag in CURVE_PANELS if any(tag in run_curves for run_curves in curves.values())]
    if any(loss is not None for loss in losses.values()) and "train/loss" not in panels:
        panels.insert(0, "train/loss")
    figure = Figure(figsize=(5.5 * max(len(panels), 1), 4), layout="constrained")
    figure.suptitle(f"training curves, {dataset}")
    if not panels:
        figure.text(0.5, 0.5, "no training curve was logged", ha="center")
    for axes, tag in zip(figure.subplots(1, len(panels), squeeze=False)[0] if panels else [], panels, strict=True):
        for label, run_curves in curves.items():
            if tag == "train/loss":
                found = losses[label]
            else:
                found = (run_curves[tag], "") if tag in run_curves else None
            if found is not None:
                (steps, values), note = found
                axes.plot(steps, values, label=label + note, marker="." if len(steps) < 30 else None)
        axes.set_title(tag)
        if tag == "train/loss":
            plotted = [value for line in axes.get_lines() for value in line.get_ydata()]
            if plotted and min(plotted) > 0:
                axes.set_yscale("log")
                axes.set_title("train/loss: each row's summed loss terms (log scale)")
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    return figure


def _loss_curve(run_curves: dict[str, tuple[list, list]]) -> tuple[tuple[list, list], str] | None:
    """((steps, values), legend note) of a run's loss: its step values, else its epoch means, else None."""
    if run_curves.get("train/loss", ([], []))[0]:
        return run_curves["train/loss"], ""
    if run_curves.get(EPOCH_LOSS_TAG, ([], []))[0]:
        return run_curves[EPOCH_LOSS_TAG], " (epoch means: no step logged)"
    return None


def dataset_curves(
    rows: Sequence[RunRow], failures: Sequence[RunFailure], warn: Callable[[str], None]
) -> dict[str, dict[str, dict[str, tuple[list, list]]]]:
    """dataset -> run label -> curves, for finished and failed runs alike (a failure's curves show why)."""
    by_dataset: dict[str, dict[str, dict[str, tuple[list, list]]]] = {}
    runs = [(run.dataset, run.label, run.run_dir) for run in rows]
    runs += [
        (failure.dataset, f"{failure.light} (failed)", failure.run_dir)
        for failure in failures
        if failure.dataset is not None
    ]
    labels_seen: dict[tuple[str, str], int] = {}
    for dataset, label, run_dir in runs:
        try:
            curves = read_scalar_curves(run_dir)
        except Exception as error:  # a damaged event file costs that run its line, not the report
            warn(f"training curves of {run_dir} skipped: {type(error).__name__}: {error}")
            continue
        if not curves:
            continue
        repeat = labels_seen[dataset, label] = labels_seen.get((dataset, label), 0) + 1
        by_dataset.setdefault(dataset, {})[label if repeat == 1 else f"{label} #{repeat}"] = curves
    return by_dataset
