"""Config to objects: the one place a composed Hydra config becomes library objects.

Commands call these; the library below takes plain arguments and never sees a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from agw_light.data.datamodule import ReIDDataModule
from agw_light.inference.checkpoint import read_checkpoint
from agw_light.lit.module import LitReID
from agw_light.lit.teacher import resolve_teacher_checkpoint

# Lightning accelerators that pick a CUDA GPU when there is one.
CUDA_ACCELERATORS = ("auto", "gpu", "cuda")


def runs_on_cuda(cfg: DictConfig) -> bool:
    """Whether the run computes on a CUDA GPU: `trainer.accelerator` for training, `device` for the other commands."""
    accelerator = cfg.get("trainer", {}).get("accelerator")  # evaluate/visualize: a dataset's trainer keys only
    if accelerator is not None:
        return str(accelerator) in CUDA_ACCELERATORS and torch.cuda.is_available()
    wanted = str(cfg.get("device", "auto"))
    return wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available())


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """Lightning Trainer keyword arguments of `trainer`, with `precision: auto` resolved.

    auto is mixed precision on CUDA (bf16 where the GPU supports it: no loss scaling, same range as float32,
    else float16) and 32-true elsewhere, where the CPU's autocast would change the numbers for no sure gain.
    """
    arguments = OmegaConf.to_container(cfg.trainer, resolve=True)
    if arguments.get("precision") == "auto":
        if runs_on_cuda(cfg):
            arguments["precision"] = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            arguments["precision"] = "32-true"
    return arguments


def model_arguments(cfg: DictConfig) -> dict[str, Any]:
    """LitReID's `model`: build_model's arguments plus its `compile` and `channels_last` options, auto resolved
    here (on when the run trains on CUDA, where NHWC convolutions are faster; off on the CPU)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model.get("channels_last") == "auto":
        model["channels_last"] = runs_on_cuda(cfg)
    return model


def build_datamodule(cfg: DictConfig) -> ReIDDataModule:
    """The DataModule of a config's dataset and loader sections (train, evaluate and visualize share it)."""
    return ReIDDataModule(
        name=cfg.dataset.name,
        root=str(Path(cfg.dataset.root).expanduser()),
        height=cfg.dataset.height,
        width=cfg.dataset.width,
        batch_size=cfg.loader.batch_size,
        num_instances=cfg.loader.num_instances,
        test_batch_size=cfg.loader.test_batch_size,
        num_workers=cfg.loader.num_workers,
        seed=cfg.seed,
        dataset_kwargs=OmegaConf.to_container(cfg.dataset.kwargs, resolve=True),
        check_images=cfg.dataset.check_images,
        pin_memory=runs_on_cuda(cfg),
    )


def loss_entries(cfg: DictConfig) -> list[dict]:
    """The row's loss stack entries: `losses`, then `distill_losses` (rows 2 and 5)."""
    return [
        *OmegaConf.to_container(cfg.losses, resolve=True),
        *OmegaConf.to_container(cfg.distill_losses, resolve=True),
    ]


def build_module(cfg: DictConfig, num_classes: int) -> LitReID:
    """The row's LitReID: model, loss stack, optimizer settings and, for rows 2 and 5, the teacher.

    A resumed student keeps the teacher hash it was started with, so a swapped teacher file is caught.
    """
    teacher_ckpt = cfg.light.get("teacher_ckpt")
    teacher_sha256 = None
    if teacher_ckpt is not None:
        teacher_ckpt = str(resolve_teacher_checkpoint(teacher_ckpt))
        if cfg.resume is not None:
            resumed = read_checkpoint(cfg.resume)  # an unreadable file is an error that names it
            teacher_sha256 = resumed["hyper_parameters"].get("teacher_sha256")
    return LitReID(
        model=model_arguments(cfg),
        losses=loss_entries(cfg),
        num_classes=num_classes,
        **OmegaConf.to_container(cfg.optim, resolve=True),
        distance=cfg.eval.distance,
        max_rank=cfg.eval.max_rank,
        teacher_ckpt=teacher_ckpt,
        image_size=(cfg.dataset.height, cfg.dataset.width),
        teacher_sha256=teacher_sha256,
    )
