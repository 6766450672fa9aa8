"""`python -m agw_light.report` on a hand-built sweep folder: tables, CSV, plots and the runs that failed."""

from __future__ import annotations

import csv
import json
import os
import stat

import pytest
from omegaconf import OmegaConf
from PIL import Image

from agw_light.cli.report import main
from agw_light.files import write_atomic
from agw_light.reporting import collect_runs, format_ms, read_scalar_curves

PYRAMID = "2048-1024-512-256-128-64-32"
# light name -> (row, res18, light feature, light search, backbone, metrics of the row)
ROWS = {
    "full": (
        1,
        False,
        False,
        False,
        "resnet50",
        {
            "feature_dim": 2048,
            "metric": "cosine",
            "R1": 0.9451,
            "mAP": 0.8652,
            "mINP": 0.6012,
            "inference_ms_per_batch64": 5248.13,
            "search_ms_per_query": 2.5,
            "device": "cpu (2 threads)",
        },
    ),
    "model": (
        2,
        True,
        False,
        False,
        "resnet18",
        {
            "feature_dim": 512,
            "metric": "cosine",
            "R1": 0.9312,
            "mAP": 0.8361,
            "mINP": 0.5523,
            "inference_ms_per_batch64": 1210.55,
            "search_ms_per_query": 0.9,
            "device": "cpu (2 threads)",
        },
    ),
    "feat": (
        3,
        False,
        True,
        False,
        "resnet50",
        {
            "feature_dim": 2048,
            "metric": "hamming",
            "R1": 0.9421,
            "mAP": 0.8594,
            "mINP": 0.5901,
            "inference_ms_per_batch64": 5261.0,
            "search_ms_per_query": 0.3,
            "device": "cpu (2 threads)",
        },
    ),
    "search": (
        4,
        False,
        True,
        True,
        "resnet50",
        {
            "feature_dim": PYRAMID,
            "metric": "hamming",
            "R1": 0.9419,
            "mAP": 0.8523,
            "mINP": 0.5702,
            "inference_ms_per_batch64": 5270.4,
            "search_ms_per_query": 0.077,
            "device": "cpu (2 threads)",
            "candidates": [2000, 500, 100, 50, 20, 10],
            "recall_at_1_of_exact": 0.995,
        },
    ),
    "all": (
        5,
        True,
        True,
        True,
        "resnet18",
        {
            "feature_dim": PYRAMID,
            "metric": "hamming",
            "R1": 0.9223,
            "mAP": 0.8094,
            "mINP": 0.5211,
            "inference_ms_per_batch64": 1220.0,
            "search_ms_per_query": 0.071,
            "device": "cpu (2 threads)",
            "candidates": [2000, 500, 100, 50, 20, 10],
            "recall_at_1_of_exact": 0.99,
        },
    ),
}


def network_fields(light: str) -> dict:
    """What metrics.json records of the network and index that produced a row (the table place comes from it)."""
    _, res18, light_feature, light_search, backbone, _ = ROWS[light]
    neck = "pyramid" if light_search else "hash" if light_feature else "bnneck"
    index = "coarse_to_fine" if light_search else "hamming" if light_feature else "float"
    return {
        "backbone": backbone,
        "neck": neck,
        "distilled": res18,
        "index": index,
        "parameters": 25_078_864 if backbone == "resnet50" else 11_562_049,
        "nonlocal_inter_channels": "1" if backbone == "resnet50" else "none",
        "selection": "last epoch",
        "checkpoint_sha256": "ab" * 32,
        "R5": 0.97,
        "R10": 0.98,
        "num_query": 3368,
        "num_gallery": 15913,
        "num_valid_queries": 3368,
    }


LOSSES = [(0, 9.0), (1, 7.5), (2, 6.0), (3, 5.5)]
VAL_MAP = [(1, 0.2), (3, 0.4)]


