"""Benchmark of `agw_light.search` at MSMT17, Market-1501 and DukeMTMC-reID sizes, on CPU.

    python scripts/bench_search.py                  # all three sizes, 2 threads (about 3 minutes)
    python scripts/bench_search.py --sizes msmt17   # only MSMT17 size

Per size, in one process: exact 2048-d float cosine search (faiss inner product, rows 1-2), exact 2048-bit
Hamming search (faiss binary scan, row 3) and coarse-to-fine search over the 32..2048-bit pyramid (rows 4-5)
with candidate counts fitted on a validation set (`fit_candidates`, target recall@1 0.99). Reported: ms per
query with all queries in one call ("batched", best of 3) and one query per call ("single", mean over
`--single` queries), recall of the exact 2048-bit top-1 / top-10, R1 and mAP of every method against the
generated identities, bytes of codes held, and the resident memory each index takes when loaded from disk
in a fresh process (growth of VmRSS).

Codes are generated, not produced by a trained model. Every image gets a 64-d latent embedding: an
identity prototype (appearance-cluster centre + identity offset: identities in a cluster are hard
negatives) plus per-image noise. Every pyramid level is a sign random projection (SimHash) of that one
embedding, and the 2048-d float features are the projection whose signs are the 2048-bit code. Short
SimHash codes are weaker than distilled ones, so this is a pessimistic pyramid for coarse-to-fine search.
Validation queries come from separate "training" identities (same generator, never in the gallery), as
`fit_candidates` is meant to be used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEVELS = (2048, 1024, 512, 256, 128, 64, 32)  # the model's code_lengths order
LATENT_DIM = 64
IDENTITIES_PER_CLUSTER = 12
IDENTITY_SPREAD = 0.5  # identity offset around its cluster centre
IMAGE_NOISE = 0.9  # per-image noise (pose, camera, background)
TOP_K = 10


@dataclass(frozen=True)
class Size:
    name: str
    gallery: int
    queries: int
    identities: int  # test identities (query and gallery)
    cameras: int
    train_identities: int  # identities the validation queries come from


SIZES = {
    "msmt17": Size("MSMT17", 82_161, 2_000, 3_060, 15, 1_041),
    "market1501": Size("Market-1501", 19_732, 3_368, 751, 6, 751),
    "dukemtmcreid": Size("DukeMTMC-reID", 17_661, 2_228, 1_110, 8, 702),
}


@dataclass
class Split:
    levels: list[np.ndarray]  # packed codes per level, in LEVELS order
    floats: np.ndarray  # (N, 2048) float32, the signs of which are the 2048-bit code
    pids: np.ndarray
    camids: np.ndarray


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.projections = [self.rng.standard_normal((LATENT_DIM, bits)).astype(np.float32) for bits in LEVELS]

    def prototypes(self, identities: int) -> np.ndarray:
        clusters = self.rng.standard_normal((max(1, identities // IDENTITIES_PER_CLUSTER), LATENT_DIM))
        centre = clusters[self.rng.integers(0, len(clusters), identities)]
        return (centre + IDENTITY_SPREAD * self.rng.standard_normal((identities, LATENT_DIM))).astype(np.float32)

    def split(self, prototypes: np.ndarray, count: int, cameras: int, *, floats: bool) -> Split:
        from agw_light.search import pack_codes

        pids = self.rng.integers(0, len(prototypes), count)
        latent = prototypes[pids] + IMAGE_NOISE * self.rng.standard_normal((count, LATENT_DIM)).astype(np.float32)
        levels, features = [], None
        for bits, projection in zip(LEVELS, self.projections, strict=True):
            values = latent @ projection
            levels.append(pack_codes(values))
            if bits == LEVELS[0] and floats:
                features = values
        return Split(levels, features, pids, self.rng.integers(0, cameras, count))


class BackgroundLoad:
    """Cores used by other processes while timing (Linux /proc/stat): the machine is shared, and a busy
    one makes faiss's OpenMP threads wait. The machine's busy time minus this process's CPU time (all
    its threads), summed over every timed section; /proc/stat counts in 10 ms ticks, so only the total
    over all sections is meaningful."""

    def __init__(self) -> None:
        self.other_seconds = 0.0
        self.wall_seconds = 0.0

    @property
    def cores(self) -> float:
        return self.other_seconds / max(self.wall_seconds, 1e-9)

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:9]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()

    def measure(self, function):
        before = self._sample()
        result = function()
        after = self._sample()
        self.other_seconds += (after[0] - before[0]) - (after[1] - before[1])
        self.wall_seconds += after[2] - before[2]
        return result


def best_of(repeats: int, function) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def single_query_seconds(search, queries, count: int) -> float:
    """Mean seconds of one call per query over the first `count` queries (after one warm-up call)."""
    search(queries[:1])
    start = time.perf_counter()
    for row in range(count):
        search(queries[row : row + 1])
    return (time.perf_counter() - start) / count


def resident_mb(directory: Path, threads: int) -> float:
    """VmRSS growth when loading the saved index in a fresh process (MB)."""
    code = (
        "import sys, faiss, numpy\n"
        "from agw_light.search import load_index\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'): return int(line.split()[1]) * 1024\n"
        "before = rss(); index = load_index(sys.argv[1]); print((rss() - before) / 1e6)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return float(out.stdout)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found (k = exact.shape[1])."""
    hits = (found[:, :, None] == exact[:, None, :]).any(axis=1)
    return float(hits.mean())


