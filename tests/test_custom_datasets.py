"""Datasets of one's own: the list and folder layouts, registered parsers, the protocol without camera ids,
and several datasets combined into one training set. Every tree is generated in the test."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agw_light.data import datasets
from agw_light.data.datasets import ReIDDataset, build_dataset, combine_datasets, register_dataset
from agw_light.metrics.rank import evaluate_rank

TINY = ["dataset.height=32", "dataset.width=16", "loader.num_workers=0", "loader.test_batch_size=16"]


@pytest.fixture
def compose(tmp_path):
    """Composes conf/config.yaml with the overrides given (conftest's compose_config adds generated-set keys
    that other datasets lack)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from agw_light.cli import CONF_DIR

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=[f"output_dir={tmp_path / 'run'}", *TINY, *overrides])

    return _compose


def write_image(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (shade, 255 - shade, 60)).save(path)
    return path


def write_lists(root: Path, lists: dict[str, str]) -> Path:
    """Each list's text as given; every image a data line names is created. Returns the root."""
    root.mkdir(parents=True, exist_ok=True)
    for split, text in lists.items():
        (root / f"{split}.txt").write_text(textwrap.dedent(text))
        for line in textwrap.dedent(text).splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].endswith(".jpg") and not fields[0].startswith("missing"):
                write_image(root / fields[0], shade=7 * len(fields[0]) % 255)
    return root


def write_identity_folders(root: Path, splits: dict[str, dict[int, list[str]]]) -> None:
    for split, identities in splits.items():
        for pid, names in identities.items():
            for index, name in enumerate(names):
                write_image(root / split / str(pid) / name, shade=(31 * pid + 5 * index) % 255)


LISTS_WITH_CAMERAS = {
    "train": """\
        # training images: path pid camid
        img/t1.jpg 30 0

        img/t2.jpg 30 1
          # an indented comment
        img/t3.jpg 12 1
        img/t4.jpg 12 2
    """,
    "query": "img/q1.jpg 5 0\n",
    "gallery": "img/g1.jpg 5 1\nimg/g2.jpg 5 0\nimg/g3.jpg 7 2\n",
}

LISTS_WITHOUT_CAMERAS = {
    "train": "t/a.jpg 3\nt/b.jpg 3\nt/c.jpg 9\nt/d.jpg 9\n",
    "query": "q/x.jpg 1\ng/a.jpg 2\n",
    "gallery": "g/a.jpg 2\ng/b.jpg 2\ng/c.jpg 1\ng/d.jpg 4\n",
}


def test_image_list_reads_paths_pids_and_cameras_skipping_comments_and_blank_lines(tmp_path):
    write_lists(tmp_path, LISTS_WITH_CAMERAS)
    dataset = build_dataset("image_list", tmp_path)
    assert dataset.name == "image_list" and dataset.root == str(tmp_path)
    # Training pids relabelled in sorted order (12 -> 0, 30 -> 1); query and gallery keep theirs; cameras as given.
    assert dataset.train == [
        (str(tmp_path / "img/t1.jpg"), 1, 0),
        (str(tmp_path / "img/t2.jpg"), 1, 1),
        (str(tmp_path / "img/t3.jpg"), 0, 1),
        (str(tmp_path / "img/t4.jpg"), 0, 2),
    ]
    assert dataset.query == [(str(tmp_path / "img/q1.jpg"), 5, 0)]
    assert [(pid, camid) for _, pid, camid in dataset.gallery] == [(5, 1), (5, 0), (7, 2)]
    assert dataset.num_cams == 3 and "no camera ids" not in dataset.summary()
    # Other list names, relative to the root.
    (tmp_path / "train.txt").rename(tmp_path / "mine.lst")
    assert build_dataset("image_list", tmp_path, train="mine.lst").train == dataset.train


