"""agw_light.convert: other frameworks' models, each built here from its published architecture
(tests/source_networks.py), saved in its file form, converted, and compared with agw_light's encoder on the same
images; the conversion is strict and never runs code from the file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import source_networks as sources
import torch
from PIL import Image

from agw_light.convert import convert_checkpoint
from agw_light.files import file_sha256
from agw_light.inference import Encoder
from agw_light.inference.checkpoint import load_checkpoint

SIZE = (64, 32)
CLASSES = 8
# torch.save of a whole module warns that it cannot keep the classes' source code: what the published files lack too.
pytestmark = pytest.mark.filterwarnings("ignore:Couldn't retrieve source code:UserWarning")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Six RGB images of another size than the network's input, so that resizing (and its filter) matters."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(6):
        pixels = rng.integers(0, 256, size=(90, 45, 3), dtype=np.uint8)
        pixels[:, : 10 + 5 * index] //= 2  # some structure besides noise
        paths.append(folder / f"{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def assert_same_features(source: torch.nn.Module, ckpt: Path, images: list[Path]) -> None:
    expected = sources.features(source, images, SIZE)
    encoded = Encoder.from_checkpoint(ckpt, device="cpu", backend="torch").encode(images)
    assert encoded.shape == expected.shape
    relative = (encoded - expected).norm(dim=1) / expected.norm(dim=1)
    assert float(relative.max()) <= 1e-5, relative


FASTREID_CASES = {
    # (depth, non-local blocks, head layout, pooling, persistent pixel statistics): fast-reid over time
    "agw-2021": ("resnet50", (0, 2, 3, 0), "weight", "gem_fixed", False),
    "agw-2020-09": ("resnet50", (0, 2, 3, 0), "classifier", "gem_fixed", True),
    "agw-2020-04": ("resnet18", (0, 1, 1, 0), "bnneck", "gem_learnable", True),
    "bot": ("resnet18", (0, 0, 0, 0), "weight", "avg", False),
}


@pytest.mark.parametrize("case", FASTREID_CASES)
def test_fastreid_models_convert_to_the_same_function(case, images, tmp_path):
    depth, nonlocal_counts, layout, pooling, persistent = FASTREID_CASES[case]
    torch.manual_seed(0)
    source = sources.randomise(
        sources.FastReID(
            CLASSES,
            depth=depth,
            nonlocal_counts=nonlocal_counts,
            head_layout=layout,
            pooling=pooling,
            persistent_pixels=persistent,
        )
    )
    src = tmp_path / "model_final.pth"
    torch.save({"model": source.state_dict(), "iteration": 1000, "optimizer": {}}, src)
    conversion = convert_checkpoint(src, tmp_path / "converted.ckpt", image_size=SIZE)
    assert conversion.format == "fastreid" and conversion.num_classes == CLASSES
    assert conversion.model["pooling"] == ("avg" if pooling == "avg" else "gem")
    assert_same_features(source, conversion.out, images)
    loaded = load_checkpoint(conversion.out)
    assert loaded.source["sha256"] == file_sha256(src) and loaded.source["format"] == "fastreid"
    assert loaded.preprocessing.interpolation == "bicubic" and loaded.preprocessing.image_size == SIZE


def test_reid_survey_pickled_module_converts_without_its_code(images, tmp_path):
    """ignite's ModelCheckpoint saved the whole Baseline module: classes under modeling.*, which do not exist here."""
    torch.manual_seed(1)
    source = sources.randomise(sources.SurveyBaseline(CLASSES))
    src = tmp_path / "resnet50_nl_model_120.pth"
    sources.save_pickled_module(source, src, "modeling.baseline")
    conversion = convert_checkpoint(src, tmp_path / "survey.ckpt", image_size=SIZE)
    assert conversion.format == "reid_survey" and "pickled module" in conversion.notes[0]
    assert "modeling" not in sys.modules  # nothing of the source project was imported
    assert conversion.model["stem_relu"] is False and conversion.model["nonlocal_layers"] == [0, 2, 3, 0]
    assert_same_features(source, conversion.out, images)


