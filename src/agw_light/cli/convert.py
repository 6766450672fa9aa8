"""Convert another framework's model: `python -m agw_light.convert src=<file> out=<file.ckpt> [format=auto]`.

Reads a fast-reid, ReID-Survey, reid-strong-baseline or torchreid model file (a state_dict, a training checkpoint,
or a whole pickled module, which is read without running any of its code) and writes an agw_light checkpoint that
computes the source network's function exactly; every command (evaluate, visualize, export, search, serve, the
teacher of rows 2 and 5, `model.init_from`) and `agw_light.Encoder.from_checkpoint` open it. Strict: a tensor left
over on either side stops the conversion with the list. Settings: conf/convert.yaml.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from agw_light.cli import CONF_DIR


def convert(cfg: DictConfig):
    """Converts `cfg.src` into `cfg.out`; returns the `agw_light.convert.Conversion`."""
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    from agw_light.convert import convert_checkpoint

    options = OmegaConf.to_container(cfg, resolve=True)
    conversion = convert_checkpoint(
        options["src"],
        options["out"],
        format=options["format"],
        overwrite=bool(options["overwrite"]),
        image_size=options["image_size"],
        last_stride=options["last_stride"],
        pooling=options["pooling"],
        gem_p=options["gem_p"],
        neck_feat=options["neck_feat"],
        mean=options["mean"],
        std=options["std"],
    )
    chosen = f"format={conversion.format}" + (f" (auto: {conversion.reason})" if cfg.format == "auto" else "")
    print(f"{cfg.src}: {chosen}, {conversion.model['backbone']}, {conversion.num_classes} classes")
    for note in conversion.notes:
        print(f"  {note}")
    print(f"wrote {conversion.out}")
    return conversion


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="convert")
def main(cfg: DictConfig) -> None:
    try:
        convert(cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"convert: {error}") from error


if __name__ == "__main__":
    main()