def test_without_camera_ids_every_image_is_its_own_camera_and_the_summary_says_so(tmp_path):
    write_lists(tmp_path, LISTS_WITHOUT_CAMERAS)
    dataset = build_dataset("image_list", tmp_path)
    cameras = {path: camid for split in ("train", "query", "gallery") for path, _, camid in getattr(dataset, split)}
    assert all(camid < 0 for camid in cameras.values())
    assert len(set(cameras.values())) == len(cameras) == 9  # one per distinct file
    query_own_image = dataset.query[1]
    assert query_own_image in dataset.gallery  # the same file: same pid and the same camera id
    assert dataset.num_cams == 0
    lines = dataset.summary().splitlines()
    assert [cell.strip() for cell in lines[3].split("|")] == ["train", "2", "4", "none"]
    assert lines[-1].startswith("no camera ids for 4 of 4 train, 2 of 2 query, 4 of 4 gallery images")


def test_no_camera_protocol_drops_only_the_query_image_itself(tmp_path):
    """R1 / mAP / mINP of a hand-computed case, with the cameras the parser gives an image list without them."""
    write_lists(tmp_path, LISTS_WITHOUT_CAMERAS)
    dataset = build_dataset("image_list", tmp_path)
    # Queries: x (pid 1) and a (pid 2, also in the gallery). Gallery: a (2), b (2), c (1), d (4).
    distmat = np.array(
        [
            [0.5, 0.4, 0.1, 0.6],  # x: c (match) is first, then b, a, d: R1 hit, AP 1, INP 1/1
            [0.0, 0.3, 0.1, 0.2],  # a: itself (dropped) then c, d, b (match at rank 3): AP 1/3, INP 1/3
        ],
        dtype=np.float32,
    )
    q_pids, q_cams = zip(*[(pid, camid) for _, pid, camid in dataset.query], strict=True)
    g_pids, g_cams = zip(*[(pid, camid) for _, pid, camid in dataset.gallery], strict=True)
    result = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    assert result["num_valid_queries"] == 2
    np.testing.assert_allclose(result["cmc"], [1 / 2, 1 / 2, 1.0])
    assert result["mAP"] == pytest.approx((1 + 1 / 3) / 2)
    assert result["mINP"] == pytest.approx((1 + 1 / 3) / 2)
    # Had a's own image stayed in the gallery it would be a true match at distance 0: R1 would be 1.
    kept = evaluate_rank(distmat, q_pids, g_pids, [0, 0], [1, 1, 1, 1], max_rank=3)
    assert kept["cmc"][0] == 1.0


def lines_of(text: str) -> str:
    return "img/ok.jpg 1 0\n" + text


@pytest.mark.parametrize(
    ("split", "text", "message"),
    [
        ("train", lines_of("img/ok.jpg\n"), r"train.txt, line 2: no pid in 'img/ok.jpg'; expected '<path> <pid>"),
        ("train", lines_of("a b 1 2\n"), r"train.txt, line 2: image '.*/a b' does not exist"),
        (
            "query",
            lines_of("img/ok.jpg \u0661\u0662 0\n"),
            r"query.txt, line 2: pid '\u0661\u0662' is not a non-negative",
        ),
        ("query", lines_of(f"img/ok.jpg 1 {2**63}\n"), rf"query.txt, line 2: camid {2**63} is larger than {2**63 - 1}"),
        ("gallery", lines_of(f"img/ok.jpg {10**30}\n"), rf"gallery.txt, line 2: pid {10**30} is larger than"),
        ("query", lines_of("img/ok.jpg x1 0\n"), r"query.txt, line 2: pid 'x1' is not a non-negative integer"),
        ("query", lines_of("img/ok.jpg -1 0\n"), r"query.txt, line 2: pid '-1' is not a non-negative integer"),
        ("gallery", lines_of("\n\nimg/ok.jpg 1 c1\n"), r"gallery.txt, line 4: camid 'c1' is not a non-negative"),
        ("gallery", lines_of("missing/no.jpg 1 0\n"), r"gallery.txt, line 2: image '.*missing/no.jpg' does not exist"),
        ("gallery", lines_of("img/ok.jpg 1 0\n"), r"gallery.txt, line 2: image '.*ok.jpg' is listed twice in the "),
        ("gallery", lines_of("img/q.jpg 1\n"), r"gallery.txt, line 2: mixes lines with and without a camid \(.*line"),
        ("gallery", "img/q.jpg 9 0\n", r"gallery.txt, line 1: image '.*q.jpg' has pid 9, but pid 1 at .*query.txt"),
        ("train", "# nothing but a comment\n", r"train.txt: lists no image"),
    ],
)
def test_bad_list_lines_name_the_file_the_line_and_what_was_expected(tmp_path, split, text, message):
    """Every value is checked at setup, with its file and line: a pid beyond int64 used to pass and crash a
    DataLoader worker after a training epoch, Unicode digits passed as pids."""
    lists = {"train": "img/t.jpg 1 0\n", "query": "img/q.jpg 1 0\n", "gallery": "img/g.jpg 1 1\n"}
    write_lists(tmp_path, {**lists, split: text})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_dataset("image_list", tmp_path)


