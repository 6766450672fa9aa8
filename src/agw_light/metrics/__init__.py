"""Re-id evaluation: ranking metrics, pairwise distances and the torchmetrics wrapper for validation.

`ReIDMetric` is loaded on first access so that `from agw_light.metrics import evaluate_rank` does not import
torchmetrics.
"""

from __future__ import annotations

from typing import Any

from agw_light.metrics.distance import pairwise_distance, prepare_features
from agw_light.metrics.rank import RankAccumulator, evaluate_rank, evaluate_retrieval
from agw_light.metrics.rerank import rerank_blocks

__all__ = [
    "RankAccumulator",
    "ReIDMetric",
    "evaluate_rank",
    "evaluate_retrieval",
    "pairwise_distance",
    "prepare_features",
    "rerank_blocks",
]


def __getattr__(name: str) -> Any:
    if name == "ReIDMetric":
        from agw_light.metrics.metric import ReIDMetric

        return ReIDMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
