"""Benchmark of the gallery search service: single-image queries over HTTP against a Market-sized index.

    python scripts/bench_serve.py                     # rows 5 and 1, 15,913 gallery items, 256x128 queries
    python scripts/bench_serve.py --rows 5 --requests 50

Per table row: a randomly initialised checkpoint of the row's network (the encoder is real: ResNet-18 with
the code pyramid for row 5, the AGW ResNet-50 with its 2048-d feature for row 1), a gallery of
`--gallery` items whose features are generated (the row's index kind and width, not the model's outputs:
pyramid codes are sign projections of one shared latent per item, so the coarse-to-fine fit finds the
structure a trained pyramid has), saved with `search build`'s record. `python -m agw_light.serve` runs in a
subprocess; clients POST one JPEG query each (`--query-size`, Market's 128x64 by default) from 1 and from
`--concurrency` threads. Reported: requests/s, p50 and p95 latency, and the baseline of the same query
answered in-process (decode + encode + search, `GallerySearch.search`, no HTTP) in the same run; the
service's overhead is the ratio. Server, clients and baseline share the machine's cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    1: {"backbone": "resnet50", "neck": "bnneck"},
    5: {"backbone": "resnet18", "neck": "pyramid"},
}
LATENT_DIM = 64


def make_checkpoint(folder: Path, row: int, image_size: tuple[int, int]) -> Path:
    import torch

    from agw_light.lit.module import LitReID

    torch.manual_seed(0)
    model = {**ROWS[row], "pretrained": "none"}
    losses = [{"name": "ce", "type": "cross_entropy", "output": "logits"}]
    module = LitReID(model=model, losses=losses, num_classes=751, image_size=image_size)
    path = folder / f"row{row}.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def generated_features(count: int, width: int, code_lengths, rng: np.random.Generator) -> np.ndarray:
    """Gallery outputs of the row's shape: float features, or +-1 codes projected from one latent per item."""
    if not code_lengths:
        return rng.standard_normal((count, width), dtype=np.float32)
    latent = rng.standard_normal((count, LATENT_DIM), dtype=np.float32)
    levels = [np.sign(latent @ rng.standard_normal((LATENT_DIM, bits), dtype=np.float32)) for bits in code_lengths]
    return np.concatenate(levels, axis=1)


def build_index(folder: Path, ckpt: Path, count: int, image_size: tuple[int, int]) -> tuple[Path, str]:
    import torch

    from agw_light.files import file_sha256
    from agw_light.inference import Encoder
    from agw_light.search import GalleryMetadata
    from agw_light.search import build_index as build

    encoder = Encoder.from_checkpoint(ckpt, device="cpu", backend="torch")
    width = encoder(torch.zeros(1, 3, *image_size)).shape[1]
    rng = np.random.default_rng(0)
    features = generated_features(count, width, encoder.code_lengths, rng)
    names = [f"{i % 1501:04d}_c{i % 6 + 1}s1_{i:06d}_00.jpg" for i in range(count)]
    metadata = GalleryMetadata(
        [str(folder / "gallery" / n) for n in names], [i % 1501 for i in range(count)], [i % 6 for i in range(count)]
    )
    fit = features[rng.permutation(count)[:1000]]
    index = build(features, encoder.code_lengths, metadata=metadata, fit_queries=fit, target_recall=0.99)
    record = {"checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(ckpt), "image_size": list(image_size)}
    index.save(folder / "index", record=record)
    return folder / "index", index.kind


def query_jpeg(size: tuple[int, int]) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, port: int, backend: str, run_dir: Path) -> subprocess.Popen:
    import httpx

    command = [
        sys.executable,
        "-m",
        "agw_light.serve",
        f"index={index}",
        f"port={port}",
        f"backend={backend}",
        "device=cpu",
        "log_level=warning",
        f"hydra.run.dir={run_dir}",
    ]
    server = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(run_dir.parent / "server.log", "w")
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}): see {run_dir.parent / 'server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not answer /health within 10 minutes")


def load_test(url: str, image: bytes, requests: int, concurrency: int) -> dict:
    """`requests` POSTs from `concurrency` threads, each with its own connection; latency per request."""
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def client(count: int) -> None:
        with httpx.Client(timeout=120) as session:
            for _ in range(count):
                started = time.perf_counter()
                response = session.post(f"{url}/search", params={"k": 10}, files={"image": ("q.jpg", image)})
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(count,)) for count in per_thread]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return summary(latencies, wall) | {"concurrency": concurrency}


