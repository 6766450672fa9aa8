"""The re-id network: a backbone producing a feature map and a head turning it into outputs.

The network also owns its retrieval contract, so that validation, evaluation, pictures and search indexes
cannot disagree about it: which part of the eval output exact ranking compares (`ranking_features`), by
which distance (`distance`), and the code pyramid a search index is built over (`code_lengths`).
"""

from __future__ import annotations

import torch
from torch import nn


class ReIDModel(nn.Module):
    """backbone + head, split timm-style so distillation and feature extraction can reuse either half.

    ``forward_features`` gives the backbone's feature map (B, C, H, W); ``forward_head`` gives the head's
    output: a dict of training outputs in train mode, the retrieval feature tensor in eval mode.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, distance: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.distance = self._check_distance(distance)

    @property
    def code_lengths(self) -> tuple[int, ...] | None:
        """The binary codes of a code head (longest first), None for a float feature."""
        lengths = getattr(self.head, "code_lengths", None)
        return tuple(int(length) for length in lengths) if lengths else None

    def _check_distance(self, distance: str | None) -> str:
        """Hamming for codes (their sign bits are the feature); cosine by default, or Euclidean, for floats."""
        allowed = ("hamming",) if self.code_lengths else ("cosine", "euclidean")
        if distance is None:
            return allowed[0]
        if distance not in allowed:
            kind = "binary codes" if self.code_lengths else "a float feature"
            raise ValueError(
                f"distance {distance!r} does not fit a head that outputs {kind}: expected one of {allowed}"
            )
        return distance

    def ranking_features(self, outputs: torch.Tensor) -> torch.Tensor:
        """The part of an eval output that exact ranking compares: a code pyramid's full-length level.

        A pyramid's eval output holds every level side by side; only a coarse-to-fine index uses the others.
        """
        lengths = self.code_lengths
        return outputs if lengths is None else outputs[:, : lengths[0]]

    @property
    def feature_dim(self) -> int:
        """Size of the retrieval feature returned in eval mode."""
        return self.head.feature_dim

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward_head(self, feature_map: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        return self.head(feature_map)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        return self.forward_head(self.forward_features(images))