def make_run(
    root,
    light: str,
    *,
    dataset: str = "market1501",
    metrics: dict | None = None,
    finished: bool = True,
    curves: bool = True,
):
    """A run folder as `python -m agw_light.train -m` leaves it (config with an unresolvable Hydra key)."""
    row, *_, default_metrics = ROWS[light]
    run_dir = root / dataset / light
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create(
            {
                "light": {"name": light},
                "dataset": {"name": dataset},
                "output_dir": "${hydra:runtime.output_dir}",
            }
        ),
        run_dir / ".hydra" / "config.yaml",
    )
    if finished:
        payload = {
            "checkpoint": str(run_dir / "checkpoints" / "best.ckpt"),
            "dataset": dataset,
            **network_fields(light),
            **(metrics or default_metrics),
        }
        (run_dir / "metrics.json").write_text(json.dumps(payload))
    if curves:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run_dir / "tensorboard")) as writer:
            for step, value in LOSSES:
                writer.add_scalar("train/loss", value + row, step, walltime=100.0 + step)
            for step, value in VAL_MAP:
                writer.add_scalar("val/mAP", value, step, walltime=100.0 + step)
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    for light in ROWS:
        make_run(root, light)
    return root


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
        image.verify()


def _leftover_temp_files(folder):
    return [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


def test_report_tables_every_row_in_row_order(sweep, capsys):
    assert main([str(sweep)]) == 0

    table = _read_csv(sweep / "results.csv")
    # Folder names sort all, feat, full, model, search: the table must follow the rows instead.
    assert [entry["light"] for entry in table] == ["full", "model", "feat", "search", "all"]
    for entry, (light, (row, res18, light_feature, light_search, backbone, metrics)) in zip(
        table, ROWS.items(), strict=True
    ):
        assert entry["dataset"] == "market1501" and entry["row"] == str(row) and entry["backbone"] == backbone
        assert (entry["model_res18"], entry["light_feature"], entry["light_search"]) == tuple(
            str(flag).lower() for flag in (res18, light_feature, light_search)
        )
        for key in ("R1", "mAP", "mINP", "search_ms_per_query"):
            assert float(entry[key]) == metrics[key], (light, key)
        # Rows written before the timing batch was a setting read as batches of 64.
        assert float(entry["inference_ms_per_batch"]) == metrics["inference_ms_per_batch64"], light
        assert entry["timing_batch_size"] == "64"
        assert entry["feature_dim"] == str(metrics["feature_dim"]) and entry["metric"] == metrics["metric"]
        assert entry["device"] == "cpu (2 threads)"
        assert entry["run_dir"] == str((sweep / "market1501" / light).resolve())

    markdown = (sweep / "results.md").read_text()
    assert f"# Results of `{sweep}`" in markdown and "on: cpu (2 threads)" in markdown
    expected_lines = [
        "| 1 (full) | - | - | - | 2048 | cosine | 25.08 M | 0.945 | 0.865 | 0.601 | 5248.1 ms | 2.50 ms "
        "| cpu (2 threads) | last epoch | `market1501/full` |",
        "| 2 (model) | √ | - | - | 512 | cosine | 11.56 M | 0.931 | 0.836 | 0.552 | 1210.5 ms | 0.900 ms "
        "| cpu (2 threads) | last epoch | `market1501/model` |",
        "| 3 (feat) | - | √ | - | 2048 | hamming | 25.08 M | 0.942 | 0.859 | 0.590 | 5261.0 ms | 0.300 ms "
        "| cpu (2 threads) | last epoch | `market1501/feat` |",
        f"| 4 (search) | - | √ | √ | multiple ({PYRAMID}) | hamming | 25.08 M | 0.942 | 0.852 | 0.570 | 5270.4 ms "
        "| 0.077 ms | cpu (2 threads) | last epoch | `market1501/search` |",
        f"| 5 (all) | √ | √ | √ | multiple ({PYRAMID}) | hamming | 11.56 M | 0.922 | 0.809 | 0.521 | 1220.0 ms "
        "| 0.071 ms | cpu (2 threads) | last epoch | `market1501/all` |",
    ]
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ") and "(" in line.split("|")[1]]
    assert table_lines == expected_lines
    assert "## market1501" in markdown and "Rows that did not finish" not in markdown
    assert "](accuracy_vs_search_time.png)" in markdown and "](training_curves_market1501.png)" in markdown

    _assert_png(sweep / "accuracy_vs_search_time.png")
    _assert_png(sweep / "training_curves_market1501.png")
    assert not _leftover_temp_files(sweep)
    printed = capsys.readouterr()
    assert printed.err == ""
    wrote = [line.removeprefix("wrote ") for line in printed.out.splitlines() if line.startswith("wrote ")]
    assert set(wrote) == {
        str(sweep / name)
        for name in (
            "results.md",
            "results.csv",
            "accuracy_vs_search_time.png",
            "training_curves_market1501.png",
            "published_market1501.png",
        )
    }
    # Market-1501 is a real dataset: its rows are printed beside the seed's (these runs hold its numbers).
    assert "| market1501 | 1 (full) | 1 | 0.945 | 0.945 | +0.000 | 0.865 | 0.865 | +0.000 |" in printed.out


def test_failed_rows_are_named_with_their_reason_and_the_rest_still_reported(tmp_path, capsys):
    root = tmp_path / "multirun"
    for light in ("full", "model", "all"):
        make_run(root, light)
    crashed = make_run(root, "search", finished=False)
    (crashed / "error.txt").write_text("RuntimeError: CUDA out of memory\nTraceback (most recent call last):\n")
    killed = make_run(root, "feat", finished=False, curves=False)

    assert main([str(root), "--out", str(tmp_path / "report")]) == 1

    err = capsys.readouterr().err
    assert f"row search (market1501, {crashed}): RuntimeError: CUDA out of memory (see {crashed / 'error.txt'})" in err
    assert f"row feat (market1501, {killed}): no metrics.json: the run did not finish; see {killed}/train.log" in err
    assert [entry["light"] for entry in _read_csv(tmp_path / "report" / "results.csv")] == ["full", "model", "all"]
    markdown = (tmp_path / "report" / "results.md").read_text()
    failed_section = markdown.split("## Rows that did not finish")[1].split("##")[0]
    assert "row feat (market1501), `market1501/feat`: no metrics.json: the run did not finish" in failed_section
    assert "row search (market1501), `market1501/search`: RuntimeError: CUDA out of memory" in failed_section
    assert "| 3 (feat)" not in markdown and "| 4 (search)" not in markdown
    assert not (root / "results.md").exists()  # --out was honoured


def test_damaged_files_fail_their_row_and_name_the_file(tmp_path):
    root = tmp_path / "multirun"
    make_run(root, "full", curves=False)
    truncated = make_run(root, "model", curves=False)
    (truncated / "metrics.json").write_text('{"R1": 0.9, "mAP"')
    incomplete = make_run(root, "feat", metrics={**ROWS["feat"][5], "mAP": None}, curves=False)
    bad_config = make_run(root, "search", curves=False)
    (bad_config / ".hydra" / "config.yaml").write_text("light: {name: search\n")
    not_a_flag = make_run(root, "all", metrics={**ROWS["all"][5], "distilled": "yes"}, curves=False)

    rows, failures = collect_runs(root)

    assert [run.light for run in rows] == ["full"]
    reasons = {failure.run_dir: failure.reason for failure in failures}
    assert str(truncated / "metrics.json") in reasons[truncated] and "truncated" in reasons[truncated]
    assert f"{incomplete / 'metrics.json'}: key mAP is None" in reasons[incomplete]
    assert str(bad_config / ".hydra" / "config.yaml") in reasons[bad_config]
    assert "key distilled is 'yes', expected bool" in reasons[not_a_flag]


def test_the_table_place_comes_from_the_recorded_network_not_the_config_label(tmp_path):
    """A run labelled light=full whose metrics.json records a distilled pyramid with coarse-to-fine search is
    row 5, and a combination the seed table lacks gets no row number."""
    relabelled = make_run(tmp_path, "full", metrics=ROWS["full"][5], curves=False)
    recorded = json.loads((relabelled / "metrics.json").read_text())
    (relabelled / "metrics.json").write_text(json.dumps({**recorded, **network_fields("all")}))
    custom = make_run(tmp_path, "model", dataset="dukemtmcreid", curves=False)
    recorded = json.loads((custom / "metrics.json").read_text())
    (custom / "metrics.json").write_text(json.dumps({**recorded, "neck": "hash", "index": "hamming"}))

    rows, failures = collect_runs(tmp_path)

    assert failures == []
    placed = {run.run_dir: (run.row, run.model_res18, run.light_feature, run.light_search) for run in rows}
    assert placed[relabelled] == (5, True, True, True)
    assert placed[custom] == (None, True, True, False)


def test_error_newer_than_metrics_marks_the_row_failed(tmp_path):
    """A rerun that failed in a finished run's folder must not pass off the old numbers as its result."""
    run_dir = make_run(tmp_path, "full", curves=False)
    (run_dir / "error.txt").write_text("ValueError: bad batch\n")
    os.utime(run_dir / "metrics.json", (1_000, 1_000))
    rows, failures = collect_runs(tmp_path)
    assert rows == [] and failures[0].reason.startswith("ValueError: bad batch")

    os.utime(run_dir / "error.txt", (500, 500))
    rows, failures = collect_runs(tmp_path)
    assert [run.light for run in rows] == ["full"] and failures == []


@pytest.mark.parametrize("content", ["empty", "only_failed", "missing"])
def test_nothing_finished_exits_2_and_writes_nothing(tmp_path, capsys, content):
    root = tmp_path / "multirun"
    if content != "missing":
        root.mkdir()
    if content == "only_failed":
        for light in ("full", "model"):
            run_dir = make_run(root, light, finished=False, curves=False)
            (run_dir / "error.txt").write_text(f"OSError: disk full in {light}\n")
    before = sorted(tmp_path.rglob("*"))

    assert main([str(root)]) == 2

    err = capsys.readouterr().err
    assert str(root) in err
    if content == "only_failed":
        assert "none of its 2 run(s) finished" in err
        assert f"row full (market1501, {root / 'market1501' / 'full'}): OSError: disk full in full" in err
        assert f"row model (market1501, {root / 'market1501' / 'model'}): OSError: disk full in model" in err
    else:
        assert ("no run folder found" if content == "empty" else "no such folder") in err
    assert sorted(tmp_path.rglob("*")) == before


def test_rows_of_several_datasets_get_one_table_each(tmp_path):
    root = tmp_path / "multirun"
    make_run(root, "model", dataset="market1501", curves=False)
    make_run(root, "full", dataset="market1501", curves=False)
    make_run(root, "full", dataset="dukemtmcreid", metrics={**ROWS["full"][5], "device": "NVIDIA H100 80GB HBM3"})

    assert main([str(root)]) == 0

    table = _read_csv(root / "results.csv")
    assert [(entry["dataset"], entry["light"]) for entry in table] == [
        ("dukemtmcreid", "full"),
        ("market1501", "full"),
        ("market1501", "model"),
    ]
    markdown = (root / "results.md").read_text()
    duke, market = markdown.split("## dukemtmcreid")[1].split("## market1501")
    assert "| 1 (full)" in duke and "NVIDIA H100 80GB HBM3" in duke and "| 2 (model)" not in duke
    assert "| 1 (full)" in market and "| 2 (model)" in market
    assert "on: NVIDIA H100 80GB HBM3; cpu (2 threads)" in markdown
    # Only the Duke run logged scalars: no empty figure for Market-1501.
    assert (root / "training_curves_dukemtmcreid.png").is_file()
    assert not (root / "training_curves_market1501.png").exists()


def test_scalar_curves_read_back_and_resume_keeps_the_latest_value(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = make_run(tmp_path, "full", curves=False)
    with SummaryWriter(str(run_dir / "tensorboard"), filename_suffix=".a") as writer:
        for step, value in [(0, 4.0), (1, 3.0), (2, 2.5), (3, 2.0)]:
            writer.add_scalar("train/loss", value, step, walltime=10.0 + step)
    # Resumed from the step-1 checkpoint: steps 2 and 3 are trained and logged again.
    with SummaryWriter(str(run_dir / "tensorboard"), filename_suffix=".b") as writer:
        for step, value in [(2, 2.4), (3, 1.9), (4, 1.5)]:
            writer.add_scalar("train/loss", value, step, walltime=50.0 + step)

    curves = read_scalar_curves(run_dir)

    assert curves == {"train/loss": ([0, 1, 2, 3, 4], [4.0, 3.0, pytest.approx(2.4), pytest.approx(1.9), 1.5])}
    assert read_scalar_curves(tmp_path / "nowhere") == {}


@pytest.mark.parametrize(
    ("value", "text"),
    [(5248.13, "5248.1"), (78.64, "78.6"), (1.254, "1.25"), (0.077, "0.077"), (0.0, "0.000"), (0.00042, "0.00042")],
)
def test_format_ms(value, text):
    assert format_ms(value) == text


def test_interrupted_write_keeps_the_previous_file_whole(tmp_path):
    target = tmp_path / "results.md"
    target.write_text("previous report\n")

    def write_half_then_fail(handle):
        handle.write(b"| half a tab")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, write_half_then_fail)
    assert target.read_text() == "previous report\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.md"]

    write_atomic(target, lambda handle: handle.write(b"new report\n"))
    assert target.read_text() == "new report\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # readable like any file the user writes


def test_rows_written_before_parameter_counts_and_selection_still_report(tmp_path):
    root = tmp_path / "multirun"
    run = make_run(root, "full", curves=False)
    row = json.loads((run / "metrics.json").read_text())
    for key in ("parameters", "nonlocal_inter_channels", "selection"):
        del row[key]
    (run / "metrics.json").write_text(json.dumps(row))
    make_run(root, "model", curves=False)

    assert main([str(root)]) == 0

    markdown = (root / "results.md").read_text()
    assert "| 2048 | cosine | - | 0.945 |" in markdown and "| 512 | cosine | 11.56 M |" in markdown
    table = {entry["light"]: entry for entry in _read_csv(root / "results.csv")}
    assert table["full"]["parameters"] == "" and table["model"]["parameters"] == "11562049"
    assert table["model"]["selection"] == "last epoch"


def test_reranked_rows_are_marked_and_rows_without_the_key_read_as_not_reranked(tmp_path):
    root = tmp_path / "multirun"
    settings = {"rerank": True, "rerank_k1": 20, "rerank_k2": 6, "rerank_lambda": 0.3}
    make_run(root, "full", metrics={**ROWS["full"][5], **settings}, curves=False)
    make_run(root, "feat", curves=False)  # a metrics.json written before re-ranking existed
    bad = make_run(root, "model", metrics={**ROWS["model"][5], "rerank": True, "rerank_k1": 20}, curves=False)

    assert main([str(root)]) == 1  # the damaged row fails alone

    assert {entry["light"]: entry["rerank"] for entry in _read_csv(root / "results.csv")} == {
        "full": "k1=20 k2=6 lambda=0.3",
        "feat": "off",
    }
    markdown = (root / "results.md").read_text()
    assert "| 2048 | cosine + re-ranking (k1=20 k2=6 lambda=0.3) | 25.08 M | 0.945 |" in markdown
    assert "| 2048 | hamming | 25.08 M | 0.942 |" in markdown
    assert f"{bad / 'metrics.json'}: key rerank_k2 is None, expected int" in markdown


def _verified(metrics: dict, dataset: str, train_dataset: str, tpr: float) -> dict:
    """A row with the optional cross-domain and verification keys, as evaluate_checkpoint writes them."""
    return {
        **metrics,
        "dataset": dataset,
        "train_dataset": train_dataset,
        "verification": [
            {"target_fpr": fpr, "fpr": fpr / 2, "tpr": tpr * scale, "threshold": threshold}
            for fpr, scale, threshold in ((1e-4, 0.5, 0.25), (1e-3, 0.75, 0.375), (1e-2, 1.0, 0.5))
        ],
        "roc": {"fpr": [0.0, 1e-4, 1e-2, 1.0], "tpr": [0.0, tpr / 2, tpr, 1.0], "threshold": [-3e-5, 0.25, 0.5, 2.0]},
        "positive_pairs": 10,
        "negative_pairs": 100_000,  # enough to resolve FPR 1e-4
        "excluded_pairs": 5,
    }


def test_cross_domain_rows_make_a_source_by_target_table_and_roc_plots(tmp_path, capsys):
    root = tmp_path / "multirun"
    full = ROWS["full"][5]
    market = make_run(root, "full", metrics=_verified(full, "market1501", "market1501", 0.8), curves=False)
    duke = make_run(
        root, "full", dataset="dukemtmcreid", metrics=_verified(full, "dukemtmcreid", "dukemtmcreid", 0.7), curves=False
    )
    payload = json.loads((market / "metrics.json").read_text())
    cross = {**payload, **_verified(full, "dukemtmcreid", "market1501", 0.4), "R1": 0.5, "mAP": 0.25}
    (market / "metrics_dukemtmcreid.json").write_text(json.dumps(cross))
    (duke / "metrics_market1501.json").write_text(json.dumps({**cross, "dataset": "msmt17"}))  # misnamed file

    assert main([str(root)]) == 0

    markdown = (root / "results.md").read_text()
    section = markdown.split("## Cross-domain (R1 / mAP)")[1].split("## Same-person verification")[0]
    assert "| source \\ target | dukemtmcreid | market1501 | run |" in section
    assert "| dukemtmcreid | 0.945 / 0.865 | - | `dukemtmcreid/full` |" in section
    assert "| market1501 | 0.500 / 0.250 | 0.945 / 0.865 | `market1501/full` |" in section
    verification = markdown.split("## Same-person verification")[1]
    assert "| 1 full | market1501 | dukemtmcreid | cosine | 0.200 (0.2500) | 0.300 (0.3750) | 0.400 (0.5000) |" in (
        verification
    )
    assert "](roc_dukemtmcreid.png)" in verification and "](roc_market1501.png)" in verification
    _assert_png(root / "roc_dukemtmcreid.png")
    assert "holds a row of dataset 'msmt17', not of 'market1501'" in markdown
    table = _read_csv(root / "results.csv")
    assert [(entry["dataset"], entry["target"], entry["R1"]) for entry in table] == [
        ("dukemtmcreid", "dukemtmcreid", str(full["R1"])),
        ("market1501", "market1501", str(full["R1"])),
        ("market1501", "dukemtmcreid", "0.5"),
    ]
    assert table[2]["TPR@FPR=1e-02"] == "0.4" and table[2]["threshold@FPR=1e-04"] == "0.25"
    assert "roc_market1501.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_dataset": 3}, "key train_dataset is 3, expected str"),
        ({"verification": [{"target_fpr": 1e-4, "fpr": 0.0, "tpr": "high", "threshold": 3}]}, r"verification\[0\].tpr"),
        ({"roc": {"fpr": [0.0], "tpr": [0.0, 1.0], "threshold": [0, 1]}}, "must have equal lengths"),
        ({"roc": {"fpr": [float("nan")], "tpr": [0.0], "threshold": [0]}}, r"roc.fpr\[0\] is nan"),
    ],
)
def test_malformed_optional_keys_are_named(tmp_path, change, message):
    from agw_light.results import check_row

    row = {"checkpoint": "x", "dataset": "market1501", **network_fields("full"), **ROWS["full"][5]}
    read = check_row(dict(row), "row")  # a row without the optional keys still reads
    legacy = {key: value for key, value in row.items() if key != "inference_ms_per_batch64"}
    timing = row["inference_ms_per_batch64"]  # the legacy timing key reads as batches of 64
    assert read == {**legacy, "inference_ms_per_batch": timing, "timing_batch_size": 64}
    with pytest.raises(ValueError, match=message):
        check_row({**row, **change}, "row")


