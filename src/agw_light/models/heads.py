"""Re-id heads: pool the feature map into one vector per image, then what training and retrieval need.

BNNeck (Luo et al. 2019, "Bag of Tricks", used by AGW): the triplet loss sees the pooled feature, the ID
classifier and retrieval see it after a BatchNorm whose bias is frozen at zero (no shift, so the feature
stays centred on the hypersphere the classifier separates). Inits follow BoT/AGW: BN weight 1 and bias 0,
classifier weights N(0, 0.001^2) without bias.
"""

from __future__ import annotations

import torch
from torch import nn

from agw_light.models.pooling import GeneralizedMeanPooling


class BNNeckHead(nn.Module):
    """Pooling + BNNeck + ID classifier.

    Train mode returns {"features": pooled, "bn_features": after BN, "logits": classifier output};
    eval mode returns only the retrieval feature (after BN), of size ``feature_dim``.
    """

    def __init__(self, in_channels: int, num_classes: int, *, pooling: nn.Module | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"BNNeckHead needs num_classes >= 1 (training identities), got {num_classes}")
        self.feature_dim = in_channels
        self.num_classes = num_classes
        self.pooling = GeneralizedMeanPooling() if pooling is None else pooling
        self.bottleneck = nn.BatchNorm1d(in_channels)
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(in_channels, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feature_map: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        features = self.pooling(feature_map)
        bn_features = self.bottleneck(features)
        if not self.training:
            return bn_features
        return {"features": features, "bn_features": bn_features, "logits": self.classifier(bn_features)}
