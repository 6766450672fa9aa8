"""ResNet trunks for re-id: torchvision ResNet-18/34/50 with last stride 1 and AGW's non-local blocks.

Non-local placement, checked against the AGW authors' code (mangye16/ReID-Survey,
modeling/backbones/resnet_nl.py with ``non_layers=[0, 2, 3, 0]`` from modeling/baseline.py) and fast-reid
(``nl_layers_per_stage`` 50x: ``[0, 2, 3, 0]``): one block after each of the **last 2 blocks of layer2**
(512 channels, after blocks 2 and 3) and the **last 3 blocks of layer3** (1024 channels, after blocks 3, 4
and 5); none in layer1 or layer4. The paper calls these stages res3/res4 (conv3_x/conv4_x), which is where a
reading "layer3 and layer4" comes from; torchvision's layer2/layer3 are those stages. ``nonlocal_layers``
counts blocks per stage (layer1..layer4), always after the last blocks of the stage, as the authors do.

For ResNet-18/34 neither the authors nor fast-reid (18x/34x: ``[0, 0, 0, 0]``) nor light-reid's ResNet-18
student use non-local blocks, so the default there is none.

One deliberate difference from the authors' ResNet: their stem omits the ReLU after ``bn1`` (commented out
as "add missed relu"); we keep torchvision's stem, which is what the ImageNet weights were trained with.
Networks imported from other frameworks need the other stems: ``stem_relu=False`` is the AGW authors' and
reid-strong-baseline's, ``maxpool="ceil"`` fast-reid's ``MaxPool2d(3, 2, ceil_mode=True)`` without padding
(fastreid/modeling/backbones/resnet.py at JDAI-CV/fast-reid c9bc3ce). Both change the function, not the weights.

Weights are torchvision's ``IMAGENET1K_V1``: the original torchvision ResNet weights that AGW loaded
(``resnet50-19c8e357.pth``, re-serialised by torchvision), not the later V2 training recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from agw_light.models.attention import NonLocalBlock

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")

# Keys the backbone has but no ImageNet checkpoint has: AGW's new modules, and BN step counters that
# pre-0.4 checkpoints (such as the original torchvision ResNet files) never stored.
NEW_AGW_KEY_PREFIXES = ("nonlocal_blocks.",)
UNTRACKED_KEY_SUFFIXES = (".num_batches_tracked",)
# Keys an ImageNet checkpoint has that the re-id model drops: the 1000-way classifier.
IMAGENET_CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
_MAX_KEYS_SHOWN = 20
# The stem's max-pool: torchvision's MaxPool2d(3, 2, padding=1), or fast-reid's MaxPool2d(3, 2, ceil_mode=True).
MAXPOOLS = ("padded", "ceil")


@dataclass(frozen=True)
class ResNetSpec:
    """What differs between the ResNets we support."""

    weights_enum: str  # torchvision weights enum, e.g. ResNet50_Weights
    stage_channels: tuple[int, int, int, int]
    default_nonlocal_layers: tuple[int, int, int, int]


RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec("ResNet18_Weights", (64, 128, 256, 512), (0, 0, 0, 0)),
    "resnet34": ResNetSpec("ResNet34_Weights", (64, 128, 256, 512), (0, 0, 0, 0)),
    "resnet50": ResNetSpec("ResNet50_Weights", (256, 512, 1024, 2048), (0, 2, 3, 0)),
}


def resnet_spec(name: str) -> ResNetSpec:
    if name not in RESNET_SPECS:
        raise ValueError(f"unknown ResNet {name!r}; known: {', '.join(sorted(RESNET_SPECS))}")
    return RESNET_SPECS[name]


class ResNetBackbone(nn.Module):
    """ResNet without avgpool/fc, returning the layer4 feature map; parameter names match torchvision's.

    Keeping torchvision's names (``conv1``, ``layer3.2.conv1`` ...) lets ImageNet state dicts load as they
    are; the non-local blocks live beside the stages in ``nonlocal_blocks[stage][block_index]`` and run
    right after that block.
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        last_stride: int = 1,
        nonlocal_layers: Sequence[int] | None = None,
        nonlocal_inter_channels: int | str = 1,
        stem_relu: bool = True,
        maxpool: str = "padded",
    ) -> None:
        super().__init__()
        from torchvision import models  # deferred: torchvision adds a second to every CLI start

        spec = resnet_spec(name)
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        if not isinstance(stem_relu, bool):
            raise ValueError(f"stem_relu must be true or false, got {stem_relu!r}")
        if maxpool not in MAXPOOLS:
            raise ValueError(
                f"maxpool={maxpool!r}: expected 'padded' (torchvision's MaxPool2d(3, 2, padding=1)) or 'ceil' "
                "(fast-reid's MaxPool2d(3, 2, ceil_mode=True))"
            )
        resnet = getattr(models, name)(weights=None)
        self.name = name
        self.conv1, self.bn1 = resnet.conv1, resnet.bn1
        self.relu = resnet.relu if stem_relu else nn.Identity()
        self.maxpool = resnet.maxpool if maxpool == "padded" else nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        self.stem_relu, self.maxpool_kind = stem_relu, maxpool
        for stage_name in STAGE_NAMES:  # layer1..layer4, the stages non-local blocks attach to
            setattr(self, stage_name, getattr(resnet, stage_name))
        _set_first_block_stride(self.layer4, last_stride)
        self.last_stride = last_stride
        self.out_channels = spec.stage_channels[-1]

        counts = spec.default_nonlocal_layers if nonlocal_layers is None else tuple(nonlocal_layers)
        self.nonlocal_layers = self._check_nonlocal_layers(counts)
        self.nonlocal_blocks = nn.ModuleDict()
        for stage_name, count, channels in zip(STAGE_NAMES, self.nonlocal_layers, spec.stage_channels, strict=True):
            depth = len(getattr(self, stage_name))
            if count:
                self.nonlocal_blocks[stage_name] = nn.ModuleDict(
                    {
                        str(index): NonLocalBlock(channels, inter_channels=nonlocal_inter_channels)
                        for index in range(depth - count, depth)
                    }
                )

    def _check_nonlocal_layers(self, counts: tuple[int, ...]) -> tuple[int, int, int, int]:
        depths = tuple(len(getattr(self, stage)) for stage in STAGE_NAMES)
        if len(counts) != len(depths) or any(not 0 <= int(c) <= d for c, d in zip(counts, depths, strict=True)):
            raise ValueError(
                f"nonlocal_layers must give 4 counts (layer1..layer4), each between 0 and the stage's "
                f"block count {depths} for {self.name}; got {counts!r}"
            )
        return tuple(int(c) for c in counts)  # type: ignore[return-value]

    @property
    def nonlocal_positions(self) -> list[tuple[str, int]]:
        """(stage, block index) after which a non-local block runs, in forward order."""
        return [
            (stage, int(index))
            for stage in STAGE_NAMES
            if stage in self.nonlocal_blocks
            for index in self.nonlocal_blocks[stage]
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage_name in STAGE_NAMES:
            attention = self.nonlocal_blocks[stage_name] if stage_name in self.nonlocal_blocks else {}
            for index, block in enumerate(getattr(self, stage_name)):
                x = block(x)
                if str(index) in attention:
                    x = attention[str(index)](x)
        return x


def _set_first_block_stride(stage: nn.Sequential, stride: int) -> None:
    """Sets the stride of a stage's first block: its strided conv (conv2 in Bottleneck, conv1 in
    BasicBlock) and its downsample shortcut, so both branches keep the same resolution."""
    first_block = stage[0]
    for module in first_block.modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (stride, stride)
    first_block.stride = stride


def load_pretrained(backbone: ResNetBackbone, pretrained: str | Path | None) -> None:
    """Initialises the backbone: "none" (or None) keeps the random init, "imagenet" loads torchvision's
    IMAGENET1K_V1 weights (downloaded once into the torch hub cache), anything else is a checkpoint path."""
    if pretrained is None or str(pretrained) == "none":
        return
    if str(pretrained) == "imagenet":
        state_dict, source = _imagenet_state_dict(backbone.name)
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained={str(pretrained)!r}: no such file; expected 'imagenet', 'none' or the path of a "
                f"{backbone.name} state_dict (.pth)"
            )
        state_dict, source = read_state_dict(path), str(path)
    load_backbone_state_dict(backbone, state_dict, source=source)


