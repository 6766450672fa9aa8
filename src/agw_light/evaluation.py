"""Checkpoint evaluation: features, the re-id protocol, and the two timings of the table row.

Used by `agw_light.test` (a checkpoint on demand) and `agw_light.train` (the best checkpoint of a run), so
the numbers a user reads after training and after testing come from the same code.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agw_light.metrics import evaluate_retrieval


def load_reid_module(ckpt_path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuilds a trained LitReID from its checkpoint alone (no config, no ImageNet download)."""
    from agw_light.lit.module import LitReID

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file (expected a .ckpt written by agw_light.train)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for a damaged zip/pickle
        raise ValueError(f"checkpoint {path} cannot be read ({error}); is it truncated or not a .ckpt?") from error
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or "model" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(
            f"checkpoint {path} is not an agw_light training checkpoint: expected keys 'hyper_parameters' "
            f"(with 'model') and 'state_dict'"
        )
    # A distilled student is complete without its teacher, which only shaped its training: its distillation
    # terms (parameter-free) are dropped with it.
    from agw_light.lit.teacher import TEACHER_TARGETS

    losses = [term for term in hparams["losses"] if term.get("target", "pids") not in TEACHER_TARGETS]
    arguments = {
        **hparams, "model": {**hparams["model"], "pretrained": "none"}, "losses": losses, "teacher_ckpt": None,
    }
    try:
        module = LitReID(**arguments)
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"checkpoint {path} does not rebuild into an agw_light model (hyper-parameters or weights do not "
            f"match this version's architecture): {error}"
        ) from error
    return module.eval()


@torch.inference_mode()
def extract_features(
    model: nn.Module, loader, device: torch.device, *, desc: str = "extracting features"
) -> dict[str, torch.Tensor]:
    """Features of every image a query/gallery loader yields, with pids, cameras and the query flag."""
    from tqdm import tqdm

    model = model.to(device).eval()
    parts: dict[str, list[torch.Tensor]] = {"features": [], "pids": [], "camids": [], "is_query": [], "index": []}
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        parts["features"].append(model(batch["image"].to(device, non_blocking=True)).float().cpu())
        parts["pids"].append(batch["pid"])
        parts["camids"].append(batch["camid"])
        parts["is_query"].append(batch["is_query"])
        parts["index"].append(batch["index"])
    return {name: torch.cat(values) for name, values in parts.items()}


def evaluate_features(
    features: torch.Tensor,
    pids: torch.Tensor,
    camids: torch.Tensor,
    is_query: torch.Tensor,
    *,
    distance: str = "cosine",
    max_rank: int = 50,
) -> dict[str, float]:
    """R1/R5/R10/mAP/mINP of the query rows against the gallery rows under the standard protocol."""
    if max_rank < 10:
        raise ValueError(f"eval.max_rank={max_rank}: must be at least 10 to report R10")
    is_query = is_query.bool()
    query, gallery = features[is_query], features[~is_query]
    result = evaluate_retrieval(
        query, gallery, pids[is_query], pids[~is_query], camids[is_query], camids[~is_query],
        distance=distance, max_rank=max_rank,
    )
    return summarize_ranking(result, num_query=len(query), num_gallery=len(gallery))


def evaluate_coarse_to_fine(
    index, query_codes: torch.Tensor, q_pids, q_camids, g_pids, g_camids, *, max_rank: int = 50
) -> dict[str, float]:
    """The protocol on the ranking a coarse-to-fine index produces (what its users get), not the exact one."""
    from agw_light.metrics import RankAccumulator

    accumulator = RankAccumulator(g_pids, g_camids, max_rank, num_gallery=index.ntotal)
    for rows, block in index.ranking_distances(query_codes):
        accumulator.add(torch.from_numpy(block), q_pids[rows], q_camids[rows])
    return summarize_ranking(accumulator.result(), num_query=len(query_codes), num_gallery=index.ntotal)


def summarize_ranking(result: dict[str, Any], *, num_query: int, num_gallery: int) -> dict[str, float]:
    if result["num_valid_queries"] == 0:
        raise ValueError("no query has a match in the gallery under another camera: nothing to evaluate")
    cmc = result["cmc"]
    return {
        "R1": float(cmc[0]),
        "R5": float(cmc[4]),
        "R10": float(cmc[9]),
        "mAP": float(result["mAP"]),
        "mINP": float(result["mINP"]),
        "num_query": int(num_query),
        "num_gallery": int(num_gallery),
        "num_valid_queries": int(result["num_valid_queries"]),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_inference(
    model: nn.Module, *, height: int, width: int, device: torch.device, batch_size: int = 64, repeats: int = 10
) -> float:
    """Median milliseconds for one forward pass of a batch of 64 images (the table's inference column)."""
    model = model.to(device).eval()
    images = torch.randn(batch_size, 3, height, width, device=device)
    for _ in range(2):
        model(images)
    timings = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        model(images)
        _synchronize(device)
        timings.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(timings))


def time_search(index, queries: torch.Tensor, *, topk: int = 100, repeats: int = 3) -> float:
    """Milliseconds per query of a batched top-k search of all queries (best of `repeats`)."""
    queries = queries.float().numpy()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(queries, topk)
        timings.append(time.perf_counter() - start)
    return 1000.0 * min(timings) / len(queries)
