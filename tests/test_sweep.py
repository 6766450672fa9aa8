"""End to end: the table's Hydra multirun over the five rows, then the report, as a user runs them (reduced)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ONE_EPOCH, TINY_DATA

ROWS = ("full", "model", "feat", "search", "all")
REDUCED = [*ONE_EPOCH, "eval.fit_images=64", "eval.timing_batch_size=8"]

pytestmark = pytest.mark.slow


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_five_row_sweep_and_report(synthetic_cache, tmp_path):
    sweep = tmp_path / "multirun"
    trained = run_module(
        "agw_light.train",
        "-m",
        f"light={','.join(ROWS)}",
        f"hydra.sweep.dir={sweep}",
        f"dataset.root={synthetic_cache}",
        *TINY_DATA,
        *REDUCED,
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    for row in ROWS:  # one run folder per row under <sweep>/<dataset>/<row>
        assert (sweep / "synthetic" / row / "metrics.json").is_file(), row
    # Rows 2 and 5 distilled from row 1 of this sweep without any path given.
    import torch

    teacher = json.loads((sweep / "synthetic" / "full" / "metrics.json").read_text())["checkpoint"]
    for student in ("model", "all"):
        checkpoint = sweep / "synthetic" / student / "checkpoints" / "last.ckpt"  # eval.select=last
        assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["teacher_ckpt"] == teacher

    # Each row's TensorBoard log holds its validation's ranked lists and the gallery embedding.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for row in ROWS:
        events = EventAccumulator(str(sweep / "synthetic" / row / "tensorboard"), size_guidance={"images": 0})
        events.Reload()
        assert "test/ranked_lists" in events.Tags()["images"], row
        assert (sweep / "synthetic" / row / "tensorboard" / "projector_config.pbtxt").is_file(), row

    reported = run_module("agw_light.report", str(sweep), cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr[-3000:]
    with open(sweep / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["light"] for row in rows] == list(ROWS)
    numeric = ("R1", "mAP", "mINP", "inference_ms_per_batch", "search_ms_per_query")
    for row in rows:
        assert all(math.isfinite(float(row[column])) for column in numeric), row
        assert 0.0 <= float(row["mAP"]) <= 1.0
    assert [row["metric"] for row in rows] == ["cosine", "cosine", "hamming", "hamming", "hamming"]
    assert [row["model_res18"] for row in rows] == ["false", "true", "false", "false", "true"]
    for name in ("results.md", "accuracy_vs_search_time.png", "training_curves_synthetic.png"):
        assert (sweep / name).is_file(), name


def test_failed_row_leaves_its_reason_in_the_run_folder(synthetic_cache, tmp_path):
    """A student row swept without row 1 fails, says where it looked for the teacher, and records why."""
    sweep = tmp_path / "multirun"
    result = run_module(
        "agw_light.train",
        "-m",
        "light=model",
        f"hydra.sweep.dir={sweep}",
        f"dataset.root={synthetic_cache}",
        *TINY_DATA,
        *REDUCED,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    error = (sweep / "synthetic" / "model" / "error.txt").read_text()
    first_line = error.splitlines()[0]
    assert first_line.startswith("FileNotFoundError: light.teacher_ckpt=")
    assert str(sweep / "synthetic" / "full") in first_line and "put light=full first" in first_line
    assert not (sweep / "synthetic" / "model" / "metrics.json").exists()
