"""Ranked-list pictures of a checkpoint: `python -m agw_light.visualize ckpt=<path> dataset=<name> num_queries=8`.

Writes one PNG per query, `query_<i>_pid<pid>.png` (i: the query's position in the query set), with its
top-k gallery images framed green (true match) or red and their distances, plus all rows in
`ranked_lists.png`, into `out` (default: ranked_lists/ beside the checkpoint). Images are resized to the
size the model was trained at (recorded in the checkpoint) unless `image_size=[h,w]` asks for another.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from agw_light.checks import is_integer
from agw_light.cli import CONF_DIR


def _check_count(name: str, value, available: int, what: str) -> None:
    if not is_integer(value) or not 1 <= value <= available:
        raise ValueError(f"{name}={value!r}: expected an integer from 1 to {available} ({what})")


def visualize_checkpoint(
    ckpt_path: str | Path, cfg: DictConfig, *, datamodule=None, out_dir: str | Path | None = None
) -> list[Path]:
    """Draws the ranked lists of `cfg.num_queries` queries; returns the PNG paths (the combined one last).

    The ranking is the one the evaluation scores: the model's validation feature and distance (a code
    pyramid's full-length level under Hamming), the protocol's junk removed, at the evaluation's image size.
    """
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    from agw_light.builders import build_datamodule
    from agw_light.evaluation import evaluation_preprocessing, extract_features, pick_device
    from agw_light.inference.checkpoint import load_checkpoint
    from agw_light.visualization import pick_positions, ranked_list_pictures, save_png_atomic, stack_rows

    loaded = load_checkpoint(ckpt_path)
    network = loaded.network
    if datamodule is None:
        datamodule = build_datamodule(cfg)
        datamodule.prepare_data()
    requested = cfg.image_size
    preprocessing, _ = evaluation_preprocessing(
        loaded, None if requested is None else list(requested), (datamodule.height, datamodule.width)
    )
    datamodule.setup("test")
    dataset = datamodule.dataset
    _check_count("num_queries", cfg.num_queries, len(dataset.query), f"the {dataset.name} query set's size")
    _check_count("topk", cfg.topk, len(dataset.gallery), f"the {dataset.name} gallery's size")

    loader = datamodule.query_gallery_dataloader(preprocessing=preprocessing)
    samples = extract_features(network, loader, pick_device(cfg.device))
    samples["features"] = network.ranking_features(samples["features"])
    positions = pick_positions(len(dataset.query), cfg.num_queries, seed=cfg.get("query_seed"))
    pictures = ranked_list_pictures(
        samples,
        [path for path, _, _ in dataset.query + dataset.gallery],
        positions,
        metric=network.distance,
        topk=cfg.topk,
        thumb_size=tuple(cfg.thumb_size),
    )
    out_dir = Path(out_dir if out_dir is not None else cfg.out or Path(ckpt_path).parent / "ranked_lists")
    written = [
        save_png_atomic(picture, out_dir / f"query_{position}_pid{dataset.query[position][1]}.png")
        for position, picture in zip(positions.tolist(), pictures, strict=True)
    ]
    written.append(save_png_atomic(stack_rows(pictures), out_dir / "ranked_lists.png"))
    for path in written:
        print(f"wrote {path}")
    return written


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="visualize")
def main(cfg: DictConfig) -> None:
    visualize_checkpoint(cfg.ckpt, cfg)


if __name__ == "__main__":
    main()
