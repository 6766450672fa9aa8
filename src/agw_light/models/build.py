"""build_model: names and plain arguments in, a ready ReIDModel out (the one place configs reach models)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from torch import nn

from agw_light.models.backbones import RESNET_SPECS, ResNetBackbone, load_pretrained
from agw_light.models.heads import BNNeckHead, CodePyramidHead, HashHead, PlainHead
from agw_light.models.pooling import build_pooling
from agw_light.models.reid import ReIDModel

BACKBONES: dict[str, Callable[..., ResNetBackbone]] = {name: partial(ResNetBackbone, name) for name in RESNET_SPECS}
NECKS: dict[str, Callable[..., nn.Module]] = {
    "bnneck": BNNeckHead,
    "plain": PlainHead,
    "hash": HashHead,
    "pyramid": CodePyramidHead,
}


def build_model(
    backbone: str = "resnet50",
    *,
    num_classes: int,
    pretrained: str | Path | None = "none",
    last_stride: int = 1,
    nonlocal_layers: Sequence[int] | None = None,
    nonlocal_inter_channels: int | str = 1,
    gem_p: float = 3.0,
    gem_learnable: bool = True,
    neck: str = "bnneck",
    code_lengths: Sequence[int] | None = None,
    distance: str | None = None,
    stem_relu: bool = True,
    maxpool: str = "padded",
    pooling: str = "gem",
    neck_feat: str = "after",
    embedding_dim: int | None = None,
) -> ReIDModel:
    """Builds AGW's network (ResNet last stride 1 + non-local + GeM + BNNeck) or a lighter or imported variant.

    Args:
        backbone: "resnet18", "resnet34" or "resnet50".
        num_classes: training identities (the ID classifier's outputs).
        pretrained: "none" (random init), "imagenet" (torchvision IMAGENET1K_V1, downloaded once into the torch
            hub cache) or the path of a ResNet state_dict (torchvision's or timm's .pth/.bin/.safetensors).
        last_stride: the stride of layer4's first block (AGW: 1).
        nonlocal_layers: non-local blocks per stage (layer1..layer4), after the stage's last blocks; None picks
            the AGW authors' placement ((0, 2, 3, 0) for resnet50, none for resnet18/34).
        nonlocal_inter_channels: each block's inner width, 1 as in the AGW authors' code (the published network)
            or "half" of its input channels (Wang et al.'s design).
        gem_p, gem_learnable: GeM's exponent (its start when learnable, as AGW learns it).
        neck: "bnneck" (float feature), "hash" (one binary code, light feature), "pyramid" (codes of several
            lengths, light search), or "plain" (no BNNeck: the pooled feature, a classifier with bias).
        code_lengths: the code heads' lengths, longest first; None keeps the head's default (2048 bits for
            "hash", 2048..32 for "pyramid"); "hash" takes exactly one length.
        distance: how retrieval compares the eval outputs; None picks the head's own (cosine for float heads,
            hamming for the code heads); "euclidean" is the alternative for float heads.
        stem_relu: the ReLU after the stem's BatchNorm (torchvision's; the AGW authors' and reid-strong-baseline's
            networks have none).
        maxpool: "padded" (torchvision's MaxPool2d(3, 2, padding=1)) or "ceil" (fast-reid's, ceil_mode).
        pooling: "gem" or "avg" (global average pooling).
        neck_feat: for "bnneck", whether retrieval reads the feature "after" the BatchNorm or "before" it.
        embedding_dim: for "plain", a linear + BatchNorm + ReLU embedding of that size after the pooling.

    Returns:
        The `ReIDModel` (train mode, as torch builds modules). The options after `distance` reproduce networks of
        other frameworks (agw_light.convert); their defaults are AGW's as agw_light trains it.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    if neck not in NECKS:
        raise ValueError(f"unknown neck {neck!r}; known: {', '.join(sorted(NECKS))}")
    neck_options = _neck_options(neck, code_lengths, neck_feat=neck_feat, embedding_dim=embedding_dim)
    trunk = BACKBONES[backbone](
        last_stride=last_stride,
        nonlocal_layers=nonlocal_layers,
        nonlocal_inter_channels=nonlocal_inter_channels,
        stem_relu=stem_relu,
        maxpool=maxpool,
    )
    load_pretrained(trunk, pretrained)
    pool = build_pooling(pooling, p=gem_p, learnable=gem_learnable)
    head = NECKS[neck](trunk.out_channels, num_classes, pooling=pool, **neck_options)
    return ReIDModel(trunk, head, distance=distance)


def _neck_options(
    neck: str, code_lengths: Sequence[int] | None, *, neck_feat: str, embedding_dim: int | None
) -> dict[str, object]:
    """The head's keyword arguments, refusing an option the chosen head cannot honour."""
    if neck_feat != "after" and neck != "bnneck":
        raise ValueError(f"neck_feat={neck_feat!r} chooses a BNNeck output: it needs neck 'bnneck', not {neck!r}")
    if embedding_dim is not None and neck != "plain":
        raise ValueError(f"embedding_dim={embedding_dim!r} is an option of neck 'plain', not of {neck!r}")
    float_options = {"bnneck": {"neck_feat": neck_feat}, "plain": {"embedding_dim": embedding_dim}}
    if code_lengths is None:
        return float_options.get(neck, {})
    lengths = [int(length) for length in code_lengths]
    if neck == "pyramid":
        return {"code_lengths": tuple(lengths)}
    if neck == "hash":
        if len(lengths) != 1:
            raise ValueError(f"neck 'hash' learns one code: code_lengths must have one entry, got {lengths}")
        return {"code_length": lengths[0]}
    raise ValueError(f"neck {neck!r} learns no binary code: code_lengths={lengths} needs neck 'hash' or 'pyramid'")
