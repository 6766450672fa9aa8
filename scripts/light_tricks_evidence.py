"""Do the light tricks do what light-reid claims? Distillation and pyramid self-distillation, 3 seeds each.

On the generated set (the CPU demo's settings, `python -m agw_light.train` defaults) it trains:

- kd: a teacher clearly stronger than the student (ResNet-34, 30 epochs instead of 16), then the ResNet-18
  student at the demo's budget (16 epochs) with KD (`light=model`) and without (`light=full`), per seed;
- sd: the code pyramid (`light=search`, ResNet-18, 10 epochs) with light-reid's probability and similarity
  self-distillation and with both weights at 0, per seed; per level, the exact Hamming R1 of each code
  length is computed from the checkpoint, besides the coarse-to-fine row and its fitted candidate counts.

Every run is a plain `python -m agw_light.train` (its command is printed and kept in `commands.txt`);
nothing is chosen on test data: every row reports its last epoch (eval.select=last). Then

    python scripts/light_tricks_evidence.py summarize --out DIR

prints the tables (mean and standard deviation over seeds) that docs/results.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

SHORT_LENGTHS = (128, 64, 32)
TEACHER = ["light=full", "model.backbone=resnet34", "trainer.max_epochs=30", "optim.milestones=[20,26]"]
# The pyramid at 10 epochs instead of the demo's 16, to fit 6 runs in the CPU budget.
SD_BUDGET = [
    "model.backbone=resnet18",
    "trainer.max_epochs=10",
    "optim.milestones=[6,9]",
    "trainer.check_val_every_n_epoch=5",
]
VARIANTS = {
    "kd": {
        "no_kd": ["light=full", "model.backbone=resnet18"],
        "kd": ["light=model", "model.backbone=resnet18", "light.teacher_ckpt={teacher}"],
    },
    "sd": {
        "self_distill": ["light=search", *SD_BUDGET],
        "no_self_distill": [
            "light=search",
            *SD_BUDGET,
            "light.prob_self_distill_weight=0",
            "light.sim_self_distill_weight=0",
        ],
    },
}


def train(run_dir: Path, overrides: list[str], log: Path) -> None:
    """One training run into `run_dir` (skipped when it already holds its metrics.json)."""
    if (run_dir / "metrics.json").is_file():
        return
    command = [sys.executable, "-m", "agw_light.train", *overrides, f"hydra.run.dir={run_dir}"]
    with log.open("a") as handle:
        handle.write(shlex.join(command) + "\n")
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def run(out: Path, experiments: list[str], seeds: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.txt"
    for experiment in experiments:
        teacher = out / "kd" / "teacher"
        if experiment == "kd":
            train(teacher, TEACHER, log)
        for seed in seeds:
            for name, overrides in VARIANTS[experiment].items():
                filled = [override.format(teacher=teacher) for override in overrides]
                train(out / experiment / name / f"seed{seed}", [*filled, f"seed={seed}"], log)


def level_r1(checkpoint: str) -> dict[int, float]:
    """Exact Hamming R1 of each code length of a pyramid checkpoint on the generated test split."""
    import torch
    from hydra import compose, initialize_config_dir

    from agw_light.builders import build_datamodule
    from agw_light.cli import CONF_DIR
    from agw_light.evaluation import evaluate_features, extract_features
    from agw_light.inference.checkpoint import load_checkpoint

    network = load_checkpoint(checkpoint).network
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["loader.num_workers=0"])
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    outputs = extract_features(network, datamodule.query_gallery_dataloader(), torch.device("cpu"))
    results, start = {}, 0
    for length in network.code_lengths:
        codes = outputs["features"][:, start : start + length]
        start += length
        ranked = evaluate_features(codes, outputs["pids"], outputs["camids"], outputs["is_query"], distance="hamming")
        results[length] = ranked["R1"]
    return results


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {deviation:.3f}"


def summarize(out: Path) -> None:
    teacher = out / "kd" / "teacher" / "metrics.json"
    if teacher.is_file():
        row = json.loads(teacher.read_text())
        print(f"teacher (ResNet-34, 30 epochs): R1 {row['R1']:.3f}  mAP {row['mAP']:.3f}  mINP {row['mINP']:.3f}\n")
    for experiment, variants in VARIANTS.items():
        rows = {}
        for name in variants:
            runs = sorted((out / experiment / name).glob("seed*/metrics.json"))
            if runs:
                rows[name] = [json.loads(path.read_text()) for path in runs]
        if not rows:
            continue
        if experiment == "kd":
            print("| student | seeds | R1 | mAP | mINP |\n|---|---|---|---|---|")
            for name, metrics in rows.items():
                cells = [spread([m[key] for m in metrics]) for key in ("R1", "mAP", "mINP")]
                print(f"| {name} | {len(metrics)} | " + " | ".join(cells) + " |")
        else:
            header = " | ".join(f"R1 {length} bits" for length in SHORT_LENGTHS)
            print(f"| pyramid | seeds | {header} | R1 2048 bits | coarse-to-fine R1 | mAP | candidates |")
            print("|---" * (6 + len(SHORT_LENGTHS)) + "|")
            for name, metrics in rows.items():
                levels = [level_r1(m["checkpoint"]) for m in metrics]
                cells = [spread([level[length] for level in levels]) for length in (*SHORT_LENGTHS, 2048)]
                cells += [spread([m[key] for m in metrics]) for key in ("R1", "mAP")]
                cells.append("; ".join("-".join(map(str, m["candidates"])) for m in metrics))
                print(f"| {name} | {len(metrics)} | " + " | ".join(cells) + " |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "summarize"))
    parser.add_argument("--out", type=Path, default=Path("evidence"))
    parser.add_argument("--experiments", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.action == "run":
        run(args.out, args.experiments, args.seeds)
    else:
        summarize(args.out)


if __name__ == "__main__":
    main()
