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

from agw_light.data.transforms import Preprocessing
from agw_light.inference import Encoder, pick_device
from agw_light.inference.checkpoint import LoadedCheckpoint, load_checkpoint
from agw_light.lit.datamodule import ReIDDataModule
from agw_light.metrics import RankAccumulator, evaluate_retrieval, rerank_blocks
from agw_light.metrics.rerank import check_rerank_settings
from agw_light.metrics.verification import evaluate_verification
from agw_light.models import NonLocalBlock
from agw_light.protocol import EvaluationProtocol
from agw_light.results import format_summary, write_metrics
from agw_light.search import CoarseToFineIndex, HammingIndex, build_index

log = logging.getLogger(__name__)


def describe_device(device: torch.device) -> str:
    """The machine a timing was taken on, recorded with every row so figures stay comparable."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def evaluation_preprocessing(
    loaded: LoadedCheckpoint, requested: Sequence[int] | None, fallback: tuple[int, int]
) -> tuple[Preprocessing, tuple[int, int] | None]:
    """(preprocessing to feed the model, the size it was trained at or None): the checkpoint's preprocessing
    (normalisation and resampling of its training, or of its source framework), at the requested size if any.

    A model's numbers only hold at the input size it was trained at, so another size is used only when asked
    for, and then logged. A checkpoint that records no size (written before it was recorded) is fed
    `fallback`, the DataModule's size, with a warning.
    """
    recorded = loaded.preprocessing
    trained = None if recorded is None else recorded.image_size
    if recorded is None:
        if requested is None:
            log.warning("the checkpoint records no image size: evaluating at the DataModule's %dx%d", *fallback)
        recorded = Preprocessing(fallback)
    preprocessing = recorded.resized(requested)
    if trained is not None and preprocessing.image_size != trained:
        log.warning(
            "evaluating at image size %dx%d, not at the size the model was trained at, %dx%d",
            *preprocessing.image_size,
            *trained,
        )
    return preprocessing, trained


def evaluate_checkpoint(
    checkpoint: LoadedCheckpoint | str | Path,
    datamodule: ReIDDataModule,
    protocol: EvaluationProtocol | None = None,
    *,
    image_size: Sequence[int] | None = None,
    device: str = "auto",
    out_path: str | Path | None = None,
    selection: str = "given",
) -> dict[str, Any]:
    """Evaluates a checkpoint on the datamodule's test split with the published protocol; writes metrics.json.

    Args:
        checkpoint: a path, or one `load_checkpoint` read (an agw_light checkpoint, trained or converted).
        datamodule: the evaluated dataset (its test split).
        protocol: the evaluation settings; None: `EvaluationProtocol()`'s defaults.
        image_size: (height, width) to feed instead of the checkpoint's recorded size (logged).
        device: where features are computed and timed ("auto": the GPU when there is one).
        out_path: metrics.json's path; None: beside the checkpoint.
        selection: how the checkpoint was chosen ("last epoch", "best val/mAP ...", or "given" by the user).

    Returns:
        The row written to metrics.json (the schema of `agw_light.results`).

    The row says which network and protocol produced it (`evaluation_provenance`); retrieval goes through the
    index the model's head calls for (`agw_light.search.build_index`: float cosine, exact Hamming, or
    coarse-to-fine with candidate counts fitted on training identities), and R1/mAP/mINP are those of the ranking
    that index returns (`ranking_scores`), re-ranked when `protocol.rerank.enabled`. The same-person
    verification figures (`agw_light.metrics.verification`) and the two timings follow.
    """
    protocol = protocol or EvaluationProtocol()
    protocol.check()
    if protocol.rerank.enabled:
        settings, names = protocol.rerank, ("eval.rerank.k1", "eval.rerank.k2", "eval.rerank.lambda_value")
        check_rerank_settings(settings.k1, settings.k2, settings.lambda_value, names=names)
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    network, torch_device = loaded.network, pick_device(device)
    pyramid = network.code_lengths is not None and len(network.code_lengths) > 1
    if protocol.rerank.enabled and pyramid:
        raise ValueError(
            f"eval.rerank.enabled=true: {loaded.path} has a code pyramid, searched coarse-to-fine, which never "
            "computes most query x gallery distances; k-reciprocal re-ranking needs them all. Disable re-ranking"
        )
    preprocessing, trained_size = evaluation_preprocessing(loaded, image_size, (datamodule.height, datamodule.width))
    datamodule.setup("test")
    loader = datamodule.query_gallery_dataloader(preprocessing=preprocessing)
    samples = extract_features(network, loader, torch_device, desc="query + gallery")
    samples["is_query"] = samples["is_query"].bool()
    fit = None
    if pyramid:
        loader = datamodule.validation_split_dataloader(protocol.fit_images, preprocessing=preprocessing)
        fit = extract_features(network, loader, torch_device, desc="validation split (training ids)")
        fit["is_query"] = fit["is_query"].bool()
    index = build_gallery_index(network, samples, fit, protocol.target_recall)
    row = evaluation_provenance(loaded, datamodule.name, preprocessing, trained_size, selection, index.kind)
    row.update(ranking_scores(network, index, samples, protocol, fit=fit))
    row.update(verification_scores(network, samples, torch_device, protocol.verification_fprs))
    row.update(timings(network, index, samples, preprocessing, torch_device, protocol.timing_batch_size))
    out_path = Path(out_path) if out_path is not None else loaded.path.with_name("metrics.json")
    write_metrics(out_path, row)
    # The summary starts on its own line, so its header and values stay aligned under the log prefix.
    log.info("wrote %s:\n%s", out_path, format_summary(row))
    return row


def build_gallery_index(
    network: nn.Module, samples: dict[str, torch.Tensor], fit: dict[str, torch.Tensor] | None, target_recall: float
) -> Any:
    """The search index over the gallery rows that the model's head calls for; a pyramid's candidate counts are
    fitted on the `fit` split (training identities), never on test queries or labels."""
    is_query = samples["is_query"]
    return build_index(
        samples["features"][~is_query],
        network.code_lengths,
        target_recall=target_recall,
        fit_queries=None if fit is None else fit["features"][fit["is_query"]],
        fit_gallery=None if fit is None else fit["features"][~fit["is_query"]],
    )


def evaluation_provenance(
    loaded: LoadedCheckpoint,
    dataset: str,
    preprocessing: Preprocessing,
    trained_size: tuple[int, int] | None,
    selection: str,
    index_kind: str,
) -> dict[str, Any]:
    """What produced a row: the checkpoint and its hash, the dataset, the network (backbone, neck, distillation,
    parameters, non-local width), the index, how the checkpoint was selected, the input size (and the trained one
    when another was asked for), the training dataset, and a converted model's source."""
    hparams, network = loaded.hparams, loaded.network
    row: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "checkpoint_sha256": loaded.sha256,
        "dataset": dataset,
        "backbone": hparams["model"]["backbone"],
        "neck": hparams["model"].get("neck", "bnneck"),
        "distilled": hparams.get("teacher_sha256") is not None,
        "index": index_kind,
        "parameters": sum(parameter.numel() for parameter in network.parameters()),
        "nonlocal_inter_channels": (
            str(hparams["model"].get("nonlocal_inter_channels", "half"))
            if any(isinstance(layer, NonLocalBlock) for layer in network.modules())
            else "none"
        ),
        "selection": selection,
        "image_size": "x".join(map(str, preprocessing.image_size)),
    }
    if trained_size is not None and preprocessing.image_size != trained_size:
        row["trained_image_size"] = "x".join(map(str, trained_size))
    if hparams.get("train_dataset") is not None:
        row["train_dataset"] = hparams["train_dataset"]
    elif loaded.source is None:
        log.warning("the checkpoint records no training dataset (written before it was recorded): the row has none")
    if loaded.source is not None:
        row.update(source_format=loaded.source["format"], source_sha256=loaded.source["sha256"])
    return row