def summary(latencies: list[float], wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
    }


def in_process_baseline(index: Path, image: bytes, requests: int, backend: str) -> dict:
    """Latency of `GallerySearch.search` on the decoded query, no HTTP, in a fresh process like the server.

    The queries run on a worker thread, as the service runs them: on this shared 2-core machine the same
    query took up to 2.6 times longer on a process's main thread (torch backend, 64x32: 129 ms against 49 ms).
    """
    from concurrent.futures import ThreadPoolExecutor

    from agw_light.service.gallery import GallerySearch, decode_query

    gallery = GallerySearch.open(index, device="cpu", backend=backend)

    def timed_query() -> float:
        begin = time.perf_counter()
        gallery.search(decode_query(image, len(image)), 10)
        return time.perf_counter() - begin

    with ThreadPoolExecutor(max_workers=1) as worker:
        for _ in range(3):
            worker.submit(timed_query).result()
        started = time.perf_counter()
        latencies = [worker.submit(timed_query).result() for _ in range(requests)]
        wall = time.perf_counter() - started
    return summary(latencies, wall) | {"backend": gallery.encoder.backend}


def baseline_in_a_fresh_process(index: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--in-process",
        str(index),
        "--requests",
        str(args.requests),
        "--backend",
        args.backend,
        "--query-size",
        *map(str, args.query_size),
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_row(row: int, args: argparse.Namespace, folder: Path) -> dict:
    image_size = (args.height, args.width)
    ckpt = make_checkpoint(folder, row, image_size)
    index, kind = build_index(folder, ckpt, args.gallery, image_size)
    image = query_jpeg(tuple(args.query_size))
    baseline = baseline_in_a_fresh_process(index, args)
    port = free_port()
    server = start_server(index, port, args.backend, folder / "run")
    try:
        url = f"http://127.0.0.1:{port}"
        load_test(url, image, args.warmup, 1)
        http = [load_test(url, image, args.requests, c) for c in (1, args.concurrency)]
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {
        "row": row,
        **ROWS[row],
        "index_kind": kind,
        "gallery": args.gallery,
        "image_size": list(image_size),
        "http": http,
        "in_process": baseline,
        "http_over_in_process_p50": round(http[0]["p50_ms"] / baseline["p50_ms"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="5,1", help="table rows to serve, comma-separated (1 and/or 5)")
    parser.add_argument("--gallery", type=int, default=15_913, help="gallery items (Market-1501 test gallery)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--query-size", type=int, nargs=2, default=[128, 64], help="query JPEG height width")
    parser.add_argument("--requests", type=int, default=100, help="requests per load level")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4, help="client threads of the second load level")
    parser.add_argument("--backend", default="auto", help="the service's encoder backend: auto | torch | onnxruntime")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--in-process", type=Path, help=argparse.SUPPRESS)  # the baseline's own process
    args = parser.parse_args()
    if args.in_process:
        image = query_jpeg(tuple(args.query_size))
        print(json.dumps(in_process_baseline(args.in_process, image, args.requests, args.backend)))
        return

    import torch

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}",
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for row in [int(r) for r in args.rows.split(",")]:
            folder = Path(tmp) / f"row{row}"
            folder.mkdir()
            results["rows"].append(bench_row(row, args, folder))
            print(json.dumps(results["rows"][-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("| row | index | encoder backend | clients | requests/s | p50 ms | p95 ms | in-process p50 ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results["rows"]:
        base = result["in_process"]
        for level in result["http"]:
            print(
                f"| {result['row']} ({result['backbone']}, {result['neck']}) | {result['index_kind']} "
                f"{result['gallery']} | {base['backend']} | {level['concurrency']} | {level['requests_per_s']} | "
                f"{level['p50_ms']} | {level['p95_ms']} | {base['p50_ms']} | "
                f"{level['p50_ms'] / base['p50_ms']:.2f} |"
            )


if __name__ == "__main__":
    main()
