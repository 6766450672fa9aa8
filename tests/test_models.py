"""Models: shapes, last stride, non-local placement and maths, GeM, BNNeck, strict pretrained loading."""

from __future__ import annotations

import argparse
import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from agw_light.models import (
    BNNeckHead,
    GeneralizedMeanPooling,
    NonLocalBlock,
    ResNetBackbone,
    build_model,
)

IMAGES = (2, 3, 64, 32)  # a 256x128 person crop scaled by 1/4: layer4 with last stride 1 is 4x2


@pytest.fixture(scope="module")
def resnet50_model():
    torch.manual_seed(0)
    return build_model("resnet50", num_classes=7)


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(*IMAGES, generator=torch.Generator().manual_seed(seed))


def test_resnet50_train_outputs_pre_and_post_bn_features_and_logits(resnet50_model):
    model = resnet50_model.train()
    x = images()
    out = model(x)
    assert set(out) == {"features", "bn_features", "logits"}
    assert out["features"].shape == (2, 2048)
    assert out["bn_features"].shape == (2, 2048)
    assert out["logits"].shape == (2, 7)
    # features = GeM(p=3) of the feature map, written out by hand.
    feature_map = model.forward_features(x)
    expected = feature_map.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    torch.testing.assert_close(out["features"], expected, rtol=1e-5, atol=1e-6)
    # Train-mode BN standardises with batch statistics (weight 1, bias 0 at init).
    feats = out["features"]
    standardised = (feats - feats.mean(0)) / torch.sqrt(feats.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out["bn_features"], standardised, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["logits"], out["bn_features"] @ model.head.classifier.weight.T)


def test_resnet50_eval_returns_the_bn_feature(resnet50_model):
    model = resnet50_model
    model.train()
    model(images(1))  # moves the running statistics away from 0/1, so eval BN is not a no-op
    model.eval()
    x = images(2)
    with torch.no_grad():
        out = model(x)
        pooled = model.forward_features(x).clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    bn = model.head.bottleneck
    expected = (pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2048)
    assert model.feature_dim == 2048
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, pooled)


def test_resnet18_outputs_512_dim_features():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5).train()
    out = model(images())
    assert out["features"].shape == (2, 512) and out["bn_features"].shape == (2, 512)
    assert out["logits"].shape == (2, 5)
    model.eval()
    with torch.no_grad():
        assert model(images()).shape == (2, 512)
    assert model.feature_dim == 512


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_last_stride_one_keeps_layer4_at_layer3_resolution(name, resnet50_model):
    backbone = resnet50_model.backbone if name == "resnet50" else ResNetBackbone(name)
    with torch.no_grad():
        assert backbone.eval()(images()).shape[-2:] == (4, 2)  # 256x128 input would give 16x8
    first = backbone.layer4[0]
    assert first.downsample[0].stride == (1, 1)
    assert all(m.stride == (1, 1) for m in first.modules() if isinstance(m, nn.Conv2d))


def test_last_stride_two_is_the_plain_resnet():
    backbone = ResNetBackbone("resnet18", last_stride=2).eval()
    reference = torchvision.models.resnet18(weights=None).eval()
    reference.load_state_dict(backbone.state_dict(), strict=False)
    x = images()
    with torch.no_grad():
        plain = nn.Sequential(*list(reference.children())[:-2])(x)  # torchvision without avgpool, fc
        assert backbone(x).shape[-2:] == (2, 1)
        torch.testing.assert_close(backbone(x), plain)
    with pytest.raises(ValueError, match="last_stride"):
        ResNetBackbone("resnet18", last_stride=3)


