"""The weight layouts of other re-id frameworks' published models, and how each maps onto an agw_light network.

Each format is read from the project's published code (facts about key names, stems, pooling, heads and the
eval output; none of their code is used):

- fast-reid (JDAI-CV/fast-reid at c9bc3ce): fastreid/modeling/backbones/resnet.py (ReLU after bn1,
  ``MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)``, stride on conv2, ``NL_2``/``NL_3`` non-local blocks after
  the last blocks of a stage), fastreid/layers/non_local.py (``g``/``theta``/``phi``, ``W.0`` conv, ``W.1`` BN, one
  inter channel), fastreid/layers/pooling.py (``GeneralizedMeanPooling``: fixed p = 3, no weight;
  ``GeneralizedMeanPoolingP``: learnable ``p``), fastreid/modeling/heads/embedding_head.py (eval output: the
  feature after the BN neck, whatever NECK_FEAT says), fastreid/modeling/meta_arch/baseline.py (``pixel_mean`` /
  ``pixel_std`` on a 0-255 scale, persistent buffers before 2021, not saved since), fastreid/data/transforms/build.py
  (test images resized bicubic: ``interpolation=3``), configs/Base-AGW.yml and Base-bagtricks.yml (last stride 1,
  BN neck, GeM for AGW, average pooling for BoT), fastreid/config/defaults.py (TEST.METRIC cosine). The head's
  layouts over time: ``heads.bnneck.*`` + ``heads.classifier.weight`` (fastreid/modeling/heads/bnneck_head.py
  until 4d573b8, 2020-09-10; GeM then learnable, ``heads.pool_layer.p``), ``heads.bottleneck.0.*`` +
  ``heads.classifier.weight`` (embedding_head.py until 883fd4a, 2021-03-23), ``heads.bottleneck.0.*`` +
  ``heads.weight`` (since).
- ReID-Survey AGW (mangye16/ReID-Survey at 38f5912): modeling/backbones/resnet_nl.py (no ReLU after bn1: "add
  missed relu" commented out; ``MaxPool2d(kernel_size=3, stride=2, padding=1)``; ``NL_2``/``NL_3`` as fast-reid),
  modeling/layer/gem_pool.py (``GeneralizedMeanPoolingP``, learnable ``global_pool.p``), modeling/baseline.py
  (``base.*``, BatchNorm1d ``bottleneck`` with frozen bias, bias-free ``classifier``; eval output: after the
  neck), data/transforms.py (bilinear resize, ImageNet mean/std), configs/AGW_baseline.yml (last stride 1,
  TEST.FEAT_NORM on: ranking by cosine).
- reid-strong-baseline (michuanhaohao/reid-strong-baseline at 3da7e6f): modeling/backbones/resnet.py (the same
  stem as ReID-Survey), modeling/baseline.py (average pooling ``gap``; ``neck: bnneck`` gives ``bottleneck`` and a
  bias-free ``classifier``, ``neck: no`` a ``classifier`` with bias; TEST.NECK_FEAT after (default) or before),
  config/defaults.py (TEST.FEAT_NORM yes: cosine), configs/softmax_triplet_with_center.yml (256x128).
- torchreid (KaiyangZhou/deep-person-reid at f8cd150): torchreid/models/resnet.py (flat keys, ReLU stem,
  ``MaxPool2d(3, 2, padding=1)``, global average pooling, optional ``fc`` = Linear + BatchNorm1d + ReLU, a
  ``classifier`` with bias; eval output: the pooled or ``fc`` feature; ``resnet50``: last stride 2,
  ``resnet50_fc512``: last stride 1 and fc [512]), torchreid/data/transforms.py (bilinear resize, ImageNet
  mean/std), torchreid/engine/engine.py (dist_metric euclidean on unnormalised features).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from agw_light.data.transforms import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("fastreid", "reid_survey", "strong_baseline", "torchreid")
# ResNet depths by (blocks per stage, bottleneck blocks?): the ones agw_light builds.
RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
}
RESNET_NAMES = {
    (3, 4, 23, 3): "ResNet-101",
    (3, 8, 36, 3): "ResNet-152",
    (3, 4, 6, 3): "ResNet-34/50",
    (2, 2, 2, 2): "ResNet-18",
}
STAGES = ("layer1", "layer2", "layer3", "layer4")
# The non-local block's parts: the sources' W (conv, BN) is agw_light's `output`.
NON_LOCAL_PART = {"g": "g", "theta": "theta", "phi": "phi", "W.0": "output.0", "W.1": "output.1"}


@dataclass
class SourceReading:
    """A format's reading of one file: agw_light's build_model options, the weights under agw_light's names (each
    with the source key it came from, or a description of the constant that fills it), the preprocessing and
    distance of the source's evaluation, source keys used for something other than a weight (preprocessing), and
    notes on every choice the file does not show."""

    model: dict[str, Any]
    weights: dict[str, tuple[str, torch.Tensor]]
    preprocessing: dict[str, Any]
    distance: str
    notes: list[str] = field(default_factory=list)
    used_otherwise: list[str] = field(default_factory=list)


def detect_format(keys: list[str]) -> tuple[str, str]:
    """(format, why) recognised from the weight names; ValueError when no format fits."""
    names = set(keys)
    if any(key.startswith("backbone.") for key in keys) and any(key.startswith("heads.") for key in keys):
        return "fastreid", "keys backbone.* and heads.*"
    if any(key.startswith("base.") for key in keys):
        if any(key.startswith("base.NL_") for key in keys) or "global_pool.p" in names:
            return "reid_survey", "keys base.* with non-local blocks (base.NL_*) or a learnable GeM (global_pool.p)"
        return "strong_baseline", "keys base.* without non-local blocks or GeM"
    if "conv1.weight" in names and any(key.startswith("layer1.") for key in keys):
        return "torchreid", "flat ResNet keys (conv1.*, layer1.*) without a prefix"
    shown = ", ".join(sorted(keys)[:12])
    raise ValueError(
        f"the weights match none of the formats {FORMATS}: expected fast-reid's backbone.*/heads.*, ReID-Survey's or "
        f"reid-strong-baseline's base.*, or torchreid's flat conv1.*/layer1.*; the file has {len(keys)} keys such "
        f"as {shown}"
    )


def resnet_of(weights: Mapping[str, torch.Tensor], prefix: str) -> tuple[str, tuple[int, int, int, int]]:
    """(agw_light backbone name, non-local blocks per stage) of a ResNet stored under `prefix`."""
    depths = []
    for stage in STAGES:
        pattern = re.compile(rf"^{re.escape(prefix)}{stage}\.(\d+)\.")
        indices = {int(match.group(1)) for key in weights if (match := pattern.match(key))}
        depths.append(max(indices) + 1 if indices else 0)
    bottleneck = any(key.startswith(f"{prefix}layer1.0.conv3.") for key in weights)
    name = RESNETS.get((tuple(depths), bottleneck))
    if name is None:
        described = RESNET_NAMES.get(tuple(depths), "a ResNet")
        raise ValueError(
            f"the backbone under {prefix or 'the top level'} has {'-'.join(map(str, depths))} blocks per stage "
            f"({described}, {'bottleneck' if bottleneck else 'basic'} blocks); agw_light builds ResNet-18, -34 and -50"
        )
    counts = []
    for stage_number in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}NL_{stage_number}\.(\d+)\.")
        indices = {int(match.group(1)) for key in weights if (match := pattern.match(key))}
        counts.append(max(indices) + 1 if indices else 0)
    return name, tuple(counts)  # type: ignore[return-value]


def backbone_weights(
    weights: Mapping[str, torch.Tensor], prefix: str, depths: tuple[int, ...], nonlocal_counts: tuple[int, ...]
) -> dict[str, tuple[str, torch.Tensor]]:
    """The source ResNet's weights under agw_light's names: torchvision's stem and stage names stay (the four
    projects keep them), a non-local block ``NL_<s>.<i>`` (placed after block ``depth - count + i`` of stage s, as
    the sources' ``NL_<s>_idx = sorted(depth - (j + 1))`` put it) becomes ``nonlocal_blocks.layer<s>.<block>``."""
    mapped = {}
    stage_names = {f"{prefix}{stage}.": f"backbone.{stage}." for stage in STAGES}
    for key, value in weights.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest.startswith(("conv1.", "bn1.")) or any(key.startswith(stage) for stage in stage_names):
            mapped[f"backbone.{rest}"] = (key, value)
            continue
        match = re.match(r"^NL_(\d)\.(\d+)\.(g|theta|phi|W\.0|W\.1)\.(.+)$", rest)
        if match:
            stage, position, part, leaf = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
            block = depths[stage - 1] - nonlocal_counts[stage - 1] + position
            target = f"backbone.nonlocal_blocks.layer{stage}.{block}.{NON_LOCAL_PART[part]}.{leaf}"
            mapped[target] = (key, value)
    return mapped


def _move(
    weights: Mapping[str, torch.Tensor], pairs: Mapping[str, str], into: dict[str, tuple[str, torch.Tensor]]
) -> None:
    """Copies every source key starting with a prefix of `pairs` to the matching agw_light prefix."""
    for key, value in weights.items():
        for source, target in pairs.items():
            if key == source or key.startswith(source + "."):
                into[target + key[len(source) :]] = (key, value)


def _depths(name: str) -> tuple[int, ...]:
    return next(depths for (depths, _), resnet in RESNETS.items() if resnet == name)


def _pixel_statistics(weights: Mapping[str, torch.Tensor], notes: list[str]) -> tuple[list[float], list[float]]:
    """fast-reid's pixel mean/std: the file's persistent buffers (0-255 scale) when present, else its defaults."""
    if "pixel_mean" in weights and "pixel_std" in weights:
        mean = (weights["pixel_mean"].flatten().double() / 255).tolist()
        std = (weights["pixel_std"].flatten().double() / 255).tolist()
        notes.append(f"pixel_mean / pixel_std read from the file and divided by 255: mean {mean}, std {std}")
        return mean, std
    notes.append(
        "the file holds no pixel_mean / pixel_std (fast-reid stopped saving them in 2021): using fast-reid's defaults "
        "(ImageNet's); pass mean=[...] std=[...] (0-1 scale) if your config changed MODEL.PIXEL_MEAN/STD"
    )
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def map_fastreid(weights: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> SourceReading:
    notes: list[str] = []
    backbone, nonlocal_counts = resnet_of(weights, "backbone.")
    mapped = backbone_weights(weights, "backbone.", _depths(backbone), nonlocal_counts)
    neck = "heads.bnneck" if any(key.startswith("heads.bnneck.") for key in weights) else "heads.bottleneck.0"
    classifier = "heads.weight" if "heads.weight" in weights else "heads.classifier.weight"
    _move(weights, {neck: "head.bottleneck", classifier: "head.classifier.weight"}, mapped)
    pooling = options.get("pooling", "auto")
    if "heads.pool_layer.p" in weights:
        pooling, learnable = "gem", True
        mapped["head.pooling.p"] = ("heads.pool_layer.p", weights["heads.pool_layer.p"])
        notes.append("learnable GeM (heads.pool_layer.p: fast-reid's GeneralizedMeanPoolingP)")
    else:
        if pooling == "auto":
            pooling = "gem" if any(nonlocal_counts) else "avg"
            notes.append(
                f"pooling={pooling}: fast-reid stores no pooling weight; "
                + (
                    "non-local blocks mean its AGW config (Base-AGW.yml: GeneralizedMeanPooling, fixed p=3)"
                    if pooling == "gem"
                    else "no non-local blocks mean its BoT config (Base-bagtricks.yml: GlobalAvgPool)"
                )
                + "; pass pooling=avg or pooling=gem if your config said otherwise"
            )
        learnable = False
        if pooling == "gem":
            p = float(options.get("gem_p") or 3.0)
            mapped["head.pooling.p"] = (f"<fixed GeM p={p}>", torch.tensor([p]))
    mean, std = _pixel_statistics(weights, notes)
    model = {
        "backbone": backbone,
        "last_stride": int(options.get("last_stride") or 1),
        "nonlocal_layers": list(nonlocal_counts),
        "nonlocal_inter_channels": 1,
        "stem_relu": True,
        "maxpool": "ceil",
        "pooling": pooling,
        "gem_learnable": learnable,
        "neck": "bnneck",
        "neck_feat": "after",
    }
    preprocessing = {"mean": mean, "std": std, "interpolation": "bicubic"}
    statistics = [key for key in ("pixel_mean", "pixel_std") if key in weights]
    return SourceReading(model, mapped, preprocessing, "cosine", notes, statistics)


def map_survey_or_strong_baseline(weights: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> SourceReading:
    """ReID-Survey's and reid-strong-baseline's `Baseline`: the same layout, GeM and non-local blocks optional."""
    notes: list[str] = []
    backbone, nonlocal_counts = resnet_of(weights, "base.")
    mapped = backbone_weights(weights, "base.", _depths(backbone), nonlocal_counts)
    has_neck = any(key.startswith("bottleneck.") for key in weights)
    _move(weights, {"bottleneck": "head.bottleneck", "classifier": "head.classifier"}, mapped)
    learnable_gem = "global_pool.p" in weights
    if learnable_gem:
        mapped["head.pooling.p"] = ("global_pool.p", weights["global_pool.p"])
    neck_feat = options.get("neck_feat") or "after"
    if not has_neck:
        notes.append("no bottleneck.*: MODEL.NECK 'no' (the pooled feature is the retrieval feature)")
    model = {
        "backbone": backbone,
        "last_stride": int(options.get("last_stride") or 1),
        "nonlocal_layers": list(nonlocal_counts),
        "nonlocal_inter_channels": 1,
        "stem_relu": False,
        "maxpool": "padded",
        "pooling": "gem" if learnable_gem else "avg",
        "gem_learnable": True,
        "neck": "bnneck" if has_neck else "plain",
        "neck_feat": neck_feat if has_neck else "after",
    }
    preprocessing = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bilinear"}
    return SourceReading(model, mapped, preprocessing, "cosine", notes)


def map_torchreid(weights: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> SourceReading:
    notes: list[str] = []
    backbone, nonlocal_counts = resnet_of(weights, "")
    mapped = backbone_weights(weights, "", _depths(backbone), nonlocal_counts)
    embedding_dim = int(weights["fc.0.weight"].shape[0]) if "fc.0.weight" in weights else None
    _move(weights, {"fc.0": "head.embedding.0", "fc.1": "head.embedding.1", "classifier": "head.classifier"}, mapped)
    last_stride = options.get("last_stride")
    if last_stride is None:
        last_stride = 1 if embedding_dim is not None else 2
        notes.append(
            f"last_stride={last_stride}: torchreid's "
            + ("resnet50_fc512 (fc.* present)" if embedding_dim is not None else "resnet50 default")
            + " (the weights do not show it; pass last_stride= if yours differs)"
        )
    model = {
        "backbone": backbone,
        "last_stride": int(last_stride),
        "nonlocal_layers": list(nonlocal_counts),
        "nonlocal_inter_channels": 1,
        "stem_relu": True,
        "maxpool": "padded",
        "pooling": "avg",
        "gem_learnable": True,
        "neck": "plain",
        "embedding_dim": embedding_dim,
    }
    preprocessing = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bilinear"}
    notes.append("distance=euclidean: torchreid's evaluation (dist_metric euclidean on unnormalised features)")
    return SourceReading(model, mapped, preprocessing, "euclidean", notes)


MAPPERS = {
    "fastreid": map_fastreid,
    "reid_survey": map_survey_or_strong_baseline,
    "strong_baseline": map_survey_or_strong_baseline,
    "torchreid": map_torchreid,
}
