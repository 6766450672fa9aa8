"""Generalized-mean (GeM) pooling, AGW's global pooling.

The AGW authors use the learnable variant (``GeneralizedMeanPoolingP``: p is a parameter starting at 3,
clamp eps 1e-6), so ``learnable=True`` is the default here. p = 1 is average pooling; large p tends to max.
"""

from __future__ import annotations

import torch
from torch import nn


class GeneralizedMeanPooling(nn.Module):
    """(mean over positions of clamp(x, eps)^p)^(1/p) per channel: (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, *, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM pooling needs p > 0, got p={p}")
        if eps <= 0:
            raise ValueError(f"GeM pooling needs eps > 0 (it keeps x^p and its root finite), got eps={eps}")
        initial_p = torch.full((1,), float(p))
        if learnable:
            self.p = nn.Parameter(initial_p)
        else:
            self.register_buffer("p", initial_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32: the p-th powers of activations overflow half precision easily.
        p = self.p.float()
        powered = x.float().clamp(min=self.eps).pow(p)
        return powered.mean(dim=(2, 3)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4g}, learnable={isinstance(self.p, nn.Parameter)}, eps={self.eps}"


class AveragePooling(nn.Module):
    """Global average pooling, (B, C, H, W) -> (B, C): the pooling of BoT, reid-strong-baseline and torchreid.

    Its own module (not GeM with p = 1) because GeM clamps at eps first, which changes exact zeros, and an
    imported network must compute its source's function exactly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


POOLINGS = ("gem", "avg")


def build_pooling(kind: str = "gem", *, p: float = 3.0, learnable: bool = True) -> nn.Module:
    """The head's global pooling: "gem" (AGW's, `p` learnable or fixed) or "avg"."""
    if kind == "gem":
        return GeneralizedMeanPooling(p, learnable=learnable)
    if kind == "avg":
        return AveragePooling()
    raise ValueError(f"pooling={kind!r}: expected one of {POOLINGS}")
