"""The evaluation protocol as one typed object: the `eval` config section and `evaluate_checkpoint`'s settings.

A plain dataclass (no torch, no Hydra here), so that the commands register it as the Hydra schema of `eval`
(`agw_light.cli`) and its defaults live in this one place; the library's own defaults (the coarse-to-fine fit's
target recall, verification's false-positive rates) are the constants below, which the library imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agw_light.checks import is_integer

# The share of queries whose exact full-length top-1 the coarse-to-fine search must find (eval.target_recall).
DEFAULT_TARGET_RECALL = 0.99
# The false-positive rates at which same-person verification reports its TPR and threshold.
FPR_TARGETS = (1e-4, 1e-3, 1e-2)


@dataclass
class Rerank:
    """k-reciprocal re-ranking (Zhong et al. 2017) of the exhaustive rows (1-3) at test time, with the paper's and
    the AGW authors' settings. It compares every query and gallery image with every other, so it costs far more
    than the search (docs/evaluation.md); coarse-to-fine rows (4-5) refuse it."""

    enabled: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3


@dataclass
class EvaluationProtocol:
    """The evaluation protocol, one object: the `eval` config section (registered as its Hydra schema, so these are
    its only defaults) and what `evaluate_checkpoint` takes. Training's final evaluation and `agw_light.evaluate`
    share it.

    Attributes:
        distance: how validation and retrieval compare outputs; None: the model's own (cosine for a float feature,
            hamming for codes); a float feature also takes euclidean.
        max_rank: the CMC's length (at least 10: R10 is reported).
        timing_batch_size: the batch of the inference timing (the table's "inference per batch(64)").
        fit_images: coarse-to-fine rows fit their candidate counts on about this many training images (whole
            identities split into queries and gallery; never test queries or labels) so that the search finds the
            exact full-length top-1 for at least `target_recall` of those queries.
        target_recall: see fit_images.
        select: which checkpoint a training run reports (and rows 2 and 5 distil from): "last" epoch, as the
            reference implementations report, or "val_split": the best val/mAP on `val_images` training images
            (whole identities) held out of training. Never the test split, which validation only monitors.
        val_images: see select (default: fit_images).
        rerank: k-reciprocal re-ranking (`Rerank`).
        verification_fprs: the false-positive rates at which same-person verification reports TPR and threshold.
        targets: cross-domain datasets (conf/dataset/<name>.yaml) evaluated besides the run's own, each with its
            own query/gallery protocol, each row in metrics_<name>.json beside metrics.json.
        target_overrides: per target, its dataset overrides, e.g. {msmt17: ["dataset.root=/data/msmt"]}.
    """

    distance: str | None = None
    max_rank: int = 50
    timing_batch_size: int = 64
    fit_images: int = 1000
    target_recall: float = DEFAULT_TARGET_RECALL
    select: str = "last"
    val_images: Any = "${eval.fit_images}"
    rerank: Rerank = field(default_factory=Rerank)
    verification_fprs: list[float] = field(default_factory=lambda: list(FPR_TARGETS))
    targets: list[str] = field(default_factory=list)
    target_overrides: dict[str, list[str]] = field(default_factory=dict)

    def check(self) -> None:
        """Errors naming the setting (`eval.<name>`) for values the protocol cannot run with (re-ranking's own
        settings are checked where it runs, `agw_light.metrics.rerank.check_rerank_settings`)."""
        if self.max_rank < 10:
            raise ValueError(f"eval.max_rank={self.max_rank}: must be at least 10 to report R10")
        if self.select not in SELECTIONS:
            raise ValueError(
                f"eval.select={self.select!r}: expected 'last' (report the final epoch) or 'val_split' (the best "
                "val/mAP on training identities held out of training); a checkpoint is never chosen on the test split"
            )
        size = self.timing_batch_size
        if not is_integer(size) or size < 1:
            raise ValueError(f"eval.timing_batch_size={self.timing_batch_size!r}: expected a positive integer")

    def held_out_images(self) -> int:
        """Training images held out of training for checkpoint selection: val_images with select=val_split."""
        return int(self.val_images) if self.select == "val_split" else 0


# eval.select: how a training run chooses the checkpoint it reports (and rows 2 and 5 distil from).
SELECTIONS = ("last", "val_split")
