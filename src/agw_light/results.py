"""metrics.json, one table row: the single schema its writer (evaluation) and its reader (report) share.

Each key says exactly which network and protocol produced the numbers: the checkpoint and its hash, the
backbone, the head, whether a teacher distilled it, the search index, the distance, and the device that
took the timings. Where a run sits in the seed table (`table_place`) is derived from these, never from
config labels that could say otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from agw_light.files import write_json_atomic

# Required keys with the types the writer gives them (bool is refused where a number is expected).
FIELDS: dict[str, tuple[type, ...]] = {
    "checkpoint": (str,),
    "checkpoint_sha256": (str,),
    "dataset": (str,),
    "backbone": (str,),
    "neck": (str,),  # bnneck (float feature) | hash (one code) | pyramid (codes of several lengths)
    "distilled": (bool,),  # trained with a teacher (the light model)
    "index": (str,),  # float | hamming | coarse_to_fine: the search that produced the ranking
    "feature_dim": (int, str),  # an int, or the pyramid's lengths "2048-1024-...-32"
    "metric": (str,),
    "R1": (int, float),
    "R5": (int, float),
    "R10": (int, float),
    "mAP": (int, float),
    "mINP": (int, float),
    "num_query": (int,),
    "num_gallery": (int,),
    "num_valid_queries": (int,),
    "inference_ms_per_batch": (int, float),  # one forward pass of a batch of timing_batch_size images
    "timing_batch_size": (int,),
    "search_ms_per_query": (int, float),
    "device": (str,),
}
# Optional: whether the ranking was k-reciprocal re-ranked (bool) and, when it was, these settings. Rows written
# before re-ranking existed lack the key and read as not re-ranked.
RERANK_FIELDS: dict[str, tuple[type, ...]] = {"rerank_k1": (int,), "rerank_k2": (int,), "rerank_lambda": (int, float)}
# Optional keys (rows written before they existed lack them): the training dataset, when the checkpoint
# records it (a row on another dataset is a cross-domain result), and the same-person verification figures
# of agw_light.metrics.verification.
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    # Written by every evaluation since issue 12; optional so that earlier rows still read.
    "parameters": (int,),  # the network's, classifier included (AGW ResNet-50, 751 ids: 25,078,864)
    "nonlocal_inter_channels": (str,),  # "1" (the AGW authors' network), "half" (Wang et al.'s) or "none"
    "selection": (str,),  # how the checkpoint was chosen: "last epoch", "best val/mAP ...", "given"
    "train_dataset": (str,),
    # A checkpoint converted from another framework (agw_light.convert): its format and the source file's hash.
    "source_format": (str,),
    "source_sha256": (str,),
    "positive_pairs": (int,),
    "negative_pairs": (int,),
    "excluded_pairs": (int,),
}
# Each entry of "verification": one target FPR, the rates reached and the threshold reaching them.
VERIFICATION_KEYS = ("target_fpr", "fpr", "tpr", "threshold")
# "roc": the downsampled curve, three lists of equal length.
ROC_KEYS = ("fpr", "tpr", "threshold")
# The terminal's two-line summary of a row.
SUMMARY_COLUMNS = ("feature_dim", "metric", "R1", "mAP", "mINP", "inference_ms_per_batch", "search_ms_per_query")
# Rows written before the timing batch became a setting name its (fixed) size in the key.
LEGACY_TIMING_KEY, LEGACY_TIMING_BATCH = "inference_ms_per_batch64", 64
# The seed table's rows by (light model, light feature, light search).
TABLE_ROWS = {
    (False, False, False): 1,
    (True, False, False): 2,
    (False, True, False): 3,
    (False, True, True): 4,
    (True, True, True): 5,
}


def _check_value(value: Any, expected: tuple[type, ...], key: str, source: str | Path) -> None:
    number_expected = bool not in expected
    if not isinstance(value, expected) or (number_expected and isinstance(value, bool)):
        names = " or ".join(kind.__name__ for kind in expected)
        raise ValueError(f"{source}: key {key} is {value!r}, expected {names}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{source}: key {key} is {value}, expected a finite number")


def check_row(row: Any, source: str | Path) -> dict[str, Any]:
    """`row` if it holds every required key with its type and finite numbers, and any optional key it holds is
    well formed; else an error naming `source`."""
    if not isinstance(row, dict):
        raise ValueError(f"{source}: expected a JSON object of the table row, got {type(row).__name__}")
    if LEGACY_TIMING_KEY in row and "inference_ms_per_batch" not in row:
        row = {**row, "timing_batch_size": LEGACY_TIMING_BATCH, "inference_ms_per_batch": row[LEGACY_TIMING_KEY]}
        del row[LEGACY_TIMING_KEY]
    for key, expected in FIELDS.items():
        _check_value(row.get(key), expected, key, source)
    _check_value(row.get("rerank", False), (bool,), "rerank", source)
    if row.get("rerank"):
        for key, expected in RERANK_FIELDS.items():
            _check_value(row.get(key), expected, key, source)
    for key, expected in OPTIONAL_FIELDS.items():
        if key in row:
            _check_value(row[key], expected, key, source)
    number = (int, float)
    if "verification" in row:
        entries = row["verification"]
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise ValueError(f"{source}: key verification is {entries!r}, expected a list of objects")
        for place, entry in enumerate(entries):
            for key in VERIFICATION_KEYS:
                _check_value(entry.get(key), number, f"verification[{place}].{key}", source)
    if "roc" in row:
        roc = row["roc"]
        if not isinstance(roc, dict) or not all(isinstance(roc.get(key), list) for key in ROC_KEYS):
            raise ValueError(f"{source}: key roc must be an object of lists {', '.join(ROC_KEYS)}")
        if len({len(roc[key]) for key in ROC_KEYS}) != 1:
            raise ValueError(f"{source}: key roc: lists {', '.join(ROC_KEYS)} must have equal lengths")
        for key in ROC_KEYS:
            for place, value in enumerate(roc[key]):
                _check_value(value, number, f"roc.{key}[{place}]", source)
    return row


def rerank_text(row: dict[str, Any]) -> str:
    """ "k1=20 k2=6 lambda=0.3" for a re-ranked row, "off" otherwise (also for rows that predate the key)."""
    if not row.get("rerank"):
        return "off"
    return f"k1={row['rerank_k1']} k2={row['rerank_k2']} lambda={row['rerank_lambda']:g}"


def write_metrics(path: str | Path, row: dict[str, Any]) -> Path:
    return write_json_atomic(path, check_row(row, f"metrics row for {path}"))


def read_metrics(path: str | Path) -> dict[str, Any]:
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read ({error}); is it truncated?") from error
    return check_row(row, path)


def table_place(row: dict[str, Any]) -> tuple[int | None, bool, bool, bool]:
    """(seed-table row or None, light model, light feature, light search) of a metrics row."""
    flags = (row["distilled"], row["neck"] in ("hash", "pyramid"), row["index"] == "coarse_to_fine")
    return TABLE_ROWS.get(flags), *flags


def format_summary(row: dict[str, Any]) -> str:
    """The row as two aligned lines, header and values, for the terminal."""
    cells = []
    for column in SUMMARY_COLUMNS:
        value = row[column]
        cells.append((column, f"{value:.4f}" if isinstance(value, float) else str(value)))
    widths = [max(len(name), len(text)) for name, text in cells]
    header = " | ".join(name.ljust(w) for (name, _), w in zip(cells, widths, strict=True))
    values = " | ".join(text.ljust(w) for (_, text), w in zip(cells, widths, strict=True))
    return f"{header}\n{values}"
