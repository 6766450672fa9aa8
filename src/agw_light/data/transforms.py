"""Image pipelines (PIL RGB image in, normalised float tensor 3 x height x width out).

Training follows AGW's augmentation: resize, horizontal flip, pad-and-crop jitter, ImageNet normalisation,
then random erasing. Erased rectangles are filled with 0 after normalisation, i.e. with the ImageNet mean
pixel, the same "mean-pixel" erasing AGW uses, over AGW's area range (2 % to 40 %) and aspect range
(0.3 to 1 / 0.3). torchvision is imported on first use: its transforms module costs about a second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ERASING_SCALE = (0.02, 0.4)
ERASING_RATIO = (0.3, 1 / 0.3)


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"transform {name} must be a positive integer, got {value!r}")


def _check_probability(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
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
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
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
    height: int, width: int, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable:
    """Deterministic pipeline for query and gallery images (an exported model records its mean and std)."""
    from torchvision.transforms import v2

    _check_size(height, width)
    return v2.Compose([v2.Resize((height, width)), *_to_normalised_tensor(mean, std)])