@pytest.mark.parametrize("neck_feat", ["after", "before"])
def test_strong_baseline_legacy_pickle_converts(neck_feat, images, tmp_path):
    """reid-strong-baseline's published files: whole pickled modules, in PyTorch's pre-1.6 (non-zip) format."""
    torch.manual_seed(2)
    source = sources.randomise(
        sources.SurveyBaseline(
            CLASSES, depth="resnet18", nonlocal_counts=(0, 0, 0, 0), learnable_gem=False, neck_feat=neck_feat
        )
    )
    src = tmp_path / "resnet18_model_120.pth"
    sources.save_pickled_module(source, src, "modeling.baseline", zipfile=False)
    out = tmp_path / "strong.ckpt"
    conversion = convert_checkpoint(src, out, image_size=SIZE, neck_feat=neck_feat)
    assert conversion.format == "strong_baseline" and conversion.model["pooling"] == "avg"
    assert_same_features(source, out, images)


def test_strong_baseline_without_neck_is_a_plain_head(images, tmp_path):
    torch.manual_seed(3)
    source = sources.randomise(
        sources.SurveyBaseline(CLASSES, depth="resnet18", nonlocal_counts=(0, 0, 0, 0), learnable_gem=False, neck=False)
    )
    src = tmp_path / "no_neck.pth"
    torch.save(source.state_dict(), src)
    conversion = convert_checkpoint(src, tmp_path / "plain.ckpt", image_size=SIZE, format="strong_baseline")
    assert conversion.model["neck"] == "plain"
    assert_same_features(source, conversion.out, images)


@pytest.mark.parametrize("fc_dim", [None, 16])
def test_torchreid_checkpoints_convert(fc_dim, images, tmp_path):
    """torchreid's save_checkpoint: {"state_dict" (DataParallel's module. prefix), "epoch", "rank1" (numpy)}."""
    torch.manual_seed(4)
    source = sources.randomise(
        sources.TorchreidResNet(CLASSES, depth="resnet18", last_stride=2 if fc_dim is None else 1, fc_dim=fc_dim)
    )
    src = tmp_path / "model.pth.tar-60"
    weights = {f"module.{key}": value for key, value in source.state_dict().items()}
    torch.save({"state_dict": weights, "epoch": 60, "rank1": np.float64(0.879), "optimizer": {}}, src)
    conversion = convert_checkpoint(src, tmp_path / "torchreid.ckpt", image_size=SIZE)
    assert conversion.format == "torchreid" and conversion.model["last_stride"] == (2 if fc_dim is None else 1)
    assert load_checkpoint(conversion.out).network.distance == "euclidean"  # torchreid's evaluation metric
    assert_same_features(source, conversion.out, images)


# --- safety and bad input ----------------------------------------------------------------------------------------


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(crafted_checkpoint, tmp_path):
    crafted, marker = crafted_checkpoint
    with pytest.raises(ValueError, match=r"crafted\.ckpt: refused, the file would run code .*posix\.system|system"):
        convert_checkpoint(crafted, tmp_path / "out.ckpt")
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


class _Payload:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch /tmp/agw_light_convert_pwned')",))


def test_a_pickled_module_carrying_code_is_refused(tmp_path):
    """Code hidden in a module's attribute, beside real weights: refused as a whole."""
    torch.manual_seed(5)
    source = sources.TorchreidResNet(CLASSES, depth="resnet18")
    source.payload = _Payload()
    src = tmp_path / "module.pth"
    torch.save(source, src)
    with pytest.raises(ValueError, match=r"module\.pth: refused, .*builtins\.eval"):
        convert_checkpoint(src, tmp_path / "out.ckpt")
    assert not Path("/tmp/agw_light_convert_pwned").exists()


def _fastreid_state(depth="resnet18", nonlocal_counts=(0, 0, 0, 0)) -> dict[str, torch.Tensor]:
    torch.manual_seed(6)
    return {
        "model": sources.FastReID(CLASSES, depth=depth, nonlocal_counts=nonlocal_counts, pooling="avg").state_dict()
    }


