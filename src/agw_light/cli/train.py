"""Train (then evaluate) one table row: `python -m agw_light.train dataset=market1501 light=full`.

With no overrides it runs the quick CPU demo on the generated dataset. Everything is a Hydra override:
`trainer.devices=2 trainer.strategy=ddp`, `trainer.precision=16-mixed`, `resume=<ckpt>`, `-m light=...`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from agw_light.cli import CONF_DIR

# The run folder's lock file (held by the first process of the run for as long as it trains and evaluates).
LOCK_NAME = ".train.lock"
# What a run that produced nothing leaves (logs, its config record, why it failed): a new run may reuse the folder.
RESTARTABLE = (LOCK_NAME, ".hydra", "error.txt")
# Environment variables that give a launched process its rank (torchrun, Lightning's launcher, SLURM, LSF).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the configured row, then evaluates its reported checkpoint; returns the metrics written to disk.

    The reported checkpoint is the last epoch's (eval.select=last, as the reference implementations report)
    or the best val/mAP on held-out training identities (eval.select=val_split); never one chosen on test data.

    The run folder is claimed first (see `claim_run_folder`); a failure after that leaves error.txt in it.
    """
    from agw_light.lit.checkpointing import TrainingInterrupted

    out_dir = Path(cfg.output_dir)
    with claim_run_folder(out_dir, cfg.resume) as claimed:
        try:
            if claimed:
                _record_hydra_config(cfg, out_dir)
            return _fit_and_evaluate(cfg, out_dir)
        except (Exception, TrainingInterrupted) as error:
            record_failure(out_dir, error)
            raise


def _fit_and_evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from agw_light.builders import (
        build_datamodule,
        build_module,
        evaluation_protocol,
        target_datamodules,
        trainer_arguments,
    )
    from agw_light.evaluation import evaluate_checkpoint, evaluate_targets
    from agw_light.inference.checkpoint import load_checkpoint
    from agw_light.lit.callbacks import RankedListLogger, RNGStateCheckpoint
    from agw_light.lit.checkpointing import AtomicCheckpointIO, StopOnSignal, read_resumable

    (out_dir / "error.txt").unlink(missing_ok=True)  # from an earlier failed attempt in this folder
    resumed = None if cfg.resume is None else read_resumable(cfg.resume)  # read once, checked before any work
    extra_callbacks = []
    for entry in cfg.callbacks:
        callback = instantiate(entry)
        if not isinstance(callback, pl.Callback):
            raise TypeError(f"callbacks: {entry.get('_target_')} made a {type(callback).__name__}, not a Callback")
        extra_callbacks.append(callback)
    pl.seed_everything(cfg.seed, workers=True)

    protocol = evaluation_protocol(cfg)
    datamodule = build_datamodule(cfg, holdout_images=protocol.held_out_images())
    targets = target_datamodules(cfg)  # before training: a bad eval.targets entry fails at once
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule.num_classes, resumed=resumed)
    # last.ckpt at the end of every training epoch, whatever the validation frequency: a kill loses one epoch.
    # No version counter: a folder is only reused to resume, where a rerun epoch overwrites its own file.
    last = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="last", save_on_train_epoch_end=True, enable_version_counter=False
    )
    # eval.select=val_split: also the best val/mAP on the held-out training identities, the reported one.
    # Never a checkpoint chosen on the test split, whose metrics (test/*) only monitor training.
    selectors = []
    if cfg.eval.select == "val_split":
        selectors.append(
            ModelCheckpoint(
                dirpath=out_dir / "checkpoints",
                filename="best-epoch{epoch:03d}-valmAP{val/mAP:.4f}",
                auto_insert_metric_name=False,
                monitor="val/mAP",
                mode="max",
                enable_version_counter=False,
            )
        )
    stop = StopOnSignal()
    trainer = pl.Trainer(
        **trainer_arguments(cfg),
        default_root_dir=str(out_dir),
        logger=TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version=""),
        callbacks=[
            *selectors,
            last,
            stop,
            LearningRateMonitor(logging_interval="epoch"),
            RNGStateCheckpoint(),
            *(
                [RankedListLogger(**cfg.visualize)]
                if cfg.visualize.num_queries > 0 or cfg.visualize.embedding_size > 0
                else []
            ),
            *extra_callbacks,
        ],
        plugins=[AtomicCheckpointIO(preloaded=None if resumed is None else {cfg.resume: resumed})],
        use_distributed_sampler=False,  # the PK sampler splits identities across ranks itself
    )
    with stop.installed():
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)
    stop.raise_if_stopped(last.best_model_path)

    if not trainer.is_global_zero:
        return {}
    selected = next((selector.best_model_path for selector in selectors if selector.best_model_path), None)
    reported = selected or last.best_model_path
    device = cfg.get("device", "auto")
    reported = load_checkpoint(reported)  # read once for every dataset
    row = evaluate_checkpoint(
        reported,
        datamodule,
        protocol,
        selection="best val/mAP (held-out training ids)" if selected else "last epoch",
        out_path=out_dir / "metrics.json",
        device=device,
    )
    evaluate_targets(reported, targets, out_dir / "metrics.json", protocol, device=device)  # cross-domain rows
    return row


