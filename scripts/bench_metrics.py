"""Benchmark `evaluate_rank` against a plain vectorised numpy implementation on a Market-sized matrix.

    python scripts/bench_metrics.py                 # Market-1501 size: 3,368 x 19,732, best of 3
    python scripts/bench_metrics.py --hamming       # also integer distances with heavy ties
    python scripts/bench_metrics.py --msmt          # also MSMT17 size: 11,659 x 82,161 (needs ~4 GB RAM)

The distance matrix is random (seeded) float32: uniform, or Hamming-like integers with --hamming. Pids and
cameras are laid out like the real test sets (Market: 751 ids, 6 cameras, ~20 gallery images per id plus
distractors). Both implementations run in the same process on the same data (best of N), and their results
must agree exactly.

Peak memory is the growth of the process's peak resident set size during one call: the kernel's high-water
mark (VmHWM in /proc/self/status) is reset through /proc/self/clear_refs before the call and read after it
(Linux), in a fresh process per measurement so memory freed by earlier calls cannot hide the peak. This
counts numpy and torch allocations alike; the input distance matrix, built before the reset, is excluded.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from agw_light.metrics import evaluate_rank


def baseline_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, sort_kind="stable") -> dict:
    """Sort every row, drop same-camera matches, cumulative sums: the textbook vectorised numpy evaluation.

    Written with care for speed (one int8 code gathered per entry, int32 cumulative sums), so the
    comparison is against a good baseline. sort_kind="stable" orders ties by gallery index, the tie rule of
    evaluate_rank; numpy's default ("quicksort", an unstable introsort) is faster but orders ties arbitrarily.
    """
    order = np.argsort(distmat, axis=1, kind=sort_kind)
    same_pid = g_pids[None, :] == q_pids[:, None]
    # 0: other identity, 1: true match, 2: junk (same pid and camera), in ranked order.
    code = same_pid.astype(np.int8) + (same_pid & (g_camids[None, :] == q_camids[:, None]))
    code = np.take_along_axis(code, order, axis=1)
    del order, same_pid
    hits = code == 1
    kept_rank = np.cumsum(code != 2, axis=1, dtype=np.int32)  # 1-based rank among kept items
    hit_number = np.cumsum(hits, axis=1, dtype=np.int32)
    num_hits = hit_number[:, -1]
    valid = num_hits > 0
    rows, cols = np.nonzero(hits)
    ranks = kept_rank[rows, cols]
    ap = np.bincount(rows, hit_number[rows, cols] / ranks, minlength=len(hits))[valid] / num_hits[valid]
    first_rank = np.full(len(hits), np.iinfo(np.int32).max)
    np.minimum.at(first_rank, rows, ranks)
    last_rank = np.zeros(len(hits), dtype=np.int32)
    np.maximum.at(last_rank, rows, ranks)
    cmc = (first_rank[valid, None] <= np.arange(1, max_rank + 1)).mean(0)
    return {
        "cmc": cmc,
        "mAP": float(ap.mean()),
        "mINP": float((num_hits[valid] / last_rank[valid]).mean()),
        "num_valid_queries": int(valid.sum()),
        "num_invalid_queries": int((~valid).sum()),
    }


SIZES = {  # num_query, num_gallery, test ids, cameras, gallery images per id
    "market1501": (3368, 19732, 751, 6, 20),
    "msmt17": (11659, 82161, 3060, 15, 26),
}
DISTANCES = {
    "uniform": "uniform random float32 in [0, 1)",
    "hamming64": "Hamming distances of random 64-bit codes (integers ~ Binomial(64, 1/2): heavy ties)",
}


def make_problem(size: str, seed: int, distances: str = "uniform"):
    """Seeded random distances with query/gallery pids and cameras shaped like the real split.

    Each test id gets `gallery_per_id` gallery images; the rest of the gallery is distractors (pid -1).
    """
    num_query, num_gallery, num_ids, num_cams, gallery_per_id = SIZES[size]
    rng = np.random.default_rng(seed)
    q_pids = rng.permutation(np.resize(np.arange(num_ids), num_query))
    labelled = np.repeat(np.arange(num_ids), gallery_per_id)[:num_gallery]
    g_pids = rng.permutation(np.concatenate([labelled, np.full(num_gallery - len(labelled), -1)]))
    q_cams, g_cams = rng.integers(0, num_cams, num_query), rng.integers(0, num_cams, num_gallery)
    if distances == "uniform":
        distmat = rng.random((num_query, num_gallery), dtype=np.float32)
    else:
        distmat = rng.binomial(64, 0.5, (num_query, num_gallery)).astype(np.float32)
    return distmat, q_pids, g_pids, q_cams, g_cams


def _read_status_kb(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def _peak_run(which: str, size: str, seed: int, distances: str, threads: int) -> tuple[float, float, dict]:
    """In a fresh process: seconds, peak RSS growth (MB) and result of one call on a freshly built problem."""
    torch.set_num_threads(threads)
    problem = make_problem(size, seed, distances)
    fn = evaluate_rank if which == "ours" else baseline_rank
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _read_status_kb("VmRSS:")
    start = time.perf_counter()
    result = fn(*problem)
    seconds = time.perf_counter() - start
    return seconds, (_read_status_kb("VmHWM:") - before) / 1024, result


def run_fresh(which: str, size: str, seed: int, distances: str, threads: int) -> tuple[float, float, dict]:
    """A fresh interpreter per measurement: memory freed by earlier calls cannot hide the peak."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_run, (which, size, seed, distances, threads))


