"""Train (then evaluate) one table row: `python -m agw_light.train dataset=market1501 light=full`.

With no overrides it runs the quick CPU demo on the generated dataset. Everything is a Hydra override:
`trainer.devices=2 trainer.strategy=ddp`, `trainer.precision=16-mixed`, `resume=<ckpt>`, `-m light=...`.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from agw_light.cli import CONF_DIR


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the configured row, then evaluates its reported checkpoint; returns the metrics written to disk."""
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from agw_light.builders import build_datamodule, build_module
    from agw_light.evaluation import evaluate_checkpoint
    from agw_light.lit.callbacks import RankedListLogger, RNGStateCheckpoint

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
    module = build_module(cfg, datamodule.num_classes)
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
        callbacks=[
            checkpoint,
            LearningRateMonitor(logging_interval="epoch"),
            RNGStateCheckpoint(),
            *(
                [RankedListLogger(**cfg.visualize)]
                if cfg.visualize.num_queries > 0 or cfg.visualize.embedding_size > 0
                else []
            ),
        ],
        use_distributed_sampler=False,  # the PK sampler splits identities across ranks itself
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)

    if not trainer.is_global_zero:
        return {}
    best = checkpoint.best_model_path or checkpoint.last_model_path
    return evaluate_checkpoint(
        best,
        datamodule,
        device=cfg.get("device", "auto"),
        max_rank=cfg.eval.max_rank,
        timing_batch_size=cfg.eval.timing_batch_size,
        fit_images=cfg.eval.fit_images,
        target_recall=cfg.eval.target_recall,
        out_path=out_dir / "metrics.json",
    )


def record_failure(out_dir: Path, error: BaseException) -> None:
    """Leaves error.txt in the run folder (first line: why), so a sweep report can say why a row is missing."""
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
