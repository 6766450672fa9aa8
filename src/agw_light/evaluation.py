"""Checkpoint evaluation: features, the re-id protocol, and the two timings of the table row.

Used by `python -m agw_light.evaluate` (a checkpoint on demand) and `python -m agw_light.train` (the reported
checkpoint of a run), so the numbers a user reads after training and after evaluating come from the same
code. Plain arguments only: no Hydra here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agw_light.files import file_sha256
from agw_light.inference import Encoder, pick_device
from agw_light.lit.datamodule import ReIDDataModule
from agw_light.lit.module import LitReID
from agw_light.metrics import RankAccumulator, evaluate_retrieval, rerank_blocks
from agw_light.metrics.rerank import check_rerank_settings
from agw_light.metrics.verification import evaluate_verification
from agw_light.models import NonLocalBlock
from agw_light.results import format_summary, write_metrics
from agw_light.search import CoarseToFineIndex, HammingIndex, build_index

log = logging.getLogger(__name__)


def describe_device(device: torch.device) -> str:
    """The machine a timing was taken on, recorded with every row so figures stay comparable."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def check_image_size(image_size: Sequence[int], name: str = "image_size") -> tuple[int, int]:
    """(height, width) as two positive integers, or an error naming the setting."""
    values = list(image_size)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name}={image_size!r}: expected [height, width], two positive integers")
    return values[0], values[1]