def best_time(fn: Callable[[], object], repeats: int) -> tuple[object, float]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def assert_same(name: str, ours: dict, theirs: dict) -> None:
    for key in ("num_valid_queries", "num_invalid_queries"):
        if ours[key] != theirs[key]:
            raise AssertionError(f"{name}: {key} differs: {ours[key]} vs {theirs[key]}")
    worst = max(
        float(np.abs(ours["cmc"] - theirs["cmc"]).max()),
        abs(ours["mAP"] - theirs["mAP"]),
        abs(ours["mINP"] - theirs["mINP"]),
    )
    if worst > 1e-9:
        raise AssertionError(f"{name}: results differ by {worst:.3g}")


def bench_market(args: argparse.Namespace, distances: str) -> None:
    """Both implementations in this process on the same matrix (best of N), then each in a fresh one for
    its peak memory."""
    problem = make_problem("market1501", args.seed, distances)
    num_query, num_gallery = problem[0].shape
    print(f"Market-1501 size {num_query} x {num_gallery}, {DISTANCES[distances]}")
    candidates = {
        "numpy baseline, stable argsort": lambda: baseline_rank(*problem, sort_kind="stable"),
        "numpy baseline, quicksort argsort": lambda: baseline_rank(*problem, sort_kind="quicksort"),
        "evaluate_rank": lambda: evaluate_rank(*problem),
    }
    results, timings = {}, {}
    for name, fn in candidates.items():
        results[name], timings[name] = best_time(fn, args.repeats)
    ours = results["evaluate_rank"]
    assert_same("evaluate_rank vs stable baseline", ours, results["numpy baseline, stable argsort"])
    quick_gap = abs(ours["mAP"] - results["numpy baseline, quicksort argsort"]["mAP"])
    print(
        f"  evaluate_rank == stable baseline: R1 {ours['cmc'][0]:.5f}, mAP {ours['mAP']:.6f}, "
        f"mINP {ours['mINP']:.6f}, valid queries {ours['num_valid_queries']}; "
        f"quicksort baseline mAP off by {quick_gap:.1e} (arbitrary tie order)"
    )
    for name, seconds in timings.items():
        print(f"  {name:34s} best of {args.repeats}: {seconds:6.3f} s")
    ours_s = timings["evaluate_rank"]
    print(
        f"  speed-up of evaluate_rank: {timings['numpy baseline, quicksort argsort'] / ours_s:.1f}x over "
        f"quicksort, {timings['numpy baseline, stable argsort'] / ours_s:.1f}x over stable"
    )
    peaks = {
        which: run_fresh(which, "market1501", args.seed, distances, args.threads)[1]
        for which in ("baseline", "ours")
    }
    print(
        f"  peak RSS growth in a fresh process (VmHWM): baseline (stable) {peaks['baseline']:.0f} MB, "
        f"evaluate_rank {peaks['ours']:.0f} MB"
    )


def bench_msmt(args: argparse.Namespace) -> None:
    """evaluate_rank alone (the baseline's int64 argsort would need 7.6 GB), once, in a fresh process."""
    num_query, num_gallery = SIZES["msmt17"][:2]
    print(
        f"MSMT17 size {num_query} x {num_gallery}, {DISTANCES['uniform']} "
        f"({num_query * num_gallery * 4 / 2**30:.2f} GiB)"
    )
    seconds, peak, result = run_fresh("ours", "msmt17", args.seed, "uniform", args.threads)
    print(
        f"  evaluate_rank: {seconds:.2f} s (one run), peak RSS growth {peak:.0f} MB, "
        f"mAP {result['mAP']:.6f}, valid queries {result['num_valid_queries']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hamming", action="store_true", help="also time integer (Hamming) distances")
    parser.add_argument("--msmt", action="store_true", help="also time the MSMT17 size (evaluate_rank only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    bench_market(args, "uniform")
    if args.hamming:
        bench_market(args, "hamming64")
    if args.msmt:
        bench_msmt(args)


if __name__ == "__main__":
    main()
