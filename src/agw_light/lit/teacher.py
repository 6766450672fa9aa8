"""The frozen teacher of the light model: loaded strictly from a row-1 checkpoint, never trained or saved.

light-reid runs its teacher in train mode, so every student step also updates the teacher's BatchNorm
statistics and the teacher drifts during distillation. Here the teacher is kept out of the student's module
tree: `LightningModule.train()` cannot reach it, the optimizer and DDP never see it, and the student's
checkpoint stores only its path and SHA-256.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from agw_light.inference.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def resolve_teacher_checkpoint(path: str | Path) -> Path:
    """The checkpoint a `light.teacher_ckpt` value names: a .ckpt file, or a finished row-1 run folder.

    A run folder stands for the checkpoint its metrics.json was evaluated on (the best one), so a sweep can
    point rows 2 and 5 at row 1's folder before row 1 has picked its best epoch. That checkpoint is looked
    up in the folder's checkpoints/ first: metrics.json records the path as training saw it, which may be
    relative to another working directory or predate a move of the sweep folder.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        metrics = path / "metrics.json"
        if not metrics.is_file():
            raise FileNotFoundError(
                f"light.teacher_ckpt={path}: this row-1 run folder has no metrics.json, so its training did not "
                f"finish (see {path / 'error.txt'} or {path / 'train.log'}); rows 2 and 5 need a finished teacher"
            )
        try:
            checkpoint = Path(json.loads(metrics.read_text())["checkpoint"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{metrics}: expected a JSON object with key 'checkpoint' ({error})") from error
        for candidate in (path / "checkpoints" / checkpoint.name, checkpoint):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"{metrics} names checkpoint {checkpoint}, which is neither in {path / 'checkpoints'} nor at that path"
        )
    raise FileNotFoundError(
        f"light.teacher_ckpt={path}: no such file or run folder. Rows 2 and 5 distil from a trained row-1 model: "
        "put light=full first in the same sweep (-m light=full,model,...), or pass light.teacher_ckpt=<row-1 run "
        "folder or .ckpt>"
    )


def load_teacher(
    ckpt_path: str | Path,
    *,
    num_classes: int,
    expected_sha256: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[nn.Module, str]:
    """(teacher network, SHA-256 of its file) of an agw_light checkpoint (trained, or converted from another
    framework), frozen in eval mode. Checks that it fits the student: the same training identities, a float
    feature with a classifier, the student's normalisation, and (a warning only) the student's image size."""
    from agw_light.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"light.teacher_ckpt={path}: no such file (expected a row-1 checkpoint written by agw_light.train or "
            "agw_light.convert, e.g. outputs/<dataset>/full/<run>/checkpoints/last.ckpt)"
        )
    loaded = load_checkpoint(path)
    if expected_sha256 is not None and loaded.sha256 != expected_sha256:
        raise ValueError(
            f"teacher checkpoint {path} changed since this student was started (SHA-256 differs from "
            f"{expected_sha256[:12]}...): resume with the original teacher file"
        )
    teacher = loaded.network
    if teacher.head.num_classes != num_classes:
        raise ValueError(
            f"teacher checkpoint {path} classifies {teacher.head.num_classes} training identities but the student's "
            f"dataset has {num_classes}: the teacher must be trained on the same dataset"
        )
    if teacher.code_lengths is not None:
        raise ValueError(
            f"teacher checkpoint {path} has a {type(teacher.head).__name__}; distillation reads the class logits "
            "and float feature of a float head (a light=full or light=model checkpoint, or a converted one)"
        )
    preprocessing = loaded.preprocessing
    if preprocessing is not None and (preprocessing.mean, preprocessing.std) != (IMAGENET_MEAN, IMAGENET_STD):
        raise ValueError(
            f"teacher checkpoint {path} normalises images with mean {preprocessing.mean} and std "
            f"{preprocessing.std}, but the student's training batches use ImageNet's {IMAGENET_MEAN}, {IMAGENET_STD}"
        )
    if preprocessing is not None and image_size is not None and preprocessing.image_size != tuple(image_size):
        log.warning(
            "teacher checkpoint %s was made for %dx%d images; the student trains at %dx%d",
            path,
            *preprocessing.image_size,
            *image_size,
        )
    teacher.requires_grad_(False)
    return teacher, loaded.sha256


@torch.no_grad()
def teacher_targets(teacher: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's retrieval feature (its eval output) and class logits for a training batch: the
    `agw_light.losses.TEACHER_TARGETS`."""
    if teacher.training:
        raise RuntimeError("the teacher must stay in eval mode during distillation")
    head = teacher.head
    outputs = head.outputs(teacher.forward_features(images))
    return {"teacher_logits": outputs["logits"], "teacher_features": outputs[head.retrieval_output]}
