"""A training run's folder: claiming it for one run, recording the run's config, and recording why it failed.

Plain files and locks only (no torch, no Lightning): `agw_light.train` claims the folder before anything is
written there, and a sweep report (`agw_light.reporting`) reads what these functions leave behind.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agw_light.files import hold_folder_lock, remove_stale_temps, write_text_atomic

# The run folder's lock file (held by the first process of the run for as long as it trains and evaluates).
LOCK_NAME = ".train.lock"
# Where a failed run says why (first line: the error), and where its config record goes.
ERROR_FILE = "error.txt"
CONFIG_RECORD = ".hydra"
# What a run that produced nothing leaves (logs, its config record, why it failed): a new run may reuse the folder.
RESTARTABLE = (LOCK_NAME, CONFIG_RECORD, ERROR_FILE)
# Environment variables that give a launched process its rank (torchrun, Lightning's launcher, SLURM, LSF).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


@contextlib.contextmanager
def claim_run_folder(out_dir: Path, resume: str | None) -> Iterator[bool]:
    """Makes the run folder this run's alone for as long as the block runs; yields whether this process holds it.

    A second run into it fails at once (a lock, naming the folder and the process holding it), and so does a
    run into a folder that holds another run's results (checkpoints, TensorBoard logs, metrics.json), unless
    `resume` is a checkpoint inside it: two runs in one folder would mix their files silently. Only the
    launch's first process claims it (the other DDP ranks write nothing of their own there). Temp files of a
    writer that was killed are removed.

    Args:
        out_dir: the run folder (created if missing).
        resume: the checkpoint the run continues from, or None for a new run.
    """
    if any(os.environ.get(name, "0") != "0" for name in RANK_VARIABLES):
        yield False
        return
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


def record_hydra_config(cfg: Any, out_dir: Path) -> None:
    """Writes what Hydra would write into `.hydra/` (config, Hydra's settings, the command-line overrides),
    once the run holds its folder; nothing when no Hydra job runs (a config composed in Python).

    conf/config.yaml turns Hydra's own writing off (`hydra.output_subdir: null`): Hydra writes before the task
    starts, so a second run into a busy folder would overwrite the first run's record before being refused.

    Args:
        cfg: the composed job config (an OmegaConf DictConfig).
        out_dir: the run folder the caller holds (`claim_run_folder`).
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():  # a config composed in Python (tests, notebooks): no Hydra job
        return
    hydra_cfg = HydraConfig.instance().cfg
    record = out_dir / CONFIG_RECORD
    write_text_atomic(record / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(record / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
    write_text_atomic(record / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))


def record_failure(out_dir: Path, error: BaseException) -> None:
    """Leaves error.txt in the run folder (first line: why), so a sweep report can say why a row is missing."""
    summary = f"{type(error).__name__}: {error}".splitlines()[0]
    write_text_atomic(out_dir / ERROR_FILE, summary + "\n\n" + "".join(traceback.format_exception(error)))


def clear_failure(out_dir: Path) -> None:
    """Removes error.txt of an earlier failed attempt in this folder, as a new attempt starts."""
    (out_dir / ERROR_FILE).unlink(missing_ok=True)
