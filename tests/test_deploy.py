"""Deploying a model: ONNX export (parity with PyTorch for each head kind) and the one Encoder.

Tiny untrained ResNet-18 checkpoints with randomised BatchNorm statistics (so folding them into the
convolutions, as onnxruntime does, is exercised), on the tiny generated dataset at 64 x 32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from agw_light.data.transforms import Preprocessing  # noqa: E402
from agw_light.evaluation import evaluate_features, extract_features  # noqa: E402
from agw_light.files import file_sha256  # noqa: E402
from agw_light.inference import Encoder, onnxruntime_available  # noqa: E402
from agw_light.inference.checkpoint import load_checkpoint  # noqa: E402

HEADS = {"bnneck": None, "hash": [64], "pyramid": [64, 32]}
IMAGE_SIZE = [64, 32]


def tiny_checkpoint(compose_config, tmp_path: Path, neck: str) -> tuple[Path, object]:
    """(checkpoint path, datamodule): an untrained ResNet-18 with the given head for the tiny dataset."""
    from agw_light.builders import build_datamodule
    from agw_light.lit.module import LitReID

    cfg = compose_config("model.backbone=resnet18", "trainer.accelerator=cpu")
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    torch.manual_seed(3)
    module = LitReID(
        model={"backbone": "resnet18", "pretrained": "none", "neck": neck, "code_lengths": HEADS[neck]},
        losses=[dict(term) for term in cfg.losses],
        num_classes=datamodule.num_classes,
        image_size=IMAGE_SIZE,
    )
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            layer.running_mean.normal_(0.0, 0.1)
            layer.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{neck}.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path, datamodule


def export_with_the_command(ckpt: Path, out: Path) -> None:
    """`python -m agw_light.export ckpt=... out=...`, composed from conf/export.yaml and run in-process."""
    from hydra import compose, initialize_config_dir

    from agw_light.cli import CONF_DIR
    from agw_light.cli.export import export

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        export(compose(config_name="export", overrides=[f"ckpt={ckpt}", f"out={out}"]))


@pytest.mark.parametrize("neck", list(HEADS))
def test_onnx_export_matches_pytorch(neck, compose_config, tmp_path):
    import onnx

    ckpt, datamodule = tiny_checkpoint(compose_config, tmp_path, neck)
    out = tmp_path / "model.onnx"
    export_with_the_command(ckpt, out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model.onnx")) == ["model.onnx"]

    props = {entry.key: json.loads(entry.value) for entry in onnx.load(str(out)).metadata_props}
    expected_distance = "cosine" if neck == "bnneck" else "hamming"
    assert props["image_size"] == IMAGE_SIZE and props["checkpoint_sha256"] == file_sha256(ckpt)
    assert props["code_lengths"] == HEADS[neck] and props["distance"] == expected_distance
    assert props["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert props["std"] == pytest.approx([0.229, 0.224, 0.225])

    onnx_encoder = Encoder.from_onnx(out)
    torch_encoder = Encoder.from_checkpoint(ckpt, device="cpu", backend="torch")
    for attribute in ("image_size", "distance", "code_lengths", "checkpoint_sha256"):
        assert getattr(onnx_encoder, attribute) == getattr(torch_encoder, attribute), attribute
    loader = datamodule.query_gallery_dataloader(preprocessing=Preprocessing(IMAGE_SIZE))
    ours, theirs = torch_encoder.encode_loader(loader), onnx_encoder.encode_loader(loader)
    reference, exported = ours["features"], theirs["features"]
    assert exported.shape == reference.shape and exported.dtype == torch.float32
    if neck == "bnneck":
        assert (exported - reference).abs().max() < 1e-4
    else:
        clear = reference.abs() > 1e-4
        assert clear.float().mean() > 0.99  # the comparison covers nearly every bit
        assert torch.equal((exported > 0)[clear], (reference > 0)[clear])

    # Evaluation's own extraction (the table's) gives the torch encoder's outputs, and both score the same.
    evaluated = extract_features(load_checkpoint(ckpt).network, loader, torch.device("cpu"))
    assert torch.equal(evaluated["features"], reference) and torch.equal(evaluated["pids"], ours["pid"])
    ranking_length = HEADS[neck][0] if HEADS[neck] else reference.shape[1]
    scores = [
        evaluate_features(
            features[:, :ranking_length],
            ours["pid"],
            ours["camid"],
            ours["is_query"],
            distance=expected_distance,
            max_rank=10,
        )
        for features in (reference, exported)
    ]
    assert scores[0]["R1"] == scores[1]["R1"] and scores[0]["mAP"] == pytest.approx(scores[1]["mAP"], abs=1e-6)


def test_encoder_backends_and_inputs_agree(compose_config, tmp_path):
    """PIL images, paths and a folder (recursive, sorted) give the same rows; the in-memory onnxruntime backend
    (the CPU default) matches torch, and batches of any size (1 included) work."""
    import numpy as np
    from PIL import Image

    ckpt, _ = tiny_checkpoint(compose_config, tmp_path, "bnneck")
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "b.png", folder / "sub" / "a.jpg", folder / "a.png"]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (90, 40, 3), dtype=np.uint8)).save(path, quality=95)
    (folder / "notes.txt").write_text("not an image")
    in_order = sorted(paths)
    assert in_order == [folder / "a.png", folder / "b.png", folder / "sub" / "a.jpg"]

    torch_encoder = Encoder.from_checkpoint(ckpt, device="cpu", backend="torch")
    by_folder = torch_encoder.encode(folder)
    by_paths = torch_encoder.encode([str(p) for p in in_order], batch_size=2)
    with Image.open(in_order[0]) as first:
        by_image = torch_encoder.encode([first.copy()])
    assert by_folder.shape == (3, 512)
    torch.testing.assert_close(by_paths, by_folder)
    torch.testing.assert_close(by_image, by_folder[:1])
    # Evaluation's preprocessing by hand: resize to 64 x 32, scale to [0, 1], ImageNet normalisation.
    network = load_checkpoint(ckpt).network
    with Image.open(in_order[1]) as image:
        resized = np.asarray(image.convert("RGB").resize((32, 64), Image.BILINEAR), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    batch = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(by_folder[1:2], network(batch), atol=2e-2, rtol=0)  # PIL vs torch resize

    auto = Encoder.from_checkpoint(ckpt, device="cpu")
    assert auto.backend == ("onnxruntime" if onnxruntime_available() else "torch")
    assert (auto.encode(folder, batch_size=2) - by_folder).abs().max() < 1e-4
    assert auto.checkpoint_sha256 == file_sha256(ckpt) and auto.image_size == (64, 32)


def test_bad_files_get_errors_naming_them(tmp_path, crafted_checkpoint):
    from agw_light.inference.onnx import export_onnx
    from agw_light.models import build_model

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.onnx"):
        Encoder.from_onnx(garbage)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        Encoder.from_onnx(tmp_path / "missing.onnx")
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(
        export_onnx(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten()), image_size=(4, 2), metadata={})
    )
    with pytest.raises(ValueError, match=r"bare.onnx lacks metadata \['image_size'"):
        Encoder.from_onnx(bare)

    crafted, marker = crafted_checkpoint
    with pytest.raises(ValueError, match="crafted.ckpt"):
        Encoder.from_checkpoint(crafted, device="cpu")
    assert not marker.exists()
    with pytest.raises(ValueError, match="backend='tensorrt'"):
        Encoder.from_checkpoint(crafted, backend="tensorrt")
    (tmp_path / "notes.txt").write_text("not an image")
    encoder = Encoder.from_network(
        build_model("resnet18", num_classes=2), preprocessing=Preprocessing((32, 16)), backend="torch"
    )
    with pytest.raises(OSError, match="cannot read image file .*notes.txt"):
        encoder.encode([tmp_path / "notes.txt"])


def test_agw_light_exposes_the_encoder_lazily():
    import subprocess
    import sys

    code = "import sys, agw_light; print('torch' in sys.modules); print(agw_light.Encoder.__module__)"
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert lines == ["False", "agw_light.inference.encoder"]
