"""`ReIDMetric`: re-id validation as a torchmetrics Metric, so Lightning gathers it across DDP ranks.

Query and gallery samples arrive mixed in the validation batches; the metric keeps every feature with its
pid, camera, query flag and dataset index, and ranks the queries against the gallery at `compute()`.

DDP: the states are lists reduced by concatenation, so `compute()` sees every rank's samples. A
DistributedSampler pads the last batches with repeated samples to give each rank the same count; pass the
dataset index of each sample (`update(..., index=batch["index"])`) and repeats are dropped at compute, the
first occurrence kept. Samples are then ordered by index, so distance ties are broken the same way whatever
the number of ranks. Without indices, repeats count twice.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn

from agw_light.checks import is_integer
from agw_light.metrics.distance import METRICS
from agw_light.metrics.rank import evaluate_retrieval

RANKS = (1, 5, 10)
_NO_INDEX = -1


class ReIDMetric(Metric):
    """R1, R5, R10, mAP and mINP (python floats, which `LightningModule.log` accepts) of the queries
    against the gallery seen since the last reset, under `evaluate_rank`'s protocol.

    With no query, no gallery or no query that has a match, the values are NaN (with a warning) rather
    than an error: Lightning's sanity check may run on a few query-only batches.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, distance: str = "cosine", max_rank: int = 50, **kwargs) -> None:
        super().__init__(**kwargs)
        if distance not in METRICS:
            raise ValueError(f"ReIDMetric distance must be one of {METRICS}, got {distance!r}")
        if not is_integer(max_rank) or max_rank < max(RANKS):
            raise ValueError(
                f"ReIDMetric max_rank must be an integer >= {max(RANKS)} (R10 is reported), got {max_rank!r}"
            )
        self.distance = distance
        self.max_rank = max_rank
        # When set, compute() leaves the samples it gathered (on CPU) in `kept_samples`, so pictures of the
        # rankings need no second gather across ranks.
        self.keep_samples = False
        self.kept_samples: dict[str, torch.Tensor] | None = None
        for name in ("features", "pids", "camids", "is_query", "index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        features: torch.Tensor,
        pids: torch.Tensor,
        camids: torch.Tensor,
        is_query: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> None:
        """Adds a batch: features (N, D); pids, camids, is_query (N,); optional dataset index (N,)."""
        if features.dim() != 2:
            shape = tuple(features.shape)
            raise ValueError(f"ReIDMetric.update: features must have shape (N, D), got {shape}")
        count = features.shape[0]
        columns = {"pids": pids, "camids": camids, "is_query": is_query}
        if index is not None:
            columns["index"] = index
        for name, value in columns.items():
            if not isinstance(value, torch.Tensor) or value.shape != (count,):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"ReIDMetric.update: {name} must be a tensor of shape ({count},), got {shape}")
        if index is not None and bool((index < 0).any()):
            raise ValueError("ReIDMetric.update: index must hold dataset indices >= 0")
        device = features.device
        self.features.append(features.detach())
        self.pids.append(pids.to(device=device, dtype=torch.long))
        self.camids.append(camids.to(device=device, dtype=torch.long))
        self.is_query.append(is_query.to(device=device, dtype=torch.bool))
        if index is None:
            index = torch.full((count,), _NO_INDEX, dtype=torch.long, device=device)
        self.index.append(index.to(device=device, dtype=torch.long))

    def gathered_samples(self) -> dict[str, torch.Tensor] | None:
        """features, pids, camids, is_query and index of the samples held, repeats dropped, in index order
        (None before any update). Inside `compute()` or `sync_context()` these are every rank's samples."""
        if isinstance(self.features, list) and not self.features:  # a list until synced, a tensor after
            return None
        samples = {
            name: dim_zero_cat(getattr(self, name)) for name in ("features", "pids", "camids", "is_query", "index")
        }
        samples["is_query"] = samples["is_query"].bool()
        keep = _unique_in_index_order(samples["index"])
        if keep is None:
            return samples
        return {name: value[keep] for name, value in samples.items()}

    def compute(self) -> dict[str, float]:
        samples = self.gathered_samples()
        if self.keep_samples and samples is not None:
            self.kept_samples = {name: value.cpu() for name, value in samples.items()}
        if samples is None:
            return self._undefined("no samples were added")
        features, pids, camids, is_query = (samples[name] for name in ("features", "pids", "camids", "is_query"))
        num_query = int(is_query.sum())
        if num_query in (0, len(is_query)):
            return self._undefined(f"{num_query} query and {len(is_query) - num_query} gallery samples")
        result = evaluate_retrieval(
            features[is_query],
            features[~is_query],
            pids[is_query],
            pids[~is_query],
            camids[is_query],
            camids[~is_query],
            distance=self.distance,
            max_rank=self.max_rank,
        )
        if result["num_valid_queries"] == 0:
            return self._undefined("no query has a match in the gallery under another camera")
        values = {f"R{k}": float(result["cmc"][k - 1]) for k in RANKS}
        return {**values, "mAP": result["mAP"], "mINP": result["mINP"]}

    @staticmethod
    def _undefined(reason: str) -> dict[str, float]:
        rank_zero_warn(f"ReIDMetric: {reason}; R1/R5/R10/mAP/mINP are undefined and reported as NaN")
        return {**{f"R{k}": math.nan for k in RANKS}, "mAP": math.nan, "mINP": math.nan}


def _unique_in_index_order(index: torch.Tensor) -> torch.Tensor | None:
    """Positions of the first occurrence of each dataset index, in increasing index order (None: no index)."""
    has_index = index != _NO_INDEX
    if not bool(has_index.any()):
        return None
    if not bool(has_index.all()):
        raise ValueError("ReIDMetric: pass index to every update or to none (some batches came without it)")
    order = torch.sort(index, stable=True).indices
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    return order[first]
