"""The Lightning Trainer of a training run: its checkpoints, callbacks, logger and plugins, and which
checkpoint the run reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from agw_light.lit.callbacks import RankedListLogger, RNGStateCheckpoint
from agw_light.lit.checkpointing import AtomicCheckpointIO, StopOnSignal

# How the reported checkpoint was chosen, as metrics.json's "selection" says it.
SELECTED_ON_VALIDATION = "best val/mAP (held-out training ids)"
LAST_EPOCH = "last epoch"


@dataclass
class TrainingRun:
    """A Trainer with the checkpoint callbacks that decide what the run reports.

    `last` writes checkpoints/last.ckpt at every training epoch's end; `selectors` (with validation-based
    selection) keep the best val/mAP on held-out training identities; `stop` turns SIGINT/SIGTERM into a
    clean stop after the epoch's checkpoint.
    """

    trainer: pl.Trainer
    last: ModelCheckpoint
    selectors: list[ModelCheckpoint]
    stop: StopOnSignal

    def fit(self, module: pl.LightningModule, datamodule: pl.LightningDataModule, ckpt_path: str | None) -> None:
        """Trains (resuming from `ckpt_path` when given); raises TrainingInterrupted after a signal stopped it."""
        with self.stop.installed():
            self.trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        self.stop.raise_if_stopped(self.last.best_model_path)

    def reported_checkpoint(self) -> tuple[str, str]:
        """(path, how it was chosen): the best val/mAP checkpoint when one was selected, else the last epoch's.

        Never a checkpoint chosen on the test split, whose metrics (test/*) only monitor training.
        """
        selected = next((selector.best_model_path for selector in self.selectors if selector.best_model_path), None)
        return (selected, SELECTED_ON_VALIDATION) if selected else (self.last.best_model_path, LAST_EPOCH)


def build_training_run(
    out_dir: Path,
    trainer_arguments: Mapping[str, Any],
    *,
    select_on_validation: bool,
    visualize: Mapping[str, Any],
    callbacks: Sequence[pl.Callback] = (),
    preloaded: Mapping[str, dict[str, Any]] | None = None,
) -> TrainingRun:
    """The Trainer that writes checkpoints, TensorBoard logs and pictures into `out_dir`.

    Args:
        out_dir: the run folder (checkpoints/ and tensorboard/ go below it).
        trainer_arguments: `pl.Trainer` keyword arguments (devices, precision, epochs, ...).
        select_on_validation: also keep the best val/mAP checkpoint, which the run then reports
            (eval.select=val_split).
        visualize: `RankedListLogger`'s arguments; it is added when it draws anything (num_queries or
            embedding_size above 0).
        callbacks: further callbacks (the config's `callbacks`), after the run's own.
        preloaded: checkpoints already read, by path (the one `resume=` names, `read_resumable`): Lightning gets
            them from memory instead of reading the file again.

    Returns:
        The run's Trainer with its checkpoint callbacks.
    """
    checkpoints = out_dir / "checkpoints"
    # last.ckpt at the end of every training epoch, whatever the validation frequency: a kill loses one epoch.
    # No version counter: a folder is only reused to resume, where a rerun epoch overwrites its own file.
    last = ModelCheckpoint(
        dirpath=checkpoints, filename="last", save_on_train_epoch_end=True, enable_version_counter=False
    )
    selectors = []
    if select_on_validation:
        selectors.append(
            ModelCheckpoint(
                dirpath=checkpoints,
                filename="best-epoch{epoch:03d}-valmAP{val/mAP:.4f}",
                auto_insert_metric_name=False,
                monitor="val/mAP",
                mode="max",
                enable_version_counter=False,
            )
        )
    stop = StopOnSignal()
    pictures = (
        [RankedListLogger(**visualize)] if visualize["num_queries"] > 0 or visualize["embedding_size"] > 0 else []
    )
    trainer = pl.Trainer(
        **trainer_arguments,
        default_root_dir=str(out_dir),
        logger=TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version=""),
        callbacks=[
            *selectors,
            last,
            stop,
            LearningRateMonitor(logging_interval="epoch"),
            RNGStateCheckpoint(),
            *pictures,
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO(preloaded=preloaded)],
        use_distributed_sampler=False,  # the PK sampler splits identities across ranks itself
    )
    return TrainingRun(trainer, last, selectors, stop)
