"""The GPU check (run by scripts/gpu_check.sh): every device figure docs/benchmarks.md asks for, in one process.

    python scripts/gpu_check.py --out gpu_check_out            # on a GPU box (about 5 minutes)
    python scripts/gpu_check.py --out /tmp/check --tiny        # CPU, tiny sizes: the end-to-end test

Writes <out>/gpu_check.json and <out>/gpu_check.md:
- train: scripts/bench_train.py for rows 1 and 2 (synthetic tensors per AMP x channels_last variant, the real
  input pipeline, peak memory, decode + augment images/s per worker);
- inference: ms per batch (`agw_light.evaluation.time_inference`) of every row's model, fp32 and fp16 autocast
  (bfloat16 on CPU) with channels_last, as scripts/bench_inference.py times them;
- search: scripts/bench_search.py's exact and coarse-to-fine search at MSMT17 gallery size (faiss on the host's
  CPU: agw_light.search has no GPU index), plus an exact float cosine top-10 as one matrix product on the device;
- loss: a 300-step real-pipeline training of row 1 on a generated Market-sized set, and whether its loss falls.
The sizes come from one table (FULL or TINY), so the tiny run exercises the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search  # noqa: E402  (the scripts folder is not a package)
import bench_train  # noqa: E402

ROW_NAMES = ["full", "model", "feat", "search", "all"]

FULL = {
    "data": ["--num-ids", "751", "--num-cams", "6", "--images-per-id-cam", "3"],  # Market-sized: 13.5k images
    "bench": ["--steps", "40", "--warmup", "10", "--pipeline-images", "500"],
    "inference": {"height": 256, "width": 128, "batch_size": 64, "repeats": 10},
    "search": bench_search.SIZES["msmt17"],
    "search_args": {"validation": 2000, "validation_gallery": 4000, "single": 200},
    "loss_steps": 300,
}
TINY = {
    "data": [
        *["--height", "64", "--width", "32", "--source-height", "64", "--source-width", "32", "--batch-size", "8"],
        *["--num-ids", "16", "--num-cams", "2", "--images-per-id-cam", "4", "--workers", "1"],
        *["--override", "model.backbone=resnet18"],  # rows 1's ResNet-50 (and row 2's teacher) made small
    ],
    "bench": ["--steps", "3", "--warmup", "1", "--pipeline-images", "20", "--variants", "off,off", "on,on"],
    "inference": {"height": 64, "width": 32, "batch_size": 8, "repeats": 1},
    "search": bench_search.Size("tiny", 2_000, 50, 100, 4, 50),
    "search_args": {"validation": 50, "validation_gallery": 500, "single": 5},
    "loss_steps": 6,
}


def bench_rows(sizes: dict, device: str, cache: str) -> dict:
    """bench_train for rows 1 and 2: every synthetic variant, the real pipeline, the per-worker figure."""
    results = {}
    for row in ("1", "2"):
        argv = ["--row", row, "--device", device, "--cache", cache, *sizes["data"], *sizes["bench"]]
        results[row] = bench_train.run(bench_train.parse_args(argv))
    return results


def inference(sizes: dict, device: torch.device, cache: str) -> dict:
    """Milliseconds per batch of every row's network, fp32 and half-precision autocast with channels_last."""
    from agw_light.evaluation import time_inference
    from agw_light.inference.checkpoint import network_arguments
    from agw_light.models import build_model

    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    args = bench_train.parse_args(["--cache", cache, *sizes["data"]])
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for row in ROW_NAMES:
            recorded = OmegaConf.to_container(bench_train.compose(args, row, Path(workdir)).model, resolve=True)
            kwargs = network_arguments(recorded)  # build_model's arguments, without LitReID's training options
            model = build_model(num_classes=751, **kwargs)
            timings = {}
            for precision in ("fp32", "fp16"):
                autocast = contextlib.nullcontext()
                if precision == "fp16":
                    model = model.to(memory_format=torch.channels_last)
                    autocast = torch.autocast(device.type, dtype=half)
                with autocast:
                    timings[precision] = time_inference(model, device=device, **sizes["inference"])
            results[row] = {"backbone": kwargs["backbone"], "neck": kwargs["neck"], **timings}
            print(f"inference {row}: {timings}", flush=True)
    return results


