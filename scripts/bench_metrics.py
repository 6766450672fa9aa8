"""Benchmark `evaluate_rank` (sort-free) against the bucket algorithm it replaced and numpy sort baselines.

    python scripts/bench_metrics.py                 # Market-1501 size: 3,368 x 19,732, best of 3
    python scripts/bench_metrics.py --hamming       # also integer distances with heavy ties
    python scripts/bench_metrics.py --msmt          # also MSMT17 size: 11,659 x 82,161 (needs ~4 GB RAM)

The distance matrix is random (seeded) float32: uniform, or Hamming-like integers with --hamming. Pids and
cameras are laid out like the real test sets (Market: 751 ids, 6 cameras, ~20 gallery images per id plus
distractors). Every implementation runs in the same process on the same data and must give the same result.

Issue 11 (item 8) keeps the bucket algorithm only if it beats the sort-free evaluator by at least 1.5x and
never gets slower with more threads under contention. The bucket algorithm is read from the last commit
that had it (`--bucket-revision`, loaded from git), and both run on torch 1 and 2 intra-op threads, first
as the machine is, then with two busy processes started by this script ("contention"). Timings interleave
the candidates round by round and keep each one's best. Each mode also reports the cores that processes
other than this one kept busy (Linux /proc/stat), since the machine may be shared.

Peak memory is the growth of the process's peak resident set size during one call: the kernel's high-water
mark (VmHWM in /proc/self/status) is reset through /proc/self/clear_refs before the call and read after it
(Linux), in a fresh process per measurement so memory freed by earlier calls cannot hide the peak. This
counts numpy and torch allocations alike; the input distance matrix, built before the reset, is excluded.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from agw_light.metrics import evaluate_rank

REPOSITORY = Path(__file__).resolve().parent.parent
# The last commit whose src/agw_light/metrics/rank.py holds the bucket algorithm.
BUCKET_REVISION = "41f1133028556deb446ffe7ffea1106d93db83b5"
THREADS = (1, 2)
KEEP_BUCKET_SPEED_UP = 1.5


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


def load_bucket_rank(revision: str) -> Callable[..., dict]:
    """The bucket algorithm's `evaluate_rank`, from `revision` of the repository (it left the package)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/agw_light/metrics/rank.py"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("bucket_rank")
    exec(compile(source, f"{revision[:7]}:src/agw_light/metrics/rank.py", "exec"), module.__dict__)
    return module.evaluate_rank


