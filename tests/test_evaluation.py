"""The evaluate command: the image size it feeds the model, and checkpoints it must refuse."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from agw_light import evaluation
from agw_light.cli.evaluate import evaluate

TRAINED_SIZE = [48, 24]  # the tiny configs' dataset is 64 x 32: evaluation must not take that size
ON_CPU = ["device=cpu"]


@pytest.fixture
def checkpoint_trained_at(compose_config, tmp_path):
    """An untrained ResNet-18 checkpoint of the tiny dataset (8 training ids), built as training builds it from
    a config with dataset.height/width = TRAINED_SIZE."""
    from agw_light.builders import build_module

    height, width = TRAINED_SIZE
    cfg = compose_config("model.backbone=resnet18", f"dataset.height={height}", f"dataset.width={width}")
    torch.manual_seed(0)
    module = build_module(cfg, num_classes=8)
    path = tmp_path / "trained.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


@pytest.fixture
def fed_sizes(monkeypatch) -> dict[str, set[tuple[int, int]]]:
    """(height, width) of every image batch the evaluation feeds the model, and of its timed batch (not
    timed here: the tests check sizes, not speed)."""
    sizes: dict[str, set[tuple[int, int]]] = {"images": set(), "timing": set()}
    extract = evaluation.extract_features

    def recording_extract(module, loader, device, *, desc="extracting features"):
        sizes["images"].update(tuple(batch["image"].shape[-2:]) for batch in loader)
        return extract(module, loader, device, desc=desc)

    def recording_timing(module, *, height, width, device, batch_size=64):
        sizes["timing"].add((height, width))
        return 1.0

    monkeypatch.setattr(evaluation, "extract_features", recording_extract)
    monkeypatch.setattr(evaluation, "time_inference", recording_timing)
    return sizes


def test_evaluate_feeds_the_trained_size_unless_another_is_asked_for(
    compose_config, checkpoint_trained_at, fed_sizes, tmp_path, caplog
):
    out = tmp_path / "metrics.json"
    cfg = compose_config(f"ckpt={checkpoint_trained_at}", f"out={out}", *ON_CPU, config_name="evaluate")
    assert (cfg.dataset.height, cfg.dataset.width) == (64, 32)
    row = evaluate(cfg)
    assert fed_sizes == {"images": {tuple(TRAINED_SIZE)}, "timing": {tuple(TRAINED_SIZE)}}
    assert row["image_size"] == "48x24" and "trained_image_size" not in row
    assert json.loads(out.read_text())["image_size"] == "48x24"

    for recorded in fed_sizes.values():
        recorded.clear()
    cfg = compose_config(
        f"ckpt={checkpoint_trained_at}", f"out={out}", "image_size=[64,32]", *ON_CPU, config_name="evaluate"
    )
    with caplog.at_level(logging.WARNING, logger="agw_light"):
        row = evaluate(cfg)
    assert fed_sizes == {"images": {(64, 32)}, "timing": {(64, 32)}}
    assert (row["image_size"], row["trained_image_size"]) == ("64x32", "48x24")
    written = json.loads(out.read_text())
    assert (written["image_size"], written["trained_image_size"]) == ("64x32", "48x24")
    assert "evaluating at image size 64x32, not at the size the model was trained at, 48x24" in caplog.text


def test_a_bad_image_size_is_named(compose_config, checkpoint_trained_at):
    cfg = compose_config(f"ckpt={checkpoint_trained_at}", "image_size=[64]", *ON_CPU, config_name="evaluate")
    with pytest.raises(ValueError, match=r"image_size=\[64\]: expected \[height, width\]"):
        evaluate(cfg)


def test_evaluate_refuses_a_checkpoint_holding_code_and_the_code_never_runs(
    compose_config, crafted_checkpoint, tmp_path
):
    (crafted, marker), out = crafted_checkpoint, tmp_path / "metrics.json"
    cfg = compose_config(f"ckpt={crafted}", f"out={out}", *ON_CPU, config_name="evaluate")
    with pytest.raises(ValueError, match=r"checkpoint .*crafted\.ckpt cannot be read safely"):
        evaluate(cfg)
    assert not marker.exists() and not out.exists()


def test_rerank_ranks_the_reranked_distances_and_records_its_settings(
    compose_config, checkpoint_trained_at, fed_sizes, tmp_path, monkeypatch
):
    """eval.rerank=true: the metrics are those of `rerank_blocks`' distances of the extracted features, fed
    through the evaluation's blocks; metrics.json and the report say so."""
    from agw_light.metrics import evaluate_rank, rerank_blocks
    from agw_light.results import read_metrics, rerank_text

    extracted = []
    recording_extract = evaluation.extract_features  # fed_sizes' recorder: it also consumes the loader once

    def keeping_extract(module, loader, device, *, desc="extracting features"):
        extracted.append(recording_extract(module, loader, device, desc=desc))
        return extracted[-1]

    monkeypatch.setattr(evaluation, "extract_features", keeping_extract)
    out = tmp_path / "metrics.json"
    settings = ["eval.rerank.enabled=true", "eval.rerank.k1=5", "eval.rerank.k2=2", "eval.rerank.lambda_value=0.4"]
    row = evaluate(
        compose_config(f"ckpt={checkpoint_trained_at}", f"out={out}", *settings, *ON_CPU, config_name="evaluate")
    )

    outputs = extracted[0]
    is_query = outputs["is_query"].bool()
    blocks = rerank_blocks(outputs["features"][is_query], outputs["features"][~is_query], k1=5, k2=2, lambda_value=0.4)
    expected = evaluate_rank(
        torch.cat([block for _, block in blocks]),
        outputs["pids"][is_query],
        outputs["pids"][~is_query],
        outputs["camids"][is_query],
        outputs["camids"][~is_query],
    )
    assert row["mAP"] == pytest.approx(expected["mAP"]) and row["mINP"] == pytest.approx(expected["mINP"])
    assert row["R1"] == pytest.approx(expected["cmc"][0])
    written = read_metrics(out)
    assert (written["rerank"], written["rerank_k1"], written["rerank_k2"], written["rerank_lambda"]) == (
        True,
        5,
        2,
        0.4,
    )
    assert rerank_text(written) == "k1=5 k2=2 lambda=0.4"
    assert rerank_text({key: value for key, value in written.items() if key != "rerank"}) == "off"


