"""Evaluate a checkpoint: `python -m agw_light.evaluate ckpt=<path> dataset=<name>`.

Prints the table row (feature dim, metric, R1, mAP, mINP, inference ms per batch of 64, search ms per query)
and writes it to metrics.json beside the checkpoint (or `out=`). Images are resized to the size the model
was trained at (recorded in the checkpoint) unless `image_size=[h,w]` asks for another.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from agw_light.cli import CONF_DIR


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates `cfg.ckpt` on the configured dataset; returns the row written to metrics.json."""
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    from agw_light.builders import build_datamodule
    from agw_light.evaluation import evaluate_checkpoint

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    return evaluate_checkpoint(
        cfg.ckpt,
        datamodule,
        image_size=None if cfg.image_size is None else list(cfg.image_size),
        device=cfg.device,
        max_rank=cfg.eval.max_rank,
        timing_batch_size=cfg.eval.timing_batch_size,
        fit_images=cfg.eval.fit_images,
        target_recall=cfg.eval.target_recall,
        rerank=cfg.eval.rerank,
        rerank_k1=cfg.eval.rerank_k1,
        rerank_k2=cfg.eval.rerank_k2,
        rerank_lambda=cfg.eval.rerank_lambda,
        out_path=cfg.out,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
