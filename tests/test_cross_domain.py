"""Cross-domain evaluation: named dataset configs, one row per target set, the source recorded with each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agw_light import evaluation
from agw_light.builders import dataset_config
from agw_light.cli.evaluate import evaluate
from agw_light.data.synthetic import MARKET_DIR, QUERY_DIR, generate_synthetic
from agw_light.results import read_metrics


def test_dataset_config_reads_plain_and_global_files():
    market = dataset_config("market1501", ["dataset.root=/data/m", "dataset.check_images=false"])
    assert (market.name, market.root, market.check_images, market.height) == ("market1501", "/data/m", False, 256)
    synthetic = dataset_config("synthetic", ["dataset.height=48", "dataset.kwargs.seed=3"])
    # synthetic.yaml is a global-package file whose kwargs interpolate ${dataset.height}: resolved after overrides.
    assert synthetic.name == "synthetic" and synthetic.kwargs.height == 48 and synthetic.kwargs.seed == 3
    assert "model" not in synthetic and "optim" not in synthetic


def test_dataset_config_names_bad_input():
    with pytest.raises(ValueError, match=r"no dataset config 'market'.*available: .*dukemtmcreid, .*market1501"):
        dataset_config("market")
    with pytest.raises(ValueError, match="has no key 'rooot'"):
        dataset_config("msmt17", ["dataset.rooot=/x"])
    with pytest.raises(ValueError, match="expected key=value"):
        dataset_config("msmt17", ["root"])


@pytest.fixture
def target_tree(tmp_path) -> Path:
    """A second generated set (another seed, so other people) in the Market-1501 layout: the target domain."""
    return generate_synthetic(
        tmp_path / "target", num_ids=6, num_cams=2, images_per_id_cam=2, height=32, width=16, seed=7
    )


def test_evaluate_writes_one_row_per_target_with_its_source(compose_config, target_tree, tmp_path, monkeypatch):
    from agw_light.builders import build_module

    monkeypatch.setattr(evaluation, "time_inference", lambda *args, **kwargs: 1.0)
    source_cfg = compose_config("model.backbone=resnet18")
    torch.manual_seed(0)
    module = build_module(source_cfg, num_classes=8)
    ckpt = tmp_path / "run" / "model.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)

    cfg = compose_config(
        f"ckpt={ckpt}",
        "device=cpu",
        "eval.targets=[synthetic,market1501]",  # the own dataset listed again: evaluated once, in metrics.json
        f"+eval.target_overrides.market1501=['dataset.root={target_tree}','dataset.check_images=false']",
        config_name="evaluate",
    )
    own = evaluate(cfg)
    assert sorted(path.name for path in ckpt.parent.glob("metrics*.json")) == [
        "metrics.json",
        "metrics_market1501.json",
    ]
    assert read_metrics(ckpt.parent / "metrics.json") == own
    assert (own["dataset"], own["train_dataset"]) == ("synthetic", "synthetic")
    target = read_metrics(ckpt.parent / "metrics_market1501.json")
    assert (target["dataset"], target["train_dataset"]) == ("market1501", "synthetic")
    # The target's own protocol: its query folder, not the source's.
    assert target["num_query"] == len(list((target_tree / MARKET_DIR / QUERY_DIR).glob("*.jpg")))
    assert target["num_query"] != own["num_query"]
    assert [entry["target_fpr"] for entry in target["verification"]] == [1e-4, 1e-3, 1e-2]


def test_an_unlisted_target_override_is_refused(compose_config, tmp_path):
    cfg = compose_config(
        f"ckpt={tmp_path / 'x.ckpt'}", "+eval.target_overrides.msmt17=['dataset.root=/x']", config_name="evaluate"
    )
    with pytest.raises(ValueError, match=r"eval.target_overrides names \['msmt17'\]"):
        evaluate(cfg)


@pytest.mark.slow  # one training epoch (about 50 s on 2 shared cores)
def test_training_evaluates_its_targets_at_the_end(compose_config, target_tree, tmp_path, monkeypatch):
    from conftest import ONE_EPOCH

    from agw_light.cli.train import train

    monkeypatch.setattr(evaluation, "time_inference", lambda *args, **kwargs: 1.0)
    cfg = compose_config(
        *ONE_EPOCH,
        "visualize.num_queries=0",
        "visualize.embedding_size=0",
        "device=cpu",
        "eval.targets=[market1501]",
        f"+eval.target_overrides.market1501=['dataset.root={target_tree}']",
    )
    own = train(cfg)
    target = read_metrics(tmp_path / "run" / "metrics_market1501.json")
    assert (own["dataset"], own["train_dataset"]) == ("synthetic", "synthetic")
    assert (target["dataset"], target["train_dataset"], target["checkpoint"]) == (
        "market1501",
        "synthetic",
        own["checkpoint"],
    )