def test_rerank_settings_and_coarse_to_fine_are_refused_by_name(compose_config, checkpoint_trained_at, tmp_path):
    cfg = compose_config(
        f"ckpt={checkpoint_trained_at}", "eval.rerank.enabled=true", "eval.rerank.k2=0", *ON_CPU, config_name="evaluate"
    )
    with pytest.raises(ValueError, match="eval.rerank.k2=0: expected an integer >= 1"):
        evaluate(cfg)

    from agw_light.builders import build_module

    pyramid_cfg = compose_config("model.backbone=resnet18", "model.neck=pyramid", "model.code_lengths=[64,32]")
    module = build_module(pyramid_cfg, num_classes=8)
    pyramid = tmp_path / "pyramid.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, pyramid)
    cfg = compose_config(f"ckpt={pyramid}", "eval.rerank.enabled=true", *ON_CPU, config_name="evaluate")
    with pytest.raises(ValueError, match="eval.rerank.enabled=true: .*pyramid.ckpt has a code pyramid"):
        evaluate(cfg)


def test_export_and_evaluate_never_replace_their_input_or_a_foreign_file(tmp_path):
    """`export ckpt=X out=X` used to replace the checkpoint with the ONNX file, `evaluate ckpt=X out=X` with
    JSON: an output that is an input, or an existing file of another kind, is refused before any work."""
    from hydra import compose, initialize_config_dir

    from agw_light.cli import CONF_DIR
    from agw_light.cli.evaluate import evaluate
    from agw_light.cli.export import export
    from agw_light.files import is_json_object, refuse_foreign_output

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 a checkpoint's bytes")
    (tmp_path / "link.ckpt").symlink_to(ckpt)
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"R1": 0.5}')
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for command, config, own in ((export, "export", "an ONNX model"), (evaluate, "evaluate", "a metrics JSON")):
            for out in (ckpt, tmp_path / "link.ckpt"):
                with pytest.raises(ValueError, match=rf"out={out} is the input {ckpt}"):
                    command(compose(config_name=config, overrides=[f"ckpt={ckpt}", f"out={out}"]))
            with pytest.raises(ValueError, match=rf"out={notes} exists and is not {own}"):
                command(compose(config_name=config, overrides=[f"ckpt={ckpt}", f"out={notes}"]))
        with pytest.raises(ValueError, match=rf"out={metrics} exists and is not an ONNX model"):
            export(compose(config_name="export", overrides=[f"ckpt={ckpt}", f"out={metrics}"]))
    assert ckpt.read_bytes() == b"PK\x03\x04 a checkpoint's bytes" and notes.read_text() == "my notes"
    assert metrics.read_text() == '{"R1": 0.5}'
    # An earlier output of the command's own kind may be replaced.
    assert refuse_foreign_output(metrics, [ckpt], "a metrics JSON file", is_json_object) == metrics
    assert refuse_foreign_output(tmp_path / "new.json", [ckpt], "a metrics JSON file", is_json_object)
