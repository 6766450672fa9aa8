"""Fault drill (issue 13): Ctrl-C, kill -9 mid-epoch, during validation and during a checkpoint write, each
followed by a resume in place; atomic checkpoint writes; one run per run folder."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_DATA, assert_same_training_state

from agw_light.cli.train import train
from agw_light.files import FolderLocked, hold_folder_lock
from agw_light.lit.checkpointing import AtomicCheckpointIO, StopOnSignal, TrainingInterrupted
from agw_light.runs import LOCK_NAME

# Three epochs of four batches, validated after the second only: last.ckpt must not wait for validation.
DRILL = [
    *TINY_DATA,
    "model.backbone=resnet18",
    "trainer.accelerator=cpu",
    "+trainer.enable_progress_bar=false",
    "trainer.max_epochs=3",
    "trainer.check_val_every_n_epoch=2",
    "trainer.deterministic=true",
    "optim.warmup_epochs=1",
    "optim.milestones=[2]",
    "visualize.num_queries=0",
    "visualize.embedding_size=0",
    "eval.fit_images=64",
    "eval.timing_batch_size=8",
]

# Loaded by the trained process through `callbacks=`: sends a signal to itself at one chosen point.
SIGNAL_AT = '''
import io
import os
import signal

import pytorch_lightning as pl
import torch


class SignalAt(pl.Callback):
    """Sends `signum` to this process (`group`: to its whole process group, as a terminal's Ctrl-C does) after
    training batch 1 of `epoch` ("train_batch"), during that epoch's validation ("validation") or halfway
    through writing that epoch's last.ckpt ("checkpoint_write")."""

    def __init__(self, point: str, epoch: int, signum: str = "SIGKILL", group: bool = False) -> None:
        self.point, self.epoch, self.signum, self.group = point, epoch, getattr(signal, signum), group

    def _fire(self) -> None:
        if self.group:
            os.killpg(os.getpgid(0), self.signum)
        else:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.point == "train_batch" and trainer.current_epoch == self.epoch and batch_idx == 1:
            self._fire()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.point == "validation" and not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            self._fire()

    def setup(self, trainer, pl_module, stage) -> None:
        if self.point != "checkpoint_write":
            return
        save = torch.save

        def save_half_then_signal(obj, handle, *args, **kwargs):
            target = os.readlink(f"/proc/self/fd/{handle.fileno()}")
            if os.path.basename(target).startswith(".last.ckpt.") and obj["epoch"] == self.epoch:
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                handle.write(buffer.getvalue()[: buffer.tell() // 2])
                handle.flush()
                self._fire()
            return save(obj, handle, *args, **kwargs)

        torch.save = save_half_then_signal
'''


def _signal_at(point: str, epoch: int, signum: str = "SIGKILL", group: bool = False) -> str:
    entry = f"_target_: drill.SignalAt, point: {point}, epoch: {epoch}, signum: {signum}, group: {str(group).lower()}"
    return f"callbacks=[{{{entry}}}]"


@pytest.fixture
def run_training(synthetic_cache, tmp_path):
    """Runs `python -m agw_light.train` with the drill's sizes into a run folder, in a process group of its own;
    returns the finished process."""
    (tmp_path / "drill.py").write_text(SIGNAL_AT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"  # every run alike (so deterministic runs agree), and no spinning on busy cores

    def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "agw_light.train", f"dataset.root={synthetic_cache}", *DRILL]
        command += [f"hydra.run.dir={run_dir}", *overrides]
        return subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, start_new_session=True
        )

    return _run


def _epoch_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_result(run_training, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    assert run_training(straight).returncode == 0

    # Ctrl-C during epoch 0: the epoch finishes, last.ckpt is saved, the run exits 130 and says how to resume.
    stopped = run_training(run, _signal_at("train_batch", 0, "SIGINT"))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert _epoch_of(last) == 0 and f"resume={last}" in stopped.stderr
    assert (run / "error.txt").read_text().startswith("TrainingInterrupted: SIGINT received: stopped after epoch 0")

    # kill -9 mid-epoch 1, during epoch 1's validation, then halfway through writing epoch 1's last.ckpt:
    # each time last.ckpt still holds epoch 0, whole, so at most one epoch is lost.
    for point in ("train_batch", "validation", "checkpoint_write"):
        killed = run_training(run, f"resume={last}", _signal_at(point, 1))
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
        assert _epoch_of(last) == 0, point
    assert list(last.parent.glob(".last.ckpt.*.tmp")), "the killed writer left its temp file"

    resumed = run_training(run, f"resume={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(run.rglob("*.tmp")) and not (run / "error.txt").exists()
    assert (run / "metrics.json").is_file()
    assert sorted(path.name for path in last.parent.iterdir()) == sorted(
        path.name for path in (straight / "checkpoints").iterdir()
    ), "a rerun epoch overwrites its own best checkpoint, no -v1 copy"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 2
    assert_same_training_state(straight / "checkpoints" / "last.ckpt", last)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_finishes_the_epoch_with_loader_workers_alive(run_training, tmp_path):
    """The whole process group gets Ctrl-C, data loader workers included: they must not die with it."""
    run = tmp_path / "run"
    stopped = run_training(run, "loader.num_workers=2", _signal_at("train_batch", 0, "SIGINT", group=True))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.count("SIGINT received: finishing this epoch") == 1
    assert _epoch_of(run / "checkpoints" / "last.ckpt") == 0


def test_a_second_run_into_a_busy_folder_is_refused_and_writes_nothing(run_training, tmp_path):
    run = tmp_path / "run"
    with hold_folder_lock(run, LOCK_NAME):
        second = run_training(run)
    assert second.returncode != 0
    assert f"{run} is in use by another run (pid {os.getpid()}" in second.stderr
    assert sorted(path.name for path in run.iterdir()) == [LOCK_NAME, "train.log"]
    assert (run / "train.log").read_text() == ""


def test_a_folder_with_another_runs_results_is_refused_unless_resuming_into_it(compose_config, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    stale = run / "checkpoints" / ".last.ckpt.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    with pytest.raises(FileExistsError, match=f"run folder {run} already holds another run's results"):
        train(compose_config(output_dir=run))
    assert stale.exists() and not (run / "error.txt").exists()

    # Resuming into it is allowed: the claim passes, clears the killed writer's temp file, and then the
    # (here unreadable) checkpoint is the error, recorded in the folder.
    broken = run / "checkpoints" / "last.ckpt"
    broken.write_bytes(b"")
    with pytest.raises(ValueError, match=f"resume={broken}"):
        train(compose_config(f"resume={broken}", output_dir=run))
    assert not stale.exists()
    assert (run / "error.txt").read_text().startswith(f"ValueError: resume={broken}")


def test_atomic_checkpoint_write_keeps_the_previous_file_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 0}, path)

    def write_half_then_fill(obj, handle) -> None:
        handle.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fill)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 1}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert sorted(path.parent.iterdir()) == [path]


def test_a_signal_stops_at_the_epoch_end_and_a_second_one_at_once(monkeypatch):
    stop = StopOnSignal()
    trainer = SimpleNamespace(
        current_epoch=4,
        should_stop=False,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
    )
    previous = signal.getsignal(signal.SIGTERM)
    with stop.installed():
        stop.on_train_epoch_end(trainer, None)
        assert not trainer.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        stop.on_train_epoch_end(trainer, None)
        assert trainer.should_stop
        with pytest.raises(TrainingInterrupted, match="SIGTERM received twice") as twice:
            os.kill(os.getpid(), signal.SIGTERM)
        assert twice.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is previous
    with pytest.raises(TrainingInterrupted, match="SIGTERM received: stopped after epoch 4; continue with resume=x"):
        stop.raise_if_stopped("x")


def test_a_lock_names_its_holder(tmp_path):
    with hold_folder_lock(tmp_path, "x.lock"):
        with pytest.raises(FolderLocked, match=f"{tmp_path} is in use by another run \\(pid {os.getpid()} on "):
            with hold_folder_lock(tmp_path, "x.lock"):
                pass
    with hold_folder_lock(tmp_path, "x.lock"):  # released when the block ended
        pass


def test_extra_callbacks_must_be_callbacks(compose_config, tmp_path):
    with pytest.raises(TypeError, match="callbacks: collections.OrderedDict made a OrderedDict, not a Callback"):
        train(compose_config("callbacks=[{_target_: collections.OrderedDict}]"))


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    """A link planted as a run folder's `.train.lock` or an index folder's lock would make the lock holder
    truncate and overwrite the file it points to: locks are opened without following links."""
    import numpy as np

    from agw_light.search import HammingIndex

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).symlink_to(victim)
    with pytest.raises(OSError, match=rf"lock file {run_dir / LOCK_NAME} is a symbolic link"):
        with hold_folder_lock(run_dir, LOCK_NAME):
            pass
    index = HammingIndex(8)
    index.add(np.zeros((2, 1), dtype=np.uint8))
    index_dir = index.save(tmp_path / "index")
    for lock in (".save.lock", ".read.lock"):
        (index_dir / lock).unlink()
        (index_dir / lock).symlink_to(victim)
        with pytest.raises(OSError, match=rf"lock file {index_dir / lock} is a symbolic link"):
            index.save(index_dir) if lock == ".save.lock" else HammingIndex.load(index_dir)
        (index_dir / lock).unlink()
    assert victim.read_text() == "keep me"