def rank_quality(blocks, q_pids, g_pids, q_camids, g_camids) -> tuple[float, float]:
    from agw_light.metrics import RankAccumulator

    accumulator = RankAccumulator(g_pids, g_camids, max_rank=1)
    for rows, distances in blocks:
        accumulator.add(distances, q_pids[rows], q_camids[rows])
    result = accumulator.result()
    return float(result["cmc"][0]), float(result["mAP"])


def hamming_blocks(queries: np.ndarray, gallery: np.ndarray, rows: int):
    from agw_light.search import hamming_distances

    for start in range(0, len(queries), rows):
        yield slice(start, start + rows), hamming_distances(queries[start : start + rows], gallery)


def cosine_blocks(queries: np.ndarray, gallery: np.ndarray, rows: int):
    import torch

    gallery = torch.nn.functional.normalize(torch.from_numpy(gallery), dim=1)
    for start in range(0, len(queries), rows):
        block = torch.nn.functional.normalize(torch.from_numpy(queries[start : start + rows]), dim=1)
        yield slice(start, start + rows), (1 - block @ gallery.T)


def run_size(size: Size, args, workdir: Path) -> dict:
    from agw_light.search import CoarseToFineIndex, FloatIndex, HammingIndex, fit_candidates

    generator = Generator(args.seed)
    test_ids = generator.prototypes(size.identities)
    gallery = generator.split(test_ids, size.gallery, size.cameras, floats=True)
    queries = generator.split(test_ids, size.queries, size.cameras, floats=True)
    # Validation split: training identities with as many gallery images per identity as the test gallery.
    per_identity = size.gallery / size.identities
    train_ids = generator.prototypes(min(size.train_identities, round(args.validation_gallery / per_identity)))
    validation_gallery = generator.split(train_ids, args.validation_gallery, size.cameras, floats=False)
    validation = generator.split(train_ids, args.validation, size.cameras, floats=False)
    row = {"size": size.name, "gallery": size.gallery, "queries": size.queries}

    float_index, hamming_index = FloatIndex(LEVELS[0]), HammingIndex(LEVELS[0])
    pyramid = CoarseToFineIndex(LEVELS)
    row["build_s"] = {
        "float": best_of(1, lambda: float_index.add(gallery.floats))[0],
        "hamming": best_of(1, lambda: hamming_index.add(gallery.levels[0]))[0],
        "coarse_to_fine": best_of(1, lambda: pyramid.add(gallery.levels))[0],
    }
    row["fit_s"], pyramid.candidates = best_of(
        1,
        lambda: fit_candidates(
            pyramid,
            validation.levels,
            validation_gallery=validation_gallery.levels,
            target_recall=args.target_recall,
            k=1,
        ),
    )
    row["candidates"] = list(pyramid.candidates)

    searches = {
        "float": (lambda q: float_index.search(q, TOP_K), queries.floats),
        "hamming": (lambda q: hamming_index.search(q, TOP_K), queries.levels[0]),
        "coarse_to_fine": (lambda q: pyramid.search(q, TOP_K), queries.levels),
    }
    results, row["batched_ms"], row["single_ms"] = {}, {}, {}
    load = BackgroundLoad()
    for name, (search, query_input) in searches.items():
        seconds, results[name] = load.measure(lambda s=search, q=query_input: best_of(3, lambda: s(q)))
        row["batched_ms"][name] = 1e3 * seconds / size.queries
        single_input = query_input if name != "coarse_to_fine" else _LevelRows(query_input)
        seconds = load.measure(lambda s=search, q=single_input: single_query_seconds(s, q, args.single))
        row["single_ms"][name] = 1e3 * seconds
    row["background_cores"] = load.cores
    exact_top = results["hamming"][1]
    row["recall_at_1"] = recall(results["coarse_to_fine"][1][:, :1], exact_top[:, :1])
    row["recall_at_10"] = recall(results["coarse_to_fine"][1], exact_top)

    ids = (queries.pids, gallery.pids, queries.camids, gallery.camids)
    rows = max(1, (1 << 24) // size.gallery)
    row["r1_map"] = {
        "float": rank_quality(cosine_blocks(queries.floats, gallery.floats, rows), *ids),
        "hamming": rank_quality(hamming_blocks(queries.levels[0], gallery.levels[0], rows), *ids),
        "coarse_to_fine": rank_quality(pyramid.ranking_distances(queries.levels), *ids),
    }
    row["codes_mb"] = {"hamming": hamming_index.nbytes / 1e6, "coarse_to_fine": pyramid.nbytes / 1e6}
    row["resident_mb"] = {}
    for name, index in (("float", float_index), ("hamming", hamming_index), ("coarse_to_fine", pyramid)):
        index.save(workdir / name)
        row["resident_mb"][name] = resident_mb(workdir / name, args.threads)
    return row


class _LevelRows:
    """Row slicing of a list of per-level arrays, so single-query loops can slice pyramid queries."""

    def __init__(self, levels: list[np.ndarray]) -> None:
        self.levels = levels

    def __getitem__(self, rows: slice) -> list[np.ndarray]:
        return [level[rows] for level in self.levels]


def print_table(rows: list[dict]) -> None:
    print(
        "\n| size (gallery x queries) | method | batched ms/query | single ms/query | speed-up vs 2048-bit "
        "(batched / single) | R1 | mAP | resident MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    names = {
        "float": "2048-d float cosine",
        "hamming": "2048-bit Hamming",
        "coarse_to_fine": "coarse-to-fine",
    }
    for row in rows:
        base_batched, base_single = row["batched_ms"]["hamming"], row["single_ms"]["hamming"]
        for key, label in names.items():
            batched, single = row["batched_ms"][key], row["single_ms"][key]
            r1, mean_ap = row["r1_map"][key]
            print(
                f"| {row['size']} ({row['gallery']:,} x {row['queries']:,}) | {label} | {batched:.4f} | "
                f"{single:.4f} | {base_batched / batched:.2f}x / {base_single / single:.2f}x | {r1:.3f} | "
                f"{mean_ap:.3f} | {row['resident_mb'][key]:.1f} |"
            )
    for row in rows:
        codes = row["codes_mb"]
        print(
            f"\n{row['size']}: candidates {row['candidates']} (fitted in {row['fit_s']:.1f} s); recall of "
            f"the exact 2048-bit top-1 {row['recall_at_1']:.4f}, top-10 {row['recall_at_10']:.4f}; "
            "packed 2048-bit codes "
            f"{codes['hamming']:.1f} MB, pyramid codes {codes['coarse_to_fine']:.1f} MB; other processes "
            f"used {row['background_cores']:.2f} cores on average while timing; build s "
            + ", ".join(f"{k} {v:.2f}" for k, v in row["build_s"].items())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["msmt17", "market1501", "dukemtmcreid"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--validation", type=int, default=2000, help="validation queries for fit_candidates")
    parser.add_argument("--validation-gallery", type=int, default=4000, help="validation gallery images")
    parser.add_argument("--single", type=int, default=200, help="queries timed one call at a time")
    parser.add_argument("--target-recall", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads; "
        f"faiss {faiss.__version__}, numpy {np.__version__}, torch {torch.__version__}"
    )
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as workdir:
        for key in args.sizes:
            rows.append(run_size(SIZES[key], args, Path(workdir) / key))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
