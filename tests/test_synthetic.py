"""Generated dataset: Market-1501 names and splits, determinism, one-time atomic writing, learnable signal."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agw_light.data import synthetic
from agw_light.data.synthetic import COMPLETE_MARKER, MARKET_DIR, generate_synthetic

# Written from the Market-1501 readme, independently of the library's parser.
MARKET_NAME = re.compile(r"^(-1|\d{4})_c([1-9])s1_(\d{6})_(\d{2})\.jpg$")
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
TINY = dict(num_ids=8, num_cams=2, images_per_id_cam=3, height=32, width=16)


def images(folder: Path) -> dict[str, list[tuple[Path, int, int]]]:
    """split -> (path, pid, camera) for every file, failing on any name outside the Market pattern."""
    found = {}
    for split in SPLITS:
        found[split] = []
        for path in sorted((folder / MARKET_DIR / split).iterdir()):
            match = MARKET_NAME.match(path.name)
            assert match, f"{path.name} does not follow the Market-1501 naming"
            found[split].append((path, int(match.group(1)), int(match.group(2))))
    return found


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("tiny"), **TINY)


def test_tree_has_the_market_layout_and_names(tiny):
    assert tiny.name.startswith("market-like-")
    assert sorted(p.name for p in tiny.iterdir()) == sorted([MARKET_DIR, COMPLETE_MARKER])
    assert sorted(p.name for p in (tiny / MARKET_DIR).iterdir()) == sorted(SPLITS)
    found = images(tiny)
    everything = [item for split in SPLITS for item in found[split]]
    assert {cam for _, _, cam in everything} == {1, 2}
    names = [path.name for path, _, _ in everything]
    assert len(set(names)) == len(names)
    for path, _, _ in everything[::7]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (16, 32))


def test_splits_follow_market(tiny):
    found = images(tiny)
    # 8 ids: ids 1-4 train (2 cameras x 3 images), ids 5-8 test: one query per camera, the other two in the
    # gallery, plus max(1, round(5% of 16)) = 1 distractor and max(1, round(2% of 16)) = 1 junk image.
    assert [len(found[split]) for split in SPLITS] == [24, 8, 18]
    assert {pid for _, pid, _ in found["bounding_box_train"]} == {1, 2, 3, 4}
    assert sorted((pid, cam) for _, pid, cam in found["query"]) == [(p, c) for p in range(5, 9) for c in (1, 2)]
    gallery_pids = [pid for _, pid, _ in found["bounding_box_test"]]
    assert sorted(gallery_pids) == [-1, 0] + sorted([5, 6, 7, 8] * 4)
    gallery = {(pid, cam) for _, pid, cam in found["bounding_box_test"]}
    for _, pid, cam in found["query"]:
        assert (pid, 3 - cam) in gallery  # a true match seen by the other camera


def test_odd_identity_count_gives_the_extra_identity_to_training(tmp_path):
    found = images(generate_synthetic(tmp_path, num_ids=9, num_cams=3, images_per_id_cam=4, height=16, width=16))
    # ceil(9 / 2) = 5 training ids x 3 cameras x 4 images; 4 test ids: 12 queries, 36 gallery images,
    # round(5% of 36) = 2 distractors and max(1, round(2% of 36)) = 1 junk image.
    assert [len(found[split]) for split in SPLITS] == [60, 12, 39]
    assert {pid for _, pid, _ in found["bounding_box_train"]} == {1, 2, 3, 4, 5}
    assert sorted(pid for _, pid, _ in found["bounding_box_test"] if pid <= 0) == [-1, 0, 0]


def test_same_parameters_give_identical_bytes(tiny, tmp_path):
    again = generate_synthetic(tmp_path, **TINY)
    assert again.name == tiny.name
    assert tree_bytes(again) == tree_bytes(tiny)


def test_other_seed_or_size_gives_other_images_in_another_folder(tiny, tmp_path):
    other = generate_synthetic(tmp_path, **{**TINY, "seed": 1})
    assert other.name != tiny.name
    ours, theirs = tree_bytes(tiny), tree_bytes(other)
    assert ours.keys() - {COMPLETE_MARKER} == theirs.keys() - {COMPLETE_MARKER}
    assert sum(ours[name] == theirs[name] for name in ours) <= 1  # at most the marker could coincide
    assert generate_synthetic(tmp_path, **{**TINY, "width": 24}).name not in {tiny.name, other.name}


def test_second_call_reuses_the_tree_silently(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="agw_light")
    first = generate_synthetic(tmp_path, **TINY)
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 1 and str(first) in logged[0] and re.search(r"\b50 synthetic images", logged[0])
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    caplog.clear()
    assert generate_synthetic(str(tmp_path), **TINY) == first
    assert caplog.records == []
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps


def test_leftovers_of_crashed_runs_are_ignored_or_replaced(tiny, tmp_path):
    stale_tmp = tmp_path / f"{tiny.name}.tmp-1-dead"
    (stale_tmp / MARKET_DIR / "query").mkdir(parents=True)
    (stale_tmp / MARKET_DIR / "query" / "0001_c1s1_000100_01.jpg").write_bytes(b"half")
    incomplete = tmp_path / tiny.name  # a tree without its marker, e.g. a copy that was interrupted
    (incomplete / MARKET_DIR / "query").mkdir(parents=True)
    (incomplete / MARKET_DIR / "query" / "0001_c1s1_000100_01.jpg").write_bytes(b"half")

    assert generate_synthetic(tmp_path, **TINY) == incomplete
    assert tree_bytes(incomplete) == tree_bytes(tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([tiny.name, stale_tmp.name])


def test_losing_a_race_keeps_the_winners_tree(tiny, tmp_path, monkeypatch):
    target = tmp_path / tiny.name
    render = synthetic._Renderer.render

    def render_while_another_process_finishes(self, spec):
        if not target.exists():
            shutil.copytree(tiny, target)
            (target / COMPLETE_MARKER).write_text("winner\n")
        return render(self, spec)

    monkeypatch.setattr(synthetic._Renderer, "render", render_while_another_process_finishes)
    assert generate_synthetic(tmp_path, **TINY) == target
    assert (target / COMPLETE_MARKER).read_text() == "winner\n"
    assert [p.name for p in tmp_path.iterdir()] == [tiny.name]


def test_a_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(self, spec):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic._Renderer, "render", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_identities_are_recognisable_across_cameras_which_still_differ(tmp_path):
    found = images(generate_synthetic(tmp_path, **TINY))
    people = [item for split in SPLITS for item in found[split] if item[1] > 0]
    pixels = np.stack([np.asarray(Image.open(path), dtype=np.float64) / 255.0 for path, _, _ in people])
    pid = np.array([p for _, p, _ in people])
    cam = np.array([c for _, _, c in people])
    same_id, same_cam = pid[:, None] == pid[None], cam[:, None] == cam[None]
    other_cam_pairs = ~same_cam

    # Clothes: the mean colour of the body centre is closer for the same person seen by the other camera.
    body = pixels[:, 8:24, 5:11].mean(axis=(1, 2))
    body_distance = np.linalg.norm(body[:, None] - body[None], axis=2)
    same_person = body_distance[same_id & other_cam_pairs].mean()
    other_person = body_distance[~same_id & other_cam_pairs].mean()
    assert same_person < 0.9 * other_person

    # Cameras: backgrounds (the left and right borders) are closer within a camera than across cameras,
    # and a person's images from the two cameras are far from identical.
    border = np.concatenate([pixels[:, :, :3], pixels[:, :, -3:]], axis=2).mean(axis=(1, 2))
    border_distance = np.linalg.norm(border[:, None] - border[None], axis=2)
    distinct = ~np.eye(len(pid), dtype=bool)
    assert border_distance[same_cam & distinct].mean() < 0.8 * border_distance[other_cam_pairs].mean()
    pixel_change = np.abs(pixels[:, None] - pixels[None]).mean(axis=(2, 3, 4))
    assert pixel_change[same_id & other_cam_pairs].min() > 0.03


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [
        ("num_ids", 1, ValueError),
        ("num_ids", 10000, ValueError),
        ("num_ids", 2.5, TypeError),
        ("num_cams", 1, ValueError),
        ("num_cams", 10, ValueError),
        ("images_per_id_cam", 1, ValueError),
        ("images_per_id_cam", True, TypeError),
        ("height", 15, ValueError),
        ("width", 8, ValueError),
        ("seed", -1, ValueError),
    ],
)
def test_bad_arguments_are_named_and_nothing_is_written(tmp_path, argument, value, error):
    with pytest.raises(error, match=rf"{argument} must .*got {re.escape(str(value))}"):
        generate_synthetic(tmp_path / "cache", **{**TINY, argument: value})
    assert not (tmp_path / "cache").exists()
