"""Collecting a sweep: each run folder's table row (or why it has none) and its TensorBoard curves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agw_light.results import TABLE_ROWS, read_metrics, table_place

# Keys of the composed job config that name a run (its table place comes from its metrics.json).
CONFIG_TYPES: dict[str, type] = {"light.name": str, "dataset.name": str}
# Rows of a run on other datasets than its own (cross-domain), beside its metrics.json.
TARGET_METRICS_GLOB = "metrics_*.json"
# val/mAP: held-out training ids (eval.select=val_split); test/mAP: the test split, monitored only;
# train/epoch_loss: each epoch's mean loss, what the plot shows where no step value of train/loss was logged.
CURVE_TAGS = ("train/loss", "val/mAP", "test/mAP", "train/epoch_loss")
EPOCH_LOSS_TAG = "train/epoch_loss"


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
    # The run's `seed` (None in a config without one): runs of one row differing only in it are summarised.
    seed: int | None = None

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
    seed = loaded.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{config_path}: key seed is {seed!r}, expected an integer")
    values["seed"] = seed
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
        seed=keys["seed"],
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
