"""Export a checkpoint to ONNX: `python -m agw_light.export ckpt=<path> out=<file.onnx>`.

Writes the eval network (batch size dynamic): the float feature for a BNNeck head, the relaxed codes (all
pyramid levels side by side) for a hash or pyramid head. The file's metadata_props record the input size,
normalisation, code lengths, distance and the checkpoint's SHA-256, so `agw_light.Encoder.from_onnx` (or
any onnxruntime user) preprocesses and compares outputs as evaluation does. Needs the `deploy` extra.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from agw_light.cli import CONF_DIR


def export(cfg: DictConfig) -> Path:
    """Exports `cfg.ckpt` to `cfg.out`; returns the written path."""
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    from agw_light.inference.onnx import export_checkpoint

    out = export_checkpoint(cfg.ckpt, cfg.out, image_size=None if cfg.image_size is None else list(cfg.image_size))
    print(f"wrote {out}")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
