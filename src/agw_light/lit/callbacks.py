"""Training callbacks: exact resume (RNG states) and ranked-list pictures in TensorBoard."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from agw_light.checks import is_integer


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


class RankedListLogger(pl.Callback):
    """At each validation, draws `num_queries` queries' top-`topk` gallery images (true matches framed
    green, false red) into TensorBoard as "<split>/ranked_lists", and sends `embedding_size` gallery features
    with thumbnails to its embedding projector as "<split>/gallery", where split is what the validation loop
    scores ("test", or "val" for held-out training identities). 0 turns either off.

    Shows the very ranking the validation metrics scored (the samples `ReIDMetric` gathered, its distance),
    always for the same evenly spaced queries, so epochs compare. Without a TensorBoard logger it does
    nothing, and the module then keeps no samples.
    """

    def __init__(self, num_queries: int = 8, topk: int = 10, embedding_size: int = 300) -> None:
        for name, value, least in (
            ("num_queries", num_queries, 0),
            ("topk", topk, 1),
            ("embedding_size", embedding_size, 0),
        ):
            if not is_integer(value) or value < least:
                raise ValueError(f"visualize.{name}={value!r}: expected an integer >= {least}")
        self.num_queries = num_queries
        self.topk = topk
        self.embedding_size = embedding_size

    @staticmethod
    def _writer(trainer: pl.Trainer):
        from pytorch_lightning.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (self.num_queries or self.embedding_size) and self._writer(trainer) is not None:
            pl_module.keep_validation_samples = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples = getattr(pl_module, "validation_samples", None)
        pl_module.validation_samples = None  # up to a whole gallery's features: never held past this hook
        datamodule = trainer.datamodule
        if samples is None or trainer.sanity_checking or not trainer.is_global_zero or datamodule is None:
            return
        writer = self._writer(trainer)
        if writer is None:
            return
        image_paths = [path for path, _, _ in datamodule.validation_samples()]
        split = pl_module.validation_name
        if self.num_queries:
            self._log_ranked_lists(
                writer, samples, image_paths, pl_module.val_metric.distance, trainer.global_step, split
            )
        if self.embedding_size:
            self._log_embedding(writer, samples, image_paths, trainer.global_step, split)

    def _log_ranked_lists(
        self, writer, samples: dict, image_paths: list[str], metric: str, step: int, split: str
    ) -> None:
        from agw_light.visualization import pick_positions, protocol_junk, ranked_list_pictures, stack_rows

        is_query = samples["is_query"]
        num_query, num_gallery = int(is_query.sum()), int((~is_query).sum())
        if num_query == 0 or num_gallery == 0:
            return
        positions = pick_positions(num_query, min(self.num_queries, num_query))
        # A partial validation (limit_val_batches) may leave fewer ranked images than topk: draw fewer.
        queries = torch.nonzero(is_query).squeeze(1)[positions]
        junk = protocol_junk(
            samples["pids"][queries],
            samples["camids"][queries],
            samples["pids"][~is_query],
            samples["camids"][~is_query],
        )
        topk = min(self.topk, num_gallery - int(junk.sum(1).max()))
        if topk < 1:
            return
        pictures = ranked_list_pictures(samples, image_paths, positions, metric=metric, topk=topk)
        writer.add_image(f"{split}/ranked_lists", np.asarray(stack_rows(pictures)), global_step=step, dataformats="HWC")

    def _log_embedding(self, writer, samples: dict, image_paths: list[str], step: int, split: str) -> None:
        from agw_light.visualization import load_thumbnails, pick_positions

        gallery = torch.nonzero(~samples["is_query"]).squeeze(1)
        if len(gallery) == 0:
            return
        rows = gallery[pick_positions(len(gallery), min(self.embedding_size, len(gallery)))]
        writer.add_embedding(
            samples["features"][rows].float(),
            metadata=[str(pid) for pid in samples["pids"][rows].tolist()],
            label_img=load_thumbnails([image_paths[i] for i in samples["index"][rows].tolist()]),
            tag=f"{split}/gallery",
            global_step=step,
        )
