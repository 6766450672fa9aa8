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

# A serialised ONNX ModelProto starts with field 1 (ir_version) as a varint: tag byte 0x08.
ONNX_FIRST_BYTE = b"\x08"


def export(cfg: DictConfig) -> Path:
    """Exports `cfg.ckpt` to `cfg.out`; returns the written path."""
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    from agw_light.files import refuse_foreign_output
    from agw_light.inference.onnx import export_checkpoint

    refuse_foreign_output(cfg.out, [cfg.ckpt], "an ONNX model", looks_like_onnx)
    out = export_checkpoint(cfg.ckpt, cfg.out, image_size=None if cfg.image_size is None else list(cfg.image_size))
    print(f"wrote {out}")
    return out


def looks_like_onnx(path: Path) -> bool:
    """An .onnx file whose first byte opens a protobuf ModelProto's ir_version field (a checkpoint is a zip)."""
    with open(path, "rb") as handle:
        return path.suffix.lower() == ".onnx" and handle.read(1) == ONNX_FIRST_BYTE


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