def test_an_fpr_below_one_over_the_negative_pairs_is_not_resolved(tmp_path):
    root = tmp_path / "multirun"
    metrics = {**_verified(ROWS["full"][5], "market1501", "market1501", 0.8), "negative_pairs": 5000}
    make_run(root, "full", metrics=metrics, curves=False)

    assert main([str(root)]) == 0

    verification = (root / "results.md").read_text().split("## Same-person verification")[1]
    # 5000 negative pairs: one false positive is FPR 2e-4, so 1e-4 cannot be told from 0; 1e-3 and 1e-2 can.
    assert "| cosine | not resolved (5,000 negative pairs) | 0.600 (0.3750) | 0.800 (0.5000) |" in verification
    (row,) = _read_csv(root / "results.csv")
    assert (row["TPR@FPR=1e-04"], row["threshold@FPR=1e-04"], row["TPR@FPR=1e-03"]) == ("", "", "0.6000000000000001")


def test_training_curves_show_epoch_means_where_no_step_was_logged_on_a_log_loss_axis():
    from agw_light.reporting.plots import training_curves_figure

    curves = {
        "1 full": {"train/epoch_loss": ([4, 9], [8.0, 6.0]), "val/mAP": ([4, 9], [0.1, 0.2])},  # 5-step epochs
        "3 feat": {"train/loss": ([0, 20, 40], [900.0, 500.0, 300.0])},  # another row's loss terms: 100x larger
    }
    loss_axes, map_axes = training_curves_figure(curves, "market1501").axes
    assert [(line.get_label(), list(line.get_ydata())) for line in loss_axes.get_lines()] == [
        ("1 full (epoch means: no step logged)", [8.0, 6.0]),
        ("3 feat", [900.0, 500.0, 300.0]),
    ]
    assert loss_axes.get_yscale() == "log" and "log scale" in loss_axes.get_title()
    assert [line.get_label() for line in map_axes.get_lines()] == ["1 full"] and map_axes.get_yscale() == "linear"
    empty = training_curves_figure({"1 full": {}}, "market1501")
    assert "no training curve was logged" in [text.get_text() for text in empty.texts] and not empty.axes
