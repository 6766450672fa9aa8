"""Train (and then evaluate) one table row: `python -m agw_light.train dataset=market1501 light=full`.

With no overrides it runs the quick CPU demo on the generated dataset. Everything is a Hydra override:
`trainer.devices=2 trainer.strategy=ddp`, `trainer.precision=16-mixed`, `resume=<ckpt>`, `-m light=...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def build_datamodule(cfg: DictConfig):
    """The DataModule of a config's dataset and loader sections (also used by test and visualize)."""
    from agw_light.data.datamodule import ReIDDataModule

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
    )


def _resumed_teacher_sha256(resume: str | None) -> str | None:
    """The teacher hash a resumed student was started with, so a swapped teacher file is caught."""
    if resume is None:
        return None
    import torch

    return torch.load(resume, map_location="cpu", weights_only=True)["hyper_parameters"].get("teacher_sha256")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the configured row, then evaluates its best checkpoint; returns the metrics written to disk."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from agw_light.lit.callbacks import RankedListLogger, RNGStateCheckpoint
    from agw_light.lit.module import LitReID
    from agw_light.test import evaluate_checkpoint

    out_dir = Path(cfg.output_dir)
    if cfg.resume is not None and not Path(cfg.resume).is_file():
        raise FileNotFoundError(
            f"resume={cfg.resume}: no such checkpoint file (expected e.g. <run>/checkpoints/last.ckpt)"
        )
    (out_dir / "error.txt").unlink(missing_ok=True)  # from an earlier failed attempt in this folder
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    teacher_ckpt = cfg.light.get("teacher_ckpt")
    if teacher_ckpt is not None:
        from agw_light.lit.teacher import resolve_teacher_checkpoint

        teacher_ckpt = str(resolve_teacher_checkpoint(teacher_ckpt))
    module = LitReID(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        losses=OmegaConf.to_container(cfg.losses, resolve=True),
        num_classes=datamodule.num_classes,
        **OmegaConf.to_container(cfg.optim, resolve=True),
        distance=cfg.eval.distance,
        max_rank=cfg.eval.max_rank,
        teacher_ckpt=teacher_ckpt,
        image_size=(cfg.dataset.height, cfg.dataset.width),
        teacher_sha256=_resumed_teacher_sha256(cfg.resume) if teacher_ckpt is not None else None,
    )
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints",
        filename="best-epoch{epoch:03d}-mAP{val/mAP:.4f}",
        auto_insert_metric_name=False,
        monitor="val/mAP",
        mode="max",
        save_last=True,
    )
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(out_dir),
        logger=TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version=""),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="epoch"), RNGStateCheckpoint(),
                   *([RankedListLogger(**cfg.visualize)]
                     if cfg.visualize.num_queries > 0 or cfg.visualize.embedding_size > 0 else [])],
        use_distributed_sampler=False,  # the PK sampler splits identities across ranks itself
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)

    if not trainer.is_global_zero:
        return {}
    best = checkpoint.best_model_path or checkpoint.last_model_path
    return evaluate_checkpoint(best, cfg, datamodule=datamodule, out_path=out_dir / "metrics.json")


def record_failure(out_dir: Path, error: BaseException) -> None:
    """Leaves error.txt in the run folder (first line: why), so a sweep report can say why a row is missing."""
    import traceback

    from agw_light.files import write_text_atomic

    summary = f"{type(error).__name__}: {error}".splitlines()[0]
    write_text_atomic(out_dir / "error.txt", summary + "\n\n" + "".join(traceback.format_exception(error)))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except Exception as error:
        record_failure(Path(cfg.output_dir), error)
        raise


if __name__ == "__main__":
    main()