@contextlib.contextmanager
def claim_run_folder(out_dir: Path, resume: str | None) -> Iterator[bool]:
    """Makes the run folder this run's alone for as long as the block runs; yields whether this process holds it.

    A second run into it fails at once (a lock, naming the folder and the process holding it), and so does a
    run into a folder that holds another run's results (checkpoints, TensorBoard logs, metrics.json), unless
    `resume` is a checkpoint inside it: two runs in one folder would mix their files silently. Only the
    launch's first process claims it (the other DDP ranks write nothing of their own there). Temp files of a
    writer that was killed are removed.
    """
    if any(os.environ.get(name, "0") != "0" for name in RANK_VARIABLES):
        yield False
        return
    from agw_light.files import hold_folder_lock, remove_stale_temps

    with hold_folder_lock(out_dir, LOCK_NAME):
        results = sorted(
            entry.name for entry in out_dir.iterdir() if entry.name not in RESTARTABLE and entry.suffix != ".log"
        )
        resuming_here = resume is not None and Path(resume).resolve().is_relative_to(out_dir.resolve())
        if results and not resuming_here:
            raise FileExistsError(
                f"run folder {out_dir} already holds another run's results ({', '.join(results)}); give this run "
                f"its own folder (hydra.run.dir=...), or continue that run with resume={out_dir}/checkpoints/last.ckpt"
            )
        remove_stale_temps(out_dir)
        yield True


def _record_hydra_config(cfg: DictConfig, out_dir: Path) -> None:
    """Writes what Hydra would write into `.hydra/` (config, Hydra's settings, the command-line overrides),
    once the run holds its folder.

    conf/config.yaml turns Hydra's own writing off (`hydra.output_subdir: null`): Hydra writes before the task
    starts, so a second run into a busy folder would overwrite the first run's record before being refused.
    """
    from hydra.core.hydra_config import HydraConfig

    from agw_light.files import write_text_atomic

    if not HydraConfig.initialized():  # a config composed in Python (tests, notebooks): no Hydra job
        return
    hydra_cfg = HydraConfig.instance().cfg
    record = out_dir / ".hydra"
    write_text_atomic(record / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(record / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
    write_text_atomic(record / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))


def record_failure(out_dir: Path, error: BaseException) -> None:
    """Leaves error.txt in the run folder (first line: why), so a sweep report can say why a row is missing."""
    from agw_light.files import write_text_atomic

    summary = f"{type(error).__name__}: {error}".splitlines()[0]
    write_text_atomic(out_dir / "error.txt", summary + "\n\n" + "".join(traceback.format_exception(error)))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from agw_light.lit.checkpointing import TrainingInterrupted

    started = time.perf_counter()
    try:
        train(cfg)
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)  # 130 (SIGINT) or 143 (SIGTERM), as a shell reports a signalled job
    log_run_cost(started)


def log_run_cost(started: float) -> None:
    """Logs the run's wall time and CPU time (user + sys of this process and its finished loader workers).

    CPU time compares machines better than wall time, which depends on what else runs beside the job.
    """
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
    log.info("run took %.0f s wall time, %.0f s CPU time", time.perf_counter() - started, cpu)


if __name__ == "__main__":
    main()
