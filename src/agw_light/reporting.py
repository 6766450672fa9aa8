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

A run evaluated on other datasets too (`eval.targets`) leaves metrics_<target>.json beside metrics.json:
those rows make a source x target table (R1 / mAP) in results.md and one CSV line each, whose "target"
column names the set evaluated ("dataset" stays the training set).

The timings are the ones each run measured when it was evaluated; the device that took them is named with
every row. Where a run sits in the table (row number, light model / feature / search) is derived from its
metrics.json (`agw_light.results.table_place`), which records the network and index that produced it.
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agw_light.files import write_atomic, write_text_atomic
from agw_light.protocol import FPR_TARGETS
from agw_light.results import TABLE_ROWS, read_metrics, rerank_text, table_place

log = logging.getLogger(__name__)

# Keys of the composed job config that name a run (its table place comes from its metrics.json).
CONFIG_TYPES: dict[str, type] = {"light.name": str, "dataset.name": str}
# The CSV's measured columns: metrics.json fields with the place derived from them.
METRIC_COLUMNS = (
    "feature_dim",
    "metric",
    "parameters",
    "R1",
    "mAP",
    "mINP",
    "inference_ms_per_batch",
    "timing_batch_size",
    "search_ms_per_query",
    "device",
    "backbone",
    "neck",
    "index",
    "nonlocal_inter_channels",
    "selection",
    "checkpoint_sha256",
)
# Same-person verification columns (empty for rows written before verification existed).
VERIFICATION_FPRS = FPR_TARGETS
VERIFICATION_COLUMNS = tuple(
    name for fpr in VERIFICATION_FPRS for name in (f"TPR@FPR={fpr:.0e}", f"threshold@FPR={fpr:.0e}")
)
# "rerank": "off", or the k-reciprocal re-ranking's settings ("k1=20 k2=6 lambda=0.3").
CSV_COLUMNS = (
    "dataset",
    "row",
    "light",
    "model_res18",
    "light_feature",
    "light_search",
    *METRIC_COLUMNS,
    "rerank",
    "run_dir",
    "target",
    *VERIFICATION_COLUMNS,
)
# Rows of a run on other datasets than its own (cross-domain), beside its metrics.json.
TARGET_METRICS_GLOB = "metrics_*.json"
ACCURACY_PLOT = "accuracy_vs_search_time.png"
# val/mAP: held-out training ids (eval.select=val_split); test/mAP: the test split, monitored only.
CURVE_TAGS = ("train/loss", "val/mAP", "test/mAP")


@dataclass(frozen=True)
class RunRow:
    """One finished run: where it sits in the table and what it measured."""

    run_dir: Path
    dataset: str
    row: int | None  # None: a combination the seed table has no row for
    light: str
    model_res18: bool
    light_feature: bool
    light_search: bool
    backbone: str
    metrics: dict[str, Any]
    # Rows of this run's checkpoint on other datasets, by target name (metrics_<target>.json).
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # metrics_<target>.json files that could not be read, each with why.
    target_problems: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.row or '-'} {self.light}"

    def evaluations(self) -> list[tuple[str, dict[str, Any]]]:
        """(evaluated dataset, row) of the run's own dataset, then of each target in name order."""
        return [(self.dataset, self.metrics), *sorted(self.targets.items())]


@dataclass(frozen=True)
class RunFailure:
    """A run without usable results; dataset/light are None when its config itself could not be read."""

    run_dir: Path
    reason: str
    dataset: str | None = None
    light: str | None = None

    def describe(self) -> str:
        return f"row {self.light or '?'} ({self.dataset or 'unknown dataset'}, {self.run_dir}): {self.reason}"


@dataclass(frozen=True)
class ReportSummary:
    rows: list[RunRow]
    failures: list[RunFailure]
    written: list[Path] = field(default_factory=list)


class NoFinishedRunsError(RuntimeError):
    """Nothing to tabulate: no run folder under the root, or none of them finished."""


def find_run_dirs(root: str | Path) -> list[Path]:
    """Folders below `root` (itself included) holding a Hydra job config, in path order."""
    return sorted(config.parent.parent for config in Path(root).glob("**/.hydra/config.yaml"))


