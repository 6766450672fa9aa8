"""The sweep's text tables: results.md (one table per dataset, cross-domain, verification, failures) and
results.csv (one line per evaluated row)."""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agw_light.protocol import FPR_TARGETS
from agw_light.reporting.published import PUBLISHED_SOURCE, RowSummary, published_row, summarise_rows
from agw_light.reporting.runs import RunFailure, RunRow
from agw_light.results import rerank_text

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

# Same-person verification columns (empty for rows written before verification existed, and at an FPR the row's
# negative pairs cannot resolve: fewer than 1 / FPR of them).
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


def resolves(metrics: dict[str, Any], fpr: float) -> bool:
    """Whether the row's negative pairs can measure a false-positive rate of `fpr`: one false positive among
    them is a rate of 1 / negative_pairs, so fewer than 1 / fpr of them cannot tell `fpr` from 0 (rows that do
    not record the count are taken as they are)."""
    negatives = metrics.get("negative_pairs")
    return negatives is None or negatives * fpr >= 1


def _verification_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """The CSV's TPR and threshold at each FPR; empty where the row has no entry or too few negative pairs."""
    fields = {}
    for fpr in VERIFICATION_FPRS:
        entry = verification_at(metrics, fpr)
        if entry is not None and resolves(metrics, fpr):
            fields[f"TPR@FPR={fpr:.0e}"], fields[f"threshold@FPR={fpr:.0e}"] = entry["tpr"], entry["threshold"]
    return fields


def csv_text(rows: Sequence[RunRow]) -> str:
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
        "(1 - cosine, or Hamming bits). An FPR below 1 / (negative pairs) cannot be measured: not resolved.",
        "",
        header,
        "|" + "---|" * header.count(" | ") + "---|",
    ]
    for run, target, m in evaluated:
        cells = []
        for fpr in VERIFICATION_FPRS:
            entry = verification_at(m, fpr)
            if entry is None:
                cells.append("-")
            elif not resolves(m, fpr):
                cells.append(f"not resolved ({m['negative_pairs']:,} negative pairs)")
            else:
                cells.append(f"{entry['tpr']:.3f} ({_threshold_text(entry['threshold'])})")
        lines.append(
            f"| {run.label} | {run.dataset} | {target} | {m['metric']} | "
            + " | ".join(cells)
            + f" | `{_relative(run.run_dir, root)}` |"
        )
    for dataset, name in roc_files.items():
        lines += ["", f"![ROC curves, {dataset}]({name})"]
    return lines


def _mean_text(values: Sequence[float]) -> str:
    """'0.812' for one run, '0.812 ± 0.010' (mean ± sample standard deviation) for several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{RowSummary.mean(values):.3f} ± {RowSummary.spread(values):.3f}"


def published_comparison_lines(rows: Sequence[RunRow]) -> list[str]:
    """Each real dataset's rows beside the seed's published ones (R1, mAP, ours minus published), as a
    markdown section; none when no row is of a dataset and table row the seed published."""
    compared = [(summary, published_row(summary)) for summary in summarise_rows(rows)]
    compared = [(summary, published) for summary, published in compared if published is not None]
    if not compared:
        return []
    lines = [
        "",
        "## Beside the published rows",
        "",
        f"Published: {PUBLISHED_SOURCE}. Ours: the mean over a row's runs (± their standard deviation when "
        "several seeds ran); difference: ours minus published.",
    ]
    header = "| dataset | row | runs | R1 | published R1 | R1 difference | mAP | published mAP | mAP difference |"
    lines += ["", header, "|" + "---|" * header.count(" | ") + "---|"]
    for summary, published in compared:
        r1, mean_ap = summary.mean(summary.R1), summary.mean(summary.mAP)
        cells = [
            summary.dataset,
            f"{summary.row} ({summary.light})",
            str(summary.runs),
            _mean_text(summary.R1),
            f"{published.R1:.3f}",
            f"{r1 - published.R1:+.3f}",
            _mean_text(summary.mAP),
            f"{published.mAP:.3f}",
            f"{mean_ap - published.mAP:+.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def seed_summary_lines(rows: Sequence[RunRow]) -> list[str]:
    """Rows run more than once (a multirun over `seed`): mean ± standard deviation, min and max of R1 and mAP."""
    repeated = [summary for summary in summarise_rows(rows) if summary.runs > 1]
    if not repeated:
        return []
    header = "| dataset | row | seeds | R1 mean ± sd | R1 min-max | mAP mean ± sd | mAP min-max |"
    lines = ["", "## Over seeds", "", header, "|" + "---|" * header.count(" | ") + "---|"]
    for summary in repeated:
        seeds = ", ".join("?" if seed is None else str(seed) for seed in summary.seeds)
        cells = [
            summary.dataset,
            f"{summary.row or '-'} ({summary.light})",
            seeds,
            _mean_text(summary.R1),
            f"{min(summary.R1):.3f}-{max(summary.R1):.3f}",
            _mean_text(summary.mAP),
            f"{min(summary.mAP):.3f}-{max(summary.mAP):.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_text(
    root: Path,
    rows: Sequence[RunRow],
    failures: Sequence[RunFailure],
    accuracy_plot: str,
    curve_files: dict[str, str],
    roc_files: dict[str, str] | None = None,
    published_files: dict[str, str] | None = None,
) -> str:
    """results.md: the runs under `root`, linking the plots (file names relative to it) written beside it."""
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
    lines += seed_summary_lines(rows)
    lines += published_comparison_lines(rows)
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
    lines += ["", "## mAP against search time", "", f"![mAP against search ms per query]({accuracy_plot})"]
    for dataset, name in (published_files or {}).items():
        lines += ["", f"![{dataset}: R1 and mAP per row beside the published points]({name})"]
    lines += ["", "## Training curves"]
    for dataset, name in curve_files.items():
        lines += ["", f"![training curves, {dataset}]({name})"]
    if not curve_files:
        lines += ["", "No TensorBoard scalars found in any run folder."]
    return "\n".join(lines) + "\n"
