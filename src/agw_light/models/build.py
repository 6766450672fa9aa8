"""build_model: names and plain arguments in, a ready ReIDModel out (the one place configs reach models)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from torch import nn

from agw_light.models.backbones import RESNET_SPECS, ResNetBackbone, load_pretrained
from agw_light.models.heads import BNNeckHead
from agw_light.models.pooling import GeneralizedMeanPooling
from agw_light.models.reid import ReIDModel

BACKBONES: dict[str, Callable[..., ResNetBackbone]] = {
    name: partial(ResNetBackbone, name) for name in RESNET_SPECS
}
NECKS: dict[str, Callable[..., nn.Module]] = {"bnneck": BNNeckHead}


def build_model(
    backbone: str = "resnet50",
    *,
    num_classes: int,
    pretrained: str | Path | None = "none",
    last_stride: int = 1,
    nonlocal_layers: Sequence[int] | None = None,
    gem_p: float = 3.0,
    gem_learnable: bool = True,
    neck: str = "bnneck",
) -> ReIDModel:
    """Builds AGW's network (ResNet last stride 1 + non-local + GeM + BNNeck) or a lighter variant.

    pretrained: "none" (random init), "imagenet" (torchvision IMAGENET1K_V1, needs internet once) or the path
    of a ResNet state_dict. nonlocal_layers: non-local blocks per stage (layer1..layer4), after the stage's
    last blocks; None picks the AGW authors' placement for the backbone ((0, 2, 3, 0) for resnet50, none for
    resnet18/34). gem_learnable: AGW learns p, starting from gem_p.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    if neck not in NECKS:
        raise ValueError(f"unknown neck {neck!r}; known: {', '.join(sorted(NECKS))}")
    trunk = BACKBONES[backbone](last_stride=last_stride, nonlocal_layers=nonlocal_layers)
    load_pretrained(trunk, pretrained)
    pooling = GeneralizedMeanPooling(gem_p, learnable=gem_learnable)
    head = NECKS[neck](trunk.out_channels, num_classes, pooling=pooling)
    return ReIDModel(trunk, head)
