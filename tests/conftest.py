"""Shared fixtures: composing the real Hydra configs with tiny sizes, so tests exercise what users run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

# Two cores on CI: one intra-op thread per test process keeps parallel pieces from fighting.
torch.set_num_threads(2)

TINY_DATA = [
    "dataset.height=64",
    "dataset.width=32",
    "dataset.kwargs.num_ids=16",
    "dataset.kwargs.num_cams=2",
    "dataset.kwargs.images_per_id_cam=4",
    "loader.batch_size=16",
    "loader.num_instances=4",
    "loader.test_batch_size=64",
    "loader.num_workers=0",
]

# One epoch of a ResNet-18 on the CPU, validated once: the shortest real training run a row can do.
ONE_EPOCH = [
    "model.backbone=resnet18",
    "trainer.accelerator=cpu",
    "+trainer.enable_progress_bar=false",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="session")
def lite_uri(tmp_path_factory) -> str:
    """One Milvus Lite file for the session (pymilvus starts one local server process per file): tests make
    collections of their own in it."""
    return str(tmp_path_factory.mktemp("milvus") / "gallery.db")


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Commands run in-process (Hydra's apps) attach handlers to the root logger that write to the stream pytest
    captured for that test; a later test's log records would then hit a closed file. Remove what a test added."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> Path:
    """One generated-dataset cache for the whole session, so each tiny set is drawn once."""
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture
def compose_config(synthetic_cache, tmp_path):
    """Composes conf/config.yaml (or another entry config) with tiny sizes and a temporary output folder."""
    from hydra import compose, initialize_config_dir

    from agw_light.cli import CONF_DIR

    def _compose(*overrides: str, config_name: str = "config", output_dir: Path | None = None):
        base = [f"dataset.root={synthetic_cache}", *TINY_DATA]
        if config_name == "config":
            base.append(f"output_dir={output_dir or tmp_path / 'run'}")
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=[*base, *overrides])

    return _compose


@pytest.fixture
def tiny_teacher(compose_config, tmp_path):
    """(path, datamodule): an untrained ResNet-18 'row 1' checkpoint for the tiny generated dataset and that
    dataset; distillation tests check the mechanics, not the teacher's accuracy."""
    from agw_light.builders import build_datamodule
    from agw_light.lit.module import LitReID

    cfg = compose_config("model.backbone=resnet18", "trainer.accelerator=cpu")
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    torch.manual_seed(1)
    teacher = LitReID(
        model={"backbone": "resnet18", "pretrained": "none"},
        losses=[dict(term) for term in cfg.losses],
        num_classes=datamodule.num_classes,
    )
    path = tmp_path / "teacher.ckpt"
    torch.save({"hyper_parameters": dict(teacher.hparams), "state_dict": teacher.state_dict()}, path)
    return path, datamodule


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted_checkpoint(tmp_path) -> tuple[Path, Path]:
    """(crafted.ckpt, marker): a checkpoint-shaped file whose unpickling would create `marker`."""
    marker, crafted = tmp_path / "code-ran", tmp_path / "crafted.ckpt"
    torch.save({"hyper_parameters": {"model": {}}, "state_dict": {}, "payload": _RunsCode(marker)}, crafted)
    return crafted, marker


def assert_same_training_state(expected: Path, actual: Path) -> None:
    """Two Lightning checkpoints hold the same step, weights and Adam moments (float32 tolerance)."""
    a = torch.load(expected, map_location="cpu", weights_only=True)
    b = torch.load(actual, map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"] > 0
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, msg=name)
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for key in state_a:
        torch.testing.assert_close(state_b[key]["exp_avg"], state_a[key]["exp_avg"])
