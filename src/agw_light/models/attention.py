"""Non-local attention block as used by AGW (Ye et al. 2020, after Wang et al. 2018).

What the AGW authors' code does (mangye16/ReID-Survey, modeling/layer/non_local.py; fast-reid copies it):
- theta, phi, g are 1x1 convolutions (with bias); the output projection W is a 1x1 conv followed by BN whose
  weight and bias start at zero, so a new block is the identity and can be dropped into a pretrained ResNet.
- The pairwise function is the *dot product divided by N* (N = number of spatial positions), not the
  embedded-Gaussian softmax.
- Their inter-channel count is written ``reduc_ratio // reduc_ratio``, which evaluates to 1 channel, and so
  do fast-reid's and light-reid's. Every published AGW number comes from that network, so it is the default
  here (``inter_channels=1``). Wang et al.'s design, and the evident intent of that line, is
  ``in_channels // 2``: ``inter_channels="half"`` (``model.nonlocal_inter_channels=half``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from agw_light.checks import is_integer


class NonLocalBlock(nn.Module):
    """Adds to each position a learned mix of all positions' features: z = x + W(f(x) g(x) / N)."""

    def __init__(self, in_channels: int, *, inter_channels: int | Literal["half"] = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = inter_channel_count(in_channels, inter_channels)
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


def inter_channel_count(in_channels: int, inter_channels: int | str) -> int:
    """The block's inner width: a positive count, or "half" of `in_channels` (Wang et al.'s choice)."""
    if not is_integer(in_channels) or in_channels < 1:
        raise ValueError(f"NonLocalBlock needs in_channels >= 1, got {in_channels!r}")
    if inter_channels == "half":
        return max(1, in_channels // 2)
    if not is_integer(inter_channels) or not 1 <= inter_channels <= in_channels:
        raise ValueError(
            f"nonlocal_inter_channels={inter_channels!r}: expected 'half' or an integer between 1 and the "
            f"stage's {in_channels} channels (1: the AGW authors' network)"
        )
    return inter_channels
