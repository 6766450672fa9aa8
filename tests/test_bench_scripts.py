"""scripts/gpu_check.sh end to end on the CPU at tiny sizes, so the GPU check is known to run before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_at_tiny_sizes(tmp_path):
    out = tmp_path / "out"
    environment = {**os.environ, "GPU_CHECK_TINY": "1", "PYTHON": sys.executable, "AGW_CACHE": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((out / "gpu_check.json").read_text())
    assert {"device", "torch", "sizes", "train", "inference", "search", "loss", "seconds"} <= set(report)
    assert set(report["train"]) == {"1", "2"}
    for row in report["train"].values():
        assert {"synthetic", "real", "real_over_synthetic", "pipeline_images_per_s_per_worker"} <= set(row)
        assert set(row["synthetic"]) == {"amp=off,channels_last=off", "amp=on,channels_last=on"}
        for figures in [*row["synthetic"].values(), row["real"]]:
            assert figures["images_per_s"] > 0 and figures["peak_memory_mb"] > 0
    assert report["train"]["2"]["row"] == "model"  # the distilled row: its step ran the teacher forward
    assert set(report["inference"]) == {"full", "model", "feat", "search", "all"}
    assert all(figures["fp32"] > 0 and figures["fp16"] > 0 for figures in report["inference"].values())
    assert {"batched_ms", "single_ms", "recall_at_1", "device_exact_float_batched_ms"} <= set(report["search"])
    assert len(report["loss"]["losses"]) == 6 and isinstance(report["loss"]["loss_falls"], bool)
    assert (out / "gpu_check.md").read_text().startswith("# GPU check: cpu")


def test_bench_rerank_runs_and_agrees_with_the_dense_implementation(tmp_path):
    """scripts/bench_rerank.py at a tiny size: both implementations measured, and their distances agree up to
    the dense one's float16 vectors."""
    out = tmp_path / "rerank.json"
    environment = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_rerank.py"), "--sizes", "12", "40", "--dim", "8", "--dense"]
        + ["--json", str(out)],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sizes"] == [12, 40] and report["blockwise"]["queries_measured"] == 12
    for figures in (report["blockwise"], report["dense"]):
        assert figures["seconds"] > 0 and figures["peak_mb"] >= 0
    assert report["max_abs_difference_of_sample_rows"] < 5e-3
