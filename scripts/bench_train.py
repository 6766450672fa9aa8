"""Training throughput (images/s) of one table row: the model's ceiling against what the input pipeline feeds.

    python scripts/bench_train.py --row 1 --device cuda              # 256x128, batch 64, Market-sized set
    python scripts/bench_train.py --row 2 --device cpu --height 64 --width 32 --batch-size 8 --steps 3 --warmup 1

The training step is the real one: the row's config is composed from conf/ (hydra.compose, dataset=market1501
by default for the row's optimizer and loader settings) and turned into the LitReID module by
`agw_light.builders.build_module` (model, loss stack, Adam, and for rows 2 and 5 the teacher forward, from an
untrained row-1 teacher written for the run), then stepped by a Lightning Trainer. Two feeds, in one process:

- synthetic: one P x K batch of random tensors already on the device, so the figure is the model's ceiling;
  timed for every AMP on/off x channels_last on/off variant (`--variants`);
- real: the DataModule of `build_datamodule` on a generated set (JPEGs of `--source-height` x
  `--source-width`, Market-1501's own 128x64 by default, decoded and resized to the input size, PK sampling,
  the AGW augmentations) with `--workers` loader workers, at the `--amp` / `--channels-last` variant.

real / synthetic at the same variant says whether the input pipeline is the bottleneck (1.0: it keeps up).
Also measured: decode + augment images/s of one worker (one thread, the training transform, no model), and
from it the workers that would feed the best synthetic variant. Timings start after `--warmup` steps; peak
memory is the device's allocated peak on CUDA, the process's peak resident set on CPU. Losses are recorded
per step, so a longer real run (`--modes real --steps 300`) also says whether the loss falls.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import resource
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ROWS = {"1": "full", "2": "model", "3": "feat", "4": "search", "5": "all"}
DISTILLED = {"model", "all"}


class StepTimer(pl.Callback):
    """Wall-clock time from the end of the warm-up steps to the end of the last step, and every step's loss."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.done = 0
        self.marks: list[float] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())
        self.done += 1
        if self.done in (self.warmup, self.steps):  # only here: a sync every step would stall the GPU queue
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())


