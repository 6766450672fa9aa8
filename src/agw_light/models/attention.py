"""Non-local attention block as used by AGW (Ye et al. 2020, after Wang et al. 2018).

What the AGW authors' code does (mangye16/ReID-Survey, modeling/layer/non_local.py; fast-reid copies it):
- theta, phi, g are 1x1 convolutions (with bias); the output projection W is a 1x1 conv followed by BN whose
  weight and bias start at zero, so a new block is the identity and can be dropped into a pretrained ResNet.
- The pairwise function is the *dot product divided by N* (N = number of spatial positions), not the
  embedded-Gaussian softmax.
- Their inter-channel count is written ``reduc_ratio // reduc_ratio``, which evaluates to 1 channel; the
  evident intent (and Wang et al.'s design) is ``in_channels // 2``. We follow the intent: ``reduction=2``.
"""

from __future__ import annotations

import torch
from torch import nn


class NonLocalBlock(nn.Module):
    """Adds to each position a learned mix of all positions' features: z = x + W(f(x) g(x) / N)."""

    def __init__(self, in_channels: int, *, reduction: int = 2) -> None:
        super().__init__()
        if in_channels < 1 or reduction < 1:
            raise ValueError(
                f"NonLocalBlock needs in_channels >= 1 and reduction >= 1, got {in_channels} and {reduction}"
            )
        self.in_channels = in_channels
        self.inter_channels = max(1, in_channels // reduction)
        self.theta = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.g = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        # W_z of Wang et al.: back to in_channels, then BN zero-initialised so the block starts as identity.
        self.output = nn.Sequential(
            nn.Conv2d(self.inter_channels, in_channels, kernel_size=1),
            nn.BatchNorm2d(in_channels),
        )
        nn.init.zeros_(self.output[1].weight)
        nn.init.zeros_(self.output[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        theta = self.theta(x).flatten(2)  # (B, C', N)
        phi = self.phi(x).flatten(2)  # (B, C', N)
        g = self.g(x).flatten(2)  # (B, C', N)
        affinity = theta.transpose(1, 2) @ phi / (height * width)  # (B, N, N): query i, key j
        attended = g @ affinity.transpose(1, 2)  # (B, C', N): column i = sum_j affinity[i, j] g[:, j]
        return x + self.output(attended.view(batch, self.inter_channels, height, width))
