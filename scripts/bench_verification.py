"""Benchmark the same-person verification figures (`agw_light.metrics.verification`): time and peak memory.

    python scripts/bench_verification.py                  # MSMT17 size: 11,659 x 82,161 pairs (~958M)
    python scripts/bench_verification.py --size market    # Market-1501 size, with the all-pairs sort baseline

Features are random 2048-d vectors drawn around one random centre per identity (so positives are closer than
negatives and the figures are not trivial), L2-normalised for cosine, or their 2048 sign bits for Hamming.
Pids and cameras are laid out like the test split (MSMT17: 3,060 ids, 15 cameras; Market-1501: 751 ids, 6).

Each measurement runs in a fresh process. Peak memory is the growth of the peak resident set size during the
call (VmHWM in /proc/self/status, reset through /proc/self/clear_refs before it; Linux), so the features,
built before the reset, are excluded. The baseline of each size:
- "distances only": the same blocks of query x gallery distances with nothing counted, the cost any
  evaluation over all pairs pays; the ratio is what counting into histograms adds;
- "all-pairs sort" (market only; too large at MSMT17 size): every pair's distance and label held at once,
  sorted, rates by cumulative sums, the straightforward implementation; it must give the same figures.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import time
from pathlib import Path

import numpy as np
import torch

from agw_light.metrics.distance import pairwise_distance
from agw_light.metrics.verification import BLOCK_PAIRS, FLOAT_BINS, FPR_TARGETS, evaluate_verification

SIZES = {  # (num_query, num_gallery, ids, cameras)
    "msmt": (11_659, 82_161, 3_060, 15),
    "market": (3_368, 19_732, 751, 6),
    "tiny": (200, 1_000, 50, 4),
}
DIM = 2048


def make_problem(size: str, distance: str, seed: int = 0) -> tuple:
    num_query, num_gallery, ids, cams = SIZES[size]
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, DIM, generator=generator)
    q_pids = torch.randint(0, ids, (num_query,), generator=generator)
    g_pids = torch.randint(0, ids, (num_gallery,), generator=generator)
    q_cams = torch.randint(0, cams, (num_query,), generator=generator)
    g_cams = torch.randint(0, cams, (num_gallery,), generator=generator)

    def draw(pids: torch.Tensor) -> torch.Tensor:
        features = torch.empty(len(pids), DIM)
        for start in range(0, len(pids), 8192):  # in pieces: the noise of all rows at once would double memory
            rows = pids[start : start + 8192]
            features[start : start + 8192] = centres[rows] + 4.5 * torch.randn(len(rows), DIM, generator=generator)
        if distance == "hamming":
            return torch.where(features > 0, 1.0, -1.0)
        return torch.nn.functional.normalize(features, dim=1)

    return draw(q_pids), draw(g_pids), q_pids, g_pids, q_cams, g_cams


def distances_only(query, gallery, q_pids, g_pids, q_cams, g_cams, *, distance: str) -> dict:
    rows = max(1, BLOCK_PAIRS // len(gallery))
    for start in range(0, len(query), rows):
        pairwise_distance(query[start : start + rows], gallery, distance, prepared=True)
    return {}


def all_pairs_sort(query, gallery, q_pids, g_pids, q_cams, g_cams, *, distance: str) -> dict:
    """Every kept pair's distance at once, sorted; TPR at the largest grid threshold within each target FPR."""
    dist = pairwise_distance(query, gallery, distance, prepared=True).numpy()
    same = (q_pids[:, None] == g_pids[None]).numpy()
    kept = ~(same & (q_cams[:, None] == g_cams[None]).numpy())
    positives, negatives = np.sort(dist[same & kept]), np.sort(dist[~same & kept])
    width = 1.0 if distance == "hamming" else 2.0 / FLOAT_BINS
    grid = np.arange(-1, (DIM if distance == "hamming" else FLOAT_BINS) + 1) * width
    fpr = np.searchsorted(negatives, grid, side="right") / len(negatives)
    tpr = np.searchsorted(positives, grid, side="right") / len(positives)
    picked = [int(np.searchsorted(fpr, target, side="right")) - 1 for target in FPR_TARGETS]
    return {"verification": [{"tpr": float(tpr[i]), "threshold": float(grid[i])} for i in picked]}


def histograms(query, gallery, q_pids, g_pids, q_cams, g_cams, *, distance: str) -> dict:
    return evaluate_verification(query, gallery, q_pids, g_pids, q_cams, g_cams, distance=distance)


METHODS = {"histograms": histograms, "distances only": distances_only, "all-pairs sort": all_pairs_sort}


def _read_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure(method: str, size: str, distance: str, threads: int) -> tuple[float, float, dict]:
    torch.set_num_threads(threads)
    problem = make_problem(size, distance)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _read_status_kb("VmRSS:")
    start = time.perf_counter()
    result = METHODS[method](*problem, distance=distance)
    seconds = time.perf_counter() - start
    return seconds, (_read_status_kb("VmHWM:") - before) / 1024, result


def measure(method: str, size: str, distance: str, threads: int) -> tuple[float, float, dict]:
    """In a fresh interpreter, so memory freed by earlier measurements cannot hide the peak."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (method, size, distance, threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="msmt")
    parser.add_argument("--distances", nargs="+", choices=("cosine", "hamming"), default=["cosine", "hamming"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    num_query, num_gallery, _, _ = SIZES[args.size]
    methods = ["histograms", "distances only"] + (["all-pairs sort"] if args.size != "msmt" else [])
    print(
        f"{args.size}: {num_query} x {num_gallery} = {num_query * num_gallery / 1e6:.0f}M pairs, {DIM}-d, "
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}"
    )
    for distance in args.distances:
        measured = {method: measure(method, args.size, distance, args.threads) for method in methods}
        base_seconds = measured["distances only"][0]
        for method, (seconds, peak_mb, _) in measured.items():
            print(
                f"  {distance:7s} {method:15s} {seconds:8.1f} s ({seconds / base_seconds:4.2f}x distances only)"
                f"  peak RSS growth {peak_mb:7.0f} MB"
            )
        figures = measured["histograms"][2]
        print(
            "    TPR (threshold) at FPR 1e-4, 1e-3, 1e-2: "
            + ", ".join(f"{entry['tpr']:.4f} ({entry['threshold']})" for entry in figures["verification"])
        )
        if "all-pairs sort" in measured:
            reference = measured["all-pairs sort"][2]["verification"]
            same = all(
                entry["tpr"] == ref["tpr"] and float(entry["threshold"]) == ref["threshold"]
                for entry, ref in zip(figures["verification"], reference, strict=True)
            )
            print(f"    all-pairs sort gives the same figures: {same}")


if __name__ == "__main__":
    main()