def test_default_nonlocal_placement_follows_agw_authors(resnet50_model):
    """ReID-Survey non_layers=[0, 2, 3, 0]: after layer2 blocks 2, 3 and layer3 blocks 3, 4, 5."""
    backbone = resnet50_model.backbone
    assert backbone.nonlocal_layers == (0, 2, 3, 0)
    expected_positions = [("layer2", 2), ("layer2", 3), ("layer3", 3), ("layer3", 4), ("layer3", 5)]
    assert backbone.nonlocal_positions == expected_positions
    blocks = [backbone.nonlocal_blocks[stage][str(index)] for stage, index in expected_positions]
    assert [b.in_channels for b in blocks] == [512, 512, 1024, 1024, 1024]
    assert [b.inter_channels for b in blocks] == [1, 1, 1, 1, 1]  # the authors' `reduc_ratio // reduc_ratio`
    assert sum(isinstance(m, NonLocalBlock) for m in backbone.modules()) == 5

    # Each non-local block runs right after its block: record the forward call order.
    calls: list[str] = []
    handles = []
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(backbone, stage)):
            handles.append(block.register_forward_hook(lambda *_, n=f"{stage}.{index}": calls.append(n)))
    for stage, index in expected_positions:
        block = backbone.nonlocal_blocks[stage][str(index)]
        handles.append(block.register_forward_hook(lambda *_, n=f"NL {stage}.{index}": calls.append(n)))
    try:
        with torch.no_grad():
            backbone.eval()(images())
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [
        "layer1.0", "layer1.1", "layer1.2",
        "layer2.0", "layer2.1", "layer2.2", "NL layer2.2", "layer2.3", "NL layer2.3",
        "layer3.0", "layer3.1", "layer3.2", "layer3.3", "NL layer3.3", "layer3.4", "NL layer3.4",
        "layer3.5", "NL layer3.5",
        "layer4.0", "layer4.1", "layer4.2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("inter_channels", "expected"),
    [(1, 25_078_864), ("half", 32_408_641)],  # 1: the published AGW (ReID-Survey, fast-reid, light-reid)
)
def test_agw_resnet50_parameter_count_matches_the_reference_networks(inter_channels, expected):
    """AGW ResNet-50 for Market-1501's 751 training ids, counted on the reference code's network."""
    model = build_model("resnet50", num_classes=751, nonlocal_inter_channels=inter_channels)
    assert sum(p.numel() for p in model.parameters()) == expected
    widths = {block.inter_channels for block in model.modules() if isinstance(block, NonLocalBlock)}
    assert widths == ({1} if inter_channels == 1 else {256, 512})


@pytest.mark.parametrize("bad", [0, -1, 2048, "third", True, 1.5])
def test_nonlocal_inter_channels_is_checked(bad):
    with pytest.raises(ValueError, match="nonlocal_inter_channels"):
        NonLocalBlock(1024, inter_channels=bad)


def test_nonlocal_layers_are_configurable_and_checked():
    assert ResNetBackbone("resnet18").nonlocal_positions == []  # no non-local in ResNet-18 by default
    custom = ResNetBackbone("resnet18", nonlocal_layers=[1, 0, 0, 2])
    assert custom.nonlocal_positions == [("layer1", 1), ("layer4", 0), ("layer4", 1)]
    assert custom.nonlocal_blocks["layer4"]["0"].in_channels == 512
    assert ResNetBackbone("resnet18", nonlocal_layers=(0, 0, 0, 0)).nonlocal_positions == []
    with pytest.raises(ValueError, match="nonlocal_layers"):
        ResNetBackbone("resnet18", nonlocal_layers=(0, 3, 0, 0))  # layer2 of ResNet-18 has 2 blocks
    with pytest.raises(ValueError, match="nonlocal_layers"):
        ResNetBackbone("resnet18", nonlocal_layers=(0, 1, 1))


def test_fresh_nonlocal_block_is_identity():
    torch.manual_seed(0)
    block = NonLocalBlock(16)
    x = torch.randn(2, 16, 4, 3)
    assert torch.equal(block.train()(x), x)
    assert torch.equal(block.eval()(x), x)
    nn.init.ones_(block.output[1].weight)  # a trained block is no longer the identity
    assert not torch.allclose(block(x), x)


