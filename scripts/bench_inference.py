"""Inference time per batch of 64 (the table's column) for the AGW ResNet-50 and the ResNet-18 student.

    python scripts/bench_inference.py                      # 256x128, batch 64, CPU, 2 threads
    python scripts/bench_inference.py --device cuda --amp  # on a GPU, fp16 autocast, channels_last

All models run in the same process on the same input, so the ratio to the first model is the figure to
compare across machines. Timings are medians of `--repeats` forward passes after two warm-up passes.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from agw_light.evaluation import time_inference
from agw_light.models import build_model

MODELS = {
    "AGW ResNet-50 (non-local, GeM, BNNeck)": dict(backbone="resnet50"),
    "ResNet-50 (last stride 1, GeM, BNNeck), no non-local": dict(backbone="resnet50", nonlocal_layers=[0, 0, 0, 0]),
    "ResNet-18 student (last stride 1, GeM, BNNeck)": dict(backbone="resnet18"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--amp", action="store_true", help="fp16 autocast and channels_last (GPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(
        f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{args.height}x{args.width}, amp {args.amp}, torch {torch.__version__}"
    )
    baseline = None
    for name, kwargs in MODELS.items():
        model = build_model(num_classes=751, pretrained="none", **kwargs).eval()
        if args.amp:
            model = model.to(memory_format=torch.channels_last)
        autocast = torch.autocast(device.type, dtype=torch.float16) if args.amp else contextlib.nullcontext()
        with autocast:
            ms = time_inference(
                model,
                height=args.height,
                width=args.width,
                device=device,
                batch_size=args.batch_size,
                repeats=args.repeats,
            )
        baseline = baseline or ms
        print(f"{name:55s} {ms:9.1f} ms / batch  ({baseline / ms:4.2f}x the first)")


if __name__ == "__main__":
    main()