def ranking_scores(
    network: nn.Module,
    index: Any,
    samples: dict[str, torch.Tensor],
    protocol: EvaluationProtocol,
    *,
    fit: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """R1/R5/R10/mAP/mINP of the ranking the row's search produces, by index kind: coarse-to-fine (with its
    candidate counts and its recall of the exact full-length top-1), re-ranked, or the exhaustive ranking."""
    features, pids, camids, is_query = (samples[key] for key in ("features", "pids", "camids", "is_query"))
    retrieval = network.ranking_features(features)
    scored: dict[str, Any] = {"metric": network.distance, "rerank": protocol.rerank.enabled}
    if isinstance(index, CoarseToFineIndex):
        query = features[is_query]
        scored.update(
            evaluate_coarse_to_fine(
                index,
                query,
                pids[is_query],
                camids[is_query],
                pids[~is_query],
                camids[~is_query],
                max_rank=protocol.max_rank,
            )
        )
        exact = HammingIndex(network.code_lengths[0])
        exact.add(retrieval[~is_query])
        exact_top1 = exact.search(retrieval[is_query].numpy(), 1)[1]
        scored.update(
            feature_dim="-".join(map(str, network.code_lengths)),
            candidates=list(index.candidates),
            fit_queries=int(fit["is_query"].sum()),
            fit_gallery=int((~fit["is_query"]).sum()),
            recall_at_1_of_exact=float((index.search(query.numpy(), 1)[1] == exact_top1).mean()),
            # The exact scan of the full-length codes, timed like the row's search: the speed-up's baseline.
            exact_search_ms_per_query=time_search(exact, retrieval[is_query]),
        )
        return scored
    scored["feature_dim"] = int(features.shape[1])
    if protocol.rerank.enabled:
        settings = protocol.rerank
        scored.update(
            evaluate_reranked(
                retrieval,
                pids,
                camids,
                is_query,
                distance=network.distance,
                max_rank=protocol.max_rank,
                k1=settings.k1,
                k2=settings.k2,
                lambda_value=settings.lambda_value,
            ),
            rerank_k1=settings.k1,
            rerank_k2=settings.k2,
            rerank_lambda=settings.lambda_value,
        )
        return scored
    scored.update(
        evaluate_features(retrieval, pids, camids, is_query, distance=network.distance, max_rank=protocol.max_rank)
    )
    return scored


def verification_scores(
    network: nn.Module, samples: dict[str, torch.Tensor], device: torch.device, fprs: Sequence[float]
) -> dict[str, Any]:
    """Same-person decisions on the full-length feature or code, whatever index ranks (see metrics.verification),
    computed on the evaluation device: all query x gallery pairs cost as much as an exact ranking."""
    retrieval = network.ranking_features(samples["features"]).to(device)
    is_query, pids, camids = samples["is_query"], samples["pids"], samples["camids"]
    return evaluate_verification(
        retrieval[is_query],
        retrieval[~is_query],
        pids[is_query],
        pids[~is_query],
        camids[is_query],
        camids[~is_query],
        distance=network.distance,
        targets=tuple(fprs),
    )


def timings(
    network: nn.Module,
    index: Any,
    samples: dict[str, torch.Tensor],
    preprocessing: Preprocessing,
    device: torch.device,
    batch_size: int,
) -> dict[str, Any]:
    """The table's two timings, with what they were measured on: one forward pass of a batch (median), and the
    search per query; the timing batch size and the device are recorded with them."""
    height, width = preprocessing.image_size
    with torch.inference_mode():
        inference_ms = time_inference(network, height=height, width=width, device=device, batch_size=batch_size)
    return {
        "inference_ms_per_batch": inference_ms,
        "timing_batch_size": batch_size,
        "search_ms_per_query": time_search(index, samples["features"][samples["is_query"]]),
        "device": describe_device(device),
    }


def target_metrics_path(metrics_path: str | Path, target: str) -> Path:
    """Where the row of an extra evaluation set goes: metrics_<target>.json beside the run's metrics.json."""
    return Path(metrics_path).with_name(f"metrics_{target}.json")


def evaluate_targets(
    checkpoint: LoadedCheckpoint | str | Path,
    datamodules: Mapping[str, ReIDDataModule],
    metrics_path: str | Path,
    protocol: EvaluationProtocol | None = None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluates a checkpoint on each named DataModule (cross-domain sets), one row each, by target name; a
    path is read once for all of them.

    metrics.json keeps the row of the run's own dataset; each target's row goes to `target_metrics_path`.
    Each target uses its own query/gallery protocol; the classifier plays no part, so the number of training
    identities does not matter. `options` are `evaluate_checkpoint`'s keyword arguments.
    """
    if datamodules and not isinstance(checkpoint, LoadedCheckpoint):
        checkpoint = load_checkpoint(checkpoint)
    rows = {}
    for name, datamodule in datamodules.items():
        datamodule.prepare_data()
        rows[name] = evaluate_checkpoint(
            checkpoint, datamodule, protocol, out_path=target_metrics_path(metrics_path, name), **options
        )
    return rows


def extract_features(
    model: nn.Module, loader, device: torch.device, *, desc: str = "extracting features"
) -> dict[str, torch.Tensor]:
    """Features of every image a query/gallery loader yields, with pids, cameras and the query flag.

    Through `agw_light.inference.Encoder` (torch backend, the table's), which also encodes users' own images.
    """
    encoder = Encoder.from_network(model, preprocessing=None, device=device, backend="torch")
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
