"""Lightning DDP on 2 CPU processes (gloo): the validated mAP equals a single-process evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_DATA

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_two_process_ddp_validation_matches_single_process(tmp_path, synthetic_cache):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "agw_light.train",
        f"dataset.root={synthetic_cache}",
        *TINY_DATA,
        "model.backbone=resnet18",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=2",
        "trainer.log_every_n_steps=1",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    checkpoint = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    ddp_map = events.Scalars("test/mAP")[-1].value  # the last epoch's validation, gathered from both ranks
    single = json.loads((run_dir / "metrics.json").read_text())
    assert ddp_map == pytest.approx(single["mAP"], abs=1e-6)
    assert checkpoint["global_step"] > 0