def evaluation_image_size(
    module: LitReID, requested: Sequence[int] | None, fallback: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(size to feed the model, size it was trained at or None): the requested size, else the trained one.

    A model's numbers only hold at the input size it was trained at, so another size is used only when asked
    for, and then logged. A checkpoint that records no size (written before it was recorded) is fed
    `fallback`, the DataModule's size, with a warning.
    """
    recorded = module.hparams.get("image_size")
    trained = check_image_size(recorded, "the checkpoint's image_size") if recorded else None
    if requested is not None:
        size = check_image_size(requested)
        if trained is not None and size != trained:
            log.warning(
                "evaluating at image size %dx%d, not at the size the model was trained at, %dx%d", *size, *trained
            )
        return size, trained
    if trained is None:
        log.warning("the checkpoint records no training image size: evaluating at the DataModule's %dx%d", *fallback)
        return fallback, None
    return trained, trained


def evaluate_checkpoint(
    ckpt_path: str | Path,
    datamodule: ReIDDataModule,
    *,
    image_size: Sequence[int] | None = None,
    device: str = "auto",
    max_rank: int = 50,
    timing_batch_size: int = 64,
    fit_images: int = 1000,
    target_recall: float = 0.99,
    rerank: bool = False,
    rerank_k1: int = 20,
    rerank_k2: int = 6,
    rerank_lambda: float = 0.3,
    out_path: str | Path | None = None,
    selection: str = "given",
) -> dict[str, Any]:
    """Evaluates a checkpoint on the datamodule's test split with the published protocol; writes metrics.json.

    Retrieval goes through the search index the model's head calls for (`agw_light.search.build_index`):
    float cosine (rows 1-2), exact Hamming on the full-length code (row 3) or coarse-to-fine over the code
    pyramid (rows 4-5, candidate counts fitted on a query/gallery split of training identities, never on
    test queries or labels). The reported R1/mAP/mINP are those of the ranking that index returns, and the
    search time is that index's. metrics.json goes beside the checkpoint unless `out_path` is given.

    The row also holds the same-person verification figures (`agw_light.metrics.verification`: TPR at FPR
    1e-4 / 1e-3 / 1e-2 with each distance threshold, and a downsampled ROC curve) and, when the checkpoint
    records it, the dataset the model was trained on ("train_dataset"; "dataset" is the one evaluated here).

    Images are resized to the checkpoint's training size, or to `image_size` (height, width) when given;
    the row records the size used ("image_size", e.g. "256x128": height x width, a flat value like the
    row's others) and, when it is not the training size, that one ("trained_image_size"). `selection` says
    how the checkpoint was chosen ("last epoch", "best val/mAP ...", or "given" by the user), and
    "parameters" counts the network's parameters (classifier included, as the published counts do).

    `rerank=True` ranks the exhaustive rows (float cosine, exact Hamming) by k-reciprocal re-ranking
    (`agw_light.metrics.rerank_blocks`) with k1, k2 and lambda; its original distance is the row's own
    (cosine or Hamming, scaled per query by the query's largest distance). A coarse-to-fine index never
    computes most distances, which re-ranking needs, so it is refused there. The row records "rerank" and,
    when on, the three settings; the search time stays the index's, without re-ranking.
    """
    if rerank:
        check_rerank_settings(
            rerank_k1, rerank_k2, rerank_lambda, names=("eval.rerank_k1", "eval.rerank_k2", "eval.rerank_lambda")
        )
    torch_device = pick_device(device)
    module = LitReID.from_checkpoint(ckpt_path)
    model = module.model
    if rerank and model.code_lengths is not None and len(model.code_lengths) > 1:
        raise ValueError(
            f"eval.rerank=true: {ckpt_path} has a code pyramid, searched coarse-to-fine, which never computes "
            f"most query x gallery distances; k-reciprocal re-ranking needs them all. Set eval.rerank=false"
        )
    size, trained_size = evaluation_image_size(module, image_size, (datamodule.height, datamodule.width))
    datamodule.setup("test")
    outputs = extract_features(
        module, datamodule.query_gallery_dataloader(image_size=size), torch_device, desc="query + gallery"
    )
    features, pids, camids = outputs["features"], outputs["pids"], outputs["camids"]
    is_query = outputs["is_query"].bool()
    code_lengths = model.code_lengths
    fit = None
    if code_lengths is not None and len(code_lengths) > 1:
        fit = extract_features(
            module,
            datamodule.validation_split_dataloader(fit_images, image_size=size),
            torch_device,
            desc="validation split (training ids)",
        )
        fit["is_query"] = fit["is_query"].bool()
    index = build_index(
        features[~is_query],
        code_lengths,
        target_recall=target_recall,
        fit_queries=None if fit is None else fit["features"][fit["is_query"]],
        fit_gallery=None if fit is None else fit["features"][~fit["is_query"]],
    )

    hparams = module.hparams
    row: dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": file_sha256(ckpt_path),
        "dataset": datamodule.name,
        "backbone": hparams.model["backbone"],
        "neck": hparams.model.get("neck", "bnneck"),
        "distilled": hparams.get("teacher_sha256") is not None,
        "index": index.kind,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "nonlocal_inter_channels": (
            str(hparams.model["nonlocal_inter_channels"])
            if any(isinstance(layer, NonLocalBlock) for layer in model.modules())
            else "none"
        ),
        "selection": selection,
        "image_size": "x".join(map(str, size)),
    }
    if trained_size is not None and size != trained_size:
        row["trained_image_size"] = "x".join(map(str, trained_size))
    train_dataset = hparams.get("train_dataset")
    if train_dataset is not None:
        row["train_dataset"] = train_dataset
    else:
        log.warning("the checkpoint records no training dataset (written before it was recorded): the row has none")
    if isinstance(index, CoarseToFineIndex):
        query = features[is_query]
        results = evaluate_coarse_to_fine(
            index, query, pids[is_query], camids[is_query], pids[~is_query], camids[~is_query], max_rank=max_rank
        )
        exact = HammingIndex(code_lengths[0])
        exact.add(model.ranking_features(features[~is_query]))
        exact_top1 = exact.search(model.ranking_features(query).numpy(), 1)[1]
        row.update(
            feature_dim="-".join(map(str, code_lengths)),
            metric=model.distance,
            candidates=list(index.candidates),
            fit_queries=int(fit["is_query"].sum()),
            fit_gallery=int((~fit["is_query"]).sum()),
            recall_at_1_of_exact=float((index.search(query.numpy(), 1)[1] == exact_top1).mean()),
            # The exact scan of the full-length codes, timed like the row's search: the speed-up's baseline.
            exact_search_ms_per_query=time_search(exact, model.ranking_features(query)),
        )
    elif rerank:
        results = evaluate_reranked(
            model.ranking_features(features),
            pids,
            camids,
            is_query,
            distance=model.distance,
            max_rank=max_rank,
            k1=rerank_k1,
            k2=rerank_k2,
            lambda_value=rerank_lambda,
        )
        row.update(
            feature_dim=int(features.shape[1]),
            metric=model.distance,
            rerank=True,
            rerank_k1=rerank_k1,
            rerank_k2=rerank_k2,
            rerank_lambda=rerank_lambda,
        )
    else:
        results = evaluate_features(
            model.ranking_features(features), pids, camids, is_query, distance=model.distance, max_rank=max_rank
        )
        row.update(feature_dim=int(features.shape[1]), metric=model.distance)
    row.setdefault("rerank", False)
    # Same-person decisions on the full-length feature or code, whatever index ranks (see metrics.verification),
    # computed on the evaluation device: all query x gallery pairs cost as much as an exact ranking.
    retrieval = model.ranking_features(features).to(torch_device)
    row.update(
        evaluate_verification(
            retrieval[is_query],
            retrieval[~is_query],
            pids[is_query],
            pids[~is_query],
            camids[is_query],
            camids[~is_query],
            distance=model.distance,
        )
    )
    with torch.inference_mode():
        inference_ms = time_inference(
            module, height=size[0], width=size[1], device=torch_device, batch_size=timing_batch_size
        )
    row.update(
        results,
        inference_ms_per_batch64=inference_ms,
        search_ms_per_query=time_search(index, features[is_query]),
        device=describe_device(torch_device),
    )
    out_path = Path(out_path) if out_path is not None else Path(ckpt_path).with_name("metrics.json")
    write_metrics(out_path, row)
    # The summary starts on its own line, so its header and values stay aligned under the log prefix.
    log.info("wrote %s:\n%s", out_path, format_summary(row))
    return row


def target_metrics_path(metrics_path: str | Path, target: str) -> Path:
    """Where the row of an extra evaluation set goes: metrics_<target>.json beside the run's metrics.json."""
    return Path(metrics_path).with_name(f"metrics_{target}.json")


def evaluate_targets(
    ckpt_path: str | Path, datamodules: Mapping[str, ReIDDataModule], metrics_path: str | Path, **options: Any
) -> dict[str, dict[str, Any]]:
    """Evaluates a checkpoint on each named DataModule (cross-domain sets), one row each, by target name.

    metrics.json keeps the row of the run's own dataset; each target's row goes to `target_metrics_path`.
    Each target uses its own query/gallery protocol; the classifier plays no part, so the number of training
    identities does not matter. `options` are `evaluate_checkpoint`'s.
    """
    rows = {}
    for name, datamodule in datamodules.items():
        datamodule.prepare_data()
        rows[name] = evaluate_checkpoint(
            ckpt_path, datamodule, out_path=target_metrics_path(metrics_path, name), **options
        )
    return rows


def extract_features(
    model: nn.Module, loader, device: torch.device, *, desc: str = "extracting features"
) -> dict[str, torch.Tensor]:
    """Features of every image a query/gallery loader yields, with pids, cameras and the query flag.

    Through `agw_light.inference.Encoder` (torch backend, the table's), which also encodes users' own images.
    """
    encoder = Encoder.from_network(model, image_size=None, device=device, backend="torch")
    outputs = encoder.encode_loader(loader, desc=desc)
    names = {"features": "features", "pids": "pid", "camids": "camid", "is_query": "is_query", "index": "index"}
    return {name: outputs[key] for name, key in names.items()}


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
    check_max_rank(max_rank)
    is_query = is_query.bool()
    query, gallery = features[is_query], features[~is_query]
    result = evaluate_retrieval(
        query,
        gallery,
        pids[is_query],
        pids[~is_query],
        camids[is_query],
        camids[~is_query],
        distance=distance,
        max_rank=max_rank,
    )
    return summarize_ranking(result, num_query=len(query), num_gallery=len(gallery))


def evaluate_coarse_to_fine(
    index, query_codes: torch.Tensor, q_pids, q_camids, g_pids, g_camids, *, max_rank: int = 50
) -> dict[str, float]:
    """The protocol on the ranking a coarse-to-fine index produces (what its users get), not the exact one."""
    accumulator = RankAccumulator(g_pids, g_camids, max_rank, num_gallery=index.ntotal)
    for rows, block in index.ranking_distances(query_codes):
        accumulator.add(torch.from_numpy(block), q_pids[rows], q_camids[rows])
    return summarize_ranking(accumulator.result(), num_query=len(query_codes), num_gallery=index.ntotal)


def evaluate_reranked(
    features: torch.Tensor,
    pids: torch.Tensor,
    camids: torch.Tensor,
    is_query: torch.Tensor,
    *,
    distance: str = "cosine",
    max_rank: int = 50,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> dict[str, float]:
    """`evaluate_features` on the k-reciprocal re-ranked distances, fed block by block to the accumulator."""
    check_max_rank(max_rank)
    is_query = is_query.bool()
    q_pids, q_camids = pids[is_query], camids[is_query]
    accumulator = RankAccumulator(pids[~is_query], camids[~is_query], max_rank)
    for rows, block in rerank_blocks(
        features[is_query], features[~is_query], metric=distance, k1=k1, k2=k2, lambda_value=lambda_value
    ):
        accumulator.add(block, q_pids[rows], q_camids[rows])
    return summarize_ranking(accumulator.result(), num_query=len(q_pids), num_gallery=int((~is_query).sum()))


def check_max_rank(max_rank: int) -> None:
    if max_rank < 10:
        raise ValueError(f"eval.max_rank={max_rank}: must be at least 10 to report R10")


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