def _read_status_kb(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def _peak_run(which: str, size: str, seed: int, distances: str, revision: str) -> tuple[float, float, dict]:
    """In a fresh process: seconds, peak RSS growth (MB) and result of one call on a freshly built problem."""
    torch.set_num_threads(1)
    problem = make_problem(size, seed, distances)
    fn = {"sort-free": evaluate_rank, "baseline": baseline_rank}.get(which) or load_bucket_rank(revision)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _read_status_kb("VmRSS:")
    start = time.perf_counter()
    result = fn(*problem)
    seconds = time.perf_counter() - start
    return seconds, (_read_status_kb("VmHWM:") - before) / 1024, result


def run_fresh(which: str, size: str, args: argparse.Namespace, distances: str) -> tuple[float, float, dict]:
    """A fresh interpreter per measurement: memory freed by earlier calls cannot hide the peak."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_run, (which, size, args.seed, distances, args.bucket_revision))


class BusyProcesses:
    """Python processes that each keep one core busy while the block runs: the contention of a shared machine."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> BusyProcesses:
        self.processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        time.sleep(0.5 if self.count else 0.0)  # let them start spinning
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes:
            process.terminate()
            process.wait()


def _busy_seconds() -> tuple[float, float]:
    """(machine busy CPU seconds from /proc/stat, this process's CPU seconds, all its threads)."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:9]]
    own = os.times()
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def interleaved_best(candidates: dict[str, Callable[[], dict]], repeats: int) -> tuple[dict, dict, float]:
    """Best seconds and last result of each candidate over `repeats` rounds (one call each per round, in
    turn), and the cores other processes kept busy meanwhile."""
    best = dict.fromkeys(candidates, float("inf"))
    results = {}
    machine_before, own_before = _busy_seconds()
    wall_start = time.perf_counter()
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    machine_after, own_after = _busy_seconds()
    other_cores = ((machine_after - machine_before) - (own_after - own_before)) / (time.perf_counter() - wall_start)
    return best, results, other_cores


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


def label(implementation: str, threads: int) -> str:
    return f"{implementation}, {threads} thread{'s' if threads > 1 else ''}"


def with_threads(threads: int, fn: Callable[[], dict]) -> Callable[[], dict]:
    def run() -> dict:
        torch.set_num_threads(threads)
        return fn()

    return run


def bench_market(args: argparse.Namespace, distances: str, bucket_rank: Callable[..., dict]) -> None:
    """Sort-free and bucket on 1 and 2 threads, without and with two busy processes, plus the numpy sort
    baselines once; then each implementation in a fresh process for its peak memory."""
    problem = make_problem("market1501", args.seed, distances)
    num_query, num_gallery = problem[0].shape
    print(f"\nMarket-1501 size {num_query} x {num_gallery}, {DISTANCES[distances]}")
    candidates = {}
    for threads in THREADS:
        candidates[label("sort-free", threads)] = with_threads(threads, lambda: evaluate_rank(*problem))
        candidates[label("bucket", threads)] = with_threads(threads, lambda: bucket_rank(*problem))
    timings, results = {}, {}
    for mode, busy in (("as is", 0), ("contention", 2)):
        with BusyProcesses(busy):
            timings[mode], mode_results, other_cores = interleaved_best(candidates, args.repeats)
        results |= {f"{name} ({mode})": result for name, result in mode_results.items()}
        print(
            f"  {mode} (other processes kept {other_cores:.2f} of {os.cpu_count()} cores busy), best of {args.repeats}:"
        )
        for name, seconds in timings[mode].items():
            print(f"    {name:24s} {seconds:6.3f} s")
    if not args.skip_baselines:
        baselines = {
            "numpy baseline, stable argsort": lambda: baseline_rank(*problem, sort_kind="stable"),
            "numpy baseline, quicksort argsort": lambda: baseline_rank(*problem, sort_kind="quicksort"),
        }
        baseline_timings, baseline_results, other_cores = interleaved_best(baselines, args.repeats)
        results |= baseline_results
        print(f"  numpy sort baselines (other processes: {other_cores:.2f} cores), best of {args.repeats}:")
        for name, seconds in baseline_timings.items():
            print(f"    {name:34s} {seconds:6.3f} s")
    sort_free = results[f"{label('sort-free', 1)} (as is)"]
    for name, result in results.items():
        if "quicksort" not in name:  # quicksort orders ties arbitrarily
            assert_same(f"sort-free vs {name}", sort_free, result)
    print(
        f"  all agree (to 1e-9): R1 {sort_free['cmc'][0]:.5f}, mAP {sort_free['mAP']:.6f}, "
        f"mINP {sort_free['mINP']:.6f}, valid queries {sort_free['num_valid_queries']}"
    )
    report_rule(timings)
    peaks = {which: run_fresh(which, "market1501", args, distances)[1] for which in ("sort-free", "bucket", "baseline")}
    print(
        "  peak RSS growth in a fresh process (VmHWM, 1 thread): "
        + ", ".join(f"{which} {peak:.0f} MB" for which, peak in peaks.items())
    )


def report_rule(timings: dict[str, dict[str, float]]) -> None:
    """Issue 11's rule, applied literally: the bucket algorithm stays only if both conditions hold."""
    as_is = timings["as is"]
    bucket_best = min(as_is[label("bucket", threads)] for threads in THREADS)
    sort_free_best = min(as_is[label("sort-free", threads)] for threads in THREADS)
    speed_up = sort_free_best / bucket_best
    busy = timings["contention"]
    slowdown = busy[label("bucket", THREADS[-1])] / busy[label("bucket", THREADS[0])]
    fast_enough, scales = speed_up >= KEEP_BUCKET_SPEED_UP, slowdown <= 1.0
    print(
        f"  rule: bucket (best thread count) is {speed_up:.2f}x the speed of sort-free "
        f"(needs >= {KEEP_BUCKET_SPEED_UP}x: {'met' if fast_enough else 'not met'}); under contention its "
        f"{THREADS[-1]}-thread run takes {slowdown:.2f}x its {THREADS[0]}-thread time "
        f"(needs <= 1: {'met' if scales else 'not met'}) -> "
        f"{'keep the bucket algorithm' if fast_enough and scales else 'sort-free'}"
    )


def bench_msmt(args: argparse.Namespace) -> None:
    """Sort-free and bucket once each, in fresh processes on 1 thread (the numpy baseline's int64 argsort
    would need 7.6 GB)."""
    num_query, num_gallery = SIZES["msmt17"][:2]
    print(
        f"\nMSMT17 size {num_query} x {num_gallery}, {DISTANCES['uniform']} "
        f"({num_query * num_gallery * 4 / 2**30:.2f} GiB)"
    )
    results = {}
    for which in ("sort-free", "bucket"):
        seconds, peak, results[which] = run_fresh(which, "msmt17", args, "uniform")
        print(
            f"  {which}: {seconds:.2f} s (one run, 1 thread), peak RSS growth {peak:.0f} MB, "
            f"mAP {results[which]['mAP']:.6f}, valid queries {results[which]['num_valid_queries']}"
        )
    assert_same("sort-free vs bucket", results["sort-free"], results["bucket"])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hamming", action="store_true", help="also time integer (Hamming) distances")
    parser.add_argument("--msmt", action="store_true", help="also time the MSMT17 size (once each)")
    parser.add_argument("--skip-baselines", action="store_true", help="skip the numpy sort baselines")
    parser.add_argument("--bucket-revision", default=BUCKET_REVISION, help="git revision of the bucket algorithm")
    args = parser.parse_args()
    bucket_rank = load_bucket_rank(args.bucket_revision)
    print(
        f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}; bucket algorithm from {args.bucket_revision[:7]}"
    )
    bench_market(args, "uniform", bucket_rank)
    if args.hamming:
        bench_market(args, "hamming64", bucket_rank)
    if args.msmt:
        bench_msmt(args)


if __name__ == "__main__":
    main()