def test_missing_list_file_or_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image_list root .*nowhere.* expected a folder holding the list"):
        build_dataset("image_list", tmp_path / "nowhere")
    write_lists(tmp_path, {"train": "t.jpg 1\n", "query": "q.jpg 1\n"})
    with pytest.raises(FileNotFoundError, match=r"image_list gallery list .*gallery.txt' does not exist"):
        build_dataset("image_list", tmp_path)


FOLDERS = {
    "train": {7: ["0007_c1_a.jpg", "0007_c2_b.png"], 3: ["x_c4_1.jpg"]},
    "query": {5: ["q_c1.jpg"]},
    "gallery": {5: ["g_c2.jpg", "g_c1.jpeg"], 0: ["d_c3.jpg"]},
}


def test_image_folders_read_pids_from_folders_and_cameras_from_the_pattern(tmp_path):
    write_identity_folders(tmp_path, FOLDERS)
    (tmp_path / "train" / "7" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "train" / "7" / ".hidden.jpg")
    (tmp_path / "query" / ".DS_Store").write_text("")
    dataset = build_dataset("image_folders", tmp_path, camera_pattern=r"_c(\d+)")
    assert dataset.train == [
        (str(tmp_path / "train/3/x_c4_1.jpg"), 0, 4),
        (str(tmp_path / "train/7/0007_c1_a.jpg"), 1, 1),
        (str(tmp_path / "train/7/0007_c2_b.png"), 1, 2),
    ]
    assert dataset.query == [(str(tmp_path / "query/5/q_c1.jpg"), 5, 1)]
    assert [(pid, camid) for _, pid, camid in dataset.gallery] == [(0, 3), (5, 1), (5, 2)]
    without = build_dataset("image_folders", tmp_path)
    assert [path for path, _, _ in without.train] == [path for path, _, _ in dataset.train]
    assert all(camid < 0 for split in ("train", "query", "gallery") for _, _, camid in getattr(without, split))
    assert "no camera ids" in without.summary()