def test_nonlocal_block_matches_per_position_dot_product_divided_by_n():
    torch.manual_seed(0)
    block = NonLocalBlock(4, inter_channels="half").eval()
    nn.init.ones_(block.output[1].weight)  # BN in eval with running stats 0/1 and weight 1: identity
    x = torch.randn(1, 4, 3, 2)
    positions = x[0].flatten(1).T  # (N, C)
    n = positions.shape[0]

    def conv(layer, v):
        return layer.weight.view(layer.out_channels, -1) @ v + layer.bias

    theta = [conv(block.theta, p) for p in positions]
    phi = [conv(block.phi, p) for p in positions]
    g = [conv(block.g, p) for p in positions]
    expected = torch.empty_like(positions)
    for i in range(n):  # y_i = 1/N sum_j <theta(x_i), phi(x_j)> g(x_j), then z_i = x_i + BN(W y_i)
        y = sum(theta[i] @ phi[j] * g[j] for j in range(n)) / n
        expected[i] = positions[i] + conv(block.output[0], y) / math.sqrt(1 + block.output[1].eps)
    with torch.no_grad():
        got = block(x)[0].flatten(1).T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gem_p1_is_average_pooling_and_p3_matches_hand_value():
    x = torch.rand(3, 5, 4, 2) + 0.01
    gem1 = GeneralizedMeanPooling(1.0)
    torch.testing.assert_close(gem1(x), F.adaptive_avg_pool2d(x, 1).flatten(1))
    hand = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    assert GeneralizedMeanPooling(3.0)(hand).item() == pytest.approx(25.0 ** (1 / 3), rel=1e-6)
    # eps clamp: negative activations count as eps, so the result stays finite
    assert torch.isfinite(GeneralizedMeanPooling(3.0)(-torch.ones(1, 1, 2, 2))).all()


def test_gem_p_is_learnable_by_default_like_agw():
    learnable = GeneralizedMeanPooling(3.0)
    assert isinstance(learnable.p, nn.Parameter) and learnable.p.item() == 3.0
    learnable(torch.rand(2, 3, 2, 2) + 0.1).sum().backward()
    assert learnable.p.grad is not None and learnable.p.grad.abs().item() > 0
    fixed = GeneralizedMeanPooling(3.0, learnable=False)
    assert not isinstance(fixed.p, nn.Parameter) and "p" in fixed.state_dict()
    with pytest.raises(ValueError, match="p > 0"):
        GeneralizedMeanPooling(0.0)


def test_bnneck_head_inits_and_frozen_bias():
    torch.manual_seed(0)
    head = BNNeckHead(2048, 751)
    assert head.bottleneck.bias.requires_grad is False
    assert torch.equal(head.bottleneck.weight, torch.ones(2048))
    assert torch.equal(head.bottleneck.bias, torch.zeros(2048))
    assert head.classifier.bias is None
    assert head.classifier.weight.std().item() == pytest.approx(0.001, rel=0.02)
    assert head.classifier.weight.mean().abs().item() < 1e-5
    with pytest.raises(ValueError, match="num_classes"):
        BNNeckHead(512, 0)


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50"):
        build_model("resnet101", num_classes=3)
    with pytest.raises(ValueError, match="bnneck"):
        build_model("resnet18", num_classes=3, neck="transformer")


# ---- pretrained weights -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_state_dict():
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


