"""Config to objects: the one place a composed Hydra config becomes library objects.

Commands call these; the library below takes plain arguments and never sees a config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from agw_light.data.datamodule import ReIDDataModule
from agw_light.lit.checkpoint import read_checkpoint
from agw_light.lit.module import LitReID
from agw_light.lit.teacher import resolve_teacher_checkpoint

# The package's Hydra configs (a link to the repository's conf/; a wheel carries them).
CONF_DIR = Path(__file__).resolve().parent / "conf"
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


def dataset_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved `dataset` node of conf/dataset/<name>.yaml, as composing `dataset=<name>` would give it.

    Plain OmegaConf, not Hydra's compose: it works inside a running `@hydra.main` app and in tests alike.
    A file under `# @package _global_` (synthetic.yaml) contributes its `dataset` node (its other keys tune a
    training run, not a dataset); any other file is the node itself. `overrides` are dotted assignments from
    the config root, as on the command line: `dataset.root=/data`, `dataset.kwargs.seed=1`.
    """
    path = CONF_DIR / "dataset" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(entry.stem for entry in (CONF_DIR / "dataset").glob("*.yaml"))
        raise ValueError(f"dataset {name!r}: no config {path}; known datasets: {', '.join(known)}")
    loaded = OmegaConf.load(path)
    is_global = path.read_text().lstrip().startswith("# @package _global_")
    root = OmegaConf.create({"dataset": loaded.get("dataset") if is_global else loaded})
    malformed = [entry for entry in overrides if not entry.startswith("dataset.") or "=" not in entry]
    if malformed:
        raise ValueError(f"dataset {name!r}: overrides must read dataset.<key>=<value>, got {malformed}")
    root = OmegaConf.merge(root, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.create(OmegaConf.to_container(root, resolve=True)["dataset"])


def with_dataset(cfg: DictConfig, dataset: DictConfig) -> DictConfig:
    """A copy of `cfg` whose `dataset` node is `dataset` (the rest, e.g. the loader, kept)."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(copy, False)
    copy.dataset = dataset
    return copy


def target_datamodules(cfg: DictConfig) -> dict[str, ReIDDataModule]:
    """The DataModule of each name in `eval.targets` other than the run's own dataset, by name.

    Each target keeps its own protocol (its parser, query and gallery) with the run's loader settings;
    `eval.target_overrides.<name>` lists dataset overrides (`dataset.root=...`) for that target.
    """
    overrides = cfg.eval.get("target_overrides") or {}
    unknown = sorted(set(overrides) - set(cfg.eval.get("targets") or ()))
    if unknown:
        raise ValueError(f"eval.target_overrides names {unknown}, which eval.targets does not list")
    modules = {}
    for name in cfg.eval.get("targets") or ():
        if name == cfg.dataset.name or name in modules:
            continue
        node = dataset_config(name, list(overrides.get(name, ())))
        modules[name] = build_datamodule(with_dataset(cfg, node))
    return modules


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
        train_dataset=cfg.dataset.name,
    )