@pytest.mark.parametrize(
    ("change", "options", "message"),
    [
        (lambda root: (root / "gallery" / "abc").mkdir(), {}, r"identity folder '.*gallery/abc': 'abc' is not a pid"),
        (lambda root: write_image(root / "query" / "loose.jpg"), {}, r"'.*query/loose.jpg' is a file in the query"),
        (lambda root: write_image(root / "train" / "3" / "nocam.jpg"), {"camera_pattern": r"_c(\d+)"}, "nocam.jpg"),
        (lambda root: None, {"camera_pattern": r"_c\d+"}, r"has 0 groups; expected exactly one"),
        (lambda root: None, {"camera_pattern": r"_c(\d+"}, r"is not a regular expression"),
        (lambda root: None, {"camera_pattern": r"_(c)\d"}, r"finds group 'c' in the file name"),
        (lambda root: None, {"query": "probe"}, r"image_folders query folder '.*probe' does not exist; expected"),
    ],
)
def test_bad_identity_folders_name_the_file_and_what_was_expected(tmp_path, change, options, message):
    write_identity_folders(tmp_path, FOLDERS)
    change(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_dataset("image_folders", tmp_path, **options)


def test_an_identity_folder_split_without_images_is_named(tmp_path):
    write_identity_folders(tmp_path, {**FOLDERS, "query": {}})
    (tmp_path / "query" / "4").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"image_folders query folder '.*query' holds no image"):
        build_dataset("image_folders", tmp_path)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the parser registry, so registrations end with the test."""
    monkeypatch.setattr(datasets, "PARSERS", dict(datasets.PARSERS))
    return datasets.PARSERS


def two_people(root, *, seen: str = "x") -> ReIDDataset:
    return ReIDDataset.from_samples(
        "two_people",
        root,
        train=[(f"{root}/{seen}1.jpg", 40, None), (f"{root}/{seen}2.jpg", 41, 3)],
        query=[(f"{root}/q.jpg", 40, 3)],
        gallery=[(f"{root}/g.jpg", 40, None)],
    )


def test_register_dataset_makes_build_dataset_call_the_parser(registry, tmp_path):
    register_dataset("two_people", two_people)
    dataset = build_dataset("two_people", tmp_path, seen="y")
    assert [(Path(path).name, pid, camid) for path, pid, camid in dataset.train] == [
        ("y1.jpg", 0, -1),
        ("y2.jpg", 1, 3),
    ]
    register_dataset("two_people", two_people)  # the same parser again (a module imported twice): harmless
    with pytest.raises(TypeError, match="'two_people' takes keyword arguments seen; got unexpected colour"):
        build_dataset("two_people", tmp_path, colour="red")
    with pytest.raises(ValueError, match="'two_people' is already registered to .*two_people; pass replace=True"):
        register_dataset("two_people", lambda root: two_people(root))
    register_dataset("two_people", lambda root: "not a dataset", replace=True)
    with pytest.raises(TypeError, match="parser of dataset 'two_people' returned str, expected a ReIDDataset"):
        build_dataset("two_people", tmp_path)
    with pytest.raises(ValueError, match="'market1501' is built in"):
        register_dataset("market1501", two_people)
    with pytest.raises(ValueError, match="unknown dataset 'three_people'.*two_people.*register_dataset"):
        build_dataset("three_people", tmp_path)


def test_a_parser_must_return_relabelled_training_pids(registry, tmp_path):
    register_dataset("raw", lambda root: ReIDDataset("raw", str(root), [("a", 5, 0)], [("q", 5, 0)], [("g", 5, 1)]))
    with pytest.raises(ValueError, match=r"training pids that are not 0..0: .*ReIDDataset.from_samples relabels"):
        build_dataset("raw", tmp_path)


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (("a.jpg", "3", 0), r"train sample 1: .* needs an integer pid"),
        (("a.jpg", 3, -2), r"train sample 1: .* camid >= 0 \(None when unknown\)"),
        (("a.jpg", True, 0), r"train sample 1: .* needs an integer pid"),
        (("a.jpg", 3), r"train sample 1: \('a.jpg', 3\) is not a \(path, pid, camid\) triple"),
    ],
)
def test_from_samples_names_a_bad_sample(sample, message):
    with pytest.raises(ValueError, match=message):
        ReIDDataset.from_samples("mine", "/r", [("ok.jpg", 1, 0), sample], [("q", 1, 0)], [("g", 1, 0)])
    with pytest.raises(ValueError, match="dataset 'mine': the query split has no images"):
        ReIDDataset.from_samples("mine", "/r", [("ok.jpg", 1, 0)], [], [("g", 1, 0)])


REGISTERING_MODULE = """
from agw_light.data import ReIDDataset, register_dataset