def _read_config_keys(config_path: Path) -> dict[str, Any]:
    """The row-placing keys of a job config, read without resolving (`${hydra:...}` needs a live Hydra)."""
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    except Exception as error:  # YAML and OmegaConf raise many types for a damaged file
        raise ValueError(f"{config_path} cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{config_path}: expected a mapping (a composed agw_light.train config)")
    values = {}
    for dotted, expected in CONFIG_TYPES.items():
        node: Any = loaded
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, expected):
            raise ValueError(
                f"{config_path}: key {dotted} is {node!r}, expected {expected.__name__} "
                f"(is this an agw_light.train run?)"
            )
        values[dotted] = node
    return values


def _unfinished_reason(run_dir: Path) -> str:
    error_file = run_dir / "error.txt"
    if error_file.is_file():
        try:
            first_line = error_file.read_text(errors="replace").strip().splitlines()
        except OSError as error:
            return f"the run failed, but {error_file} cannot be read ({error})"
        return f"{first_line[0] if first_line else 'failed (error.txt is empty)'} (see {error_file})"
    return f"no metrics.json: the run did not finish; see {run_dir / 'train.log'}"


def read_run(run_dir: str | Path) -> RunRow | RunFailure:
    """The table row of one run folder, or why it has none (never raises for a bad or unfinished run)."""
    run_dir = Path(run_dir)
    try:
        keys = _read_config_keys(run_dir / ".hydra" / "config.yaml")
    except ValueError as error:
        return RunFailure(run_dir, str(error))
    place = {"dataset": keys["dataset.name"], "light": keys["light.name"]}
    metrics_path, error_file = run_dir / "metrics.json", run_dir / "error.txt"
    # A failed rerun into the folder of an earlier finished one must not pass off the old numbers.
    stale = (
        error_file.is_file() and metrics_path.is_file() and (error_file.stat().st_mtime > metrics_path.stat().st_mtime)
    )
    if not metrics_path.is_file() or stale:
        return RunFailure(run_dir, _unfinished_reason(run_dir), **place)
    try:
        metrics = read_metrics(metrics_path)
    except ValueError as error:
        return RunFailure(run_dir, str(error), **place)
    row, model_res18, light_feature, light_search = table_place(metrics)
    targets, problems = _read_targets(run_dir)
    return RunRow(
        run_dir=run_dir,
        row=row,
        model_res18=model_res18,
        light_feature=light_feature,
        light_search=light_search,
        backbone=metrics["backbone"],
        metrics=metrics,
        targets=targets,
        target_problems=problems,
        **place,
    )


def _read_targets(run_dir: Path) -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """The cross-domain rows of a run folder by target name, and why any of them could not be used."""
    targets, problems = {}, []
    for path in sorted(run_dir.glob(TARGET_METRICS_GLOB)):
        target = path.stem.removeprefix("metrics_")
        try:
            metrics = read_metrics(path)
        except ValueError as error:
            problems.append(str(error))
            continue
        if metrics["dataset"] != target:
            problems.append(f"{path}: holds a row of dataset {metrics['dataset']!r}, not of {target!r}")
            continue
        targets[target] = metrics
    return targets, tuple(problems)


def collect_runs(root: str | Path) -> tuple[list[RunRow], list[RunFailure]]:
    """Finished rows and failures under `root`, each ordered by dataset, then table row, then folder."""
    rows: list[RunRow] = []
    failures: list[RunFailure] = []
    for run_dir in find_run_dirs(root):
        result = read_run(run_dir)
        (rows if isinstance(result, RunRow) else failures).append(result)
    rows.sort(key=lambda run: (run.dataset, run.row or max(TABLE_ROWS.values()) + 1, str(run.run_dir)))
    failures.sort(key=lambda run: (run.dataset or "", str(run.run_dir)))
    return rows, failures


def format_ms(value: float) -> str:
    """Milliseconds with the decimals that matter at their size: 5248.1, 23.2, 1.25, 0.077."""
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    if value >= 0.001 or value == 0:
        return f"{value:.3f}"
    return f"{value:.2g}"


def _tick(flag: bool) -> str:
    return "√" if flag else "-"


def _feature_dim_text(feature_dim: int | str) -> str:
    """Code pyramids (several lengths) read "multiple" as in the seed table, with the lengths kept."""
    if isinstance(feature_dim, str) and "-" in feature_dim:
        return f"multiple ({feature_dim})"
    return str(feature_dim)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def verification_at(metrics: dict[str, Any], fpr: float) -> dict[str, Any] | None:
    """The row's verification entry for a target FPR, or None (rows written before verification existed)."""
    return next((entry for entry in metrics.get("verification", ()) if entry["target_fpr"] == fpr), None)