def _imagenet_state_dict(name: str) -> tuple[dict[str, torch.Tensor], str]:
    from torchvision import models

    weights = getattr(models, resnet_spec(name).weights_enum).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True), f"torchvision {weights}"
    except OSError as err:  # URLError, socket and DNS errors are all OSErrors
        hint = offline_hint(weights.url)
        raise RuntimeError(f"could not download the ImageNet weights {weights} for {name} ({err}). {hint}") from err


def offline_hint(url: str) -> str:
    """Where a machine without internet puts torchvision's weights file so that `pretrained: imagenet` finds it."""
    import torch.hub

    file_name = url.rsplit("/", 1)[-1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"Without internet, fetch {url} on another machine and either copy it to {cache / file_name} (torch's hub "
        f"cache, $TORCH_HOME; it is then found with model.pretrained=imagenet) or pass its path: "
        f"model.pretrained=/path/to/{file_name}. A timm ResNet file (.pth, .bin or .safetensors, same key names) "
        "works as such a path too"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads a plain state_dict or a training checkpoint wrapping one ("state_dict" or "model" key, as
    torchvision's reference scripts save), dropping DistributedDataParallel's "module." prefixes. A
    ``.safetensors`` file (timm's and the Hugging Face hub's format: tensors only, no pickle) is read as such."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        # Tensors only (no arbitrary pickled code); torchvision checkpoints also carry their argparse args.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (KeyError, UnpicklingError...) on foreign files
        raise ValueError(f"{path}: not a loadable PyTorch weights file ({err})") from err
    if isinstance(checkpoint, Mapping):
        for wrapper_key in ("state_dict", "model"):
            if isinstance(checkpoint.get(wrapper_key), Mapping):
                checkpoint = checkpoint[wrapper_key]
                break
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a state_dict (mapping of names to tensors), got {type(checkpoint)}")
    not_tensors = [str(key) for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path}: expected a state_dict of tensors, but these entries are not tensors: {key_list(not_tensors)}"
        )
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def load_backbone_state_dict(backbone: ResNetBackbone, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strict load: every backbone weight must come from the checkpoint and every checkpoint weight must be
    used, except the keys named above (AGW's new modules and BN counters may be absent, ImageNet's ``fc``
    may be unused). The re-id head is not part of the backbone, so it is never loaded from here."""
    own = backbone.state_dict()
    missing = [
        key
        for key in own
        if key not in state_dict
        and not key.startswith(NEW_AGW_KEY_PREFIXES)
        and not key.endswith(UNTRACKED_KEY_SUFFIXES)
    ]
    unexpected = [key for key in state_dict if key not in own and key not in IMAGENET_CLASSIFIER_KEYS]
    mismatched = [
        f"{key} (checkpoint {tuple(state_dict[key].shape)}, model {tuple(own[key].shape)})"
        for key in own
        if key in state_dict and state_dict[key].shape != own[key].shape
    ]
    summary = key_problems({"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched})
    if summary:
        raise ValueError(f"pretrained weights {source} do not fit the {backbone.name} backbone: {summary}")
    # The keys allowed to be absent keep their fresh values; everything else comes from the file (strict load).
    backbone.load_state_dict({**own, **{key: value for key, value in state_dict.items() if key in own}}, strict=True)


def key_problems(problems: Mapping[str, Sequence[str]]) -> str:
    """ "what: keys; ..." for each kind of problem that has keys (the first 20 of each), "" when none has."""
    return "; ".join(f"{what}: {key_list(keys)}" for what, keys in problems.items() if keys)


def key_list(keys: Sequence[str]) -> str:
    """Keys for an error message: the first 20, then how many more."""
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown if len(keys) <= _MAX_KEYS_SHOWN else f"{shown} ... and {len(keys) - _MAX_KEYS_SHOWN} more"