class SyntheticBatches:
    """`steps` times the same P x K batch of random images, already on the device (no input pipeline)."""

    def __init__(self, steps: int, batch_size: int, num_instances: int, num_classes: int, size, device) -> None:
        self.steps = steps
        pids = torch.arange(batch_size // num_instances).repeat_interleave(num_instances) % num_classes
        self.batch = {"image": torch.randn(batch_size, 3, *size, device=device), "pid": pids.to(device)}

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def compose(args: argparse.Namespace, row: str, workdir: Path, *extra: str):
    """The row's config from conf/, on the generated set at the benchmark's sizes."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from agw_light.cli import CONF_DIR

    overrides = [
        f"dataset={args.dataset}",
        f"light={row}",
        "dataset.name=synthetic",
        f"dataset.root={args.cache}",
        f"dataset.height={args.height}",
        f"dataset.width={args.width}",
        "dataset.check_images=false",
        f"++dataset.kwargs={{num_ids: {args.num_ids}, num_cams: {args.num_cams}, "
        f"images_per_id_cam: {args.images_per_id_cam}, height: {args.source_height}, width: {args.source_width}}}",
        "model.pretrained=none",
        f"loader.batch_size={args.batch_size}",
        f"output_dir={workdir}",
        *([f"loader.num_workers={args.workers}"] if args.workers is not None else []),
        *args.override,
        *extra,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def write_teacher(args: argparse.Namespace, workdir: Path, num_classes: int) -> Path:
    """An untrained row-1 checkpoint: rows 2 and 5 pay for the teacher forward, not for its accuracy."""
    from agw_light.builders import build_module

    teacher = build_module(compose(args, "full", workdir), num_classes)
    path = workdir / "teacher.ckpt"
    torch.save({"hyper_parameters": dict(teacher.hparams), "state_dict": teacher.state_dict()}, path)
    return path


def fit(
    cfg, num_classes: int, batches, *, steps: int, warmup: int, device: torch.device, amp: bool, amp_precision: str
) -> dict:
    """`steps` real training steps of the row; images/s, steps/s, peak memory and losses."""
    from agw_light.builders import build_module

    torch.manual_seed(0)
    module = build_module(cfg, num_classes)
    timer = StepTimer(warmup, steps, device)
    precision = amp_precision if amp else "32-true"
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=precision,
        max_steps=steps,
        # The schedule is defined in epochs: as many as the steps span, so the first steps get its real learning rate.
        max_epochs=max(1, math.ceil(steps / len(batches))),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, train_dataloaders=batches)
    seconds = timer.marks[-1] - timer.marks[0]
    timed = steps - warmup
    losses = torch.stack(timer.losses).float().cpu().tolist()
    window = max(1, len(losses) // 10)
    return {
        "precision": precision,
        "channels_last": bool(cfg.model.channels_last),
        "steps_per_s": timed / seconds,
        "images_per_s": timed * cfg.loader.batch_size / seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "loss_falls": sum(losses[-window:]) < sum(losses[:window]),
        "losses": losses,
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def pipeline_images_per_s(dataset, count: int) -> float:
    """Decode + augment images/s of one loader worker: the training dataset's items, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        dataset[0]  # imports torchvision's transforms
        start = time.perf_counter()
        for index in range(count):
            dataset[index % len(dataset)]
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def default_amp_precision(device: torch.device) -> str:
    """bf16 where the GPU supports it (no loss scaling), else fp16; bf16 on the CPU (Lightning's CPU AMP)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "16-mixed"
    return "bf16-mixed"


def variant_name(amp: bool, channels_last: bool) -> str:
    return f"amp={'on' if amp else 'off'},channels_last={'on' if channels_last else 'off'}"


def run(args: argparse.Namespace) -> dict:
    from agw_light.builders import build_datamodule

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    row = ROWS.get(args.row, args.row)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    result = {
        "row": row,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "input_size": [args.height, args.width],
        "source_size": [args.source_height, args.source_width],
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cfg = compose(args, row, workdir)
        datamodule = build_datamodule(cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
        num_classes = datamodule.num_classes
        result["train_images"] = len(datamodule.dataset.train)
        result["num_classes"] = num_classes
        result["workers"] = datamodule.num_workers
        if row in DISTILLED:
            cfg = compose(args, row, workdir, f"light.teacher_ckpt={write_teacher(args, workdir, num_classes)}")

        def row_cfg(variant_channels_last: bool):
            """The row's config with channels_last set explicitly (the config's own may be a device-dependent auto)."""
            variant = copy.deepcopy(cfg)
            variant.model.channels_last = variant_channels_last
            return variant

        amp_precision = args.amp_precision or default_amp_precision(device)
        result["amp_precision"] = amp_precision
        timing = dict(steps=args.steps, warmup=args.warmup, device=device, amp_precision=amp_precision)
        if "synthetic" in args.modes:
            result["synthetic"] = {}
            for variant in args.variants:
                v_amp, v_cl = (part == "on" for part in variant.split(","))
                batches = SyntheticBatches(
                    args.steps,
                    args.batch_size,
                    cfg.loader.num_instances,
                    num_classes,
                    (args.height, args.width),
                    device,
                )
                figures = fit(row_cfg(v_cl), num_classes, batches, amp=v_amp, **timing)
                result["synthetic"][variant_name(v_amp, v_cl)] = figures
                print(f"synthetic {variant_name(v_amp, v_cl)}: {figures['images_per_s']:.1f} images/s", flush=True)
        if "real" in args.modes:
            figures = fit(row_cfg(channels_last), num_classes, datamodule.train_dataloader(), amp=amp, **timing)
            figures["variant"] = variant_name(amp, channels_last)
            result["real"] = figures
            print(f"real pipeline {figures['variant']}: {figures['images_per_s']:.1f} images/s", flush=True)
            same = result.get("synthetic", {}).get(figures["variant"])
            if same is not None:
                result["real_over_synthetic"] = figures["images_per_s"] / same["images_per_s"]
        if args.pipeline_images > 0:
            per_worker = pipeline_images_per_s(datamodule.train_dataloader().dataset, args.pipeline_images)
            result["pipeline_images_per_s_per_worker"] = per_worker
            print(f"decode + augment, one worker: {per_worker:.1f} images/s", flush=True)
            if result.get("synthetic"):
                best = max(figures["images_per_s"] for figures in result["synthetic"].values())
                result["workers_to_feed_best_synthetic"] = math.ceil(best / per_worker)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", default="1", help="table row: 1-5 or full, model, feat, search, all")
    parser.add_argument("--dataset", default="market1501", help="conf/dataset entry whose settings the row takes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of the training process")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--source-height", type=int, default=128, help="generated JPEGs' height (Market: 128)")
    parser.add_argument("--source-width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, help="loader workers (default: conf/loader's num_workers)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-ids", type=int, default=751, help="generated training identities (Market: 751)")
    parser.add_argument("--num-cams", type=int, default=6)
    parser.add_argument("--images-per-id-cam", type=int, default=3)
    parser.add_argument("--cache", default=str(Path("~/.cache/agw_light/bench").expanduser()))
    parser.add_argument(
        "--modes",
        nargs="*",
        choices=["synthetic", "real"],
        default=["synthetic", "real"],
        help="none: only the per-worker figure",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["off,off", "off,on", "on,off", "on,on"],
        help="synthetic variants as amp,channels_last (on/off)",
    )
    toggle = argparse.BooleanOptionalAction
    parser.add_argument("--amp", action=toggle, help="real-pipeline variant (default: on for CUDA)")
    parser.add_argument("--channels-last", action=toggle, help="real-pipeline variant (default: on for CUDA)")
    parser.add_argument(
        "--amp-precision",
        choices=["16-mixed", "bf16-mixed"],
        help="AMP's Lightning precision (default: bf16 if supported)",
    )
    parser.add_argument("--pipeline-images", type=int, default=200, help="images for the per-worker figure (0: off)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides of the row's config")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    summary = {key: value for key, value in result.items() if key not in ("synthetic", "real")}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
