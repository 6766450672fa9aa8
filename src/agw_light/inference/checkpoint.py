"""Reading agw_light training checkpoints: safely (no pickled code runs) and with errors that name the file.

A checkpoint holds the plain arguments LitReID was built with ("hyper_parameters") and its weights, so the
network rebuilds from the file alone: no Hydra config, no ImageNet download.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from agw_light.losses import TEACHER_TARGETS
from agw_light.models import ReIDModel, build_model


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict, loaded with `weights_only=True` (a crafted pickle cannot run code) and checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file (expected a .ckpt written by agw_light.train)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a damaged zip, a pickle or a refused global
        raise ValueError(
            f"checkpoint {path} cannot be read safely ({type(error).__name__}: {error}); is it truncated, not a "
            "checkpoint, or a file holding code?"
        ) from error
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "model" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(
            f"checkpoint {path} is not an agw_light training checkpoint: expected keys 'hyper_parameters' "
            f"(with 'model') and 'state_dict'"
        )
    return checkpoint


@contextlib.contextmanager
def rebuilding(path: str | Path) -> Iterator[None]:
    """Turns a failure to rebuild the network from a checkpoint into one error that names the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"checkpoint {path} does not rebuild into an agw_light model (hyper-parameters or weights do not "
            f"match this version's architecture): {error}"
        ) from error


# Checkpoints written before `nonlocal_inter_channels` existed were built with blocks of half width.
LEGACY_MODEL_DEFAULTS = {"nonlocal_inter_channels": "half"}


def module_arguments(hparams: dict[str, Any]) -> dict[str, Any]:
    """LitReID's arguments for a trained model: no pretrained download, no teacher.

    A distilled student is complete without its teacher, which only shaped its training: the distillation
    terms (parameter-free) are dropped with it.
    """
    losses = [term for term in hparams["losses"] if term.get("target", "pids") not in TEACHER_TARGETS]
    model = {**LEGACY_MODEL_DEFAULTS, **hparams["model"], "pretrained": "none"}
    return {**hparams, "model": model, "losses": losses, "teacher_ckpt": None}


# Keys of LitReID's `model` dict that are LitReID's own options, not build_model's arguments.
LIT_MODEL_OPTIONS = ("channels_last", "compile")


def network_from_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> ReIDModel:
    """The checkpoint's ReIDModel alone (no loss stack, no Lightning), with every weight key matched."""
    hparams = checkpoint["hyper_parameters"]
    model_kwargs = {
        key: value
        for key, value in {**LEGACY_MODEL_DEFAULTS, **hparams["model"]}.items()
        if key not in LIT_MODEL_OPTIONS
    }
    weights = {
        name.removeprefix("model."): value
        for name, value in checkpoint["state_dict"].items()
        if name.startswith("model.")
    }
    with rebuilding(path):
        network = build_model(
            num_classes=hparams["num_classes"],
            distance=hparams.get("distance"),
            **{**model_kwargs, "pretrained": "none"},
        )
        network.load_state_dict(weights, strict=True)
    return network.eval()
