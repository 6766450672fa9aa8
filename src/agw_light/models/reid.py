"""The re-id network: a backbone producing a feature map and a head turning it into outputs."""

from __future__ import annotations

import torch
from torch import nn


class ReIDModel(nn.Module):
    """backbone + head, split timm-style so distillation and feature extraction can reuse either half.

    ``forward_features`` gives the backbone's feature map (B, C, H, W); ``forward_head`` gives the head's
    output: a dict of training outputs in train mode, the retrieval feature tensor in eval mode.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

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
