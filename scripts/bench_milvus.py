"""Benchmark of galleries on Milvus Lite against agw_light's in-process indexes, in one run, on CPU.

    python scripts/bench_milvus.py                          # 100k and 1M codes, 100k floats (about 15 minutes)
    python scripts/bench_milvus.py --code-sizes 100000 --float-size 0

Per gallery size: generated 2048-bit codes (with the 32..2048-bit pyramid of scripts/bench_search.py: sign
random projections of one latent embedding per image) searched by the in-process exact Hamming index, the
in-process coarse-to-fine index (`fit_candidates`), Milvus Lite exact (BIN_FLAT / HAMMING) and Milvus Lite
coarse-to-fine (`build_milvus_index`: the shortlist level and count that `fit_shortlist` fits, else the
exact scan); and, at `--float-size`, 2048-d floats: faiss inner product against Milvus Lite FLAT / IP.
Reported: build seconds (insert, or add + fit), ms per query with all queries in one call ("batched") and
one query per call ("single", mean over `--single`), recall of the exact top-10 and top-1, and peak memory:
for in-process indexes the growth of this process's peak RSS (VmHWM) while building, for Milvus Lite the
peak RSS of its server process (one per database file, so one per method).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import LEVELS, Generator, recall  # noqa: E402

TOP_K = 10
CAMERAS = 15
CHUNK = 50_000  # images generated at a time (a 2048-d projection of 1M images would take 8 GB)


def generate(generator: Generator, prototypes: np.ndarray, count: int, *, floats: bool):
    """(packed codes per level in LEVELS order, float features or None) for `count` images."""
    parts = [
        generator.split(prototypes, min(CHUNK, count - start), CAMERAS, floats=floats)
        for start in range(0, count, CHUNK)
    ]
    levels = [np.concatenate([part.levels[level] for part in parts]) for level in range(len(LEVELS))]
    features = np.concatenate([part.floats for part in parts]) if floats else None
    return levels, features


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lite_server_pid(db_file: Path) -> int:
    """The Milvus Lite server process serving `db_file` (its command line names the file)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(db_file) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    return int(entry.name)
            except OSError:
                continue
    raise RuntimeError(f"no Milvus Lite server process found for {db_file}")


