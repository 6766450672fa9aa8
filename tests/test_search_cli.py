"""`python -m agw_light.search build|query` on a tiny generated gallery with a tiny checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from agw_light.cli.search import main, parse_arguments
from agw_light.data.synthetic import generate_synthetic
from agw_light.files import file_sha256
from agw_light.lit.module import LitReID
from agw_light.search import FloatIndex, HammingIndex, load_index

LOSSES = [{"name": "ce", "type": "cross_entropy", "output": "logits"}]
FLOAT_MODEL = {"backbone": "resnet18", "pretrained": "none"}
HASH_MODEL = {"backbone": "resnet18", "pretrained": "none", "neck": "hash", "code_lengths": [64]}


@pytest.fixture(scope="module")
def gallery_folder(tmp_path_factory) -> Path:
    root = generate_synthetic(
        tmp_path_factory.mktemp("cli"), num_ids=6, num_cams=2, images_per_id_cam=2, height=32, width=16, seed=3
    )
    return (root / "Market-1501-v15.09.15" / "bounding_box_test").resolve()


def _checkpoint(path: Path, neck_model: dict, seed: int = 0) -> str:
    torch.manual_seed(seed)
    module = LitReID(model=neck_model, losses=LOSSES, num_classes=3, image_size=(32, 16))
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def built_index(gallery_folder, tmp_path_factory) -> tuple[str, Path]:
    """(checkpoint, index folder) built once; tests that change the index work on a copy."""
    folder = tmp_path_factory.mktemp("built")
    ckpt = _checkpoint(folder / "model.ckpt", FLOAT_MODEL)
    main(["build", f"ckpt={ckpt}", f"gallery={gallery_folder}", f"out={folder / 'index'}", "device=cpu"])
    return ckpt, folder / "index"


def _query(index, image, capsys, *extra: str) -> list[dict]:
    capsys.readouterr()
    main(["query", f"index={index}", f"image={image}", "topk=3", "json=true", "device=cpu", *extra])
    return json.loads(capsys.readouterr().out)


def _rewrite_record(index: Path, record: dict | None) -> None:
    manifest = json.loads((index / "manifest.json").read_text())
    (index / "manifest.json").write_text(json.dumps({**manifest, "record": record}))


def test_build_then_query_from_another_directory_finds_the_image_itself(gallery_folder, tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "model.ckpt", FLOAT_MODEL)
    monkeypatch.chdir(gallery_folder.parent)  # relative gallery and checkpoint, stored absolute
    relative_ckpt = os.path.relpath(ckpt)
    main(
        ["build", f"ckpt={relative_ckpt}", f"gallery={gallery_folder.name}", f"out={tmp_path / 'index'}", "device=cpu"]
    )
    index = load_index(tmp_path / "index")
    images = sorted(gallery_folder.glob("*.jpg"))
    assert len(index) == len(images) and index.metadata.paths == [str(p) for p in images]
    assert index.record == {
        "checkpoint": str(Path(ckpt).resolve()),
        "checkpoint_sha256": file_sha256(ckpt),
        "image_size": [32, 16],
    }
    assert not (tmp_path / "index" / "model.json").exists()
    first = images[0]
    pid, camera = re.match(r"(-?\d+)_c(\d+)", first.name).groups()
    assert (index.metadata.pids[0], index.metadata.camids[0]) == (int(pid), int(camera) - 1)

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    results = _query(tmp_path / "index", first, capsys)
    assert results[0]["query"] == str(first)
    hits = results[0]["results"]
    assert [hit["rank"] for hit in hits] == [1, 2, 3] and all(Path(hit["path"]).is_file() for hit in hits)
    assert hits[0]["path"] == str(first) and hits[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    assert hits[0]["distance"] <= hits[1]["distance"] <= hits[2]["distance"]


def test_query_refuses_a_changed_checkpoint_unless_allowed(gallery_folder, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "model.ckpt", FLOAT_MODEL)
    main(["build", f"ckpt={ckpt}", f"gallery={gallery_folder}", f"out={tmp_path / 'index'}", "device=cpu"])
    built_sha = file_sha256(ckpt)
    _checkpoint(tmp_path / "model.ckpt", FLOAT_MODEL, seed=1)  # retrained in place
    changed_sha = file_sha256(ckpt)
    image = sorted(gallery_folder.glob("*.jpg"))[0]
    with pytest.raises(SystemExit, match=rf"SHA-256 {changed_sha}.* SHA-256 {built_sha}.*allow_changed_model=true"):
        _query(tmp_path / "index", image, capsys)
    main(["query", f"index={tmp_path / 'index'}", f"image={image}", "device=cpu", "allow_changed_model=true"])
    printed = capsys.readouterr()
    assert f"warning: checkpoint {ckpt}: SHA-256 {changed_sha}" in printed.err and str(image) in printed.out


def test_query_needs_a_model_and_refuses_an_old_separate_model_record(built_index, gallery_folder, tmp_path, capsys):
    ckpt, built = built_index
    index = shutil.copytree(built, tmp_path / "index")
    _rewrite_record(index, None)  # an index saved by the library, without a record
    image = sorted(gallery_folder.glob("*.jpg"))[0]
    with pytest.raises(SystemExit, match="records no model.*pass ckpt="):
        _query(index, image, capsys)
    assert len(_query(index, image, capsys, f"ckpt={ckpt}")[0]["results"]) == 3

    (index / "model.json").write_text(json.dumps({"ckpt": ckpt})[:-5])  # what older versions wrote beside it
    with pytest.raises(SystemExit, match=r"model.json: this index was built by an older agw_light.*rebuild it"):
        _query(index, image, capsys)


def test_a_checkpoint_holding_code_is_refused_by_build_and_query(
    built_index, gallery_folder, crafted_checkpoint, tmp_path, capsys
):
    crafted, marker = crafted_checkpoint
    with pytest.raises(SystemExit, match="crafted.ckpt"):
        main(["build", f"ckpt={crafted}", f"gallery={gallery_folder}", f"out={tmp_path / 'new'}", "device=cpu"])
    assert not (tmp_path / "new").exists()

    _, built = built_index
    index = shutil.copytree(built, tmp_path / "index")
    image = sorted(gallery_folder.glob("*.jpg"))[0]
    with pytest.raises(SystemExit, match="crafted.ckpt"):
        _query(index, image, capsys, f"ckpt={crafted}")
    _rewrite_record(index, {**load_index(index).record, "checkpoint": str(crafted)})  # the recorded model is crafted
    with pytest.raises(SystemExit, match="crafted.ckpt"):
        _query(index, image, capsys)
    assert not marker.exists()


def test_two_concurrent_builds_leave_one_consistent_index(gallery_folder, tmp_path, capsys):
    """The fault drill: data from one model with model.json naming the other."""
    checkpoints = {
        FloatIndex: _checkpoint(tmp_path / "float.ckpt", FLOAT_MODEL),
        HammingIndex: _checkpoint(tmp_path / "hash.ckpt", HASH_MODEL),
    }
    errors: list[BaseException] = []

    def build(ckpt: str) -> None:
        try:
            main(["build", f"ckpt={ckpt}", f"gallery={gallery_folder}", f"out={tmp_path / 'index'}", "device=cpu"])
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=build, args=(ckpt,)) for ckpt in checkpoints.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    index = load_index(tmp_path / "index")
    assert index.record["checkpoint_sha256"] == file_sha256(checkpoints[type(index)])  # data and model agree
    assert len(list((tmp_path / "index").glob("data-*"))) == 1
    image = sorted(gallery_folder.glob("*.jpg"))[0]
    hits = _query(tmp_path / "index", image, capsys)[0]["results"]
    assert hits[0]["path"] == str(image) and hits[0]["distance"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["find"], "unknown command 'find'"),
        (["build", "ckpt=a"], "missing gallery=..."),
        (["query", "index=a", "image=b", "top=3"], "query: Could not override 'top'"),
        (["query", "index"], "query: Error parsing override 'index'"),
    ],
)
def test_bad_arguments_say_what_is_expected(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_arguments(argv)


def test_missing_gallery_folder_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.ckpt", FLOAT_MODEL)
    with pytest.raises(SystemExit, match="build: .*nowhere: no such image file or folder"):
        main(["build", f"ckpt={ckpt}", f"gallery={tmp_path / 'nowhere'}", f"out={tmp_path / 'index'}"])


def test_query_max_distance_drops_farther_hits(built_index, gallery_folder, capsys):
    _, index = built_index
    image = sorted(gallery_folder.glob("*.jpg"))[0]
    ranked = _query(index, image, capsys)[0]["results"]
    cut = (ranked[0]["distance"] + ranked[1]["distance"]) / 2  # keeps the image itself (distance ~0) only
    assert [hit["index"] for hit in _query(index, image, capsys, f"max_distance={cut}")[0]["results"]] == [
        ranked[0]["index"]
    ]
    assert _query(index, image, capsys, "max_distance=0")[0]["results"] in ([], ranked[:1])  # 0 is a threshold
    for refused in ("-1", "near", "nan"):  # as the service answers a negative one: 422
        with pytest.raises(SystemExit, match=r"query: max_distance=.*expected a number >= 0"):
            _query(index, image, capsys, f"max_distance={refused}")


def _labelled_gallery(gallery_folder: Path, root: Path) -> dict[str, Path]:
    """Four of the generated images copied into a folder per identity under names no Market parser reads
    ("cam<camera>_<n>.jpg"), and a list file naming two of them by paths with a space."""
    sources = sorted(gallery_folder.glob("*.jpg"))[:4]
    folders = root / "by_identity"
    for number, (source, pid, camera) in enumerate(zip(sources, (7, 7, 12, 12), (3, 5, 3, 1), strict=True)):
        (folders / str(pid)).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folders / str(pid) / f"cam{camera}_{number}.jpg")
    (root / "listed" / "two words").mkdir(parents=True)
    for number, source in enumerate(sources[:2]):
        shutil.copy(source, root / "listed" / "two words" / f"shot {number}.jpg")
    (root / "listed" / "unlisted.jpg").write_bytes(sources[2].read_bytes())
    (root / "listed" / "gallery.txt").write_text(
        "# path pid camid\ntwo words/shot 1.jpg 40 2\ntwo words/shot 0.jpg 41 0\n"
    )
    return {"folders": folders, "listed": root / "listed"}


def _labels(index: Path) -> list[tuple[str, int, int]]:
    metadata = load_index(index).metadata
    return [
        (str(Path(path).relative_to(index.parent)), pid, camid)
        for path, pid, camid in zip(metadata.paths, metadata.pids, metadata.camids, strict=True)
    ]


def test_build_reads_pid_and_camera_in_the_layouts_the_datasets_read(gallery_folder, tmp_path, capsys):
    galleries = _labelled_gallery(gallery_folder, tmp_path)
    ckpt = _checkpoint(tmp_path / "model.ckpt", FLOAT_MODEL)

    def build(gallery: Path, name: str, *overrides: str) -> list[tuple[str, int, int]]:
        main(
            [
                "build",
                f"ckpt={ckpt}",
                f"gallery={gallery}",
                f"out={tmp_path / ('index_' + name)}",
                "device=cpu",
                *overrides,
            ]
        )
        return _labels(tmp_path / ("index_" + name))

    # What bash passes for "camera_pattern='cam(\d+)'" (docs/deploy.md): Hydra's quoted string keeps the backslash.
    assert build(galleries["folders"], "folders", r"camera_pattern='cam(\d+)'") == [
        ("by_identity/12/cam1_3.jpg", 12, 1),
        ("by_identity/12/cam3_2.jpg", 12, 3),
        ("by_identity/7/cam3_0.jpg", 7, 3),
        ("by_identity/7/cam5_1.jpg", 7, 5),
    ]
    # auto: every image in a pid folder and no camera pattern: pids known, cameras not.
    assert [(pid, camid) for _, pid, camid in build(galleries["folders"], "auto")] == [
        (12, -1),
        (12, -1),
        (7, -1),
        (7, -1),
    ]
    # a list file: only the listed images, in its order, paths with spaces read from the right
    assert build(galleries["listed"], "listed", "layout=image_list", "list_file=gallery.txt") == [
        ("listed/two words/shot 1.jpg", 40, 2),
        ("listed/two words/shot 0.jpg", 41, 0),
    ]
    capsys.readouterr()
    assert {(pid, camid) for _, pid, camid in build(galleries["listed"], "unknown")} == {(-1, -1)}
    assert "follow no layout agw_light knows: pids and cameras are recorded as -1" in capsys.readouterr().err
    # the datasets' own errors, named, before any model is loaded
    with pytest.raises(SystemExit, match=r"cannot parse image name .*shot 0.jpg.*Market-1501 name"):
        build(galleries["listed"], "market", "layout=market")
    with pytest.raises(SystemExit, match=r"camera_pattern 'x\(' is not a regular expression"):
        build(galleries["folders"], "bad", "camera_pattern='x('")
    with pytest.raises(SystemExit, match="list_file='gallery.txt' is read by layout=image_list only"):
        build(galleries["listed"], "bad", "layout=market", "list_file=gallery.txt")
    assert not (tmp_path / "index_bad").exists() and not (tmp_path / "index_market").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "index=NOINDEX", "image=NOIMAGE", "topk=0"],
        ["query", "index=NOINDEX", "image=NOIMAGE", "topk=-3"],
        ["query", "index=NOINDEX", "image=NOIMAGE", "batch_size=0"],
        ["query", "index=NOINDEX", "image=NOIMAGE", "max_distance=-1"],
        ["query", "index=NOINDEX", "image=NOIMAGE", "height=-1"],
        ["build", "ckpt=NOCKPT", "gallery=NOIMAGE", "out=NOINDEX", "fit_queries=0"],
        ["build", "ckpt=NOCKPT", "gallery=NOIMAGE", "out=NOINDEX", "target_recall=1.5"],
        ["build", "ckpt=NOCKPT", "gallery=NOIMAGE", "out=NOINDEX", "layout=msmt"],
    ],
)
def test_bad_settings_are_refused_in_one_line_before_any_work(argv, monkeypatch):
    import agw_light.gallery_index as gallery_index
    import agw_light.search as search

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(gallery_index, "load_model", no_work)
    monkeypatch.setattr(search, "load_index", no_work)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    key = argv[-1].split("=")[0]
    message = str(stop.value.code)
    assert message.startswith(f"{argv[0]}: {key}") and "\n" not in message


def test_errors_print_one_line_and_no_traceback(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "agw_light.search", "query", f"index={tmp_path / 'nowhere'}", "image=x.jpg"]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().startswith("query: ")
        and "nowhere" in done.stderr
        and len(done.stderr.strip().splitlines()) == 1
    )


def test_an_index_written_with_the_old_record_keys_is_still_read(built_index, gallery_folder, tmp_path, capsys):
    ckpt, built = built_index
    index = shutil.copytree(built, tmp_path / "index")
    record = load_index(index).record
    old = {"ckpt": record["checkpoint"], "ckpt_sha256": record["checkpoint_sha256"], "image_size": record["image_size"]}
    _rewrite_record(index, old)
    image = sorted(gallery_folder.glob("*.jpg"))[0]
    assert _query(index, image, capsys)[0]["results"][0]["path"] == str(image)  # the recorded model, found
    _rewrite_record(index, {**old, "ckpt_sha256": "0" * 64})
    with pytest.raises(SystemExit, match=f"built by a checkpoint with SHA-256 {'0' * 64} \\({ckpt}\\)"):
        _query(index, image, capsys)