def parse_corridor(root, *, suffix=".jpg"):
    return ReIDDataset.from_samples(
        "corridor",
        root,
        train=[(f"{root}/train/{pid}_{n}{suffix}", pid, None) for pid in (11, 12) for n in range(4)],
        query=[(f"{root}/test/{pid}_0{suffix}", pid, None) for pid in (21, 22)],
        gallery=[(f"{root}/test/{pid}_{n}{suffix}", pid, None) for pid in (21, 22) for n in range(3)],
    )


register_dataset("corridor", parse_corridor)
"""


@pytest.fixture
def user_config(registry, tmp_path, monkeypatch):
    """A user's module registering "corridor", its images and its dataset config in a folder of their own."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "corridor_data.py").write_text(REGISTERING_MODULE)
    monkeypatch.syspath_prepend(str(code))
    for name in [f"train/{pid}_{n}.jpg" for pid in (11, 12) for n in range(4)] + [
        f"test/{pid}_{n}.jpg" for pid in (21, 22) for n in range(3)
    ]:
        write_image(tmp_path / "corridor" / name)
    conf = tmp_path / "my_conf" / "dataset"
    conf.mkdir(parents=True)
    (conf / "corridor.yaml").write_text(
        f"name: corridor\nregister: corridor_data\nroot: {tmp_path / 'corridor'}\nheight: 32\nwidth: 16\n"
        "check_images: true\nkwargs: {}\n"
    )
    yield f"hydra.searchpath=[file://{conf.parent}]"
    sys.modules.pop("corridor_data", None)


def test_dataset_name_picks_a_registered_parser_whose_module_the_config_names(compose, user_config):
    from agw_light.builders import build_datamodule

    datamodule = build_datamodule(compose(user_config, "dataset=corridor", "loader.batch_size=8"))
    assert "corridor" not in datasets.PARSERS  # imported when the data is prepared, in every process
    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = datamodule.dataset
    assert dataset.name == "corridor" and datamodule.num_classes == 2
    assert "no camera ids" in dataset.summary()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 16)
    # Query 21_0 is also in the gallery, under the same camera id: the protocol drops only that image.
    assert dataset.query[0] == dataset.gallery[0] and len({camid for _, _, camid in dataset.gallery}) == 6
    # Validation split without camera ids: one query per identity, its other images the gallery.
    loader = datamodule.validation_split_dataloader(8)
    assert loader.dataset.num_query == 2 and len(loader.dataset) == 8


def test_a_module_to_register_that_cannot_be_imported_is_named(compose, user_config):
    from agw_light.builders import build_datamodule

    cfg = compose(user_config, "dataset=corridor", "dataset.register=no_such_module_here")
    with pytest.raises(ModuleNotFoundError, match="cannot import 'no_such_module_here', named to register datasets"):
        build_datamodule(cfg).prepare_data()


def test_combine_datasets_offsets_identities_and_cameras(tmp_path):
    write_lists(tmp_path / "lists", LISTS_WITH_CAMERAS)
    write_identity_folders(tmp_path / "folders", FOLDERS)
    with_cameras = build_dataset("image_list", tmp_path / "lists")
    without_cameras = build_dataset("image_folders", tmp_path / "folders")
    other_without = build_dataset("image_list", write_lists(tmp_path / "more", LISTS_WITHOUT_CAMERAS))
    parts = [with_cameras, without_cameras, other_without]
    combined = combine_datasets(parts)
    assert combined.name == "image_list+image_folders+image_list"
    assert combined.num_train_pids == sum(part.num_train_pids for part in parts) == 2 + 2 + 2
    assert sorted({pid for _, pid, _ in combined.train}) == list(range(6))
    labels = [{pid for path, pid, _ in combined.train if path in {p for p, _, _ in part.train}} for part in parts]
    assert labels == [{0, 1}, {2, 3}, {4, 5}]  # disjoint, in order
    assert [path for path, _, _ in combined.train] == [path for part in parts for path, _, _ in part.train]
    assert combined.train[:4] == with_cameras.train  # the first dataset keeps its labels
    cameras = [camid for _, _, camid in combined.train]
    assert cameras[:4] == [0, 1, 1, 2]
    own = cameras[4:]  # no camera ids: negative and unique across both datasets without them
    assert all(camid < 0 for camid in own) and len(set(own)) == len(own)
    assert combined.query is with_cameras.query and combined.gallery is with_cameras.gallery
    summary = combined.summary()
    assert "training splits of image_list" in summary and "query and gallery of image_list" in summary
    assert "no camera ids for 7 of 11 train images" in summary
    with pytest.raises(ValueError, match=r"is in the training splits of both image_list and image_list"):
        combine_datasets([with_cameras, with_cameras])