def _verification_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    fields = {}
    for fpr in VERIFICATION_FPRS:
        entry = verification_at(metrics, fpr)
        if entry is not None:
            fields[f"TPR@FPR={fpr:.0e}"], fields[f"threshold@FPR={fpr:.0e}"] = entry["tpr"], entry["threshold"]
    return fields


def _csv_text(rows: Sequence[RunRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for run in rows:
        for target, metrics in run.evaluations():
            fields = {
                "dataset": run.dataset,
                "row": run.row,
                "light": run.light,
                "backbone": run.backbone,
                "run_dir": str(run.run_dir.resolve()),
                **{key: metrics.get(key) for key in METRIC_COLUMNS},
                "rerank": rerank_text(metrics),
                "model_res18": run.model_res18,
                "light_feature": run.light_feature,
                "light_search": run.light_search,
                "target": target,
                **_verification_fields(metrics),
            }
            writer.writerow(
                [str(value).lower() if isinstance(value, bool) else value for value in map(fields.get, CSV_COLUMNS)]
            )
    return buffer.getvalue()


def _threshold_text(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _cross_domain_lines(root: Path, rows: Sequence[RunRow]) -> list[str]:
    """One source x target table (R1 / mAP) per table row (light name) that has cross-domain results."""
    lines: list[str] = []
    for light in dict.fromkeys(run.light for run in rows if run.targets):
        runs = [run for run in rows if run.light == light]
        targets = sorted({name for run in runs for name, _ in run.evaluations()})
        header = "| source \\ target | " + " | ".join(targets) + " | run |"
        lines += ["", f"### {runs[0].label}", "", header, "|" + "---|" * (len(targets) + 2)]
        for run in runs:
            evaluated = dict(run.evaluations())
            cells = [
                f"{evaluated[name]['R1']:.3f} / {evaluated[name]['mAP']:.3f}" if name in evaluated else "-"
                for name in targets
            ]
            source = run.metrics.get("train_dataset", f"{run.dataset} (not recorded in the checkpoint)")
            lines.append(f"| {source} | " + " | ".join(cells) + f" | `{_relative(run.run_dir, root)}` |")
    if not lines:
        return []
    return [
        "",
        "## Cross-domain (R1 / mAP)",
        "",
        "Rows: the dataset a model was trained on; columns: the dataset it was evaluated on, each with its own "
        "query/gallery protocol.",
        *lines,
    ]


def _verification_lines(root: Path, rows: Sequence[RunRow], roc_files: dict[str, str]) -> list[str]:
    """TPR at each FPR with its distance threshold (same person iff distance <= threshold), per evaluated row."""
    evaluated = [(run, target, m) for run in rows for target, m in run.evaluations() if "verification" in m]
    if not evaluated:
        return []
    columns = " | ".join(f"TPR @ FPR {fpr:.0e} (threshold)" for fpr in VERIFICATION_FPRS)
    header = f"| row | trained on | evaluated on | metric | {columns} | run |"
    lines = [
        "",
        "## Same-person verification",
        "",
        "All query x gallery pairs but same-identity same-camera ones; same person iff distance <= threshold "
        "(1 - cosine, or Hamming bits).",
        "",
        header,
        "|" + "---|" * header.count(" | ") + "---|",
    ]
    for run, target, m in evaluated:
        cells = []
        for fpr in VERIFICATION_FPRS:
            entry = verification_at(m, fpr)
            cells.append("-" if entry is None else f"{entry['tpr']:.3f} ({_threshold_text(entry['threshold'])})")
        lines.append(
            f"| {run.label} | {run.dataset} | {target} | {m['metric']} | "
            + " | ".join(cells)
            + f" | `{_relative(run.run_dir, root)}` |"
        )
    for dataset, name in roc_files.items():
        lines += ["", f"![ROC curves, {dataset}]({name})"]
    return lines


def _markdown_text(
    root: Path,
    rows: Sequence[RunRow],
    failures: Sequence[RunFailure],
    curve_files: dict[str, str],
    roc_files: dict[str, str] | None = None,
) -> str:
    devices = sorted({run.metrics["device"] for run in rows})
    generated = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        f"# Results of `{root}`",
        "",
        f"Generated {generated} by `python -m agw_light.report`. Timings (inference per batch of 64, search per "
        f"query) were measured when each run was evaluated, on: {'; '.join(devices)}.",
    ]
    header = (
        "| row | model (res18) | light feature | light search | feature dim | metric | params | R1 | mAP | mINP "
        "| inference per batch (64) | search per query | device | checkpoint | run |"
    )
    for dataset in sorted({run.dataset for run in rows}):
        lines += ["", f"## {dataset}", "", header, "|" + "---|" * header.count(" | ") + "---|"]
        for run in (run for run in rows if run.dataset == dataset):
            m = run.metrics
            cells = [
                f"{run.row or '-'} ({run.light})",
                _tick(run.model_res18),
                _tick(run.light_feature),
                _tick(run.light_search),
                _feature_dim_text(m["feature_dim"]),
                m["metric"] + ("" if rerank_text(m) == "off" else f" + re-ranking ({rerank_text(m)})"),
                f"{m['parameters'] / 1e6:.2f} M" if "parameters" in m else "-",
                f"{m['R1']:.3f}",
                f"{m['mAP']:.3f}",
                f"{m['mINP']:.3f}",
                f"{format_ms(m['inference_ms_per_batch'])} ms",
                f"{format_ms(m['search_ms_per_query'])} ms",
                m["device"],
                m.get("selection", "-"),
                f"`{_relative(run.run_dir, root)}`",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += _cross_domain_lines(root, rows)
    lines += _verification_lines(root, rows, roc_files or {})
    problems = [problem for run in rows for problem in run.target_problems]
    if failures or problems:
        lines += ["", "## Rows that did not finish", ""]
        lines += [
            f"- row {failure.light or '?'} ({failure.dataset or 'unknown dataset'}), "
            f"`{_relative(failure.run_dir, root)}`: {failure.reason}"
            for failure in failures
        ]
        lines += [f"- cross-domain row: {problem}" for problem in problems]
    lines += ["", "## mAP against search time", "", f"![mAP against search ms per query]({ACCURACY_PLOT})"]
    lines += ["", "## Training curves"]
    for dataset, name in curve_files.items():
        lines += ["", f"![training curves, {dataset}]({name})"]
    if not curve_files:
        lines += ["", "No TensorBoard scalars found in any run folder."]
    return "\n".join(lines) + "\n"


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


def _roc_curves(rows: Sequence[RunRow]) -> dict[str, dict[str, dict[str, list]]]:
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


def read_scalar_curves(run_dir: str | Path, tags: Sequence[str] = CURVE_TAGS) -> dict[str, tuple[list, list]]:
    """(steps, values) of each tag a run logged to TensorBoard; absent tags are left out.

    A resumed run logs the steps after its last checkpoint again, so each step keeps its latest value.
    """
    log_dir = Path(run_dir) / "tensorboard"
    if not any(log_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    available = set(accumulator.Tags().get("scalars", []))
    curves = {}
    for tag in tags:
        if tag not in available:
            continue
        latest: dict[int, float] = {}
        for event in sorted(accumulator.Scalars(tag), key=lambda event: event.wall_time):
            latest[event.step] = event.value
        steps = sorted(latest)
        curves[tag] = (steps, [latest[step] for step in steps])
    return curves


def plot_training_curves(curves: dict[str, dict[str, tuple[list, list]]], dataset: str, path: Path) -> None:
    """train/loss and val/mAP or test/mAP (those logged) against step, one line per run (keyed by its label)."""
    from matplotlib.figure import Figure

    tags = [tag for tag in CURVE_TAGS if any(tag in run_curves for run_curves in curves.values())]
    figure = Figure(figsize=(5.5 * len(tags), 4), layout="constrained")
    figure.suptitle(f"training curves, {dataset}")
    for axes, tag in zip(figure.subplots(1, len(tags), squeeze=False)[0], tags, strict=True):
        for label, run_curves in curves.items():
            if tag in run_curves:
                steps, values = run_curves[tag]
                axes.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        axes.set_title(tag)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


def _dataset_curves(
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
    for dataset, curves in sorted(_dataset_curves(rows, failures, warn).items()):
        name = f"training_curves_{dataset}.png"
        plot_training_curves(curves, dataset, out_dir / name)
        curve_files[dataset] = name
        written.append(out_dir / name)
    roc_files = {}
    for dataset, curves in sorted(_roc_curves(rows).items()):
        name = f"roc_{dataset}.png"
        plot_roc_curves(curves, dataset, out_dir / name)
        roc_files[dataset] = name
        written.append(out_dir / name)
    write_text_atomic(out_dir / "results.csv", _csv_text(rows))
    written.append(out_dir / "results.csv")
    # Last, so its image links point at files that already exist.
    write_text_atomic(out_dir / "results.md", _markdown_text(root, rows, failures, curve_files, roc_files))
    written.append(out_dir / "results.md")
    return ReportSummary(rows, failures, written)
