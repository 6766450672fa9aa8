"""Ranked-list pictures: protocol-exact ranking, frame colours, the visualize CLI and the TensorBoard callback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from agw_light.metrics.metric import ReIDMetric
from agw_light.visualization import (
    MATCH_COLOUR,
    MISMATCH_COLOUR,
    QUERY_COLOUR,
    draw_ranked_list,
    load_thumbnails,
    pick_positions,
    rank_queries,
)


def slow_ranking(query, gallery, q_pids, q_camids, g_pids, g_camids, metric, topk):
    """One query at a time in plain numpy: drop same-pid-same-camera items, sort by (distance, gallery index)."""
    results = []
    for q in range(len(query)):
        rows = []
        for g in range(len(gallery)):
            if q_pids[q] == g_pids[g] and q_camids[q] == g_camids[g]:
                continue
            if metric == "cosine":
                a, b = query[q], gallery[g]
                distance = 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
            else:
                distance = int(((query[q] > 0) != (gallery[g] > 0)).sum())
            rows.append((distance, g))
        rows.sort()
        results.append([(g, distance, bool(g_pids[g] == q_pids[q])) for distance, g in rows[:topk]])
    return results


@pytest.mark.parametrize("metric, dim", [("cosine", 16), ("hamming", 6)])  # 6 bits: Hamming ties everywhere
def test_rank_queries_matches_slow_protocol_reference(metric, dim):
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((60, dim)).astype(np.float32)
    query = rng.standard_normal((9, dim)).astype(np.float32)
    g_pids, g_camids = rng.integers(0, 5, 60), rng.integers(0, 3, 60)
    q_pids, q_camids = rng.integers(0, 5, 9), rng.integers(0, 3, 9)
    # Junk planted as each query's nearest neighbours: same pid, same camera, (almost) the query's feature.
    for q in range(9):
        gallery[5 * q] = query[q] + 1e-3
        g_pids[5 * q], g_camids[5 * q] = q_pids[q], q_camids[q]
    indices, distances, matches = rank_queries(
        torch.from_numpy(query), torch.from_numpy(gallery), q_pids, q_camids, g_pids, g_camids, metric=metric, topk=7
    )
    assert indices.shape == distances.shape == matches.shape == (9, 7)
    expected = slow_ranking(query, gallery, q_pids, q_camids, g_pids, g_camids, metric, 7)
    for q in range(9):
        assert indices[q].tolist() == [g for g, _, _ in expected[q]]
        assert distances[q].tolist() == pytest.approx([d for _, d, _ in expected[q]], abs=1e-5)
        assert matches[q].tolist() == [m for _, _, m in expected[q]]
        assert 5 * q not in indices[q].tolist()
    assert bool((distances[:, 1:] >= distances[:, :-1]).all())
    assert matches.any() and not matches.all()
    if metric == "hamming":
        assert distances.dtype == torch.int64


def test_rank_queries_refuses_topk_beyond_what_a_query_keeps():
    features = torch.eye(4)
    pids, camids = torch.tensor([1, 1, 2, 3]), torch.tensor([0, 0, 0, 0])
    # Query 0 (pid 1, camera 0) loses gallery items 0 and 1 to the protocol: 2 left.
    indices, _, _ = rank_queries(features[:1], features, pids[:1], camids[:1], pids, camids, metric="cosine", topk=2)
    assert sorted(indices[0].tolist()) == [2, 3]
    with pytest.raises(ValueError, match=r"topk=3.*\[1, 2\]"):
        rank_queries(features[:1], features, pids[:1], camids[:1], pids, camids, metric="cosine", topk=3)


def test_pick_positions():
    assert pick_positions(10, 4).tolist() == [0, 2, 5, 7]
    assert pick_positions(3, 3).tolist() == [0, 1, 2]
    seeded = pick_positions(100, 8, seed=3)
    assert seeded.tolist() == pick_positions(100, 8, seed=3).tolist() == sorted(set(seeded.tolist()))
    with pytest.raises(ValueError, match="cannot pick 5 of 4"):
        pick_positions(4, 5)


def test_draw_ranked_list_frames_and_size():
    grey = Image.new("RGB", (10, 20), (128, 128, 128))
    picture = draw_ranked_list(
        grey, [grey, grey, grey], torch.tensor([0.1, 0.2, 0.3]), torch.tensor([True, False, True]), thumb_size=(20, 10)
    )
    # Cells: 10 + 2 * 3 (frame) = 16 wide, 20 + 6 + 14 (label) = 40 high; margin 4; query gap 16; spacing 4.
    assert picture.size == (4 + 16 + 16 + 3 * 16 + 2 * 4 + 4, 4 + 40 + 4)
    pixels = np.asarray(picture)
    gallery_lefts = [36, 56, 76]
    assert tuple(pixels[5, 5]) == QUERY_COLOUR
    for left, colour in zip(gallery_lefts, [MATCH_COLOUR, MISMATCH_COLOUR, MATCH_COLOUR], strict=True):
        for y, x in ((5, left + 1), (4 + 25, left + 8), (4 + 12, left + 14)):  # top, bottom and right frame
            assert tuple(pixels[y, x]) == colour
        assert tuple(pixels[4 + 10, left + 8]) == (128, 128, 128)  # the thumbnail inside
        label = pixels[4 + 26 : 4 + 40, left : left + 16]
        assert (label < 100).all(axis=2).any()  # dark text under each image
    assert tuple(pixels[20, 32]) == (255, 255, 255)  # the gap after the query
    labels = [pixels[4 + 26 : 4 + 40, left : left + 16] for left in gallery_lefts]
    assert not np.array_equal(labels[0], labels[1])  # 0.100 and 0.200 read differently


def test_draw_ranked_list_checks_lengths():
    grey = Image.new("RGB", (10, 20))
    with pytest.raises(ValueError, match="2 gallery images, 1 distances"):
        draw_ranked_list(grey, [grey, grey], [0.1], [True])


def test_thumbnails_are_square_and_keep_aspect(tmp_path):
    path = tmp_path / "person.png"
    Image.new("RGB", (16, 32), (255, 0, 0)).save(path)
    thumbnails = load_thumbnails([str(path)], side=8)
    assert thumbnails.shape == (1, 3, 8, 8)
    assert thumbnails[0, :, 4, 4].tolist() == [1.0, 0.0, 0.0]  # the image, 4 wide, centred
    assert thumbnails[0, :, 4, 0].tolist() == [1.0, 1.0, 1.0]  # white padding at the sides


def test_gathered_samples_drop_repeats_in_index_order():
    metric = ReIDMetric()
    metric.update(
        torch.tensor([[3.0], [1.0]]),
        torch.tensor([30, 10]),
        torch.tensor([0, 0]),
        torch.tensor([False, True]),
        torch.tensor([3, 1]),
    )
    metric.update(
        torch.tensor([[9.0], [2.0]]),
        torch.tensor([99, 20]),
        torch.tensor([0, 1]),
        torch.tensor([False, False]),
        torch.tensor([3, 2]),
    )  # index 3 again: a DDP padding repeat
    samples = metric.gathered_samples()
    assert samples["index"].tolist() == [1, 2, 3]
    assert samples["features"].squeeze(1).tolist() == [1.0, 2.0, 3.0]
    assert samples["pids"].tolist() == [10, 20, 30]
    assert samples["is_query"].tolist() == [True, False, False]
    assert ReIDMetric().gathered_samples() is None


def _frame_colours(picture_path, topk: int) -> list[tuple[int, ...]]:
    """The top-frame colour of each ranked image in a CLI picture (default 128x64 thumbnails)."""
    pixels = np.asarray(Image.open(picture_path).convert("RGB"))
    return [tuple(pixels[5, 4 + 70 + 16 + rank * 74 + 1]) for rank in range(topk)]


def test_cli_writes_one_picture_per_query_matching_the_protocol(compose_config, tiny_teacher, tmp_path):
    from agw_light.cli.visualize import visualize_checkpoint
    from agw_light.evaluation import extract_features
    from agw_light.inference.checkpoint import load_checkpoint

    checkpoint, datamodule = tiny_teacher
    cfg = compose_config(f"ckpt={checkpoint}", "num_queries=3", "topk=5", "device=cpu", config_name="visualize")
    written = visualize_checkpoint(cfg.ckpt, cfg, datamodule=datamodule)

    out = checkpoint.parent / "ranked_lists"
    query = datamodule.dataset.query
    positions = [0, len(query) // 3, 2 * len(query) // 3]
    names = [f"query_{p}_pid{query[p][1]}.png" for p in positions]
    assert written == [out / name for name in names] + [out / "ranked_lists.png"]
    assert sorted(path.name for path in out.iterdir()) == sorted([*names, "ranked_lists.png"])  # no temp files
    row_size = (4 + 70 + 16 + 5 * 70 + 4 * 4 + 4, 4 + 128 + 6 + 14 + 4)
    assert all(Image.open(path).size == row_size for path in written[:-1])
    assert Image.open(written[-1]).size == (row_size[0], 3 * row_size[1])

    samples = extract_features(
        load_checkpoint(checkpoint).network, datamodule.query_gallery_dataloader(), torch.device("cpu")
    )
    features, pids, camids = samples["features"].numpy(), samples["pids"].numpy(), samples["camids"].numpy()
    q, g = slice(0, len(query)), slice(len(query), None)
    expected = slow_ranking(
        features[q][positions], features[g], pids[q][positions], camids[q][positions], pids[g], camids[g], "cosine", 5
    )
    for path, ranking in zip(written, expected, strict=False):
        assert _frame_colours(path, 5) == [MATCH_COLOUR if match else MISMATCH_COLOUR for _, _, match in ranking]


def test_cli_errors_are_clear(compose_config, tiny_teacher, tmp_path):
    from agw_light.cli.visualize import visualize_checkpoint

    checkpoint, datamodule = tiny_teacher
    gallery_size = len(datamodule.dataset.gallery)
    for override, message in (
        ("num_queries=0", "num_queries=0: expected an integer from 1"),
        (f"topk={gallery_size + 1}", f"topk={gallery_size + 1}: .* gallery"),
    ):
        cfg = compose_config(f"ckpt={checkpoint}", override, config_name="visualize")
        with pytest.raises(ValueError, match=message):
            visualize_checkpoint(cfg.ckpt, cfg, datamodule=datamodule)
    cfg = compose_config(f"ckpt={tmp_path / 'missing.ckpt'}", config_name="visualize")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        visualize_checkpoint(cfg.ckpt, cfg, datamodule=datamodule)


def test_cli_feeds_the_trained_image_size_unless_another_is_asked_for(
    compose_config, tiny_teacher, tmp_path, monkeypatch
):
    from agw_light import evaluation
    from agw_light.cli.visualize import visualize_checkpoint

    teacher, datamodule = tiny_teacher
    checkpoint = torch.load(teacher, weights_only=True)
    checkpoint["hyper_parameters"]["image_size"] = (48, 24)  # the tiny dataset's DataModule is 64 x 32
    trained = tmp_path / "trained_48x24.ckpt"
    torch.save(checkpoint, trained)
    sizes = []
    extract = evaluation.extract_features

    def recording(module, loader, device, **kwargs):
        sizes.append({tuple(batch["image"].shape[-2:]) for batch in loader})
        return extract(module, loader, device, **kwargs)

    monkeypatch.setattr(evaluation, "extract_features", recording)
    for override in ("image_size=null", "image_size=[32,16]"):
        cfg = compose_config(
            f"ckpt={trained}", "num_queries=1", "topk=2", "device=cpu", override, config_name="visualize"
        )
        visualize_checkpoint(cfg.ckpt, cfg, datamodule=datamodule, out_dir=tmp_path / "pictures")
    assert sizes == [{(48, 24)}, {(32, 16)}]


def test_cli_refuses_a_checkpoint_holding_code_and_the_code_never_runs(compose_config, crafted_checkpoint, tmp_path):
    from agw_light.cli.visualize import visualize_checkpoint

    (crafted, marker), out = crafted_checkpoint, tmp_path / "pictures"
    cfg = compose_config(f"ckpt={crafted}", f"out={out}", config_name="visualize")
    with pytest.raises(ValueError, match=r"checkpoint .*crafted\.ckpt cannot be read safely"):
        visualize_checkpoint(cfg.ckpt, cfg)
    assert not marker.exists() and not out.exists()


def _tiny_module(datamodule):
    from agw_light.lit.module import LitReID

    torch.manual_seed(0)
    losses = [{"name": "ce", "type": "cross_entropy", "weight": 1.0, "output": "logits"}]
    return LitReID(
        model={"backbone": "resnet18", "pretrained": "none"}, losses=losses, num_classes=datamodule.num_classes
    )


def test_callback_logs_ranked_lists_and_projector_to_tensorboard(tiny_teacher, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from agw_light.lit.callbacks import RankedListLogger

    _, datamodule = tiny_teacher
    module = _tiny_module(datamodule)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="")
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[RankedListLogger(num_queries=3, topk=4, embedding_size=20)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert module.keep_validation_samples and module.validation_samples is None  # freed after drawing

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["test/ranked_lists"]  # the validation loop scores the test split
    [image] = events.Images("test/ranked_lists")  # the sanity check draws nothing
    assert (image.width, image.height) == (4 + 70 + 16 + 4 * 70 + 3 * 4 + 4, 3 * (4 + 148 + 4))
    projector = (tmp_path / "tb" / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "test/gallery:' in projector and "sprite" in projector
    [tensors] = (tmp_path / "tb").glob("*/*/tensors.tsv")
    assert len(tensors.read_text().splitlines()) == 20


def test_callback_without_tensorboard_keeps_nothing(tiny_teacher):
    import pytorch_lightning as pl

    from agw_light.lit.callbacks import RankedListLogger

    _, datamodule = tiny_teacher
    module = _tiny_module(datamodule)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, callbacks=[RankedListLogger()], enable_progress_bar=False, limit_val_batches=1
    )
    trainer.validate(module, datamodule=datamodule)
    assert not module.keep_validation_samples and module.validation_samples is None
    with pytest.raises(ValueError, match=r"visualize.topk=0: expected an integer >= 1"):
        RankedListLogger(topk=0)
