"""End-to-end training, resume and checkpoint evaluation on a tiny generated dataset (row 1, light=full)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_same_training_state

from agw_light.builders import build_datamodule
from agw_light.cli.train import train
from agw_light.evaluation import evaluate_checkpoint, evaluate_features, extract_features
from agw_light.files import file_sha256
from agw_light.inference.checkpoint import load_checkpoint
from agw_light.lit.module import LitReID, warmup_multistep_factor

# ResNet-18 keeps the suite fast on 2 cores; the row's losses, head and evaluation are the same as ResNet-50's.
SMALL = [
    "model.backbone=resnet18",
    "trainer.accelerator=cpu",
    "+trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def test_schedule_matches_agw_definition():
    kwargs = dict(warmup_epochs=10, warmup_factor=0.1, milestones=(40, 90), gamma=0.1)
    assert warmup_multistep_factor(0, **kwargs) == pytest.approx(0.1)
    assert warmup_multistep_factor(5, **kwargs) == pytest.approx(0.55)
    assert warmup_multistep_factor(10, **kwargs) == pytest.approx(1.0)
    assert warmup_multistep_factor(39.9, **kwargs) == pytest.approx(1.0)
    assert warmup_multistep_factor(40, **kwargs) == pytest.approx(0.1)
    assert warmup_multistep_factor(90, **kwargs) == pytest.approx(0.01)


@pytest.mark.slow
def test_training_lowers_loss_and_raises_map(compose_config, tmp_path):
    cfg = compose_config(
        *SMALL,
        "trainer.max_epochs=30",
        "trainer.check_val_every_n_epoch=30",
        "optim.warmup_epochs=1",
        "optim.milestones=[100]",
        "optim.lr=1e-3",
    )
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    torch.manual_seed(0)
    untrained = LitReID(
        model=dict(cfg.model),
        losses=[dict(t) for t in cfg.losses],
        num_classes=datamodule.num_classes,
        distance="cosine",
    )
    before = extract_features(untrained.model, datamodule.query_gallery_dataloader(), torch.device("cpu"))
    map_before = evaluate_features(before["features"], before["pids"], before["camids"], before["is_query"])["mAP"]

    row = train(cfg)

    assert row["mAP"] > map_before + 0.1, (row["mAP"], map_before)
    assert row["feature_dim"] == 512 and row["metric"] == "cosine"
    for key in ("R1", "mAP", "mINP", "inference_ms_per_batch", "search_ms_per_query"):
        assert math.isfinite(row[key]), key
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["mAP"] == pytest.approx(row["mAP"])
    losses = _scalar_series(tmp_path / "run" / "tensorboard", "train/loss")
    assert losses[-1] < losses[0]
    tags = _scalar_tags(tmp_path / "run" / "tensorboard")
    assert {"test/R1", "test/mAP", "test/mINP", "train/loss_ce", "train/loss_wrt"} <= tags
    assert not any(tag.startswith("val/") for tag in tags)  # nothing is called validation that scores test data
    # eval.select=last: the final epoch is reported, and no checkpoint is chosen on the test split.
    assert written["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert written["selection"] == "last epoch"
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_val_split_selects_on_held_out_training_identities(compose_config, tmp_path):
    """eval.select=val_split: identities leave training, validation scores them as val/*, the best is reported."""
    cfg = compose_config(
        *SMALL, "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "eval.select=val_split",
        "eval.val_images=16",
    )  # fmt: skip
    full = build_datamodule(cfg)
    full.prepare_data()
    full.setup("fit")
    held = build_datamodule(cfg, holdout_images=16)
    held.setup("fit")
    queries, gallery = held._held_out
    held_paths = {path for path, _, _ in queries + gallery}
    assert len({pid for _, pid, _ in queries}) == 2  # 16 of the 64 training images: whole identities
    assert not held_paths & {path for path, _, _ in held.dataset.train}
    assert len(held_paths) + len(held.dataset.train) == len(full.dataset.train)
    assert held.num_classes == full.num_classes - 2
    assert sorted({pid for _, pid, _ in held.dataset.train}) == list(range(held.num_classes))
    assert held.dataset.query == full.dataset.query and held.dataset.gallery == full.dataset.gallery

    row = train(cfg)

    checkpoints = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    [best] = [name for name in checkpoints if name.startswith("best-")]
    assert row["checkpoint"] == str(tmp_path / "run" / "checkpoints" / best)
    assert row["selection"].startswith("best val/mAP")
    val_map = _scalar_series(tmp_path / "run" / "tensorboard", "val/mAP")
    assert best.endswith(f"valmAP{max(val_map):.4f}.ckpt")
    assert not any(tag.startswith("test/") for tag in _scalar_tags(tmp_path / "run" / "tensorboard"))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / best).hparams["num_classes"] == held.num_classes


def test_select_must_be_last_or_val_split(compose_config):
    from agw_light.builders import evaluation_protocol

    with pytest.raises(ValueError, match="eval.select='test'.*never chosen on the test split"):
        evaluation_protocol(compose_config("eval.select=test"))


@pytest.mark.slow
def test_resume_continues_exactly(compose_config, tmp_path):
    common = [
        *SMALL,
        "trainer.check_val_every_n_epoch=2",
        "optim.warmup_epochs=1",
        "optim.milestones=[1]",
        "trainer.deterministic=true",
    ]
    straight = compose_config(*common, "trainer.max_epochs=2", output_dir=tmp_path / "straight")
    train(straight)
    first = compose_config(*common, "trainer.max_epochs=1", output_dir=tmp_path / "first")
    train(first)
    resumed = compose_config(
        *common,
        "trainer.max_epochs=2",
        f"resume={tmp_path / 'first/checkpoints/last.ckpt'}",
        output_dir=tmp_path / "resumed",
    )
    train(resumed)

    straight, resumed = tmp_path / "straight/checkpoints/last.ckpt", tmp_path / "resumed/checkpoints/last.ckpt"
    assert_same_training_state(straight, resumed)
    schedules = [torch.load(path, weights_only=True)["lr_schedulers"][0]["last_epoch"] for path in (straight, resumed)]
    assert schedules[0] == schedules[1]


@pytest.mark.slow
def test_checkpoint_alone_rebuilds_the_model_and_test_reproduces_the_row(compose_config, tmp_path):
    cfg = compose_config(*SMALL, "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1")
    trained_row = train(cfg)
    checkpoint = tmp_path / "run/checkpoints/last.ckpt"
    loaded = load_checkpoint(checkpoint)
    assert not loaded.network.training
    assert loaded.hparams["model"]["backbone"] == "resnet18"
    assert loaded.network(torch.zeros(2, 3, 64, 32)).shape == (2, 512)
    assert loaded.sha256 == file_sha256(checkpoint)

    test_cfg = compose_config(f"ckpt={checkpoint}", config_name="evaluate")
    row = evaluate_checkpoint(test_cfg.ckpt, build_datamodule(test_cfg), device="cpu", out_path=tmp_path / "test.json")
    # Exact: JSON round-trips Python floats (approx cannot compare the nested verification / ROC entries).
    assert json.loads((tmp_path / "test.json").read_text()) == json.loads(json.dumps(row))
    for key in ("R1", "R5", "R10", "mAP", "mINP", "feature_dim", "num_valid_queries"):
        assert row[key] == pytest.approx(trained_row[key]), key


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint(tmp_path / "missing.ckpt")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.ckpt"):
        load_checkpoint(broken)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(ValueError, match="foreign.ckpt.*hyper_parameters"):
        load_checkpoint(foreign)


@pytest.mark.parametrize("inter_channels", [1, "half"])
def test_checkpoints_record_the_nonlocal_width_and_older_ones_load_as_half(tmp_path, inter_channels):
    """Checkpoints from before `nonlocal_inter_channels` existed hold half-width blocks and record no width."""
    model = {"backbone": "resnet18", "nonlocal_layers": [0, 0, 1, 0], "pretrained": "none"}
    if inter_channels == "half":
        model["nonlocal_inter_channels"] = "half"
    losses = [{"name": "ce", "type": "cross_entropy", "output": "logits"}]
    module = LitReID(model, losses, num_classes=3)
    assert module.hparams.model["nonlocal_inter_channels"] == inter_channels
    state = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    if inter_channels == "half":  # what a checkpoint of the earlier default holds
        del state["hyper_parameters"]["model"]["nonlocal_inter_channels"]
    torch.save(state, tmp_path / "net.ckpt")
    rebuilt = load_checkpoint(tmp_path / "net.ckpt").network
    block = rebuilt.backbone.nonlocal_blocks["layer3"]["1"]
    assert block.inter_channels == (1 if inter_channels == 1 else 128)


def test_a_checkpoint_holding_code_is_refused_and_the_code_never_runs(crafted_checkpoint):
    crafted, marker = crafted_checkpoint
    with pytest.raises(ValueError, match="crafted.ckpt"):
        load_checkpoint(crafted)
    assert not marker.exists()


def test_resume_from_missing_file_is_a_clear_error(compose_config, tmp_path):
    cfg = compose_config(*SMALL, f"resume={tmp_path / 'nope.ckpt'}")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        train(cfg)


def test_an_unusable_resume_file_is_named_with_what_is_wrong(compose_config, tmp_path):
    """A file cut short (a kill or a full disk during an old, non-atomic save) or one without training state
    fails before training starts, naming the file, instead of Lightning's bare EOFError or IndexError."""
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"hyper_parameters": {"model": {}}, "state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"hyper_parameters": {"model": {}}, "state_dict": {}}, weights_only)
    for path, problem in (
        (empty, "cannot be read safely .*truncated"),
        (truncated, "cannot be read safely .*truncated"),
        (weights_only, "holds weights but no training state \\(missing epoch, global_step, loops"),
    ):
        cfg = compose_config(*SMALL, f"resume={path}", output_dir=tmp_path / path.stem)
        with pytest.raises(ValueError, match=f"resume={path}: .*{problem}"):
            train(cfg)


def _event_accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator


def _scalar_series(log_dir, tag: str) -> list[float]:
    return [event.value for event in _event_accumulator(log_dir).Scalars(tag)]


def _scalar_tags(log_dir) -> set[str]:
    return set(_event_accumulator(log_dir).Tags()["scalars"])


@pytest.mark.slow
def test_the_cpu_small_preset_composes_over_a_gpu_sized_config_and_trains(compose_config, tmp_path):
    """`+preset=cpu_small` replaces what a dataset config and the row leave sized for a GPU and ImageNet (a
    ResNet-50 from ImageNet weights, 256x128, 16 x 4 batches) and trains offline on the CPU; here one tiny
    epoch of the generated set."""
    from hydra import compose, initialize_config_dir

    from agw_light.cli import CONF_DIR
    from agw_light.cli.train import train

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        market = ["dataset=market1501", "dataset.root=/data", "output_dir=/nowhere"]
        gpu_sized, small = compose("config", market), compose("config", [*market, "+preset=cpu_small"])
    assert (gpu_sized.model.backbone, gpu_sized.model.pretrained, gpu_sized.dataset.height) == (
        "resnet50",
        "imagenet",
        256,
    )
    assert (small.model.backbone, small.model.pretrained, small.trainer.accelerator) == ("resnet18", "none", "cpu")
    assert (small.dataset.height, small.dataset.width, small.loader.batch_size) == (128, 64, 32)
    cfg = compose_config(
        "+preset=cpu_small",
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1",
        "+trainer.enable_progress_bar=false",
        "visualize.num_queries=0",
        "visualize.embedding_size=0",
        "eval.timing_batch_size=8",
        "dataset.kwargs.num_ids=8",
        "loader.batch_size=8",
        "loader.num_instances=2",
    )
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.optim.lr) == ("resnet18", "none", 1.0e-3)
    row = train(cfg)
    assert math.isfinite(row["mAP"]) and row["feature_dim"] == 512
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_the_logged_cpu_time_is_the_runs_own_not_the_processes_so_far(caplog):
    """In a multirun every job runs in one process: what ran before a job is not its cost."""
    import logging
    import re
    import time

    from agw_light.cli.train import cpu_seconds, log_run_cost

    def burn(seconds: float) -> None:
        until = cpu_seconds() + seconds
        while cpu_seconds() < until:
            sum(range(10_000))

    burn(0.6)  # an earlier job of the multirun
    started = time.perf_counter(), cpu_seconds()
    burn(0.2)
    with caplog.at_level(logging.INFO, logger="agw_light.cli.train"):
        log_run_cost(*started)
    cpu = float(re.search(r"wall time, ([0-9.]+) s CPU time", caplog.text)[1])
    assert 0.15 <= cpu <= 0.5