def reset_peak() -> None:
    """Resets this process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def search(index, queries, k: int):
    return index.search(queries, k)


def measure(name: str, build, search, queries, exact: np.ndarray | None, single: int, server_file=None) -> dict:
    reset_peak()
    before = peak_rss_mb()
    start = time.perf_counter()
    index, ids = build()
    build_s = time.perf_counter() - start
    search(index, queries[:2] if isinstance(queries, np.ndarray) else [q[:2] for q in queries], TOP_K)  # warm up
    start = time.perf_counter()
    found = search(index, queries, TOP_K)[1]
    batched_ms = (time.perf_counter() - start) / len(found) * 1e3
    start = time.perf_counter()
    for row in range(single):
        search(
            index,
            queries[row : row + 1] if isinstance(queries, np.ndarray) else [q[row : row + 1] for q in queries],
            TOP_K,
        )
    single_ms = (time.perf_counter() - start) / single * 1e3
    if server_file is not None:
        peak = peak_rss_mb(lite_server_pid(server_file))
        found = np.where(found >= 0, np.searchsorted(ids, found), -1)  # ids grow with insertion order
    else:
        peak = peak_rss_mb() - before
    row = {
        "method": name,
        "build_s": round(build_s, 2),
        "batched_ms": round(batched_ms, 3),
        "single_ms": round(single_ms, 3),
        "recall_top10": None if exact is None else round(recall(found, exact), 4),
        "recall_top1": None if exact is None else round(float(np.mean(found[:, 0] == exact[:, 0])), 4),
        "peak_mb": round(peak, 1),
        "settings": getattr(index, "shortlist", None) or getattr(index, "candidates", None),
    }
    print(json.dumps(row), flush=True)
    return row, index, found


def run_codes(size: int, args, workdir: Path) -> list[dict]:
    from agw_light.search import CoarseToFineIndex, HammingIndex, fit_candidates
    from agw_light.search.fit import fit_shortlist
    from agw_light.search.milvus import MilvusIndex, milvus_search_cost

    generator = Generator(args.seed)
    test_ids = generator.prototypes(max(1, size // 25))
    gallery, _ = generate(generator, test_ids, size, floats=False)
    queries, _ = generate(generator, test_ids, args.queries, floats=False)
    train_ids = generator.prototypes(max(1, args.validation // 2))
    validation, _ = generate(generator, train_ids, args.validation, floats=False)
    validation_gallery, _ = generate(generator, train_ids, args.validation_gallery, floats=False)
    full = gallery[0]
    rows = []

    def build_exact():
        index = HammingIndex(LEVELS[0])
        index.add(full)
        return index, None

    exact_row, exact_index, exact = measure("in-process exact", build_exact, search, queries[0], None, args.single)
    exact_row["recall_top10"] = exact_row["recall_top1"] = 1.0
    rows.append(exact_row)
    del exact_index

    def build_c2f():
        index = CoarseToFineIndex.from_stage_codes(LEVELS, gallery[::-1])
        index.candidates = fit_candidates(index, validation, validation_gallery=validation_gallery)
        return index, None

    rows.append(measure("in-process coarse-to-fine", build_c2f, search, queries, exact, args.single)[0])

    for name, pyramid, query_codes in (
        ("Milvus Lite exact", False, queries[0]),
        ("Milvus Lite coarse-to-fine", True, queries),
    ):
        file = workdir / f"{size}-{'c2f' if pyramid else 'exact'}.db"

        def build(file=file, pyramid=pyramid):
            # As build_milvus_index builds it, with the ids add returns kept for the recall.
            if not pyramid:
                index = MilvusIndex.create(str(file), "codes", code_lengths=[LEVELS[0]])
                return index, index.add(full)
            local = CoarseToFineIndex.from_stage_codes(LEVELS, gallery[::-1])
            shortlist = fit_shortlist(
                local, validation, milvus_search_cost(size), validation_gallery=validation_gallery
            )
            index = MilvusIndex.create(str(file), "codes", code_lengths=LEVELS, shortlist=shortlist)
            return index, index.add(gallery)

        row, index, _ = measure(name, build, search, query_codes, exact, args.single, server_file=file)
        index.close()
        rows.append(row)
    return [{"size": size, "kind": "2048-bit codes", **row} for row in rows]


def run_floats(size: int, args, workdir: Path) -> list[dict]:
    from agw_light.search import FloatIndex
    from agw_light.search.milvus import MilvusIndex

    generator = Generator(args.seed + 1)
    test_ids = generator.prototypes(max(1, size // 25))
    _, gallery = generate(generator, test_ids, size, floats=True)
    _, queries = generate(generator, test_ids, args.queries, floats=True)

    def build_faiss():
        index = FloatIndex(gallery.shape[1])
        index.add(gallery)
        return index, None

    exact_row, faiss_index, exact = measure(
        "in-process exact (faiss IP)", build_faiss, search, queries, None, args.single
    )
    exact_row["recall_top10"] = exact_row["recall_top1"] = 1.0
    del faiss_index
    file = workdir / f"{size}-float.db"

    def build_lite():
        index = MilvusIndex.create(str(file), "floats", dim=gallery.shape[1])
        return index, index.add(gallery)

    row, index, _ = measure(
        "Milvus Lite exact (FLAT IP)", build_lite, search, queries, exact, args.single, server_file=file
    )
    index.close()
    return [{"size": size, "kind": "2048-d floats", **r} for r in (exact_row, row)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--float-size", type=int, default=100_000, help="0 skips the float rows")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--single", type=int, default=50, help="queries timed one call at a time")
    parser.add_argument("--validation", type=int, default=500, help="validation queries for the fits")
    parser.add_argument("--validation-gallery", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    import pymilvus

    header = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "pymilvus": pymilvus.__version__,
        "queries": args.queries,
        "single": args.single,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as folder:
        for size in args.code_sizes:
            rows += run_codes(size, args, Path(folder))
        if args.float_size:
            rows += run_floats(args.float_size, args, Path(folder))
    print("| gallery | method | build s | batched ms/q | single ms/q | recall top-10 | recall top-1 | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['size']:,} {row['kind']} | {row['method']} | {row['build_s']} | {row['batched_ms']} | "
            f"{row['single_ms']} | {row['recall_top10']} | {row['recall_top1']} | {row['peak_mb']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({**header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
