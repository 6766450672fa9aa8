"""Hyper-parameter search (Hydra's Optuna sweeper, conf/hparams_search/): what a search may maximise, and
the final run's use of the best trial it found.

A search steers training, so it may only read what the run logs on training identities held out of training
(`val/<metric>` with eval.select=val_split); the test split's metrics (`test/*`) only monitor. The check runs
in the sweeper before its first trial (`check_objective` is the sweeper's `custom_search_space` hook) and
again in each run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# What a training run logs on held-out training identities at each validation (agw_light.lit.module).
VALIDATION_METRICS = ("R1", "R5", "R10", "mAP", "mINP")
# What the Optuna sweeper writes into the sweep folder at its end.
RESULTS_FILE = "optimization_results.yaml"
_ABSENT = object()


def check_objective(cfg: DictConfig, trial: Any = None) -> None:
    """Raises ValueError saying why when `optimized_metric` is set to something a search must not or cannot
    maximise: a test-split metric, a metric the run never logs, or val/* without held-out identities.

    Args:
        cfg: the composed config (the sweeper's, or one run's).
        trial: the Optuna trial about to start (the sweeper's hook passes it; unused: the check is the config's).
    """
    name = cfg.get("optimized_metric")
    if name is None:
        return
    split, _, metric = str(name).partition("/")
    logged = [f"val/{metric}" for metric in VALIDATION_METRICS]
    if split == "test":
        raise ValueError(
            f"optimized_metric={name}: a search must not be steered by the test split, whose metrics only monitor "
            f"training (selecting on them reports an optimistic test score); use one of {logged} with "
            "eval.select=val_split, which scores training identities held out of training"
        )
    if split != "val" or metric not in VALIDATION_METRICS:
        raise ValueError(f"optimized_metric={name}: the run never logs it; a search can maximise one of {logged}")
    if cfg.eval.select != "val_split":
        raise ValueError(
            f"optimized_metric={name}: val/* is logged only with eval.select=val_split (training identities held "
            f"out of training), but eval.select={cfg.eval.select}"
        )


def read_best_params(path: str | Path) -> dict[str, Any]:
    """The best trial's parameters (dotted config keys) from a search's optimization_results.yaml."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tuned={path}: no such file (expected the {RESULTS_FILE} a search writes)")
    results = OmegaConf.to_container(OmegaConf.load(path))
    best = results.get("best_params") if isinstance(results, dict) else None
    if not isinstance(best, dict) or not best:
        raise ValueError(f"tuned={path}: expected a mapping best_params (an Optuna sweeper's {RESULTS_FILE})")
    return best


def apply_tuned(cfg: DictConfig) -> dict[str, Any]:
    """Sets the best parameters of the search that `tuned` names on `cfg` (in place); returns them.

    Each key must already be in the config: a search over a key this config does not have is a mismatch
    (another row's search), not something to add silently.
    """
    if cfg.get("tuned") is None:
        return {}
    best = read_best_params(cfg.tuned)
    for key, value in best.items():
        if OmegaConf.select(cfg, key, throw_on_missing=False, default=_ABSENT) is _ABSENT:
            raise KeyError(f"tuned={cfg.tuned}: its parameter {key} is not a key of this run's config")
        OmegaConf.update(cfg, key, value, merge=False)
    return best
