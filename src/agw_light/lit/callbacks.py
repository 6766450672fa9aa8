"""Callbacks that make a resumed run continue exactly where it stopped."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


def _numpy_state_to_plain(state: tuple) -> tuple:
    """NumPy's MT19937 state with its key as a list: Lightning loads checkpoints with weights_only=True,
    which refuses pickled ndarrays."""
    name, key, position, has_gauss, cached_gaussian = state
    return name, key.tolist(), position, has_gauss, cached_gaussian


def _numpy_state_from_plain(state: tuple) -> tuple:
    name, key, position, has_gauss, cached_gaussian = state
    return name, np.asarray(key, dtype=np.uint32), position, has_gauss, cached_gaussian


class RNGStateCheckpoint(pl.Callback):
    """Stores the Python, NumPy and torch RNG states in every checkpoint and restores them on resume.

    Lightning restores weights, optimizer, scheduler and loop counters, but not the random generators, so
    without this a resumed run draws different augmentations and dropout masks than an uninterrupted one.
    """

    key = "rng_states"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[self.key] = states

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get(self.key)
        if states is None:
            return
        random.setstate(states["python"])
        np.random.set_state(_numpy_state_from_plain(states["numpy"]))
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
