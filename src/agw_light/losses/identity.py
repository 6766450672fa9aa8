"""The identity (classification) loss on the BNNeck logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against (1 - epsilon) * one-hot + epsilon / num_classes, as in BoT and AGW.

    torch's ``label_smoothing`` spreads epsilon over all classes, the true one included, which is exactly that
    target, so no hand-written log-softmax is needed.
    """

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label smoothing epsilon={epsilon}: expected a value in [0, 1)")
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), pids, label_smoothing=self.epsilon)
