"""Evaluate a checkpoint: `python -m agw_light.test ckpt=<path> dataset=<name>`.

Prints the table row (feature dim, metric, R1, mAP, mINP, inference ms per batch of 64, search ms per query)
and writes it to metrics.json beside the checkpoint (or `out=`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from agw_light.train import CONF_DIR, build_datamodule

ROW_COLUMNS = ("feature_dim", "metric", "R1", "mAP", "mINP", "inference_ms_per_batch64", "search_ms_per_query")


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_device(device) -> str:
    """The machine a timing was taken on, recorded with every row so figures stay comparable."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_row(row: dict[str, Any]) -> str:
    """The table row as two aligned lines, header and values, for the terminal."""
    cells = []
    for column in ROW_COLUMNS:
        value = row[column]
        cells.append((column, f"{value:.4f}" if isinstance(value, float) else str(value)))
    widths = [max(len(name), len(text)) for name, text in cells]
    header = " | ".join(name.ljust(w) for (name, _), w in zip(cells, widths, strict=True))
    values = " | ".join(text.ljust(w) for (_, text), w in zip(cells, widths, strict=True))
    return f"{header}\n{values}"


def evaluate_checkpoint(
    ckpt_path: str | Path, cfg: DictConfig, *, datamodule=None, out_path: str | Path | None = None
) -> dict[str, Any]:
    """Evaluates a checkpoint on the config's dataset with the published protocol; writes metrics.json.

    Retrieval goes through the search index the model's head calls for (`agw_light.search`): float cosine
    (rows 1-2), exact Hamming on the full-length code (row 3) or coarse-to-fine over the code pyramid
    (rows 4-5, candidate counts fitted on a query/gallery split of training identities, never on test
    queries or labels). The reported R1/mAP/mINP are those of the ranking that index returns, and the
    search time is that index's.
    """
    import torch

    from agw_light.evaluation import (
        evaluate_coarse_to_fine,
        evaluate_features,
        extract_features,
        load_reid_module,
        time_inference,
        time_search,
    )
    from agw_light.files import write_json_atomic
    from agw_light.search.index import CoarseToFineIndex, HammingIndex
    from agw_light.search.model_index import build_index, code_lengths_of

    device = pick_device(cfg.get("device", "auto"))
    module = load_reid_module(ckpt_path)
    if datamodule is None:
        datamodule = build_datamodule(cfg)
        datamodule.prepare_data()
    datamodule.setup("test")
    outputs = extract_features(module, datamodule.query_gallery_dataloader(), device, desc="query + gallery")
    features, pids, camids = outputs["features"], outputs["pids"], outputs["camids"]
    is_query = outputs["is_query"].bool()
    code_lengths = code_lengths_of(module.model)
    fit = None
    if code_lengths is not None and len(code_lengths) > 1:
        fit = extract_features(module, datamodule.validation_split_dataloader(cfg.eval.fit_images), device,
                               desc="validation split (training ids)")
        fit["is_query"] = fit["is_query"].bool()
    index = build_index(
        features[~is_query], code_lengths, target_recall=cfg.eval.target_recall,
        fit_queries=None if fit is None else fit["features"][fit["is_query"]],
        fit_gallery=None if fit is None else fit["features"][~fit["is_query"]],
    )

    row: dict[str, Any] = {"checkpoint": str(ckpt_path), "dataset": cfg.dataset.name,
                           "backbone": module.hparams.model["backbone"]}
    if isinstance(index, CoarseToFineIndex):
        query = features[is_query]
        results = evaluate_coarse_to_fine(index, query, pids[is_query], camids[is_query], pids[~is_query],
                                          camids[~is_query], max_rank=cfg.eval.max_rank)
        exact = HammingIndex(code_lengths[0])
        exact.add(features[~is_query, : code_lengths[0]])
        exact_top1 = exact.search(query[:, : code_lengths[0]].numpy(), 1)[1]
        row.update(feature_dim="-".join(map(str, code_lengths)), metric="hamming",
                   candidates=list(index.candidates), fit_queries=int(fit["is_query"].sum()),
                   fit_gallery=int((~fit["is_query"]).sum()),
                   recall_at_1_of_exact=float((index.search(query.numpy(), 1)[1] == exact_top1).mean()),
                   # The exact scan of the full-length codes, timed like the row's search: the speed-up's baseline.
                   exact_search_ms_per_query=time_search(exact, query[:, : code_lengths[0]]))
    else:
        distance = "hamming" if code_lengths else module.hparams.distance
        results = evaluate_features(features, pids, camids, is_query, distance=distance, max_rank=cfg.eval.max_rank)
        row.update(feature_dim=int(features.shape[1]), metric=distance)
    with torch.inference_mode():
        inference_ms = time_inference(
            module, height=cfg.dataset.height, width=cfg.dataset.width, device=device,
            batch_size=cfg.eval.timing_batch_size,
        )
    row.update(results, inference_ms_per_batch64=inference_ms,
               search_ms_per_query=time_search(index, features[is_query]), device=describe_device(device))
    print(format_row(row))
    out_path = Path(out_path) if out_path is not None else Path(ckpt_path).with_name("metrics.json")
    write_json_atomic(out_path, row)
    print(f"wrote {out_path}")
    return row


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="test")
def main(cfg: DictConfig) -> None:
    evaluate_checkpoint(cfg.ckpt, cfg, out_path=cfg.out)


if __name__ == "__main__":
    main()
