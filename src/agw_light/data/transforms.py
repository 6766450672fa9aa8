"""Image pipelines (PIL RGB image in, normalised float tensor 3 x height x width out).

Training follows AGW's augmentation: resize, horizontal flip, pad-and-crop jitter, ImageNet normalisation,
then random erasing. Erased rectangles are filled with 0 after normalisation, i.e. with the ImageNet mean
pixel, the same "mean-pixel" erasing AGW uses, over AGW's area range (2 % to 40 %) and aspect range
(0.3 to 1 / 0.3). torchvision is imported on first use: its transforms module costs about a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agw_light.checks import is_integer, is_number

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How a test image is resized: bilinear (torchvision's default, agw_light's, ReID-Survey's, torchreid's) or bicubic
# (fast-reid's `T.Resize(size_test, interpolation=3)`).
INTERPOLATIONS = ("bilinear", "bicubic")
ERASING_SCALE = (0.02, 0.4)
ERASING_RATIO = (0.3, 1 / 0.3)


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not is_integer(value) or value < 1:
            raise ValueError(f"transform {name} must be a positive integer, got {value!r}")


def _check_probability(value: float, name: str) -> None:
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"transform {name} must be a probability in [0, 1], got {value!r}")


def _to_normalised_tensor(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> list:
    from torch import float32
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.ToDtype(float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_train_transform(
    height: int, width: int, *, flip_p: float = 0.5, padding: int = 10, erasing_p: float = 0.5
) -> Callable:
    """Augmenting pipeline for training images."""
    from torchvision.transforms import v2

    _check_size(height, width)
    _check_probability(flip_p, "flip_p")
    _check_probability(erasing_p, "erasing_p")
    if not is_integer(padding) or padding < 0:
        raise ValueError(f"transform padding must be a non-negative integer, got {padding!r}")
    return v2.Compose(
        [
            v2.Resize((height, width)),
            v2.RandomHorizontalFlip(flip_p),
            v2.Pad(padding),
            v2.RandomCrop((height, width)),
            *_to_normalised_tensor(),
            v2.RandomErasing(p=erasing_p, scale=ERASING_SCALE, ratio=ERASING_RATIO, value=0.0),
        ]
    )


def build_test_transform(
    height: int,
    width: int,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
) -> Callable:
    """Deterministic pipeline for query and gallery images (a checkpoint and an export record theirs)."""
    from torchvision.transforms import InterpolationMode, v2

    _check_size(height, width)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: expected one of {INTERPOLATIONS}")
    resize = v2.Resize((height, width), interpolation=InterpolationMode(interpolation))
    return v2.Compose([resize, *_to_normalised_tensor(mean, std)])


def _channel_triple(value: Any, name: str, *, positive: bool) -> tuple[float, float, float]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 3
        or any(not is_number(v) or not math.isfinite(v) for v in value)
        or (positive and any(v <= 0 for v in value))
    ):
        kind = "positive " if positive else ""
        raise ValueError(f"{name}={value!r}: expected three {kind}numbers, one per RGB channel, on a 0-1 scale")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessing:
    """How a network wants its test images: size (height, width), resampling, and per-channel mean/std on the
    0-1 scale of `ToDtype(scale=True)`. A checkpoint records it, so the Encoder, evaluation, an ONNX export and
    the service all feed a model the images its training (or its source framework) fed it."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        size = self.image_size
        if not isinstance(size, Sequence) or len(size) != 2 or any(not is_integer(v) or v < 1 for v in size):
            raise ValueError(f"image_size={size!r}: expected [height, width], two positive integers")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        object.__setattr__(self, "mean", _channel_triple(self.mean, "mean", positive=False))
        object.__setattr__(self, "std", _channel_triple(self.std, "std", positive=True))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}: expected one of {INTERPOLATIONS}")

    def resized(self, image_size: Sequence[int] | None) -> Preprocessing:
        """The same preprocessing at another input size (None keeps this one)."""
        if image_size is None:
            return self
        return Preprocessing(image_size, self.mean, self.std, self.interpolation)  # type: ignore[arg-type]

    def transform(self) -> Callable:
        """The test pipeline: PIL RGB image in, normalised float tensor (3, height, width) out."""
        return build_test_transform(*self.image_size, mean=self.mean, std=self.std, interpolation=self.interpolation)

    def to_record(self) -> dict[str, Any]:
        """Plain values for a checkpoint's hyper-parameters or a JSON file."""
        return {
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, source: str) -> Preprocessing:
        """The inverse of `to_record`; mean, std and interpolation default to agw_light's own (ImageNet, bilinear),
        which is what every checkpoint written before they were recorded used. Errors name `source`."""
        try:
            return cls(
                record["image_size"],
                record.get("mean", IMAGENET_MEAN),
                record.get("std", IMAGENET_STD),
                record.get("interpolation", "bilinear"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: preprocessing record {dict(record)!r} is not valid ({error})") from error
