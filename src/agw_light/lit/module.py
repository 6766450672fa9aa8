"""LitReID: the Lightning glue around a re-id model and its loss stack.

The module stays thin: the network comes from `agw_light.models.build_model`, the losses from
`agw_light.losses.build_loss_stack`, the evaluation from `agw_light.metrics.ReIDMetric`. It keeps the plain
arguments it was built with as hyper-parameters, so a checkpoint alone rebuilds the model (no Hydra config
needed to test or search with it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from agw_light.inference.checkpoint import TRAINING_MODEL_OPTIONS
from agw_light.lit.teacher import load_teacher, teacher_targets
from agw_light.losses import TEACHER_TARGETS, build_loss_stack
from agw_light.metrics import ReIDMetric
from agw_light.models import build_model


def warmup_multistep_factor(
    epoch: float, *, warmup_epochs: float, warmup_factor: float, milestones: Sequence[int], gamma: float
) -> float:
    """Learning-rate multiplier at a (fractional) epoch: linear warm-up, then step decay at milestones."""
    decay = gamma ** sum(epoch >= m for m in milestones)
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return decay * (warmup_factor + (1.0 - warmup_factor) * epoch / warmup_epochs)
    return decay


class LitReID(pl.LightningModule):
    """Trains a re-id model with a weighted loss stack and validates it by query/gallery retrieval.

    `image_size` (height, width) is only recorded, so tools that embed new images with a checkpoint (the search
    CLI) resize them as in training; `train_dataset` (the training set's name) is only recorded too, so an
    evaluation on another set knows it is a cross-domain one. `distance` overrides the model's own retrieval
    distance (see `agw_light.models.ReIDModel`); None keeps it. Besides build_model's arguments, `model` takes
    options of training (`agw_light.inference.checkpoint.TRAINING_MODEL_OPTIONS`): `channels_last` (True,
    False, or "auto": on when CUDA is available), `compile`, which compiles the network's forward with
    `torch.compile` in place (`nn.Module.compile`), so its weight names and checkpoints stay those of the eager
    model, and `init_from` / `drop_classifier`, only recorded here (the weights are copied in by whoever builds
    the module for a new run: `agw_light.builders.build_module`). `init_from_sha256` records that file's hash.
    """

    def __init__(
        self,
        model: dict[str, Any],
        losses: list[dict[str, Any]],
        num_classes: int,
        *,
        lr: float = 3.5e-4,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 10,
        warmup_factor: float = 0.1,
        milestones: Sequence[int] = (40, 90),
        gamma: float = 0.1,
        distance: str | None = None,
        max_rank: int = 50,
        teacher_ckpt: str | None = None,
        teacher_sha256: str | None = None,
        image_size: Sequence[int] | None = None,
        train_dataset: str | None = None,
        init_from_sha256: str | None = None,
    ) -> None:
        super().__init__()
        # Recorded explicitly (save_hyperparameters reads the arguments below), so a checkpoint always says
        # which non-local width it holds, whatever the default becomes.
        model = {"nonlocal_inter_channels": 1, **model}
        options = {key: model.get(key) for key in TRAINING_MODEL_OPTIONS}
        model_kwargs = {key: value for key, value in model.items() if key not in TRAINING_MODEL_OPTIONS}
        channels_last = options["channels_last"] or False
        self.channels_last = torch.cuda.is_available() if channels_last == "auto" else bool(channels_last)
        compile_model = bool(options["compile"])
        self.model = build_model(num_classes=num_classes, distance=distance, **model_kwargs)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile_model:
            self.model.compile()
        self.loss_stack = build_loss_stack(list(losses), num_classes=num_classes)
        self.val_metric = ReIDMetric(distance=self.model.distance, max_rank=max_rank)
        # A plain attribute, not a submodule: see agw_light.lit.teacher for why.
        object.__setattr__(self, "teacher", None)
        if teacher_ckpt is not None:
            teacher, teacher_sha256 = load_teacher(
                teacher_ckpt, num_classes=num_classes, expected_sha256=teacher_sha256, image_size=image_size
            )
            object.__setattr__(self, "teacher", teacher)
        self._check_loss_targets(teacher_ckpt)
        self.save_hyperparameters()
        # Set by the ranked-list callback: plain attributes, not hyper-parameters, so checkpoints stay the same.
        # When kept, `validation_samples` holds the last validation's gathered samples (global rank 0, CPU).
        self.keep_validation_samples = False
        self.validation_samples: dict[str, torch.Tensor] | None = None

    def _check_loss_targets(self, teacher_ckpt: str | None) -> None:
        """Fails at construction, not at the first step, when a loss reads a teacher target without a teacher.

        Other target names are the model's own outputs (self-distillation), known only after a forward: the
        loss stack checks those at the first step and names what the model gives.
        """
        available = {"pids", *(TEACHER_TARGETS if teacher_ckpt is not None else ())}
        for term in self.loss_stack.terms:
            if term.target in TEACHER_TARGETS and term.target not in available:
                raise ValueError(
                    f"loss {term.name!r} reads target {term.target!r}, which is not available (distillation: "
                    f"set light.teacher_ckpt=<row-1 checkpoint>); available: {sorted(available)}"
                )

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def forward(self, images: torch.Tensor) -> Any:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        outputs = self(batch["image"])
        targets = {"pids": batch["pid"]}
        if self.teacher is not None:
            targets.update(teacher_targets(self.teacher, batch["image"]))
        total, terms = self.loss_stack(outputs, targets)
        batch_size = batch["image"].shape[0]
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, batch_size=batch_size)
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        # The epoch's mean as well: an epoch shorter than trainer.log_every_n_steps logs no step value at all.
        self.log("train/epoch_loss", total, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return total

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        features = self.model.ranking_features(self(batch["image"]))
        self.val_metric.update(features, batch["pid"], batch["camid"], batch["is_query"], batch["index"])

    def on_validation_epoch_end(self) -> None:
        self.val_metric.keep_samples = self.keep_validation_samples and not self.trainer.sanity_checking
        results = self.val_metric.compute()
        if self.trainer.is_global_zero:
            self.validation_samples = self.val_metric.kept_samples
        self.val_metric.kept_samples = None
        self.val_metric.reset()
        split = self.validation_name
        for name, value in results.items():
            # compute() already gathered every rank, so each rank logs the same value: no further reduction.
            self.log(f"{split}/{name}", value, prog_bar=name in ("R1", "mAP"), sync_dist=False)
        if not self.trainer.sanity_checking:
            summary = "  ".join(f"{split}/{name} {value:.4f}" for name, value in results.items())
            self.print(f"epoch {self.current_epoch}: {summary}")

    @property
    def validation_name(self) -> str:
        """The split the validation loop scores, as its metrics are named: "test" unless the DataModule holds
        out training identities for validation ("val"). Test metrics only monitor; they never select."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "validation_name", "test")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.Adam(
            [p for p in self.parameters() if p.requires_grad], lr=hp.lr, weight_decay=hp.weight_decay
        )
        steps_per_epoch = self._steps_per_epoch()

        def factor(step: int) -> float:
            return warmup_multistep_factor(
                step / steps_per_epoch,
                warmup_epochs=hp.warmup_epochs,
                warmup_factor=hp.warmup_factor,
                milestones=hp.milestones,
                gamma=hp.gamma,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, so the schedule is defined in epochs but stepped every batch."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(total):
            return max(1, int(total) // trainer.max_epochs)
        raise ValueError("trainer.max_epochs must be set: the learning-rate schedule is defined in epochs")
