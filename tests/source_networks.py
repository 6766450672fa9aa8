"""Other frameworks' re-id networks, written here from their published architecture (the facts: key names, stem,
pooling, non-local blocks, head, eval output, preprocessing), as independent references for agw_light.convert.

Nothing here is agw_light's code or the sources' code: each network is a plain nn.Module whose state_dict keys
are the source's, saved in the source's file form, and whose eval forward is the source's function, with its own
preprocessing (`preprocess`). The converter's output must compute the same features on the same images.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided) - 1x1 with a projection shortcut when the shape changes; names as torchvision's."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class NonLocal(nn.Module):
    """z = x + W(y), y_i = sum_j (theta_i . phi_j / N) g_j with one inner channel; W = (1x1 conv, BN)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.g = nn.Conv2d(channels, 1, 1)
        self.theta = nn.Conv2d(channels, 1, 1)
        self.phi = nn.Conv2d(channels, 1, 1)
        self.W = nn.Sequential(nn.Conv2d(1, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        g = self.g(x).reshape(batch, 1, -1).transpose(1, 2)  # (B, N, 1)
        theta = self.theta(x).reshape(batch, 1, -1).transpose(1, 2)
        phi = self.phi(x).reshape(batch, 1, -1)
        pairwise = theta @ phi / phi.shape[-1]  # (B, N, N)
        y = (pairwise @ g).transpose(1, 2).reshape(batch, 1, height, width)
        return x + self.W(y)


RESNET_LAYOUT = {"resnet18": (BasicBlock, (2, 2, 2, 2), 1), "resnet50": (Bottleneck, (3, 4, 6, 3), 4)}


class ResNetTrunk(nn.Module):
    """The four projects' ResNet: `stem_relu` and `ceil_pool` pick the stem; NL_<s> blocks after a stage's last
    `nonlocal_counts[s-1]` blocks."""

    def __init__(
        self,
        depth: str = "resnet50",
        *,
        last_stride: int = 1,
        stem_relu: bool = True,
        ceil_pool: bool = False,
        nonlocal_counts: tuple[int, int, int, int] = (0, 0, 0, 0),
        named_nonlocal: bool = True,
    ) -> None:
        super().__init__()
        block, depths, expansion = RESNET_LAYOUT[depth]
        self.stem_relu = stem_relu
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, ceil_mode=True) if ceil_pool else nn.MaxPool2d(3, 2, padding=1)
        inplanes = 64
        stages = zip((64, 128, 256, 512), depths, (1, 2, 2, last_stride), strict=True)
        for stage, (planes, count, stride) in enumerate(stages, 1):
            blocks = []
            for index in range(count):
                blocks.append(block(inplanes, planes, stride if index == 0 else 1))
                inplanes = planes * expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            if named_nonlocal:
                setattr(
                    self, f"NL_{stage}", nn.ModuleList(NonLocal(inplanes) for _ in range(nonlocal_counts[stage - 1]))
                )
        self.out_channels = inplanes
        self.nonlocal_counts = nonlocal_counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.maxpool(F.relu(x) if self.stem_relu else x)
        for stage in range(1, 5):
            layer = getattr(self, f"layer{stage}")
            attention = getattr(self, f"NL_{stage}", [])
            first = len(layer) - len(attention)
            for index, block in enumerate(layer):
                x = block(x)
                if index >= first:
                    x = attention[index - first](x)
        return x


def gem(x: torch.Tensor, p: torch.Tensor | float, eps: float = 1e-6) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x.clamp(min=eps).pow(p), 1).pow(1.0 / p)


class FastReID(nn.Module):
    """fast-reid's Baseline: `backbone`, `heads` (pool, BN neck on the 4-d pooled map, classifier), pixel
    statistics on a 0-255 scale inside the model. `head_layout`: "bnneck" (2020), "classifier" (2020-09 to
    2021-03) or "weight" (since); `pooling`: "gem_fixed", "gem_learnable" or "avg"."""

    def __init__(
        self,
        num_classes: int,
        *,
        depth: str = "resnet50",
        nonlocal_counts=(0, 2, 3, 0),
        head_layout: str = "weight",
        pooling: str = "gem_fixed",
        persistent_pixels: bool = False,
    ) -> None:
        super().__init__()
        mean, std = (
            torch.tensor(IMAGENET_MEAN * 255).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD * 255).view(1, 3, 1, 1),
        )
        self.register_buffer("pixel_mean", mean.float(), persistent=persistent_pixels)
        self.register_buffer("pixel_std", std.float(), persistent=persistent_pixels)
        self.backbone = ResNetTrunk(depth, ceil_pool=True, nonlocal_counts=nonlocal_counts)
        self.heads = nn.Module()
        channels = self.backbone.out_channels
        self.pooling = pooling
        if pooling == "gem_learnable":
            self.heads.pool_layer = nn.Module()
            self.heads.pool_layer.p = nn.Parameter(torch.ones(1) * 3)
        self.head_layout = head_layout
        if head_layout == "bnneck":
            self.heads.bnneck = nn.BatchNorm2d(channels)
        else:
            self.heads.bottleneck = nn.Sequential(nn.BatchNorm2d(channels))
        if head_layout == "weight":
            self.heads.weight = nn.Parameter(torch.randn(num_classes, channels) * 0.01)
        else:
            self.heads.classifier = nn.Linear(channels, num_classes, bias=False)

    def forward(self, images_0_255: torch.Tensor) -> torch.Tensor:
        features = self.backbone((images_0_255 - self.pixel_mean) / self.pixel_std)
        if self.pooling == "avg":
            pooled = F.adaptive_avg_pool2d(features, 1)
        else:
            pooled = gem(features, self.heads.pool_layer.p if self.pooling == "gem_learnable" else 3.0)
        neck = self.heads.bnneck if self.head_layout == "bnneck" else self.heads.bottleneck
        return neck(pooled)[..., 0, 0]

    @staticmethod
    def preprocess(path: Path, size: tuple[int, int]) -> torch.Tensor:
        """fast-reid's test transform: bicubic resize, values 0-255 (its ToTensor does not scale)."""
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize(size[::-1], Image.BICUBIC), dtype=np.float32)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


