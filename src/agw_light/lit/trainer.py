"""The Lightning Trainer of a training run: its checkpoints, callbacks, loggers and plugins, which
checkpoint the run reports, and what the trackers record of its result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, WandbLogger

from agw_light.lit.callbacks import RankedListLogger, RNGStateCheckpoint
from agw_light.lit.checkpointing import AtomicCheckpointIO, StopOnSignal

# How the reported checkpoint was chosen, as metrics.json's "selection" says it.
SELECTED_ON_VALIDATION = "best val/mAP (held-out training ids)"
LAST_EPOCH = "last epoch"
# trainer.profiler names (conf/debug/profiler.yaml) -> Lightning's profilers, which then write
# <run>/fit-profile.txt instead of printing to the console only.
PROFILERS = ("simple", "advanced", "pytorch")
# metrics.json's numbers that the trackers also get, as final/<name>.
FINAL_METRICS = ("R1", "R5", "R10", "mAP", "mINP", "inference_ms_per_batch", "search_ms_per_query")


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

    def objective(self, name: str) -> float:
        """The value of the logged metric `name` that a hyper-parameter search maximises: the best over the run
        where a checkpoint selector monitors it (the value of the checkpoint the run reports), else its last.

        Raises KeyError naming the metrics the run did log when it never logged `name`.
        """
        for selector in self.selectors:
            if selector.monitor == name and selector.best_model_score is not None:
                return float(selector.best_model_score)
        logged = self.trainer.callback_metrics
        if name not in logged:
            raise KeyError(f"optimized_metric={name} was never logged; this run logged {sorted(logged)}")
        return float(logged[name])

    def record_results(self, row: Mapping[str, Any], metrics_path: Path) -> None:
        """Gives the trackers the run's result: metrics.json's numbers as final/<name> to every logger; for
        MLflow also metrics.json as an artifact and the reported checkpoint's path and SHA-256 as tags; for
        W&B the same in the run's summary and files. Then closes each tracker's run."""
        final = {f"final/{name}": float(row[name]) for name in FINAL_METRICS if name in row}
        for logger in self.trainer.loggers:
            logger.log_metrics(final, step=self.trainer.global_step)
            if isinstance(logger, MLFlowLogger):
                client, run_id = logger.experiment, logger.run_id
                client.log_artifact(run_id, str(metrics_path))
                client.set_tag(run_id, "checkpoint", row["checkpoint"])
                client.set_tag(run_id, "checkpoint_sha256", row["checkpoint_sha256"])
            elif isinstance(logger, WandbLogger):
                run = logger.experiment
                run.summary.update({"checkpoint": row["checkpoint"], "checkpoint_sha256": row["checkpoint_sha256"]})
                run.save(str(metrics_path), base_path=str(metrics_path.parent), policy="now")
                run.finish()
            elif isinstance(logger, CSVLogger):
                logger.save()  # CSVLogger buffers metrics until saved


def build_training_run(
    out_dir: Path,
    trainer_arguments: Mapping[str, Any],
    *,
    select_on_validation: bool,
    visualize: Mapping[str, Any],
    callbacks: Sequence[pl.Callback] = (),
    preloaded: Mapping[str, dict[str, Any]] | None = None,
    loggers: Sequence[Logger] = (),
) -> TrainingRun:
    """The Trainer that writes checkpoints and pictures into `out_dir` and logs to `loggers`.

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
        loggers: the run's trackers (`agw_light.builders.build_loggers`); none is fine.

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
    arguments = dict(trainer_arguments)
    if arguments.get("profiler") in PROFILERS:
        arguments["profiler"] = _profiler(arguments["profiler"], out_dir)
    trainer = pl.Trainer(
        **arguments,
        default_root_dir=str(out_dir),
        logger=list(loggers),
        callbacks=[
            *selectors,
            last,
            stop,
            *([LearningRateMonitor(logging_interval="epoch")] if loggers else []),  # it needs a logger
            RNGStateCheckpoint(),
            *pictures,
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO(preloaded=preloaded)],
        use_distributed_sampler=False,  # the PK sampler splits identities across ranks itself
    )
    return TrainingRun(trainer, last, selectors, stop)


def _profiler(name: str, out_dir: Path) -> Any:
    """Lightning's profiler of that name, writing its report to <out_dir>/fit-profile.txt (and the console)."""
    from pytorch_lightning.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler

    kind = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}[name]
    return kind(dirpath=str(out_dir), filename="profile")
