"""Experiment tracking and sweeps (docs/tracking.md): each logger read back, the Optuna search on held-out
identities, the debug configs, the table and seed configs."""

from __future__ import annotations

import csv
import json
import math
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ONE_EPOCH, TINY_DATA
from omegaconf import OmegaConf

from agw_light.builders import build_loggers
from agw_light.cli.train import train
from agw_light.tuning import apply_tuned, check_objective

# Two training batches, no pictures, the inference timing on one image, a small fit: the cheapest run that
# still goes end to end.
CHEAP = [
    *ONE_EPOCH,
    "++trainer.limit_train_batches=2",
    "visualize.num_queries=0",
    "visualize.embedding_size=0",
    "eval.timing_batch_size=1",
    "eval.fit_images=64",
]
ALL_LOGGERS = "logger=[tensorboard,csv,mlflow,wandb]"
# conf/debug/overfit.yaml, shortened to one batch of 2 identities x 4 images fit 4 times; CHEAP validates every
# epoch, so the overfit config's no-validation is restored.
OVERFIT = [
    "debug=overfit",
    "trainer.overfit_batches=1",
    "trainer.max_epochs=4",
    "trainer.check_val_every_n_epoch=100",
    "logger=csv",
    "loader.batch_size=8",
]


def _compose(cache: Path, out_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from agw_light.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="config", overrides=[f"dataset.root={cache}", *TINY_DATA, f"output_dir={out_dir}", *overrides]
        )


@pytest.fixture(scope="module")
def tracked_run(synthetic_cache, tmp_path_factory):
    """(run folder, metrics row) of one cheap run logging to all four trackers at once."""
    out_dir = tmp_path_factory.mktemp("tracked") / "run"
    row = train(_compose(synthetic_cache, out_dir, *CHEAP, ALL_LOGGERS))
    return out_dir, row


@pytest.mark.slow
def test_tensorboard_holds_training_and_final_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir, row = tracked_run
    events = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"train/loss", "test/mAP", "final/mAP"} <= set(events.Tags()["scalars"])
    assert events.Scalars("final/mAP")[-1].value == pytest.approx(row["mAP"], rel=1e-6)


@pytest.mark.slow
def test_csv_holds_every_step_and_the_final_row(tracked_run):
    out_dir, row = tracked_run
    with open(out_dir / "csv" / "metrics.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    losses = [float(line["train/loss"]) for line in lines if line.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)  # limit_train_batches=2
    finals = [float(line["final/R1"]) for line in lines if line.get("final/R1")]
    assert finals == [pytest.approx(row["R1"])]


@pytest.mark.slow
def test_mlflow_records_config_metrics_metrics_json_and_checkpoint(tracked_run):
    from mlflow.tracking import MlflowClient

    out_dir, row = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("agw_light").experiment_id])
    assert run.info.run_name == "synthetic-full" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["config/model/backbone"] == "resnet18" and params["config/optim/lr"] == "0.001"
    assert params["config/logger/mlflow/experiment_name"] == "agw_light"
    assert run.data.metrics["final/mAP"] == pytest.approx(row["mAP"])
    assert run.data.metrics["test/mAP"] == pytest.approx(row["mAP"], abs=1e-6)  # last epoch reported
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert run.data.tags["checkpoint"] == row["checkpoint"]
    assert run.data.tags["checkpoint_sha256"] == row["checkpoint_sha256"]
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(out_dir)  # not ./mlruns
    artifact = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(out_dir / "downloaded")))
    assert json.loads(artifact.read_text()) == json.loads((out_dir / "metrics.json").read_text())


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file: LevelDB's log format (32 KiB blocks of chunks, each
    with a 7-byte header: CRC, length, type) after W&B's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    raw, block, position, pending = path.read_bytes(), 32768, 7, b""
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        data, position = raw[position + 7 : position + 7 + length], position + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_key(item) -> str:
    """A record item's metric name: W&B stores a name holding "/" as its parts (nested_key)."""
    return item.key or "/".join(item.nested_key)


