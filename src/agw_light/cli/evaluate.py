"""Evaluate a checkpoint: `python -m agw_light.evaluate ckpt=<path> dataset=<name>`.

Prints the table row (feature dim, metric, R1, mAP, mINP, inference ms per batch of 64, search ms per query)
and writes it to metrics.json beside the checkpoint (or `out=`). `eval.targets=[dukemtmcreid,msmt17]` also
evaluates it on those sets (cross-domain), each row in metrics_<target>.json beside metrics.json. Images are
resized to the size the model was trained at (recorded in the checkpoint) unless `image_size=[h,w]` asks for
another. Every row also holds the same-person verification figures (TPR at FPR 1e-4/1e-3/1e-2, thresholds).
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from agw_light.cli import CONF_DIR


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates `cfg.ckpt` on the configured dataset; returns the row written to metrics.json."""
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    from pathlib import Path

    from agw_light.builders import build_datamodule, evaluation_protocol, target_datamodules
    from agw_light.evaluation import evaluate_checkpoint, evaluate_targets
    from agw_light.files import is_json_object, refuse_foreign_output
    from agw_light.inference.checkpoint import load_checkpoint

    if cfg.out is not None:
        refuse_foreign_output(cfg.out, [cfg.ckpt], "a metrics JSON file", is_json_object)
    datamodule = build_datamodule(cfg)
    targets = target_datamodules(cfg)  # before any evaluation: a bad target name fails at once
    datamodule.prepare_data()
    protocol = evaluation_protocol(cfg)
    options = {"image_size": None if cfg.image_size is None else list(cfg.image_size), "device": cfg.device}
    out_path = Path(cfg.out) if cfg.out is not None else Path(cfg.ckpt).with_name("metrics.json")
    checkpoint = load_checkpoint(cfg.ckpt)  # read once for every dataset
    row = evaluate_checkpoint(checkpoint, datamodule, protocol, out_path=out_path, **options)
    evaluate_targets(checkpoint, targets, out_path, protocol, **options)
    return row


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