def test_known_cameras_of_later_datasets_follow_the_earlier_ones(tmp_path):
    write_lists(tmp_path / "a", LISTS_WITH_CAMERAS)
    write_identity_folders(tmp_path / "b", FOLDERS)
    first = build_dataset("image_list", tmp_path / "a")
    second = build_dataset("image_folders", tmp_path / "b", camera_pattern=r"_c(\d+)")
    combined = combine_datasets([first, second])
    assert [camid for _, _, camid in combined.train[4:]] == [4 + 3, 1 + 3, 2 + 3]  # first one's cameras: 0..2


def test_dataset_combined_trains_on_every_named_dataset_and_tests_on_the_first(compose, tmp_path):
    from agw_light.builders import build_datamodule

    write_lists(tmp_path / "lists", LISTS_WITH_CAMERAS)
    write_identity_folders(tmp_path / "folders", FOLDERS)
    synthetic = ["'kwargs.num_ids=4'", "'kwargs.num_cams=2'", "'kwargs.images_per_id_cam=2'"]
    cfg = compose(
        "dataset=combined",
        "dataset.names=[image_list,image_folders,synthetic]",
        f"dataset.overrides={{image_list: {{root: {tmp_path / 'lists'}}}, "
        f"image_folders: {{root: {tmp_path / 'folders'}, kwargs: {{camera_pattern: '_c(\\d+)'}}}}}}",
        f"+dataset.overrides.synthetic=['root={tmp_path / 'cache'}', {', '.join(synthetic)}]",
        "loader.batch_size=4",
        "loader.num_instances=2",
    )
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = datamodule.dataset
    synthetic = dataset.parts[2]
    assert synthetic.train[0][0].endswith(".jpg") and "image_list+image_folders+synthetic" == dataset.name
    assert datamodule.num_classes == 2 + 2 + synthetic.num_train_pids == 2 + 2 + 2
    assert dataset.query == dataset.parts[0].query and dataset.gallery == dataset.parts[0].gallery
    assert datamodule.num_query == 1
    # The generated part is drawn at the run's image size.
    assert Image.open(synthetic.train[0][0]).size == (16, 32)
    # PK batches draw from every dataset's identities; DDP ranks get disjoint identities as before.
    per_rank = [list(datamodule._train_dataloader(2, rank)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    for batch_0, batch_1 in zip(*per_rank, strict=True):
        assert not set(batch_0["pid"].tolist()) & set(batch_1["pid"].tolist())
    drawn = {pid for rank in per_rank for batch in rank for pid in batch["pid"].tolist()}
    assert drawn == set(range(6))


def test_dataset_config_reads_one_dataset_node_with_overrides(tmp_path):
    from omegaconf import OmegaConf

    from agw_light.builders import dataset_config

    synthetic = dataset_config("synthetic", ["height=32", "dataset.width=16", "kwargs.num_ids=6"])
    assert OmegaConf.to_container(synthetic, resolve=True)["kwargs"] == {
        "num_ids": 6,
        "num_cams": 4,
        "images_per_id_cam": 4,
        "height": 32,  # ${dataset.height} resolves inside the dataset node
        "width": 16,
        "seed": 0,
    }
    assert "model" not in synthetic and synthetic.name == "synthetic"
    market = dataset_config("market1501", ["root=/data", "+register=my_module"])
    assert (market.name, market.root, market.register) == ("market1501", "/data", "my_module")
    with pytest.raises(ValueError, match=r"override 'rot=/x': .*market1501.yaml has no key 'rot' \(prefix it with \+"):
        dataset_config("market1501", ["rot=/x"])
    with pytest.raises(
        ValueError, match=r"no dataset config 'cuhk03': looked for dataset/cuhk03.yaml in .*available: "
    ):
        dataset_config("cuhk03")


def test_dataset_config_looks_in_the_running_apps_search_path(user_config):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from agw_light.builders import dataset_config
    from agw_light.cli import CONF_DIR

    with pytest.raises(ValueError, match="no dataset config 'corridor'"):
        dataset_config("corridor")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        app = compose("config", overrides=[user_config], return_hydra_config=True)
    HydraConfig.instance().set_config(app)  # what a running @hydra.main app holds
    try:
        corridor = dataset_config("corridor", ["height=64"])
    finally:
        HydraConfig.instance().cfg = None
    assert (corridor.name, corridor.register, corridor.height) == ("corridor", "corridor_data", 64)


def test_combined_config_errors_name_the_key(compose):
    from agw_light.builders import build_datamodule

    with pytest.raises(ValueError, match=re.escape("dataset.names is empty")):
        build_datamodule(compose("dataset=combined", "dataset.names=[]"))
    with pytest.raises(ValueError, match="dataset.overrides names msmt17, which dataset.names"):
        build_datamodule(compose("dataset=combined", "dataset.overrides={msmt17: ['root=/x']}"))


@pytest.mark.slow
def test_one_epoch_on_combined_datasets_without_camera_ids_trains_and_evaluates(compose, tmp_path):
    """The whole run: the class count is the sum of both training sets, and the final evaluation on the first
    dataset's test split (no camera ids) keeps every query, whose matches are its identity's other images."""
    import torch

    from agw_light.cli.train import train

    folders = {
        "train": {pid: [f"{pid}_{n}.jpg" for n in range(4)] for pid in (1, 2, 3, 4)},
        "query": {pid: [f"q{pid}.jpg"] for pid in (8, 9)},
        "gallery": {pid: [f"g{pid}_{n}.jpg" for n in range(3)] for pid in (8, 9)},
    }
    write_identity_folders(tmp_path / "folders", folders)
    write_lists(
        tmp_path / "lists", {**LISTS_WITHOUT_CAMERAS, "train": "".join(f"t/{n}.jpg {n // 4}\n" for n in range(8))}
    )
    cfg = compose(
        "dataset=combined",
        "dataset.names=[image_folders,image_list]",
        f"+dataset.overrides.image_folders.root={tmp_path / 'folders'}",
        f"+dataset.overrides.image_list.root={tmp_path / 'lists'}",
        "loader.batch_size=8",
        "loader.num_instances=4",
        "model.backbone=resnet18",
        "model.pretrained=none",
        "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false",
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
        "visualize.num_queries=0",
        "visualize.embedding_size=0",
    )
    row = train(cfg)
    assert row["num_valid_queries"] == 2
    state = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["num_classes"] == 4 + 2


def test_paths_with_spaces_are_read_from_the_right_and_a_non_utf8_list_is_named(tmp_path):
    lists = {
        "train": "my photos/a b.jpg 3 0\nmy photos/c.jpg 4 1\n",
        "query": "my photos/q 1.jpg 3 1\n",
        "gallery": "my photos/g  2.jpg\t3 0\n",
    }
    for split, text in lists.items():
        (tmp_path / f"{split}.txt").write_text(text)
    for shade, name in enumerate(["a b.jpg", "c.jpg", "q 1.jpg", "g  2.jpg"]):
        write_image(tmp_path / "my photos" / name, shade=40 * shade)
    dataset = build_dataset("image_list", tmp_path)
    assert [(Path(path).name, pid, camid) for path, pid, camid in dataset.train] == [("a b.jpg", 0, 0), ("c.jpg", 1, 1)]
    assert [Path(path).name for path, _, _ in dataset.query + dataset.gallery] == ["q 1.jpg", "g  2.jpg"]
    (tmp_path / "query.txt").write_bytes(b"my photos/q 1.jpg 3 1\nmy photos/caf\xe9.jpg 3 1\n")
    with pytest.raises(ValueError, match=r"query.txt, line 2: byte 0xe9 is not UTF-8 text"):
        build_dataset("image_list", tmp_path)
    # "q 1.jpg 3 1" now reads as image "q 1.jpg" (pid 3, camid 1) and as image "q 1.jpg 3" (pid 1)
    (tmp_path / "my photos" / "q 1.jpg 3").write_bytes((tmp_path / "my photos" / "c.jpg").read_bytes())
    (tmp_path / "query.txt").write_text("my photos/q 1.jpg 3 1\n")
    with pytest.raises(ValueError, match=r"query.txt, line 1: .* both exist; rename one of them"):
        build_dataset("image_list", tmp_path)


def test_byte_identical_images_across_splits_are_warned_about_and_can_be_dropped(tmp_path, caplog):
    """A gallery copy of a query under another name (no camera ids) is a true match at distance 0 the
    protocol keeps (R1 = 1.000 silently); a training image listed or copied into the test set is learnt
    before it is ranked. Setup warns with the counts and the first pairs; drop_duplicates removes them."""
    import logging

    from agw_light.data.duplicates import find_duplicates
    from agw_light.lit.datamodule import ReIDDataModule

    for shade, name in enumerate(["q", "g1", "g2", "t1", "t2", "t3"]):
        write_image(tmp_path / "img" / f"{name}.jpg", shade=30 * shade)
    copy = tmp_path / "img" / "q_copy.jpg"
    copy.write_bytes((tmp_path / "img" / "q.jpg").read_bytes())  # same bytes, same size, another name
    (tmp_path / "img" / "t_copy.jpg").write_bytes((tmp_path / "img" / "g2.jpg").read_bytes())
    lists = {
        "train": "img/t1.jpg 5\nimg/t2.jpg 5\nimg/t3.jpg 6\nimg/g1.jpg 7\nimg/t_copy.jpg 7\n",
        "query": "img/q.jpg 1\n",
        "gallery": "img/q.jpg 1\nimg/q_copy.jpg 1\nimg/g1.jpg 2\nimg/g2.jpg 3\n",
    }
    for split, text in lists.items():
        (tmp_path / f"{split}.txt").write_text(text)
    dataset = build_dataset("image_list", tmp_path)
    found = find_duplicates(dataset)
    img = str(tmp_path / "img")
    # q.jpg listed in the gallery too is its own camera, same pid: the protocol removes it; the copy stays.
    assert found.query_gallery == [(f"{img}/q.jpg", f"{img}/q_copy.jpg")]
    assert found.train_test == [(f"{img}/g1.jpg", f"{img}/g1.jpg"), (f"{img}/t_copy.jpg", f"{img}/g2.jpg")]

    for drop in (False, True):
        module = ReIDDataModule("image_list", str(tmp_path), num_workers=0, drop_duplicates=drop)
        with caplog.at_level(logging.WARNING, logger="agw_light.lit.datamodule"):
            caplog.clear()
            module.setup("fit")
        warning = caplog.text
        assert "1 gallery images are byte-identical copies of a query" in warning and f"{img}/q_copy.jpg" in warning
        assert "2 training images are byte-identical to a query or gallery image (train/test overlap)" in warning
        gallery = [Path(path).name for path, _, _ in module.dataset.gallery]
        train = [(Path(path).name, pid) for path, pid, _ in module.dataset.train]
        if drop:
            assert gallery == ["q.jpg", "g1.jpg", "g2.jpg"] and train == [("t1.jpg", 0), ("t2.jpg", 0), ("t3.jpg", 1)]
        else:
            assert len(gallery) == 4 and len(train) == 5