@pytest.mark.slow
def test_wandb_runs_offline_and_records_metrics_and_checkpoint(tracked_run):
    out_dir, row = tracked_run
    (run_file,) = (out_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary = {}, {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history.setdefault(_wandb_key(item), []).append(json.loads(item.value_json))
        elif kind == "summary":
            summary.update({_wandb_key(item): json.loads(item.value_json) for item in record.summary.update})
    assert len(history["train/loss"]) == 2
    assert history["final/mAP"] == [pytest.approx(row["mAP"])]
    assert summary["checkpoint_sha256"] == row["checkpoint_sha256"]
    assert (run_file.parent / "files" / "metrics.json").is_file()


def test_unknown_logger_is_named(compose_config):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Could not load 'logger/nope'"):
        compose_config("logger=[tensorboard,nope]")


def test_a_tracker_not_installed_names_the_extra(compose_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"logger=wandb needs the wandb package.*agw_light\[tracking\]"):
        build_loggers(compose_config("logger=[csv,wandb]"))


def test_an_unreachable_tracking_server_fails_before_training(compose_config, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = compose_config("logger=mlflow", f"logger.mlflow.tracking_uri=http://127.0.0.1:{port}", *CHEAP)
    with pytest.raises(ConnectionError, match=f"tracking_uri=http://127.0.0.1:{port}.*does not answer"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert "ConnectionError" in (tmp_path / "run" / "error.txt").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimized_metric=test/mAP", "eval.select=val_split"], "must not be steered by the test split"),
        (["optimized_metric=val/accuracy", "eval.select=val_split"], "never logs it"),
        (["optimized_metric=train/loss", "eval.select=val_split"], "never logs it"),
        (["optimized_metric=val/mAP", "eval.select=last"], "only with eval.select=val_split"),
    ],
)
def test_a_search_objective_it_must_not_or_cannot_read_is_refused(compose_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_objective(compose_config(*overrides))
    check_objective(compose_config("optimized_metric=val/R1", "eval.select=val_split"))  # held-out ids: fine


def _train_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agw_light.train", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_the_sweeper_refuses_a_test_objective_before_its_first_trial(synthetic_cache, tmp_path):
    sweep = tmp_path / "multirun"
    result = _train_command(
        "hparams_search=full_optuna",
        "optimized_metric=test/mAP",
        f"hydra.sweep.dir={sweep}",
        f"dataset.root={synthetic_cache}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "optimized_metric=test/mAP: a search must not be steered by the test split" in result.stderr
    assert not (sweep / "synthetic").exists()  # no trial started


@pytest.mark.slow
def test_optuna_search_on_held_out_ids_then_the_final_run_of_its_best_trial(synthetic_cache, tmp_path, compose_config):
    sweep = tmp_path / "multirun"
    result = _train_command(
        "hparams_search=full_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        f"dataset.root={synthetic_cache}",
        *TINY_DATA,
        *[override for override in CHEAP if "limit_train_batches" not in override],
        "++trainer.limit_train_batches=1",
        "eval.val_images=32",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(results.best_params) == {"optim.lr", "optim.weight_decay", "losses.1.weight"}
    scores = {}
    for trial in (0, 1):
        run_dir = sweep / "synthetic" / "full" / f"trial{trial}"
        assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").eval.select == "val_split"
        assert not (run_dir / "metrics.json").exists()  # a trial never evaluates on the test split
        # Its best val/mAP on held-out training ids, which the selected checkpoint's file name carries.
        (selected,) = (run_dir / "checkpoints").glob("best-*.ckpt")
        scores[trial] = float(selected.stem.split("valmAP")[1])
    # What each trial returned to the sweeper is that score: the best value is the larger one.
    assert results.best_value == pytest.approx(max(scores.values()), abs=1e-4)

    # The final run (`tuned=`, otherwise an ordinary run reporting its test row) takes the best parameters.
    tuned = compose_config(f"tuned={sweep / 'optimization_results.yaml'}")
    assert apply_tuned(tuned) == dict(results.best_params)
    assert tuned.optim.lr == results.best_params["optim.lr"] and tuned.eval.select == "last"
    assert tuned.optim.weight_decay == results.best_params["optim.weight_decay"]
    assert tuned.losses[1].weight == results.best_params["losses.1.weight"]


def test_tuned_parameters_must_be_keys_of_the_config(compose_config, tmp_path):
    results = tmp_path / "optimization_results.yaml"
    results.write_text("name: optuna\nbest_params:\n  optim.momentum: 0.9\nbest_value: 0.5\n")
    with pytest.raises(KeyError, match="optim.momentum is not a key of this run's config"):
        train(compose_config(f"tuned={results}"))


@pytest.mark.slow
def test_debug_fast_dev_run_runs_one_batch_and_evaluates_nothing(compose_config, tmp_path):
    assert train(compose_config("debug=fast_dev_run", *CHEAP)) == {}
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_debug_overfit_drives_the_loss_down_on_the_same_batches(compose_config, tmp_path):
    # CHEAP validates every epoch; the overfit config's no-validation setting is restored after it.
    train(compose_config(*CHEAP, *OVERFIT))
    with open(tmp_path / "run" / "csv" / "metrics.csv", newline="") as handle:
        losses = [float(line["train/loss"]) for line in csv.DictReader(handle) if line.get("train/loss")]
    assert len(losses) == 4  # 1 batch x 4 epochs
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_debug_profiler_writes_its_report(compose_config, tmp_path):
    train(compose_config(*CHEAP, "debug=profiler", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"))
    report = (tmp_path / "run" / "fit-profile.txt").read_text()
    assert "Profiler Report" in report and "run_training_epoch" in report


def test_table_experiments_sweep_the_five_rows_of_their_dataset():
    from hydra import compose, initialize_config_dir

    from agw_light.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for dataset in ("market1501", "dukemtmcreid", "msmt17"):
            cfg = compose("config", [f"experiment={dataset}_table"], return_hydra_config=True)
            assert cfg.dataset.name == dataset and cfg.hydra.mode.name == "MULTIRUN"
            # Row 1 first, so that rows 2 and 5 find their teacher in the same sweep.
            assert dict(cfg.hydra.sweeper.params) == {"light": "full,model,feat,search,all"}
        cfg = compose("config", ["experiment=[market1501_table,seeds]"], return_hydra_config=True)
    # Seeds vary fastest, each seed in a folder of its own, and a student's teacher is row 1 of its seed.
    assert dict(cfg.hydra.sweeper.params) == {"light": "full,model,feat,search,all", "seed": "0,1,2"}
    assert cfg.hydra.sweep.subdir == "market1501/full/seed0"


def test_report_summarises_seeds_and_sets_rows_beside_the_published_ones(tmp_path, capsys):
    from test_report import ROWS, make_run

    from agw_light.cli.report import main

    root = tmp_path / "multirun"
    mAPs = {0: 0.80, 1: 0.84, 2: 0.82}  # row 1 (published mAP 0.865, R1 0.945) run with three seeds
    for seed, mean_ap in mAPs.items():
        run_dir = make_run(root / f"seed{seed}", "full", metrics={**ROWS["full"][5], "mAP": mean_ap, "R1": 0.9})
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        config.seed = seed
        OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")
    make_run(root, "full", dataset="synthetic")  # no published row: not compared

    assert main([str(root)]) == 0
    markdown, printed = (root / "results.md").read_text(), capsys.readouterr().out
    # statistics.stdev of 0.80, 0.84, 0.82 is 0.02; differences are ours (the mean) minus published.
    seeds_line = "| market1501 | 1 (full) | 0, 1, 2 | 0.900 ± 0.000 | 0.900-0.900 | 0.820 ± 0.020 | 0.800-0.840 |"
    beside_line = "| market1501 | 1 (full) | 3 | 0.900 ± 0.000 | 0.945 | -0.045 | 0.820 ± 0.020 | 0.865 | -0.045 |"
    for text in (markdown, printed):
        assert seeds_line in text and beside_line in text
        assert "| synthetic |" not in text.split("## Over seeds")[1].split("## Cross")[0]
    assert "](published_market1501.png)" in markdown and (root / "published_market1501.png").is_file()
    assert not (root / "published_synthetic.png").exists()
