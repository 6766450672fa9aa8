"""`python -m agw_light.search build|query` on a tiny generated gallery with a tiny checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch

from agw_light.cli.search import main, parse_arguments
from agw_light.data.synthetic import generate_synthetic
from agw_light.lit.module import LitReID
from agw_light.search import load_index

LOSSES = [{"name": "ce", "type": "cross_entropy", "output": "logits"}]


@pytest.fixture(scope="module")
def gallery_folder(tmp_path_factory):
    root = generate_synthetic(
        tmp_path_factory.mktemp("cli"), num_ids=6, num_cams=2, images_per_id_cam=2, height=32, width=16, seed=3
    )
    return root / "Market-1501-v15.09.15" / "bounding_box_test"


def _checkpoint(path, neck_model: dict) -> str:
    torch.manual_seed(0)
    module = LitReID(model=neck_model, losses=LOSSES, num_classes=3, image_size=(32, 16))
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path)


def test_build_then_query_finds_the_image_itself(gallery_folder, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "model.ckpt", {"backbone": "resnet18", "pretrained": "none"})
    main(["build", f"ckpt={ckpt}", f"gallery={gallery_folder}", f"out={tmp_path / 'index'}", "device=cpu"])
    index = load_index(tmp_path / "index")
    images = sorted(gallery_folder.glob("*.jpg"))
    assert len(index) == len(images) and index.metadata.paths == [str(p) for p in images]
    first = images[0]
    pid, camera = re.match(r"(-?\d+)_c(\d+)", first.name).groups()
    assert (index.metadata.pids[0], index.metadata.camids[0]) == (int(pid), int(camera) - 1)

    capsys.readouterr()
    main(["query", f"index={tmp_path / 'index'}", f"image={first}", "topk=3", "json=true", "device=cpu"])
    results = json.loads(capsys.readouterr().out)
    assert results[0]["query"] == str(first)
    hits = results[0]["results"]
    assert [hit["rank"] for hit in hits] == [1, 2, 3]
    assert hits[0]["path"] == str(first) and hits[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    assert hits[0]["distance"] <= hits[1]["distance"] <= hits[2]["distance"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["find"], "unknown command 'find'"),
        (["build", "ckpt=a"], "missing gallery=..., out=..."),
        (["query", "index=a", "image=b", "top=3"], r"unknown key\(s\) \['top'\]"),
        (["query", "index"], "key=value"),
    ],
)
def test_bad_arguments_say_what_is_expected(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_arguments(argv)


def test_missing_gallery_folder_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.ckpt", {"backbone": "resnet18", "pretrained": "none"})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["build", f"ckpt={ckpt}", f"gallery={tmp_path / 'nowhere'}", f"out={tmp_path / 'index'}"])