class SurveyBaseline(nn.Module):
    """ReID-Survey's / reid-strong-baseline's Baseline: `base` (no stem ReLU, padded max-pool), `global_pool`
    (learnable GeM) or average pooling, BatchNorm1d `bottleneck` and bias-free `classifier`; or, with
    neck=False, a classifier with bias on the pooled feature."""

    def __init__(
        self,
        num_classes: int,
        *,
        depth: str = "resnet50",
        nonlocal_counts=(0, 2, 3, 0),
        learnable_gem: bool = True,
        neck: bool = True,
        neck_feat: str = "after",
    ) -> None:
        super().__init__()
        self.base = ResNetTrunk(depth, stem_relu=False, nonlocal_counts=nonlocal_counts)
        channels = self.base.out_channels
        if learnable_gem:
            self.global_pool = nn.Module()
            self.global_pool.p = nn.Parameter(torch.ones(1) * 3)
        self.learnable_gem, self.neck, self.neck_feat = learnable_gem, neck, neck_feat
        if neck:
            self.bottleneck = nn.BatchNorm1d(channels)
        self.classifier = nn.Linear(channels, num_classes, bias=not neck)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.base(images)
        pooled = gem(features, self.global_pool.p) if self.learnable_gem else F.adaptive_avg_pool2d(features, 1)
        pooled = pooled.flatten(1)
        if not self.neck or self.neck_feat == "before":
            return pooled
        return self.bottleneck(pooled)

    @staticmethod
    def preprocess(path: Path, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear resize, ToTensor (0-1), ImageNet normalisation."""
        return imagenet_normalised(path, size)


class TorchreidResNet(nn.Module):
    """torchreid's ResNet: flat torchvision names, average pooling, optional fc (Linear, BatchNorm1d, ReLU), a
    classifier with bias; the eval output is the pooled (or fc) feature."""

    def __init__(self, num_classes: int, *, depth: str = "resnet50", last_stride: int = 2, fc_dim: int | None = None):
        super().__init__()
        trunk = ResNetTrunk(depth, last_stride=last_stride, named_nonlocal=False)
        for name in ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(trunk, name))
        channels = trunk.out_channels
        self.fc = None
        if fc_dim is not None:
            self.fc = nn.Sequential(nn.Linear(channels, fc_dim), nn.BatchNorm1d(fc_dim), nn.ReLU(inplace=True))
            channels = fc_dim
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pooled if self.fc is None else self.fc(pooled)

    @staticmethod
    def preprocess(path: Path, size: tuple[int, int]) -> torch.Tensor:
        return imagenet_normalised(path, size)


def imagenet_normalised(path: Path, size: tuple[int, int]) -> torch.Tensor:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB").resize(size[::-1], Image.BILINEAR), dtype=np.float64) / 255
    return torch.from_numpy(((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32))


def randomise(network: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and BatchNorm statistics away from their initial values (non-local W's BN included, which starts
    at zero), so that a wrong mapping or a wrong stem cannot go unnoticed; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(0.5 + torch.rand(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
                module.num_batches_tracked.fill_(7)
        for name, parameter in network.named_parameters():
            if name.endswith(".p"):
                parameter.fill_(2.5)
    return network.eval()


def features(network: nn.Module, paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
    batch = torch.stack([network.preprocess(path, size) for path in paths])
    with torch.no_grad():
        return network.eval()(batch)


def save_pickled_module(network: nn.Module, path: Path, module_path: str, *, zipfile: bool = True) -> None:
    """torch.save of the whole module as the source project would pickle it: its classes under the project's
    module path (e.g. modeling.baseline), importable only while saving. Afterwards nothing named so exists."""
    package = module_path.split(".")[0]
    fake = types.ModuleType(module_path)
    classes = {type(module) for module in network.modules() if type(module).__module__ == __name__}
    originals = {cls: (cls.__module__, cls.__qualname__) for cls in classes}
    for cls in classes:
        cls.__module__ = module_path
        setattr(fake, cls.__qualname__, cls)
    parents = [".".join(module_path.split(".")[:n]) for n in range(1, module_path.count(".") + 1)]
    try:
        for name in parents:
            sys.modules[name] = types.ModuleType(name)
        sys.modules[module_path] = fake
        torch.save(network, path, _use_new_zipfile_serialization=zipfile)
    finally:
        for name in [*parents, module_path]:
            sys.modules.pop(name, None)
        for cls, (module, _) in originals.items():
            cls.__module__ = module
    assert package not in sys.modules
