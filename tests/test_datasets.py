"""Dataset parsers against generated trees in the real layouts, checked against the published statistics."""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import pytest

from agw_light.data.datasets import (
    ReIDDataset,
    UnreadableImagesError,
    build_dataset,
    parse_dukemtmcreid,
    parse_market1501,
    parse_msmt17,
    verify_images,
)

# Published statistics (ids, images, cameras) per split, as torchreid and fast-reid document them.
# Market-1501's gallery ids include the distractor pid 0; junk (-1) images are not counted.
MARKET_STATS = {"train": (751, 12936, 6), "query": (750, 3368, 6), "gallery": (751, 15913, 6)}
DUKE_STATS = {"train": (702, 16522, 8), "query": (702, 2228, 8), "gallery": (1110, 17661, 8)}
MSMT_STATS = {"train": (1041, 32621, 15), "query": (3060, 11659, 15), "gallery": (3060, 82161, 15)}
# MSMT17's training images: list_train.txt holds 30248 of them, list_val.txt the other 2373.
MSMT_TRAIN_LIST_IMAGES = 30248

MARKET = "Market-1501-v15.09.15"
DUKE = "DukeMTMC-reID"
MSMT_IMAGE_FOLDERS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}


def touch_all(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.close(os.open(folder / name, os.O_CREAT | os.O_WRONLY))


def spread(num_images: int, pids: list[int], num_cams: int) -> list[tuple[int, int]]:
    """(pid, 1-based camera) per image, cycling both so every id and every camera gets images."""
    return [(pids[k % len(pids)], k % num_cams + 1) for k in range(num_images)]


def market_name(pid: int, camera: int, frame: int) -> str:
    pid_text = "-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_text}_c{camera}s{frame % 6 + 1}_{frame:06d}_{frame % 8:02d}.jpg"


def duke_name(pid: int, camera: int, frame: int) -> str:
    return f"{pid:04d}_c{camera}_f{frame:07d}.jpg"


def msmt_line(pid: int, camera: int, index: int) -> str:
    return f"{pid:04d}/{pid:04d}_{index:03d}_{camera:02d}_0303morning_{index % 10000:04d}_0.jpg {pid}"


def write_folder_layout(dataset_dir: Path, splits: dict[str, list[tuple[int, int]]], name_of) -> None:
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for split, images in splits.items():
        touch_all(dataset_dir / folders[split], [name_of(pid, cam, k) for k, (pid, cam) in enumerate(images)])


def write_msmt(dataset_dir: Path, lists: dict[str, list[str]], version: str = "MSMT17_V1") -> None:
    for folder in MSMT_IMAGE_FOLDERS[version]:
        (dataset_dir / folder).mkdir(parents=True, exist_ok=True)
    for list_name, lines in lists.items():
        (dataset_dir / list_name).write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def full_market(tmp_path_factory) -> Path:
    """Market-1501 at full size: disjoint train (odd) and test (even) pids, plus junk and distractors."""
    root = tmp_path_factory.mktemp("market")
    train_pids = list(range(1, 1502, 2))
    test_pids = list(range(2, 1501, 2))
    splits = {
        "train": spread(12936, train_pids, 6),
        "query": spread(3368, test_pids, 6),
        "gallery": spread(15913, [0, *test_pids], 6) + spread(500, [-1], 6),
    }
    write_folder_layout(root / MARKET, splits, market_name)
    (root / MARKET / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def full_duke(tmp_path_factory) -> Path:
    """DukeMTMC-reID at full size: 702 train ids, 702 test ids and 408 gallery-only distractor ids."""
    root = tmp_path_factory.mktemp("duke")
    train_pids = list(range(1, 1404, 2))
    test_pids = list(range(2, 1405, 2))
    distractor_pids = list(range(5000, 5408))
    splits = {
        "train": spread(16522, train_pids, 8),
        "query": spread(2228, test_pids, 8),
        "gallery": spread(17661, test_pids + distractor_pids, 8),
    }
    write_folder_layout(root / DUKE, splits, duke_name)
    return root


def full_msmt_lists() -> dict[str, list[str]]:
    """Full-size list files; training and test pids both start at 0, as in the release."""
    train = spread(MSMT_STATS["train"][1], list(range(1041)), 15)
    query = spread(MSMT_STATS["query"][1], list(range(3060)), 15)
    gallery = spread(MSMT_STATS["gallery"][1], list(range(3060)), 15)

    def lines(images: list[tuple[int, int]]) -> list[str]:
        return [msmt_line(pid, cam, k) for k, (pid, cam) in enumerate(images)]

    return {
        "list_train.txt": lines(train[:MSMT_TRAIN_LIST_IMAGES]),
        "list_val.txt": lines(train[MSMT_TRAIN_LIST_IMAGES:]),
        "list_query.txt": lines(query),
        "list_gallery.txt": lines(gallery),
    }


def original_pid(path: str) -> int:
    return int(os.path.basename(path).split("_")[0])


def assert_relabelled_in_order(dataset: ReIDDataset) -> None:
    """Training labels are the ranks of the original pids (read back from the file names)."""
    originals = sorted({original_pid(path) for path, _, _ in dataset.train})
    rank = {pid: label for label, pid in enumerate(originals)}
    assert all(label == rank[original_pid(path)] for path, label, _ in dataset.train)
    assert dataset.num_train_pids == len(originals)


@pytest.mark.parametrize("as_dataset_folder", [False, True])
def test_market1501_full_size_matches_published_statistics(full_market, as_dataset_folder):
    dataset = parse_market1501(full_market / MARKET if as_dataset_folder else full_market)
    assert dataset.statistics() == MARKET_STATS
    assert dataset.num_cams == 6
    assert dataset.root == str(full_market / MARKET)
    assert_relabelled_in_order(dataset)
    assert {camid for split in (dataset.train, dataset.query, dataset.gallery) for *_, camid in split} == set(range(6))
    assert 0 in {pid for _, pid, _ in dataset.gallery}
    assert -1 not in {pid for _, pid, _ in dataset.gallery}


@pytest.mark.parametrize("as_dataset_folder", [False, True])
def test_dukemtmcreid_full_size_matches_published_statistics(full_duke, as_dataset_folder):
    dataset = parse_dukemtmcreid(full_duke / DUKE if as_dataset_folder else full_duke)
    assert dataset.statistics() == DUKE_STATS
    assert dataset.num_cams == 8
    assert_relabelled_in_order(dataset)
    assert {camid for *_, camid in dataset.gallery} == set(range(8))


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
@pytest.mark.parametrize("as_dataset_folder", [False, True])
def test_msmt17_full_size_lists_match_published_statistics(tmp_path, version, as_dataset_folder):
    write_msmt(tmp_path / version, full_msmt_lists(), version)
    dataset = parse_msmt17(tmp_path / version if as_dataset_folder else tmp_path)
    assert dataset.statistics() == MSMT_STATS
    assert dataset.num_cams == 15
    assert dataset.root == str(tmp_path / version)
    assert_relabelled_in_order(dataset)
    train_folder, test_folder = MSMT_IMAGE_FOLDERS[version]
    assert dataset.train[0][0] == str(tmp_path / version / train_folder / "0000/0000_000_01_0303morning_0000_0.jpg")
    assert dataset.query[-1][0].startswith(str(tmp_path / version / test_folder) + os.sep)


def test_market1501_relabels_train_drops_junk_keeps_distractors(tmp_path):
    splits = {
        "train": [(7, 1), (3, 6), (12, 3), (3, 2), (-1, 1), (0, 4)],
        "query": [(3, 1), (12, 4), (-1, 2)],
        "gallery": [(3, 2), (12, 5), (0, 6), (-1, 1)],
    }
    write_folder_layout(tmp_path / MARKET, splits, market_name)
    (tmp_path / MARKET / "bounding_box_train" / "Thumbs.db").write_bytes(b"")
    dataset = parse_market1501(tmp_path)

    train_dir = tmp_path / MARKET / "bounding_box_train"
    query_dir = tmp_path / MARKET / "query"
    gallery_dir = tmp_path / MARKET / "bounding_box_test"
    # Sorted by file name; original pids 3, 7, 12 become 0, 1, 2; camera c<k> becomes k - 1.
    assert dataset.train == [
        (str(train_dir / "0003_c2s4_000003_03.jpg"), 0, 1),
        (str(train_dir / "0003_c6s2_000001_01.jpg"), 0, 5),
        (str(train_dir / "0007_c1s1_000000_00.jpg"), 1, 0),
        (str(train_dir / "0012_c3s3_000002_02.jpg"), 2, 2),
    ]
    assert dataset.query == [
        (str(query_dir / "0003_c1s1_000000_00.jpg"), 3, 0),
        (str(query_dir / "0012_c4s2_000001_01.jpg"), 12, 3),
    ]
    assert dataset.gallery == [
        (str(gallery_dir / "0000_c6s3_000002_02.jpg"), 0, 5),
        (str(gallery_dir / "0003_c2s1_000000_00.jpg"), 3, 1),
        (str(gallery_dir / "0012_c5s2_000001_01.jpg"), 12, 4),
    ]
    assert dataset.num_train_pids == 3
    assert dataset.num_cams == 6
    assert dataset.statistics() == {"train": (3, 4, 4), "query": (2, 2, 2), "gallery": (3, 3, 3)}


def test_dukemtmcreid_relabels_train_and_zero_bases_cameras(tmp_path):
    splits = {"train": [(40, 8), (9, 1), (40, 2)], "query": [(17, 8)], "gallery": [(17, 3), (900, 5)]}
    write_folder_layout(tmp_path / DUKE, splits, duke_name)
    dataset = parse_dukemtmcreid(tmp_path / DUKE)
    train_dir = tmp_path / DUKE / "bounding_box_train"
    assert dataset.train == [
        (str(train_dir / "0009_c1_f0000001.jpg"), 0, 0),
        (str(train_dir / "0040_c2_f0000002.jpg"), 1, 1),
        (str(train_dir / "0040_c8_f0000000.jpg"), 1, 7),
    ]
    assert dataset.query == [(str(tmp_path / DUKE / "query" / "0017_c8_f0000000.jpg"), 17, 7)]
    assert [(pid, camid) for _, pid, camid in dataset.gallery] == [(17, 2), (900, 4)]


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_merges_val_into_train_and_reads_pids_and_cameras_from_lists(tmp_path, version):
    write_msmt(
        tmp_path,
        {
            "list_train.txt": [
                "0005/0005_000_15_0303morning_0001_0.jpg 5",
                "0002/0002_001_03_0113noon_0002_1.jpg 2",
            ],
            "list_val.txt": ["0002/0002_002_01_0113noon_0003_0.jpg 2", ""],
            "list_query.txt": ["0000/0000_000_07_0303afternoon_0004_0.jpg 0"],
            "list_gallery.txt": [
                "0000/0000_001_08_0303afternoon_0005_0.jpg 0",
                "0031/0031_004_02_x_0006_0.jpg 31",
            ],
        },
        version,
    )
    dataset = parse_msmt17(tmp_path)
    train_dir, test_dir = (str(tmp_path / folder) + os.sep for folder in MSMT_IMAGE_FOLDERS[version])
    assert dataset.train == [
        (train_dir + "0005/0005_000_15_0303morning_0001_0.jpg", 1, 14),
        (train_dir + "0002/0002_001_03_0113noon_0002_1.jpg", 0, 2),
        (train_dir + "0002/0002_002_01_0113noon_0003_0.jpg", 0, 0),
    ]
    assert dataset.query == [(test_dir + "0000/0000_000_07_0303afternoon_0004_0.jpg", 0, 6)]
    assert [(pid, camid) for _, pid, camid in dataset.gallery] == [(0, 7), (31, 1)]


def test_relative_root_gives_absolute_paths(tmp_path, monkeypatch):
    write_folder_layout(tmp_path / "data" / MARKET, {s: [(1, 1)] for s in ("train", "query", "gallery")}, market_name)
    monkeypatch.chdir(tmp_path)
    dataset = parse_market1501("data")
    assert dataset.root == str(tmp_path / "data" / MARKET)
    assert all(os.path.isabs(path) for path, _, _ in dataset.train + dataset.query + dataset.gallery)


def test_build_dataset_dispatches_to_the_parsers(tmp_path):
    write_folder_layout(tmp_path / MARKET, {s: [(1, 1)] for s in ("train", "query", "gallery")}, market_name)
    write_folder_layout(tmp_path / DUKE, {s: [(1, 1)] for s in ("train", "query", "gallery")}, duke_name)
    write_msmt(tmp_path / "MSMT17_V2", minimal_msmt_lists(), "MSMT17_V2")
    assert build_dataset("market1501", tmp_path) == parse_market1501(tmp_path)
    assert build_dataset("dukemtmcreid", str(tmp_path)) == parse_dukemtmcreid(tmp_path)
    assert build_dataset("msmt17", tmp_path) == parse_msmt17(tmp_path)
    assert build_dataset("market1501", tmp_path).name == "market1501"


def test_build_dataset_synthetic_generates_then_parses_as_market(tmp_path, monkeypatch):
    calls = []

    def generate_synthetic(root, **kwargs):
        calls.append((root, kwargs))
        dataset_folder = Path(root) / "abc123"
        # Cameras beyond Market-1501's six are allowed: the generated set picks its own camera count.
        splits = {"train": [(3, 8), (5, 1)], "query": [(9, 2)], "gallery": [(9, 7), (11, 2)]}
        write_folder_layout(dataset_folder / MARKET, splits, market_name)
        return dataset_folder

    module = types.ModuleType("agw_light.data.synthetic")
    module.generate_synthetic = generate_synthetic
    monkeypatch.setitem(sys.modules, "agw_light.data.synthetic", module)

    dataset = build_dataset("synthetic", tmp_path, num_ids=4, num_cams=8)
    assert calls == [(tmp_path, {"num_ids": 4, "num_cams": 8})]
    assert dataset.name == "synthetic"
    assert dataset.root == str(tmp_path / "abc123" / MARKET)
    assert [(pid, camid) for _, pid, camid in dataset.train] == [(0, 7), (1, 0)]
    assert dataset.num_cams == 4


def test_summary_is_a_table_of_the_statistics(tmp_path):
    splits = {"train": [(3, 1), (4, 2), (4, 3)], "query": [(5, 1)], "gallery": [(5, 2), (0, 3)]}
    write_folder_layout(tmp_path / MARKET, splits, market_name)
    lines = parse_market1501(tmp_path).summary().splitlines()
    cells = [[cell.strip() for cell in line.split("|")] for line in lines if "|" in line]
    assert cells == [
        ["subset", "# ids", "# images", "# cameras"],
        ["train", "2", "3", "3"],
        ["query", "1", "1", "1"],
        ["gallery", "2", "2", "2"],
    ]
    assert "market1501" in lines[0]


@pytest.mark.parametrize(
    ("parse", "expected"),
    [
        (
            parse_market1501,
            "Market-1501-v15.09.15/ with sub-folders bounding_box_train/, query/, bounding_box_test/",
        ),
        (
            parse_dukemtmcreid,
            "DukeMTMC-reID/ with sub-folders bounding_box_train/, query/, bounding_box_test/",
        ),
        (parse_msmt17, "MSMT17_V1/ with train/, test/ or MSMT17_V2/ with mask_train_v2/, mask_test_v2/"),
    ],
)
def test_missing_or_wrong_root_names_the_root_and_the_expected_layout(tmp_path, parse, expected):
    with pytest.raises(FileNotFoundError, match=f"no-such-folder.*does not exist.*; expected {re.escape(expected)}"):
        parse(tmp_path / "no-such-folder")
    (tmp_path / "wrong" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"wrong'? is not an? .* root: expected {re.escape(expected)}"):
        parse(tmp_path / "wrong")


def test_dataset_folder_missing_a_split_folder_is_named(tmp_path):
    (tmp_path / MARKET / "bounding_box_train").mkdir(parents=True)
    (tmp_path / MARKET / "bounding_box_test").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{MARKET}' lacks query/"):
        parse_market1501(tmp_path)


@pytest.mark.parametrize(
    ("parse", "folder", "bad_name", "expected"),
    [
        (parse_market1501, MARKET, "0002_c1_000451_03.jpg", "<pid>_c<camera>s<sequence>_<frame>_<box>.jpg"),
        (parse_market1501, MARKET, "0002_c7s1_000451_03.jpg", "camera in 1..6"),
        (parse_dukemtmcreid, DUKE, "0001_c2s1_f0046182.jpg", "<pid>_c<camera>_f<frame>.jpg"),
        (parse_dukemtmcreid, DUKE, "-1_c2_f0046182.jpg", "<pid>_c<camera>_f<frame>.jpg"),
        (parse_dukemtmcreid, DUKE, "0001_c9_f0046182.jpg", "camera in 1..8"),
    ],
)
def test_unparsable_image_name_names_the_file_and_the_pattern(tmp_path, parse, folder, bad_name, expected):
    name_of = market_name if folder == MARKET else duke_name
    write_folder_layout(tmp_path / folder, {s: [(1, 1)] for s in ("train", "query", "gallery")}, name_of)
    touch_all(tmp_path / folder / "query", [bad_name])
    with pytest.raises(ValueError, match=f"{re.escape(bad_name)}.*{re.escape(expected)}"):
        parse(tmp_path)


def test_split_without_usable_images_is_named(tmp_path):
    splits = {"train": [(1, 1)], "query": [(-1, 1)], "gallery": [(1, 2)]}
    write_folder_layout(tmp_path / MARKET, splits, market_name)
    with pytest.raises(ValueError, match=f"split 'query' has no usable images in .*{MARKET}/query"):
        parse_market1501(tmp_path)
    # Distractors alone are no training set.
    splits = {"train": [(0, 1)], "query": [(1, 1)], "gallery": [(1, 2)]}
    write_folder_layout(tmp_path / "other" / MARKET, splits, market_name)
    with pytest.raises(ValueError, match="split 'train' has no usable images in .*bounding_box_train"):
        parse_market1501(tmp_path / "other")


def minimal_msmt_lists() -> dict[str, list[str]]:
    return {
        name: [msmt_line(1, 1, 0)] for name in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
    }


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("0000/0000_000_01_0303morning_0015_0.jpg", "cannot parse"),
        ("0000/0000_000_01_0303morning_0015_0.jpg zero", "cannot parse"),
        ("0000/0000_01_0303morning.jpg 0", "cannot parse"),
        ("0000/0000_000_16_0303morning_0015_0.jpg 0", "camera 16 .* expected a camera in 1..15"),
        ("0007/0007_000_01_0303morning_0015_0.jpg 5", "label 5 disagrees with pid 7 of the file name '0007/0007_"),
    ],
)
def test_malformed_msmt17_list_line_names_the_list_and_line_number(tmp_path, bad_line, expected):
    lists = minimal_msmt_lists()
    lists["list_gallery.txt"] = [msmt_line(1, 1, 0), msmt_line(2, 2, 1), bad_line]
    write_msmt(tmp_path, lists)
    with pytest.raises(ValueError, match=f"list_gallery.txt, line 3: {expected}"):
        parse_msmt17(tmp_path)


