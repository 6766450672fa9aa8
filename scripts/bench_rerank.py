"""Benchmark k-reciprocal re-ranking (`agw_light.metrics.rerank_blocks`): time and peak memory.

    python scripts/bench_rerank.py                          # Market-1501 size: 3,368 x 15,913, with the dense one
    python scripts/bench_rerank.py --msmt --query-fraction 0.1   # MSMT17 size: 11,659 x 82,161
    python scripts/bench_rerank.py --sizes 30 90 --dim 16   # any size (the smoke test's)
    python scripts/bench_rerank.py --msmt --stage1-rows 2048  # only the first stage, on 2,048 of the points

Features are random (seeded) 2048-d unit vectors. `rerank_blocks` first builds the neighbour lists and
k-reciprocal vectors of all query + gallery points ("setup": every point against every point), then yields
the re-ranked query x gallery distances block by block ("blocks"); each block is consumed (its row minima
summed) and dropped, as `RankAccumulator` would. With --query-fraction f < 1 only the first f of the query
blocks are computed and the blocks' time is extrapolated linearly to all queries (the setup is always whole).

The dense implementation (--dense, on by default at Market size) is the usual one, written after the
authors' code: P x P float32 distances and argsort, dense float16 V, a per-point Python loop; its result is
compared with ours (float16 V limits agreement to about 1e-3).

--stage1-rows N times only the first stage (each point's distances to all points, their maximum and top-k, one
block of rows at a time, as `rerank_blocks` does it with the library's own block function) on the first N
points; every block does the same work, so the time is extrapolated linearly to all points. It lets a
machine too slow for the whole first stage at 2048-d (every point against every point) measure it in part.

Peak memory is the growth of the process's peak resident set size during the call: the kernel's high-water
mark (VmHWM in /proc/self/status) is reset through /proc/self/clear_refs once the features exist and read
after (Linux), each implementation in a fresh process. It counts numpy and torch allocations alike and
excludes the input features.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from pathlib import Path

import numpy as np
import torch

MARKET = (3368, 15913)
MSMT = (11659, 82161)


def random_features(num_query: int, num_gallery: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    points = torch.nn.functional.normalize(torch.randn(num_query + num_gallery, dim, generator=generator), dim=1)
    return points[:num_query].clone(), points[num_query:].clone()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def dense_rerank(query: np.ndarray, gallery: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3):
    """The usual implementation: whole P x P matrices (float32 distances, float16 V), one point at a time."""
    points = np.concatenate([query, gallery]).astype(np.float32)
    num, num_query = len(points), len(query)
    squared = (points * points).sum(1)
    original = squared[:, None] + squared[None, :] - 2 * points @ points.T
    np.maximum(original, 0, out=original)
    original /= original.max(axis=1, keepdims=True)
    order = np.argsort(original, axis=1).astype(np.int32)

    def k_reciprocal(i: int, k: int) -> np.ndarray:
        forward = order[i, : k + 1]
        return forward[np.where(order[forward, : k + 1] == i)[0]]

    vectors = np.zeros((num, num), dtype=np.float16)
    half = int(np.around(k1 / 2))
    for i in range(num):
        own = k_reciprocal(i, k1)
        expanded = own
        for candidate in own:
            candidate_set = k_reciprocal(candidate, half)
            if len(np.intersect1d(candidate_set, own)) > 2 / 3 * len(candidate_set):
                expanded = np.append(expanded, candidate_set)
        expanded = np.unique(expanded)
        weight = np.exp(-original[i, expanded])
        vectors[i, expanded] = weight / weight.sum()
    original = original[:num_query]
    if k2 > 1:
        expanded_vectors = np.zeros_like(vectors)
        for i in range(num):
            expanded_vectors[i] = vectors[order[i, :k2]].mean(0)
        vectors = expanded_vectors
    order = None  # freed before the inverted index, as the authors' code does
    inverted = [np.where(vectors[:, i] != 0)[0] for i in range(num)]
    final = np.empty((num_query, num - num_query), dtype=np.float32)
    for i in range(num_query):
        overlap = np.zeros(num, dtype=np.float32)
        for column in np.where(vectors[i] != 0)[0]:
            rows = inverted[column]
            overlap[rows] += np.minimum(vectors[i, column], vectors[rows, column])
        final[i] = ((1 - overlap / (2 - overlap)) * (1 - lambda_value) + original[i] * lambda_value)[num_query:]
    return final


def first_stage(query: torch.Tensor, gallery: torch.Tensor, rows: int) -> dict:
    """The first stage of `rerank_blocks` on the first `rows` points, timed and extrapolated to all of them."""
    from agw_light.metrics import rerank

    points = torch.cat([query, gallery])
    squared_norms = (points * points).sum(1)
    rows = min(rows, len(points))
    start = time.perf_counter()
    for first in range(0, rows, rerank.DEFAULT_BLOCK_SIZE):
        block_rows = slice(first, min(first + rerank.DEFAULT_BLOCK_SIZE, rows))
        block = rerank._distance_block(points, squared_norms, block_rows, slice(0, len(points)))
        block.max(1)
        torch.topk(block, rerank.DEFAULT_K1 + 1, dim=1, largest=False, sorted=True)
    seconds = time.perf_counter() - start
    return {"rows_measured": rows, "seconds_measured": seconds, "seconds": seconds * len(points) / rows}


def _measure(kind: str, sizes: tuple[int, int], dim: int, fraction: float, result_queue) -> None:
    """One implementation in this (fresh) process: seconds, peak memory growth, and a sample of its output."""
    from agw_light.metrics import rerank_blocks

    torch.set_num_threads(torch.get_num_threads())
    query, gallery = random_features(*sizes, dim)
    sample_rows = min(8, sizes[0])
    rss_kb = _reset_peak()
    start = time.perf_counter()
    if kind.startswith("first_stage"):
        figures = first_stage(query, gallery, int(kind.split(":")[1]))
    elif kind == "dense":
        final = dense_rerank(query.numpy(), gallery.numpy())
        figures = {"seconds": time.perf_counter() - start, "sample": final[:sample_rows].tolist()}
    else:
        blocks = rerank_blocks(query, gallery)
        setup = time.perf_counter() - start
        wanted = max(1, round(fraction * sizes[0]))
        done, sample, checksum = 0, None, 0.0
        for rows, block in blocks:
            if sample is None:
                sample = block[:sample_rows].numpy().tolist()
            checksum += float(block.min(1).values.sum())
            done = rows.stop
            if done >= wanted:
                break
        block_seconds = time.perf_counter() - start - setup
        figures = {
            "setup_seconds": setup,
            "block_seconds_measured": block_seconds,
            "queries_measured": done,
            "seconds": setup + block_seconds * sizes[0] / done,
            "sample": sample,
        }
    figures["peak_mb"] = (_status_kb("VmHWM") - rss_kb) / 1024
    result_queue.put(figures)


def measure(kind: str, sizes: tuple[int, int], dim: int, fraction: float = 1.0) -> dict:
    context = multiprocessing.get_context("spawn")
    result_queue = context.Queue()
    process = context.Process(target=_measure, args=(kind, sizes, dim, fraction, result_queue))
    process.start()
    figures = result_queue.get()
    process.join()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msmt", action="store_true", help="MSMT17 size instead of Market-1501 size")
    parser.add_argument("--sizes", type=int, nargs=2, metavar=("QUERIES", "GALLERY"), help="any other size")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--query-fraction", type=float, default=1.0, help="query blocks computed (extrapolated)")
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=None, help="also the dense one")
    parser.add_argument("--stage1-rows", type=int, help="only time the first stage on this many points")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sizes = tuple(args.sizes) if args.sizes else MSMT if args.msmt else MARKET
    dense = args.dense if args.dense is not None else sizes == MARKET
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{sizes[0]:,} queries x {sizes[1]:,} gallery, {args.dim}-d, k1=20 k2=6 lambda=0.3")
    report = {"sizes": list(sizes), "dim": args.dim, "threads": torch.get_num_threads()}
    if args.stage1_rows:
        report["first_stage"] = stage = measure(f"first_stage:{args.stage1_rows}", sizes, args.dim)
        print(
            f"first stage: {stage['seconds_measured']:.1f} s for {stage['rows_measured']:,} points, "
            f"{stage['seconds']:.0f} s extrapolated to all, peak +{stage['peak_mb']:.0f} MB"
        )
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return
    report["blockwise"] = ours = measure("blockwise", sizes, args.dim, args.query_fraction)
    print(
        f"blockwise: {ours['seconds']:.1f} s (setup {ours['setup_seconds']:.1f} s, blocks "
        f"{ours['block_seconds_measured']:.1f} s for {ours['queries_measured']:,} queries), "
        f"peak +{ours['peak_mb']:.0f} MB"
    )
    if dense:
        report["dense"] = theirs = measure("dense", sizes, args.dim)
        difference = float(np.abs(np.array(ours["sample"]) - np.array(theirs["sample"])).max())
        report["max_abs_difference_of_sample_rows"] = difference
        print(
            f"dense: {theirs['seconds']:.1f} s, peak +{theirs['peak_mb']:.0f} MB; blockwise is "
            f"{theirs['seconds'] / ours['seconds']:.2f}x as fast with {ours['peak_mb'] / theirs['peak_mb']:.2f}x "
            f"the memory; largest difference on {len(ours['sample'])} rows: {difference:.1e}"
        )
    for figures in (report["blockwise"], report.get("dense", {})):
        figures.pop("sample", None)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