def search(sizes: dict, device: torch.device) -> dict:
    """bench_search's exact and coarse-to-fine search at the size, and an exact cosine top-10 on the device."""
    size = sizes["search"]
    args = argparse.Namespace(seed=0, target_recall=0.99, threads=os.cpu_count(), **sizes["search_args"])
    with tempfile.TemporaryDirectory() as workdir:
        row = bench_search.run_size(size, args, Path(workdir))
    gallery = torch.nn.functional.normalize(torch.randn(size.gallery, bench_search.LEVELS[0], device=device), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(size.queries, bench_search.LEVELS[0], device=device), dim=1)
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        torch.topk(queries @ gallery.T, bench_search.TOP_K, dim=1)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    row["device_exact_float_batched_ms"] = 1e3 * best / size.queries
    return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_check(sizes: dict, device: str, cache: str) -> dict:
    """Row 1 trained `loss_steps` steps through the real pipeline: does its loss fall?"""
    steps = str(sizes["loss_steps"])
    argv = ["--row", "1", "--device", device, "--cache", cache, *sizes["data"], "--modes", "real"]
    result = bench_train.run(
        bench_train.parse_args([*argv, "--steps", steps, "--warmup", "1", "--pipeline-images", "0"])
    )
    return {key: result[key] for key in ("train_images", "num_classes", "workers")} | result["real"]


def markdown(report: dict) -> str:
    """The summary docs/benchmarks.md takes its figures from."""
    lines = [
        f"# GPU check: {report['device']}",
        "",
        f"torch {report['torch']}, {report['cpus']} CPUs, sizes: {report['sizes']}, {report['seconds']:.0f} s in all "
        f"({', '.join(f'{name} {seconds:.0f} s' for name, seconds in report['section_seconds'].items())}).",
        "",
        "## Training throughput (images/s)",
        "",
        "| row | feed | variant | images/s | steps/s | peak memory MB |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row, result in report["train"].items():
        feeds = [("synthetic", variant, figures) for variant, figures in result.get("synthetic", {}).items()]
        feeds.append((f"real, {result['workers']} workers", result["real"]["variant"], result["real"]))
        for feed, variant, figures in feeds:
            lines.append(
                f"| {row} | {feed} | {variant} ({figures['precision']}) | {figures['images_per_s']:.1f} "
                f"| {figures['steps_per_s']:.2f} | {figures['peak_memory_mb']:.0f} |"
            )
    lines += [""]
    for row, result in report["train"].items():
        lines.append(
            f"Row {row}: real / synthetic {result.get('real_over_synthetic', float('nan')):.2f}; decode + augment "
            f"{result['pipeline_images_per_s_per_worker']:.0f} images/s per worker; workers to feed the best "
            f"synthetic variant: {result.get('workers_to_feed_best_synthetic')}."
        )
    lines += [
        "",
        "## Inference, ms per batch",
        "",
        "| row | backbone | neck | fp32 | fp16 |",
        "|---|---|---|---:|---:|",
    ]
    for number, (row, figures) in enumerate(report["inference"].items(), start=1):
        lines.append(
            f"| {number} ({row}) | {figures['backbone']} | {figures['neck']} | {figures['fp32']:.1f} "
            f"| {figures['fp16']:.1f} |"
        )
    found = report["search"]
    lines += [
        "",
        f"## Search at {found['size']} size ({found['gallery']} gallery, {found['queries']} queries)",
        "",
        "| method | batched ms/query | single ms/query |",
        "|---|---:|---:|",
        *(
            f"| {name} (faiss, host CPU) | {found['batched_ms'][name]:.3f} | {found['single_ms'][name]:.3f} |"
            for name in found["batched_ms"]
        ),
        f"| exact float cosine, one matmul + top-k on the device | {found['device_exact_float_batched_ms']:.4f} | |",
        "",
        f"Coarse-to-fine recall of the exact top-1: {found['recall_at_1']:.3f}.",
        "",
    ]
    loss = report["loss"]
    lines += [
        f"## Row 1, {len(loss['losses'])} steps on a generated set of {loss['train_images']} training images",
        "",
        f"Loss {loss['loss_first']:.3f} (first tenth) -> {loss['loss_last']:.3f} (last tenth): "
        f"{'falls' if loss['loss_falls'] else 'does NOT fall'}; {loss['images_per_s']:.1f} images/s "
        f"({loss['variant']}, {loss['workers']} workers).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (the end-to-end test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default=str(Path("~/.cache/agw_light/bench").expanduser()))
    args = parser.parse_args()
    sizes = TINY if args.tiny else FULL
    device = torch.device(args.device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "sizes": "tiny" if args.tiny else "full",
        "section_seconds": {},
    }
    sections = {
        "train": lambda: bench_rows(sizes, args.device, args.cache),
        "inference": lambda: inference(sizes, device, args.cache),
        "search": lambda: search(sizes, device),
        "loss": lambda: loss_check(sizes, args.device, args.cache),
    }
    for name, section in sections.items():
        start = time.perf_counter()
        report[name] = section()
        report["section_seconds"][name] = time.perf_counter() - start
    report["seconds"] = sum(report["section_seconds"].values())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
