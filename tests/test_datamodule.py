"""ReIDDataModule on a tiny generated set: batch contents, P x K training batches, the query+gallery loader
(also sharded as under DDP), Lightning's per-epoch sampler order, clear errors; and the image transforms."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from agw_light.data.samplers import PKSampler
from agw_light.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    build_test_transform,
    build_train_transform,
)
from agw_light.lit.datamodule import ReIDDataModule

HEIGHT, WIDTH = 32, 16
TINY = {"num_ids": 8, "num_cams": 2, "images_per_id_cam": 3, "height": HEIGHT, "width": WIDTH}
# The generator trains on half the identities: 4 identities x 2 cameras x 3 images.
NUM_TRAIN_IDS, TRAIN_IMAGES_PER_ID = 4, 6
BATCH_SIZE, NUM_INSTANCES = 8, 4


def make_datamodule(root, **overrides) -> ReIDDataModule:
    options = {
        "height": HEIGHT,
        "width": WIDTH,
        "batch_size": BATCH_SIZE,
        "num_instances": NUM_INSTANCES,
        "test_batch_size": 5,
        "num_workers": 0,
        "seed": 3,
        "dataset_kwargs": TINY,
    }
    return ReIDDataModule(name="synthetic", root=str(root), **{**options, **overrides})


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory) -> ReIDDataModule:
    module = make_datamodule(tmp_path_factory.mktemp("tiny-synthetic"))
    module.prepare_data()
    module.setup("fit")
    return module


def expected_test_image(path: str) -> torch.Tensor:
    """The test transform by hand (the generated images already have the target size)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    normalised = (pixels - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(normalised).permute(2, 0, 1).float()


def test_train_batches_are_pk_dicts_matching_the_dataset(datamodule):
    loader = datamodule.train_dataloader()
    train = datamodule.dataset.train
    assert datamodule.num_classes == NUM_TRAIN_IDS
    # One chunk of 4 per identity (6 // 4), 2 identities per batch.
    chunks = NUM_TRAIN_IDS * (TRAIN_IMAGES_PER_ID // NUM_INSTANCES)
    assert len(loader) == chunks // (BATCH_SIZE // NUM_INSTANCES)
    batches = list(loader)
    assert len(batches) == len(loader)
    for batch in batches:
        assert set(batch) == {"image", "pid", "camid", "is_query", "index"}
        assert batch["image"].dtype == torch.float32
        assert batch["image"].shape == (BATCH_SIZE, 3, HEIGHT, WIDTH)
        for key in ("pid", "camid", "index"):
            assert batch[key].dtype == torch.int64 and batch[key].shape == (BATCH_SIZE,)
        assert batch["is_query"].dtype == torch.bool and not batch["is_query"].any()
        assert batch["pid"].tolist() == [train[i][1] for i in batch["index"].tolist()]
        assert batch["camid"].tolist() == [train[i][2] for i in batch["index"].tolist()]
        blocks = batch["pid"].view(BATCH_SIZE // NUM_INSTANCES, NUM_INSTANCES)
        assert (blocks == blocks[:, :1]).all() and blocks[:, 0].unique().numel() == blocks.shape[0]


def test_query_gallery_loader_lists_queries_then_gallery_in_order(datamodule):
    dataset = datamodule.dataset
    samples = dataset.query + dataset.gallery
    assert datamodule.num_query == len(dataset.query) == 8  # 4 test identities x 2 cameras
    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        batches = list(loader)
        index = torch.cat([b["index"] for b in batches])
        assert index.tolist() == list(range(len(samples)))
        assert torch.cat([b["is_query"] for b in batches]).tolist() == [i < 8 for i in range(len(samples))]
        assert torch.cat([b["pid"] for b in batches]).tolist() == [pid for _, pid, _ in samples]
        assert torch.cat([b["camid"] for b in batches]).tolist() == [camid for _, _, camid in samples]
        images = torch.cat([b["image"] for b in batches])
        for i in (0, 7, 8, len(samples) - 1):
            torch.testing.assert_close(images[i], expected_test_image(samples[i][0]), atol=1e-5, rtol=0)


def test_validation_split_takes_whole_training_identities_one_query_per_camera(datamodule):
    train = datamodule.dataset.train
    train_pids = sorted({pid for _, pid, _ in train})
    loader = datamodule.validation_split_dataloader(12)  # 12 of 24 images: 2 of the 4 identities
    assert set(loader.dataset.samples) <= set(train)  # training images only, never a test image
    batches = list(loader)
    pids = torch.cat([b["pid"] for b in batches]).tolist()
    camids = torch.cat([b["camid"] for b in batches]).tolist()
    is_query = torch.cat([b["is_query"] for b in batches]).tolist()
    assert sorted(set(pids)) == [train_pids[0], train_pids[-1]]  # evenly spaced identities
    queries = [(pid, cam) for pid, cam, flag in zip(pids, camids, is_query, strict=True) if flag]
    assert sorted(queries) == sorted({(pid, cam) for pid, cam in zip(pids, camids, strict=True)})  # one per camera
    assert is_query == [True] * len(queries) + [False] * (len(pids) - len(queries))  # queries first
    for pid in set(pids):  # every image of a chosen identity is used: the rest form the gallery
        assert pids.count(pid) == sum(sample[1] == pid for sample in train) == TRAIN_IMAGES_PER_ID
    everything = torch.cat([b["pid"] for b in datamodule.validation_split_dataloader(10_000)])
    assert sorted(set(everything.tolist())) == train_pids
    with pytest.raises(ValueError, match="num_images >= 1"):
        datamodule.validation_split_dataloader(0)


def test_validation_split_keeps_a_gallery_image_for_identities_with_one_image_per_camera(tmp_path):
    from agw_light.data.datasets import ReIDDataset

    module = ReIDDataModule(name="mine", root=str(tmp_path), num_workers=0)
    # Identity 0 has one image per camera: one query (its first image), the other one its gallery. Identity 1
    # has two images under camera 0: one query per camera as usual. Negative cameras: no camera ids.
    train = [("a0", 0, 0), ("a1", 0, 1), ("b0", 1, 0), ("b1", 1, 0), ("b2", 1, 1), ("c0", 2, -1), ("c1", 2, -2)]
    module._dataset = ReIDDataset("mine", str(tmp_path), train, train[:1], train[:1])
    loader = module.validation_split_dataloader(100)
    assert [path for path, _, _ in loader.dataset.samples] == ["a0", "b0", "b2", "c0", "a1", "b1", "c1"]
    assert loader.dataset.num_query == 4


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_query_gallery_loaders_cover_every_index(datamodule, world_size):
    total = len(datamodule.dataset.query) + len(datamodule.dataset.gallery)
    shards = [
        torch.cat([b["index"] for b in datamodule.query_gallery_dataloader(world_size, rank)])
        for rank in range(world_size)
    ]
    assert len({len(shard) for shard in shards}) == 1  # equal counts: the sampler pads with repeats
    assert set(torch.cat(shards).tolist()) == set(range(total))
    assert sum(len(shard) for shard in shards) - total < world_size


def test_ddp_train_loaders_split_identities_between_ranks(datamodule):
    per_rank = [list(datamodule._train_dataloader(2, rank)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    for batch_0, batch_1 in zip(*per_rank, strict=True):
        assert not set(batch_0["pid"].tolist()) & set(batch_1["pid"].tolist())


def test_trainer_draws_each_epoch_in_the_sampler_order_of_that_epoch(datamodule):
    import pytorch_lightning as pl

    class RecordIndices(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, list[list[int]]] = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).append(batch["index"].tolist())
            return (self.weight * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    model = RecordIndices()
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, train_dataloaders=datamodule.train_dataloader())
    pids = [pid for _, pid, _ in datamodule.dataset.train]
    reference = PKSampler(pids, num_instances=NUM_INSTANCES, batch_size=BATCH_SIZE, seed=3)
    for epoch in range(3):
        reference.set_epoch(epoch)
        assert model.seen[epoch] == list(reference)
    assert model.seen[0] != model.seen[1]


def test_unreadable_image_error_names_the_file(tmp_path):
    module = make_datamodule(tmp_path)
    module.prepare_data()
    module.setup("test")
    broken = module.dataset.query[2][0]
    with open(broken, "wb") as handle:
        handle.write(b"not a jpeg at all")
    with pytest.raises(OSError, match=re.escape(broken)):
        list(module.test_dataloader())


def test_setup_lists_every_unreadable_image_of_every_split_before_any_loading(tmp_path):
    from agw_light.data.datasets import UnreadableImagesError, build_dataset

    dataset = build_dataset("synthetic", str(tmp_path), **TINY)
    broken = [dataset.train[5][0], dataset.query[2][0], dataset.gallery[-1][0]]
    for path in broken[:2]:
        with open(path, "wb") as handle:
            handle.write(b"not a jpeg at all")
    with open(broken[2], "r+b") as handle:
        handle.truncate(200)
    module = make_datamodule(tmp_path)
    with pytest.raises(UnreadableImagesError, match=r"^3 of \d+ images cannot be read") as caught:
        module.setup("fit")
    assert [path for path, _ in caught.value.problems] == broken
    with pytest.raises(RuntimeError, match=r"call setup\(\) before"):
        module.dataset  # noqa: B018 - a failed check leaves no dataset to train on
    unchecked = make_datamodule(tmp_path, check_images=False)
    unchecked.setup("fit")
    assert unchecked.dataset.gallery[-1][0] == broken[2]


def test_evaluation_loaders_take_another_image_size(datamodule):
    for loader in (
        datamodule.query_gallery_dataloader(preprocessing=Preprocessing((24, 12))),
        datamodule.validation_split_dataloader(12, preprocessing=Preprocessing((24, 12))),
    ):
        assert next(iter(loader))["image"].shape[1:] == (3, 24, 12)
    assert next(iter(datamodule.test_dataloader()))["image"].shape[1:] == (3, HEIGHT, WIDTH)


def test_missing_root_of_a_real_dataset_is_reported(tmp_path):
    missing = tmp_path / "no-market-here"
    module = ReIDDataModule(name="market1501", root=str(missing), num_workers=0)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        module.prepare_data()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        module.setup("fit")


def test_dataset_properties_need_setup(tmp_path):
    module = make_datamodule(tmp_path)
    for name in ("num_classes", "num_query", "dataset"):
        with pytest.raises(RuntimeError, match=r"call setup\(\) before"):
            getattr(module, name)


def test_setup_parses_once_and_logs_the_summary_once(tmp_path, caplog):
    module = make_datamodule(tmp_path)
    module.prepare_data()
    caplog.set_level(logging.INFO, logger="agw_light")
    module.setup("fit")
    dataset = module.dataset
    module.setup("validate")
    assert module.dataset is dataset
    assert [record.getMessage() for record in caplog.records].count(dataset.summary()) == 1


def constant_image(rgb: tuple[int, int, int], size: tuple[int, int] = (20, 10)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def test_test_transform_resizes_and_normalises():
    output = build_test_transform(HEIGHT, WIDTH)(constant_image((200, 100, 50)))
    assert output.shape == (3, HEIGHT, WIDTH) and output.dtype == torch.float32
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(output, expected.view(3, 1, 1).expand(3, HEIGHT, WIDTH), atol=1e-5, rtol=0)


def test_train_transform_flips_pads_and_erases():
    gradient = np.tile(np.arange(WIDTH, dtype=np.uint8)[None, :, None] * 10, (HEIGHT, 1, 3))
    image = Image.fromarray(gradient)
    plain = build_test_transform(HEIGHT, WIDTH)(image)
    flipped = build_train_transform(HEIGHT, WIDTH, flip_p=1.0, padding=0, erasing_p=0.0)(image)
    torch.testing.assert_close(flipped, plain.flip(-1))

    torch.manual_seed(0)
    jittered = build_train_transform(HEIGHT, WIDTH, flip_p=0.0, padding=4, erasing_p=0.0)
    black = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    padded = black.expand(3, HEIGHT + 8, WIDTH + 8).clone()
    padded[:, 4:-4, 4:-4] = plain
    offsets = set()
    for _ in range(20):  # each output is one window of the zero-padded image
        output = jittered(image)
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.allclose(output, padded[:, dy : dy + HEIGHT, dx : dx + WIDTH], atol=1e-5)
        ]
        assert matches
        offsets.add(matches[0])
    assert len(offsets) > 1

    erasing = build_train_transform(HEIGHT, WIDTH, flip_p=0.0, padding=0, erasing_p=1.0)
    largest = 0.4 * HEIGHT * WIDTH + (HEIGHT + WIDTH) / 2 + 1  # AGW's 40 %, plus rounding of both sides
    for _ in range(10):
        erased = (erasing(constant_image((255, 255, 255))) == 0).all(dim=0)  # the mean pixel, normalised
        rows, cols = erased.any(dim=1).nonzero().flatten(), erased.any(dim=0).nonzero().flatten()
        assert erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one rectangle
        assert 0 < erased.sum() <= largest


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: build_test_transform(0, WIDTH), r"height must be a positive integer, got 0"),
        (lambda: build_train_transform(HEIGHT, WIDTH, erasing_p=1.5), r"erasing_p must be .* got 1\.5"),
        (lambda: build_train_transform(HEIGHT, WIDTH, padding=-1), r"padding must be a non-negative .* -1"),
    ],
)
def test_bad_transform_arguments_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()