def test_msmt17_root_errors(tmp_path):
    lists = minimal_msmt_lists()
    del lists["list_val.txt"]
    write_msmt(tmp_path / "MSMT17_V1", lists)
    with pytest.raises(FileNotFoundError, match="MSMT17_V1' lacks list_val.txt"):
        parse_msmt17(tmp_path)

    write_msmt(tmp_path / "MSMT17_V1", {**lists, "list_val.txt": []})
    assert parse_msmt17(tmp_path).statistics()["train"] == (1, 1, 1)
    write_msmt(tmp_path / "MSMT17_V1", {**lists, "list_val.txt": [], "list_query.txt": [""]})
    with pytest.raises(ValueError, match="split 'query' has no images: list_query.txt in .*MSMT17_V1"):
        parse_msmt17(tmp_path)

    write_msmt(tmp_path / "MSMT17_V2", minimal_msmt_lists(), "MSMT17_V2")
    with pytest.raises(ValueError, match="holds both MSMT17_V1 and MSMT17_V2; pass the version folder"):
        parse_msmt17(tmp_path)
    assert parse_msmt17(tmp_path / "MSMT17_V2").root == str(tmp_path / "MSMT17_V2")


def test_build_dataset_rejects_unknown_names_and_stray_kwargs(tmp_path):
    with pytest.raises(
        ValueError,
        match="unknown dataset 'cuhk03'; valid names: market1501, dukemtmcreid, msmt17, image_list, image_folders, "
        "synthetic",
    ):
        build_dataset("cuhk03", tmp_path)
    with pytest.raises(TypeError, match="'market1501' takes no keyword arguments; got unexpected num_cams, num_ids"):
        build_dataset("market1501", tmp_path, num_ids=3, num_cams=2)


