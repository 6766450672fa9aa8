"""Checkpoints that survive interruption: atomic writes, a stop on SIGINT/SIGTERM at a resumable point, and a
resume file checked before training starts.

Exact resume needs an end-of-epoch state: the PK sampler draws whole epochs and the data loader prefetches
(and augments) the next batch before a step ends, so a mid-epoch state cannot be continued exactly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from agw_light.files import write_atomic
from agw_light.inference.checkpoint import read_checkpoint

# What Lightning needs besides the weights to continue a run (a weights-only file lacks them).
TRAINING_STATE_KEYS = ("epoch", "global_step", "loops", "optimizer_states", "lr_schedulers")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through `write_atomic`: a temp file in the checkpoint's folder, fsync,
    rename. A kill or a full disk during a save leaves the previous checkpoint under its name and no partial
    file under the final one. (Lightning's own writer stages the file in the system temp folder and moves it,
    which is a copy, cut short by a kill, when that folder is on another filesystem.)

    `preloaded` maps a path to its already-read contents (`read_resumable`), served once instead of reading the
    file again when Lightning resumes from it: a resumed run reads its checkpoint once.
    """

    def __init__(self, preloaded: dict[str | Path, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._preloaded = {os.path.realpath(path): contents for path, contents in (preloaded or {}).items()}

    def load_checkpoint(self, path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        contents = self._preloaded.pop(os.path.realpath(path), None)
        return contents if contents is not None else super().load_checkpoint(path, *args, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        write_atomic(path, lambda handle: torch.save(checkpoint, handle))


class TrainingInterrupted(BaseException):
    """Training stopped on SIGINT/SIGTERM. A BaseException, as KeyboardInterrupt is, so that no `except
    Exception` on the way up swallows it; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopOnSignal(pl.Callback):
    """On the first SIGINT or SIGTERM, finishes the current training epoch (and its validation), lets the
    checkpoint callbacks save it, and stops; a second signal stops at once, keeping the checkpoint of the last
    finished epoch. Wrap `trainer.fit` in `installed()`; afterwards `raise_if_stopped` turns a stop into
    TrainingInterrupted.

    Lightning installs its own SIGTERM handler when fit starts (it stops at the end of a step, saving
    nothing), so the hooks below take SIGTERM back once it has. Data loader workers forked meanwhile inherit
    the handler and ignore the signal (a terminal's Ctrl-C and SLURM's SIGTERM reach them too, and a worker
    that dies takes the epoch with it); the training process shuts them down. Under DDP the ranks agree at
    each epoch end: one rank signalled stops them all.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.finished_epoch: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handles the signals inside the block, then puts the previous handlers back."""
        self.received = self.finished_epoch = None
        self._pid = os.getpid()
        self._previous = {signum: signal.getsignal(signum) for signum in self.signals}
        try:
            self._take_signals()
            yield
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous = {}

    def _take_signals(self) -> None:
        if self._previous:
            for signum in self.signals:
                signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked data loader worker
            return
        name = signal.Signals(signum).name
        if self.received is not None:
            raise TrainingInterrupted(signum, f"{name} received twice: stopped at once, in the middle of an epoch")
        self.received = signum
        print(
            f"\n{name} received: finishing this epoch and saving checkpoints/last.ckpt, then stopping. "
            f"Send it again to stop at once (the checkpoint of the last finished epoch stays).",
            file=sys.stderr,
            flush=True,
        )

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_signals()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_signals()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning calls checkpoint callbacks after the others, so last.ckpt of this epoch is still saved.
        self.finished_epoch = trainer.current_epoch
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self.received = self.received or signal.SIGTERM  # another rank was signalled
            trainer.should_stop = True

    def raise_if_stopped(self, last_checkpoint: str | Path) -> None:
        if self.received is None:
            return
        name = signal.Signals(self.received).name
        after = "" if self.finished_epoch is None else f" after epoch {self.finished_epoch}"
        raise TrainingInterrupted(
            self.received, f"{name} received: stopped{after}; continue with resume={last_checkpoint}"
        )


def read_resumable(path: str | Path) -> dict[str, Any]:
    """The checkpoint `resume=` names, read once; fails before training starts, naming the file, when it cannot
    continue a run: missing, truncated or unreadable, not an agw_light checkpoint, or a weights-only file without
    the training state (a converted one, say: Lightning would fail later with a bare EOFError, IndexError or
    KeyError). Hand the result to `AtomicCheckpointIO(preloaded=...)` so Lightning does not read it again."""
    try:
        checkpoint, _ = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"resume={path}: {error}") from error
    missing = [key for key in TRAINING_STATE_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(
            f"resume={path}: this checkpoint holds weights but no training state (missing {', '.join(missing)}); "
            "resume from a last.ckpt or best-*.ckpt written by agw_light.train"
        )
    return checkpoint
