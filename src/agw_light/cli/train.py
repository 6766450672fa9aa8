"""Train (then evaluate) one table row: `python -m agw_light.train dataset=market1501 light=full`.

With no overrides it runs the quick CPU demo on the generated dataset. Everything is a Hydra override:
`trainer.devices=2 trainer.strategy=ddp`, `trainer.precision=16-mixed`, `resume=<ckpt>`, `-m light=...`,
`logger=[tensorboard,mlflow]`, `experiment=market1501_table`, `hparams_search=full_optuna`, `debug=overfit`
(docs/tracking.md).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from agw_light.cli import CONF_DIR

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the configured row, then evaluates its reported checkpoint; returns the metrics written to disk.

    A search's trial (`optimized_metric` set, conf/hparams_search/) returns {"objective": value} instead and
    evaluates nothing on the test split: the final run of the best parameters reports the test row, once.

    The reported checkpoint is the last epoch's (eval.select=last, as the reference implementations report)
    or the best val/mAP on held-out training identities (eval.select=val_split); never one chosen on test data.

    The run folder is claimed first (`agw_light.runs.claim_run_folder`); a failure after that leaves error.txt
    in it.
    """
    from agw_light.lit.checkpointing import TrainingInterrupted
    from agw_light.runs import claim_run_folder, record_failure, record_hydra_config
    from agw_light.tuning import apply_tuned, check_objective

    check_objective(cfg)
    out_dir = Path(cfg.output_dir)
    with claim_run_folder(out_dir, cfg.resume) as claimed:
        try:
            tuned = apply_tuned(cfg)  # recorded in .hydra/config.yaml below
            if tuned:
                log.info("tuned=%s: %s", cfg.tuned, tuned)
            if claimed:
                record_hydra_config(cfg, out_dir)
            return _fit_and_evaluate(cfg, out_dir)
        except (Exception, TrainingInterrupted) as error:
            record_failure(out_dir, error)
            raise


def _fit_and_evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    import pytorch_lightning as pl

    from agw_light.builders import (
        build_datamodule,
        build_loggers,
        build_module,
        config_parameters,
        configured_callbacks,
        evaluation_protocol,
        target_datamodules,
        trainer_arguments,
    )
    from agw_light.evaluation import evaluate_checkpoint, evaluate_targets
    from agw_light.inference.checkpoint import load_checkpoint
    from agw_light.lit.checkpointing import read_resumable
    from agw_light.lit.trainer import build_training_run
    from agw_light.runs import clear_failure

    clear_failure(out_dir)  # from an earlier failed attempt in this folder
    resumed = None if cfg.resume is None else read_resumable(cfg.resume)  # read once, checked before any work
    protocol = evaluation_protocol(cfg)
    callbacks = configured_callbacks(cfg)
    loggers = build_loggers(cfg)  # before any work: a tracker that is missing or does not answer fails now
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg, holdout_images=protocol.held_out_images())
    targets = target_datamodules(cfg)  # before training: a bad eval.targets entry fails at once
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule.num_classes, resumed=resumed)
    run = build_training_run(
        out_dir,
        trainer_arguments(cfg),
        select_on_validation=protocol.select == "val_split",
        visualize=cfg.visualize,
        callbacks=callbacks,
        preloaded=None if resumed is None else {cfg.resume: resumed},
        loggers=loggers,
    )
    for logger in loggers:
        logger.log_hyperparams({"config": config_parameters(cfg)})
    run.fit(module, datamodule, ckpt_path=cfg.resume)
    if not run.trainer.is_global_zero:
        return {}
    if run.trainer.fast_dev_run:
        log.info("trainer.fast_dev_run: a smoke test of training; Lightning saves no checkpoint, nothing evaluated")
        return {}
    if cfg.optimized_metric is not None:  # a search's trial: the test row is the final run's, reported once
        objective = run.objective(cfg.optimized_metric)
        log.info("%s = %.4f (the search's objective; no test evaluation in a trial)", cfg.optimized_metric, objective)
        return {"objective": objective}
    path, selection = run.reported_checkpoint()
    reported, device = load_checkpoint(path), cfg.get("device", "auto")  # read once for every dataset
    metrics = out_dir / "metrics.json"
    row = evaluate_checkpoint(reported, datamodule, protocol, selection=selection, out_path=metrics, device=device)
    evaluate_targets(reported, targets, metrics, protocol, device=device)  # cross-domain rows, if any
    run.record_results(row, metrics)
    return row


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Trains one run; returns `optimized_metric`'s value (what Hydra's Optuna sweeper maximises), else None."""
    from agw_light.lit.checkpointing import TrainingInterrupted

    started = time.perf_counter(), cpu_seconds()
    try:
        row = train(cfg)
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)  # 130 (SIGINT) or 143 (SIGTERM), as a shell reports a signalled job
    log_run_cost(*started)
    return row.get("objective")


def cpu_seconds() -> float:
    """User + sys CPU seconds so far of this process and of its finished children (the loader workers)."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def log_run_cost(started: float, cpu_started: float) -> None:
    """Logs the run's own wall time and CPU time: the differences from `started` (time.perf_counter()) and
    `cpu_started` (`cpu_seconds()`) taken when it began, since a multirun's jobs share one process and its
    counters.

    CPU time compares machines better than wall time, which depends on what else runs beside the job.
    """
    log.info(
        "run took %.1f s wall time, %.1f s CPU time",
        time.perf_counter() - started,
        cpu_seconds() - cpu_started,
    )


if __name__ == "__main__":
    main()