def test_verify_images_lists_every_unreadable_image_at_once(tmp_path):
    from PIL import Image

    good = tmp_path / "good.jpg"
    pattern = bytes((k * 37) % 251 for k in range(32 * 64 * 3))  # busy pixels: most of the file is image data
    Image.frombytes("RGB", (32, 64), pattern).save(good, quality=90)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"  # its header parses: only decoding finds the missing end
    truncated.write_bytes(data[: len(data) // 2])
    with Image.open(truncated) as header_only:
        assert header_only.size == (32, 64)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [str(p) for p in (good, truncated, tmp_path / "missing.jpg", garbage, good, empty)]

    verify_images([str(good)] * 3, workers=2)
    with pytest.raises(UnreadableImagesError) as caught:
        verify_images(paths, workers=2)
    assert [path for path, _ in caught.value.problems] == [paths[1], paths[2], paths[3], paths[5]]
    message = str(caught.value)
    assert message.startswith("4 of 6 images cannot be read")
    assert f"{truncated}: OSError: image file is truncated" in message
    assert f"{tmp_path / 'missing.jpg'}: FileNotFoundError" in message
    assert f"{garbage}: not an image of the formats read (JPEG, PNG, BMP, WEBP)" in message
    with pytest.raises(ValueError, match="workers >= 1"):
        verify_images(paths, workers=0)


def test_unreadable_images_error_caps_the_listed_files():
    problems = [(f"/data/{k}.jpg", "OSError: broken") for k in range(25)]
    message = str(UnreadableImagesError(problems, 100))
    assert message.startswith("25 of 100 images cannot be read")
    assert "/data/19.jpg: OSError: broken" in message and "/data/20.jpg" not in message
    assert message.endswith("  ... and 5 more")