def test_bad_input_is_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "out.ckpt"
    with pytest.raises(FileNotFoundError, match="src=.*missing.pth: no such file"):
        convert_checkpoint(tmp_path / "missing.pth", out)
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="match none of the formats .*encoder.weight"):
        convert_checkpoint(foreign, out)
    with pytest.raises(ValueError, match="format='caffe': expected auto or one of fastreid, reid_survey"):
        convert_checkpoint(foreign, out, format="caffe")
    good = tmp_path / "fastreid.pth"
    torch.save(_fastreid_state(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pth: not a readable PyTorch model file"):
        convert_checkpoint(truncated, out)
    with pytest.raises(ValueError, match="format=torchreid was asked for, but the file has fastreid's layout"):
        convert_checkpoint(good, out, format="torchreid")
    assert not out.exists()
    with pytest.raises(ValueError, match="is the source file itself"):
        convert_checkpoint(good, good, overwrite=True)


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    src, out = tmp_path / "fastreid.pth", tmp_path / "out.ckpt"
    torch.save(_fastreid_state(), src)
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="out=.*out.ckpt exists: .*overwrite=true"):
        convert_checkpoint(src, out)
    assert out.read_bytes() == b"keep me"
    convert_checkpoint(src, out, overwrite=True, image_size=SIZE)
    assert load_checkpoint(out).hparams["source"]["format"] == "fastreid"


def test_other_architectures_are_refused_listing_the_keys(tmp_path):
    state = _fastreid_state()
    ibn = {  # IBN-Net: half of bn1 becomes an InstanceNorm (bn1.IN.*), half a BatchNorm (bn1.BN.*)
        key.replace(".bn1.", ".bn1.BN.") if ".layer1.0.bn1." in key else key: value
        for key, value in state["model"].items()
    }
    ibn["backbone.layer1.0.bn1.IN.weight"] = torch.ones(32)
    src = tmp_path / "ibn.pth"
    torch.save({"model": ibn}, src)
    with pytest.raises(
        ValueError,
        match=r"source keys no agw_light weight takes: .*bn1\.IN\.weight.*does not fill: "
        r"backbone\.layer1\.0\.bn1\.weight",
    ):
        convert_checkpoint(src, tmp_path / "out.ckpt")
    deep = {f"backbone.layer3.{index}.conv3.weight": torch.zeros(1) for index in range(23)}
    deep.update({f"backbone.layer{stage}.0.conv3.weight": torch.zeros(1) for stage in (1, 2, 4)})
    deep["heads.weight"] = torch.zeros(1)
    torch.save({"model": deep}, src)
    with pytest.raises(ValueError, match=r"1-1-23-1 blocks per stage .*agw_light builds ResNet-18, -34 and -50"):
        convert_checkpoint(src, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_the_command_says_which_format_it_chose(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from agw_light.cli import CONF_DIR
    from agw_light.cli.convert import convert

    src = tmp_path / "fastreid.pth"
    torch.save(_fastreid_state(), src)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("convert", [f"src={src}", f"out={tmp_path / 'out.ckpt'}", "image_size=[64,32]"])
    convert(cfg)
    printed = capsys.readouterr().out
    assert "format=fastreid (auto: keys backbone.* and heads.*)" in printed
    assert "pooling=avg" in printed and f"wrote {tmp_path / 'out.ckpt'}" in printed


# --- every part of agw_light works on a converted model ---------------------------------------------------------


@pytest.fixture
def converted(tmp_path) -> tuple[torch.nn.Module, Path]:
    """(source network, its conversion): a fast-reid AGW-style ResNet-18 (non-local blocks, learnable GeM, bicubic
    resizing, statistics inside the model) for the tiny generated set's 8 training identities."""
    torch.manual_seed(7)
    source = sources.randomise(
        sources.FastReID(
            CLASSES, depth="resnet18", nonlocal_counts=(0, 1, 1, 0), head_layout="bnneck", pooling="gem_learnable"
        )
    )
    src = tmp_path / "fastreid_agw.pth"
    torch.save({"model": source.state_dict()}, src)
    return source, convert_checkpoint(src, tmp_path / "fastreid_agw.ckpt", image_size=SIZE).out


def test_a_converted_model_scores_what_its_source_scores(converted, compose_config, tmp_path, monkeypatch):
    from agw_light import evaluation
    from agw_light.cli.evaluate import evaluate
    from agw_light.data.synthetic import generate_synthetic

    monkeypatch.setattr(evaluation, "time_inference", lambda *args, **kwargs: 1.0)
    source, ckpt = converted
    target = generate_synthetic(tmp_path / "target", num_ids=6, num_cams=2, images_per_id_cam=2, height=32, width=16)
    cfg = compose_config(
        f"ckpt={ckpt}",
        "device=cpu",
        "eval.rerank.enabled=true",
        "eval.targets=[market1501]",
        f"+eval.target_overrides.market1501=['dataset.root={target}']",
        config_name="evaluate",
    )
    row = evaluate(cfg)
    assert (row["source_format"], row["source_sha256"]) == ("fastreid", file_sha256(tmp_path / "fastreid_agw.pth"))
    assert row["rerank"] is True and row["metric"] == "cosine" and "train_dataset" not in row
    assert (ckpt.parent / "metrics_market1501.json").is_file()

    # The same protocol on the source network's own features (its own preprocessing), without re-ranking.
    cfg = compose_config(f"ckpt={ckpt}", "device=cpu", f"out={tmp_path / 'plain.json'}", config_name="evaluate")
    assert_scores_equal(evaluate(cfg), source, cfg, "cosine")


def assert_scores_equal(row: dict, source: torch.nn.Module, cfg, distance: str) -> None:
    """The row's R1/R5/mAP/mINP equal the protocol's scores of the source network's own features."""
    from agw_light.builders import build_datamodule
    from agw_light.evaluation import evaluate_features

    datamodule = build_datamodule(cfg)
    datamodule.setup("test")
    samples = datamodule.dataset.query + datamodule.dataset.gallery
    features = sources.features(source, [Path(path) for path, _, _ in samples], SIZE)
    pids = torch.tensor([pid for _, pid, _ in samples])
    camids = torch.tensor([camid for _, _, camid in samples])
    is_query = torch.arange(len(samples)) < len(datamodule.dataset.query)
    expected = evaluate_features(features, pids, camids, is_query, distance=distance)
    assert row["metric"] == distance
    for key in ("R1", "R5", "mAP", "mINP"):
        assert row[key] == pytest.approx(expected[key], abs=1e-6), key


def test_a_converted_torchreid_model_scores_what_its_source_scores(compose_config, tmp_path, monkeypatch):
    from agw_light import evaluation
    from agw_light.cli.evaluate import evaluate

    monkeypatch.setattr(evaluation, "time_inference", lambda *args, **kwargs: 1.0)
    torch.manual_seed(8)
    source = sources.randomise(sources.TorchreidResNet(CLASSES, depth="resnet18", last_stride=1, fc_dim=32))
    torch.save(source.state_dict(), tmp_path / "torchreid.pth")
    ckpt = convert_checkpoint(tmp_path / "torchreid.pth", tmp_path / "torchreid.ckpt", image_size=SIZE).out
    cfg = compose_config(f"ckpt={ckpt}", "device=cpu", config_name="evaluate")
    assert_scores_equal(evaluate(cfg), source, cfg, "euclidean")


def test_a_converted_model_drives_pictures_export_search_and_the_service(converted, compose_config, tmp_path):
    from agw_light.cli.search import main as search_main
    from agw_light.cli.visualize import visualize_checkpoint
    from agw_light.inference import onnxruntime_available
    from agw_light.inference.onnx import export_checkpoint
    from agw_light.service.gallery import GallerySearch

    source, ckpt = converted
    cfg = compose_config(f"ckpt={ckpt}", "num_queries=2", "topk=3", "device=cpu", config_name="visualize")
    assert len(visualize_checkpoint(ckpt, cfg, out_dir=tmp_path / "pictures")) == 3

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(1)
    for index in range(5):
        Image.fromarray(rng.integers(0, 256, size=(80, 40, 3), dtype=np.uint8)).save(gallery / f"{index}.png")
    search_main(["build", f"ckpt={ckpt}", f"gallery={gallery}", f"out={tmp_path / 'index'}", "device=cpu"])
    service = GallerySearch.open(tmp_path / "index", device="cpu", backend="torch")
    assert service.encoder.preprocessing == load_checkpoint(ckpt).preprocessing  # bicubic, the source's
    with Image.open(gallery / "3.png") as image:
        hits = service.search(image.convert("RGB"), k=2)
    assert hits[0].name == "3.png" and hits[0].distance == pytest.approx(0.0, abs=1e-5)

    if onnxruntime_available():
        onnx = export_checkpoint(ckpt, tmp_path / "model.onnx")
        exported = Encoder.from_onnx(onnx)
        assert exported.preprocessing == service.encoder.preprocessing
        paths = sorted(gallery.glob("*.png"))
        torch.testing.assert_close(exported.encode(paths), sources.features(source, paths, SIZE), atol=1e-4, rtol=1e-4)


def test_a_converted_model_teaches_the_light_model(converted, compose_config, tmp_path):
    """Row 2's student as the train command builds it: the converted network is its frozen teacher, and the
    distillation targets are the source's logits and retrieval feature."""
    from agw_light.builders import build_module
    from agw_light.lit.teacher import teacher_targets

    source, ckpt = converted
    student = build_module(compose_config("model.backbone=resnet18", "light=model", f"light.teacher_ckpt={ckpt}"), 8)
    assert student.hparams.teacher_sha256 == file_sha256(ckpt)
    batch = torch.randn(2, 3, *SIZE)  # a training batch, normalised with ImageNet's statistics
    targets = teacher_targets(student.teacher, batch)
    pixels = (
        batch * torch.tensor(sources.IMAGENET_STD).view(1, 3, 1, 1)
        + torch.tensor(sources.IMAGENET_MEAN).view(1, 3, 1, 1)
    ) * 255
    with torch.no_grad():
        expected_features = source(pixels.float())  # the source normalises inside the model
        pooled = sources.gem(
            source.backbone((pixels.float() - source.pixel_mean) / source.pixel_std), source.heads.pool_layer.p
        )
        expected_logits = source.heads.classifier(source.heads.bnneck(pooled)[..., 0, 0])
    torch.testing.assert_close(targets["teacher_features"], expected_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(targets["teacher_logits"], expected_logits, rtol=1e-4, atol=1e-5)


def test_training_starts_from_a_converted_model(converted, compose_config):
    """`model.init_from` as the train command builds the module: strict architecture, every weight, the classifier
    dropped only when asked."""
    from agw_light.builders import build_module

    _, ckpt = converted
    base = ["model.backbone=resnet18", f"model.init_from={ckpt}"]
    with pytest.raises(ValueError, match=r"its network is not this run's model config: set .*model\.maxpool=ceil"):
        build_module(compose_config(*base), 8)
    matching = [*base, "model.maxpool=ceil", "model.nonlocal_layers=[0,1,1,0]"]
    module = build_module(compose_config(*matching), 8)
    converted_weights = load_checkpoint(ckpt).network.state_dict()
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(value, converted_weights[name], msg=name)
    assert module.hparams.init_from_sha256 == file_sha256(ckpt)
    with pytest.raises(ValueError, match=r"shapes differ: head\.classifier\.weight .*model\.drop_classifier=true"):
        build_module(compose_config(*matching), 6)
    fine_tuned = build_module(compose_config(*matching, "model.drop_classifier=true"), 6)
    assert fine_tuned.model.head.classifier.weight.shape == (6, 512)
    torch.testing.assert_close(fine_tuned.model.backbone.conv1.weight, converted_weights["backbone.conv1.weight"])


def test_resume_refuses_a_converted_file_and_another_architecture(converted, compose_config):
    from agw_light.builders import build_module
    from agw_light.lit.checkpointing import read_resumable

    _, ckpt = converted
    with pytest.raises(ValueError, match=r"holds weights but no training state \(missing epoch, global_step"):
        read_resumable(ckpt)
    recorded = {"hyper_parameters": {"model": {"backbone": "resnet18", "stem_relu": False}}}
    cfg = compose_config("model.backbone=resnet34", f"resume={ckpt}")
    with pytest.raises(ValueError, match=r"network is not this config's: set model.backbone=resnet18 model.stem_relu"):
        build_module(cfg, 8, resumed=recorded)


def test_a_resumed_checkpoint_is_read_once(tmp_path, monkeypatch):
    """read_resumable's contents are handed to Lightning through the checkpoint IO instead of a second read."""
    from agw_light.lit.checkpointing import AtomicCheckpointIO

    contents = {"state_dict": {}, "epoch": 3}
    (tmp_path / "last.ckpt").write_bytes(b"a checkpoint")
    io = AtomicCheckpointIO(preloaded={str(tmp_path / "run" / ".." / "last.ckpt"): contents})
    reads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: reads.append(args) or {"read": True})
    assert io.load_checkpoint(tmp_path / "last.ckpt") is contents  # same file, other spelling: no read
    assert reads == []
    assert io.load_checkpoint(tmp_path / "last.ckpt") == {"read": True}  # served once only