def _save(tmp_path, obj, name="weights.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_pretrained_state_dict_loads_exactly(tmp_path, resnet18_state_dict):
    path = _save(tmp_path, resnet18_state_dict)
    model = build_model("resnet18", num_classes=3, pretrained=str(path))
    for key in ("conv1.weight", "layer3.1.conv2.weight", "layer4.0.downsample.0.weight", "bn1.running_var"):
        assert torch.equal(model.backbone.state_dict()[key], resnet18_state_dict[key])


def test_pretrained_wrapped_checkpoint_with_module_prefix(tmp_path, resnet18_state_dict):
    wrapped = {
        "model": {f"module.{k}": v for k, v in resnet18_state_dict.items()},
        "args": argparse.Namespace(lr=0.1),
        "epoch": 89,
    }
    path = _save(tmp_path, wrapped)
    model = build_model("resnet18", num_classes=3, pretrained=path)
    assert torch.equal(model.backbone.layer2[1].conv1.weight, resnet18_state_dict["layer2.1.conv1.weight"])
    path = _save(tmp_path, {"state_dict": resnet18_state_dict}, "lightning_like.pth")
    model = build_model("resnet18", num_classes=3, pretrained=path)
    assert torch.equal(model.backbone.bn1.weight, resnet18_state_dict["bn1.weight"])


def test_pretrained_without_fc_loads(tmp_path, resnet18_state_dict):
    trimmed = {k: v for k, v in resnet18_state_dict.items() if not k.startswith("fc.")}
    model = build_model("resnet18", num_classes=3, pretrained=_save(tmp_path, trimmed))
    assert torch.equal(model.backbone.layer1[0].conv1.weight, trimmed["layer1.0.conv1.weight"])


def test_pretrained_extra_key_is_an_error(tmp_path, resnet18_state_dict):
    extra = dict(resnet18_state_dict, **{"layer5.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        build_model("resnet18", num_classes=3, pretrained=_save(tmp_path, extra))


def test_pretrained_missing_backbone_key_is_an_error(tmp_path, resnet18_state_dict):
    missing = {k: v for k, v in resnet18_state_dict.items() if k != "layer2.0.bn1.running_mean"}
    with pytest.raises(ValueError, match=r"missing keys: layer2\.0\.bn1\.running_mean"):
        build_model("resnet18", num_classes=3, pretrained=_save(tmp_path, missing))


def test_pretrained_shape_mismatch_is_an_error(tmp_path, resnet18_state_dict):
    wrong = dict(resnet18_state_dict, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(
        ValueError, match=r"layer1\.0\.conv1\.weight \(checkpoint \(64, 64, 1, 1\), model \(64, 64, 3, 3\)\)"
    ):
        build_model("resnet18", num_classes=3, pretrained=_save(tmp_path, wrong))


def test_pretrained_bad_path_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="imagenet"):
        build_model("resnet18", num_classes=3, pretrained=str(tmp_path / "nope.pth"))
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ValueError, match="notes.pth"):
        build_model("resnet18", num_classes=3, pretrained=not_a_checkpoint)
    with pytest.raises(ValueError, match="not tensors: epoch"):
        build_model("resnet18", num_classes=3, pretrained=_save(tmp_path, {"epoch": 3}))


def test_resnet50_imagenet_layout_loads_and_nonlocal_blocks_stay_identity(tmp_path):
    torch.manual_seed(2)
    state_dict = torchvision.models.resnet50(weights=None).state_dict()
    # Pre-0.4 checkpoints (the original torchvision files) have no BN step counters.
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    model = build_model("resnet50", num_classes=3, pretrained=_save(tmp_path, state_dict))
    assert torch.equal(model.backbone.layer3[5].conv3.weight, state_dict["layer3.5.conv3.weight"])
    block = model.backbone.nonlocal_blocks["layer3"]["5"]
    x = torch.randn(1, 1024, 4, 2)
    assert torch.equal(block(x), x)


def test_imagenet_download_goes_through_torchvision_weights(tmp_path, monkeypatch, resnet18_state_dict):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    requested = []

    def fake_download(url, dst, *args, **kwargs):
        requested.append(url)
        torch.save(resnet18_state_dict, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_model("resnet18", num_classes=3, pretrained="imagenet")
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(model.backbone.layer4[1].conv2.weight, resnet18_state_dict["layer4.1.conv2.weight"])


@pytest.mark.parametrize("error", [urllib.error.URLError("no route to host"), OSError("network unreachable")])
def test_imagenet_offline_error_tells_to_pass_a_file(tmp_path, monkeypatch, error):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=r"model\.pretrained=/path/to/resnet18-f37072fd\.pth") as info:
        build_model("resnet18", num_classes=3, pretrained="imagenet")
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(info.value)


def test_imagenet_offline_error_names_the_hub_cache_and_a_file_put_there_is_found(
    tmp_path, monkeypatch, resnet18_state_dict
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(RuntimeError, match=f"copy it to {cached}"):
        build_model("resnet18", num_classes=3, pretrained="imagenet")
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(resnet18_state_dict, cached)  # what the message says to do; the download stays offline
    model = build_model("resnet18", num_classes=3, pretrained="imagenet")
    assert torch.equal(model.backbone.conv1.weight, resnet18_state_dict["conv1.weight"])


def test_a_timm_safetensors_file_initialises_the_backbone(tmp_path, resnet18_state_dict):
    """timm's ResNets keep torchvision's key names; the hub ships them as .safetensors (no pickle at all)."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in resnet18_state_dict.items()}, path)
    model = build_model("resnet18", num_classes=3, pretrained=path)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, resnet18_state_dict["layer3.1.conv2.weight"])
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="broken.safetensors: not a readable safetensors file"):
        build_model("resnet18", num_classes=3, pretrained=tmp_path / "broken.safetensors")
