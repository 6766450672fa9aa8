"""Inference time per batch of 64 (the table's column) for the AGW ResNet-50 and the ResNet-18 student.

    python scripts/bench_inference.py                      # 256x128, batch 64, CPU, 2 threads, + onnxruntime
    python scripts/bench_inference.py --device cuda --amp  # on a GPU, fp16 autocast, channels_last

All models run in the same process on the same input, so the ratio to the first model is the figure to
compare across machines. Timings are medians of `--repeats` forward passes after two warm-up passes. On the
CPU each model also runs through onnxruntime as `agw_light.Encoder`'s default CPU backend does (the network
exported to ONNX in memory, a session with `--threads` intra-op threads), timed the same way, beside torch
eager: the "ort speed-up" is torch's time over onnxruntime's for the same model in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from agw_light.data.transforms import Preprocessing
from agw_light.evaluation import time_inference
from agw_light.inference import Encoder, onnxruntime_available
from agw_light.models import build_model

MODELS = {
    "AGW ResNet-50 (non-local, GeM, BNNeck)": dict(backbone="resnet50"),
    "ResNet-50 (last stride 1, GeM, BNNeck), no non-local": dict(backbone="resnet50", nonlocal_layers=[0, 0, 0, 0]),
    "ResNet-18 student (last stride 1, GeM, BNNeck)": dict(backbone="resnet18"),
}


def time_torch_and_onnxruntime(
    model: torch.nn.Module, *, height: int, width: int, batch_size: int, repeats: int, threads: int
) -> tuple[float, float]:
    """Median milliseconds per batch of torch eager and of the model's onnxruntime export, interleaved.

    `time_inference`'s procedure (two warm-up passes, median of `repeats`), with the two backends taking turns
    on the same input, so a neighbour's load on a shared machine falls on both alike.
    """
    encoder = Encoder.from_network(
        model, preprocessing=Preprocessing((height, width)), device="cpu", backend="onnxruntime", threads=threads
    )
    images = torch.randn(batch_size, 3, height, width)
    runs = {"torch": lambda: model(images), "onnxruntime": lambda: encoder(images)}
    timings: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for step in range(2 + repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if step >= 2:
                    timings[name].append(time.perf_counter() - start)
    return tuple(1000.0 * float(np.median(timings[name])) for name in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--amp", action="store_true", help="fp16 autocast and channels_last (GPU)")
    parser.add_argument("--no-onnxruntime", action="store_true", help="skip the onnxruntime column on the CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(
        f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{args.height}x{args.width}, amp {args.amp}, torch {torch.__version__}"
    )
    with_ort = device.type == "cpu" and not args.no_onnxruntime and onnxruntime_available()
    baseline = None
    for name, kwargs in MODELS.items():
        model = build_model(num_classes=751, pretrained="none", **kwargs).eval()
        if args.amp:
            model = model.to(memory_format=torch.channels_last)
        autocast = torch.autocast(device.type, dtype=torch.float16) if args.amp else contextlib.nullcontext()
        sizes = dict(height=args.height, width=args.width, batch_size=args.batch_size, repeats=args.repeats)
        if with_ort:
            ms, ort_ms = time_torch_and_onnxruntime(model, threads=args.threads, **sizes)
        else:
            with autocast:
                ms = time_inference(model, device=device, **sizes)
        baseline = baseline or ms
        line = f"{name:55s} {ms:9.1f} ms / batch  ({baseline / ms:4.2f}x the first)"
        if with_ort:
            line += f"  onnxruntime {ort_ms:9.1f} ms / batch  (ort speed-up {ms / ort_ms:4.2f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
