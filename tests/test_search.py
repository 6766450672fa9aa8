"""Search engine: packing, exact Hamming and cosine search against slow references, coarse-to-fine search
against a per-query reference, candidate fitting without labels, and the persistent index format."""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from agw_light.files import file_sha256
from agw_light.metrics import RankAccumulator, evaluate_rank
from agw_light.search import (
    CoarseToFineIndex,
    FloatIndex,
    GalleryMetadata,
    HammingIndex,
    fit_candidates,
    hamming_distances,
    hamming_reference,
    load_index,
    pack_codes,
    split_levels,
    unpack_codes,
)
from agw_light.search import storage as storage_module

LEVELS = (64, 16, 8)  # the model's order: longest first


def random_bits(rng: np.random.Generator, rows: int, bits: int) -> np.ndarray:
    return rng.random((rows, bits)) < 0.5


def planted_pyramid(rng: np.random.Generator, rows: int, flip: float = 0.0, base=None) -> np.ndarray:
    """±1 pyramid codes (rows, 88) in LEVELS order; with `base`, copies of it `flip` of the bits flipped"""
    codes = np.where(random_bits(rng, rows, sum(LEVELS)), 1.0, -1.0) if base is None else base.copy()
    if flip:
        codes[rng.random(codes.shape) < flip] *= -1
    return codes


def reference_coarse_to_fine(query_levels, gallery_levels, candidates, k):
    """Per query: stable sort of each stage's survivors by (distance, index), keep the first c; also the
    full ranking (final survivors first, then items dropped at later stages before earlier ones)."""
    results, rankings = [], []
    for q in range(len(query_levels[0])):
        alive, dropped = np.arange(len(gallery_levels[0])), []
        for stage, count in enumerate([*candidates, None]):
            alive = np.sort(alive)  # increasing indices: a stable sort then orders ties by index
            dist = hamming_reference(query_levels[stage][q : q + 1], gallery_levels[stage][alive])[0]
            alive = alive[np.argsort(dist, kind="stable")]
            keep = len(alive) if count is None else min(max(count, k), len(alive))
            dropped.append(alive[keep:])
            alive = alive[:keep]
        results.append(alive[:k])
        rankings.append(np.concatenate([alive, *dropped[::-1]]))
    return np.array(results), np.array(rankings)


def packed_levels(codes: np.ndarray) -> list[np.ndarray]:
    """Packed codes per stage, shortest level first."""
    by_length = dict(zip(LEVELS, split_levels(codes, LEVELS), strict=True))
    return [pack_codes(by_length[bits]) for bits in sorted(LEVELS)]


# --- codes -------------------------------------------------------------------------------------------------


def test_pack_bit_order_by_hand():
    codes = np.array([[1, 0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(pack_codes(codes), [[0x81, 0x80], [0x40, 0x00]])


@pytest.mark.parametrize("bits", [1, 7, 8, 63, 64, 65, 130])
def test_pack_round_trip_from_every_input_type(bits):
    rng = np.random.default_rng(bits)
    bool_codes = random_bits(rng, 11, bits)
    signed = np.where(bool_codes, 0.5, -2.0).astype(np.float32)
    tensor = torch.from_numpy(signed)
    for codes in (bool_codes, bool_codes.astype(np.int64), signed, tensor, tensor.to(torch.bfloat16)):
        packed = pack_codes(codes)
        assert packed.dtype == np.uint8 and packed.shape == (11, (bits + 7) // 8)
        np.testing.assert_array_equal(unpack_codes(packed, bits), bool_codes)


def test_zero_is_a_zero_bit_and_bad_input_is_named():
    np.testing.assert_array_equal(unpack_codes(pack_codes(np.zeros((1, 3))), 3), [[False] * 3])
    with pytest.raises(ValueError, match=r"packed must be packed 12-bit codes: uint8 of shape \(N, 2\)"):
        unpack_codes(np.zeros((2, 3), dtype=np.uint8), 12)
    with pytest.raises(ValueError, match="shape"):
        pack_codes(np.zeros(5))


def test_split_levels_numpy_and_torch():
    features = np.arange(2 * 11, dtype=np.float32).reshape(2, 11)
    parts = split_levels(features, (8, 2, 1))
    assert [part.shape for part in parts] == [(2, 8), (2, 2), (2, 1)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), features)
    torch_parts = split_levels(torch.from_numpy(features), (8, 2, 1))
    assert all(torch.equal(t, torch.from_numpy(p)) for t, p in zip(torch_parts, parts, strict=True))
    with pytest.raises(ValueError, match=r"add up to 10"):
        split_levels(features, (8, 2))


def test_hamming_by_hand():
    query = pack_codes(np.array([[1, 1, 0, 0, 1]]))
    gallery = pack_codes(np.array([[1, 1, 0, 0, 1], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0]]))
    np.testing.assert_array_equal(hamming_reference(query, gallery), [[0, 5, 2]])
    np.testing.assert_array_equal(hamming_distances(query, gallery), [[0, 5, 2]])


@pytest.mark.parametrize("bits", [5, 32, 64, 100, 130, 2048])
def test_hamming_equals_reference(bits):
    rng = np.random.default_rng(bits)
    query, gallery = pack_codes(random_bits(rng, 9, bits)), pack_codes(random_bits(rng, 37, bits))
    np.testing.assert_array_equal(hamming_distances(query, gallery), hamming_reference(query, gallery))


# --- exact indexes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 100, 256])
def test_hamming_index_equals_stable_argsort(bits):
    rng = np.random.default_rng(bits)
    gallery, queries = random_bits(rng, 300, bits), random_bits(rng, 25, bits)
    index = HammingIndex(bits)
    index.add(gallery)
    distances, indices = index.search(queries, 20)
    reference = hamming_reference(pack_codes(queries), pack_codes(gallery))
    order = np.argsort(reference, axis=1, kind="stable")[:, :20]  # 16 bits: heavy ties, index order
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(distances, np.take_along_axis(reference, order, axis=1))
    assert index.search(queries, 1000)[1].shape == (25, 300)


def test_hamming_index_takes_packed_codes_and_ignores_padding_bits():
    rng = np.random.default_rng(0)
    gallery = random_bits(rng, 50, 12)
    packed = pack_codes(gallery)
    packed[:, -1] |= 0x0F  # set the 4 padding bits: they must not count
    by_values, by_packed = HammingIndex(12), HammingIndex(12)
    by_values.add(gallery)
    by_packed.add(packed)
    np.testing.assert_array_equal(by_packed.codes, pack_codes(gallery))
    np.testing.assert_array_equal(by_values.search(gallery[:5], 7)[1], by_packed.search(packed[:5], 7)[1])
    with pytest.raises(ValueError, match=r"\(N, 12\) code values .* or \(N, 2\) packed uint8"):
        by_values.add(np.zeros((3, 5)))


def test_float_index_equals_torch_cosine_top_k():
    rng = np.random.default_rng(0)
    gallery, queries = rng.standard_normal((200, 32)), rng.standard_normal((15, 32))
    index = FloatIndex(32)
    index.add(torch.from_numpy(gallery))
    distances, indices = index.search(queries, 10)
    cosine = (
        torch.nn.functional.normalize(torch.from_numpy(queries), dim=1)
        @ torch.nn.functional.normalize(torch.from_numpy(gallery), dim=1).T
    )
    top = torch.topk(cosine, 10, dim=1)
    np.testing.assert_array_equal(indices, top.indices.numpy())
    np.testing.assert_allclose(distances, 1 - top.values.numpy(), atol=1e-5)


# --- coarse-to-fine ----------------------------------------------------------------------------------------


def make_index(codes, candidates=None, metadata=None) -> CoarseToFineIndex:
    index = CoarseToFineIndex(LEVELS, candidates)
    index.add(codes, metadata)
    return index


def test_keeping_every_candidate_is_exact_search():
    rng = np.random.default_rng(1)
    gallery, queries = planted_pyramid(rng, 120), planted_pyramid(rng, 30)
    index = make_index(gallery, candidates=(120, 120))
    exact = HammingIndex(64)
    exact.add(gallery[:, :64])
    for k in (1, 10, 120):
        for got, want in zip(index.search(queries, k), exact.search(queries[:, :64], k), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("candidates", [(40, 12), (100, 100), (7, 3), (120, 9)])
def test_search_and_ranking_equal_the_per_query_reference(candidates):
    rng = np.random.default_rng(2)
    gallery, queries = planted_pyramid(rng, 120), planted_pyramid(rng, 14)
    index = make_index(gallery, candidates)
    expected_top, expected_ranking = reference_coarse_to_fine(
        packed_levels(queries), packed_levels(gallery), candidates, k=5
    )
    distances, indices = index.search(queries, 5)
    np.testing.assert_array_equal(indices, expected_top)
    full = hamming_reference(pack_codes(queries[:, :64]), pack_codes(gallery[:, :64]))
    np.testing.assert_array_equal(distances, np.take_along_axis(full, indices, axis=1))
    _, ranking_reference = reference_coarse_to_fine(packed_levels(queries), packed_levels(gallery), candidates, 1)
    blocks = list(index.ranking_distances(queries, query_chunk=4))
    assert [rows for rows, _ in blocks] == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 14)]
    ranking = np.concatenate([block for _, block in blocks])
    np.testing.assert_array_equal(np.argsort(ranking, axis=1, kind="stable"), ranking_reference)


def test_batched_search_equals_one_query_at_a_time():
    """Large batches are re-ranked in parallel slices; the result must not depend on the split."""
    rng = np.random.default_rng(14)
    gallery, queries = planted_pyramid(rng, 300), planted_pyramid(rng, 150)
    index = make_index(gallery, (60, 20))
    batched = index.search(queries, 7)
    single = [index.search(queries[row : row + 1], 7) for row in range(150)]
    np.testing.assert_array_equal(batched[0], np.concatenate([d for d, _ in single]))
    np.testing.assert_array_equal(batched[1], np.concatenate([i for _, i in single]))


def test_ranking_distances_bands():
    """Final survivors carry their full-length distance; dropped items lie above every survivor's band."""
    rng = np.random.default_rng(3)
    gallery, queries = planted_pyramid(rng, 200), planted_pyramid(rng, 6)
    index = make_index(gallery, candidates=(50, 10))
    ((_, ranking),) = index.ranking_distances(queries)
    _, top = index.search(queries, 10)
    full = hamming_reference(pack_codes(queries[:, :64]), pack_codes(gallery[:, :64]))
    np.testing.assert_array_equal(np.take_along_axis(ranking, top, 1), np.take_along_axis(full, top, 1))
    survivors = np.zeros(ranking.shape, dtype=bool)
    np.put_along_axis(survivors, top, True, axis=1)
    assert (ranking[survivors] <= 64).all() and (ranking[~survivors] > 64).all()
    # 50 items scored at 16 bits (40 dropped there), the other 150 dropped by the 8-bit scan above them.
    stage_16 = (ranking > 64) & (ranking <= 64 + 1 + 16)
    assert (stage_16.sum(axis=1) == 40).all() and (ranking[~survivors & ~stage_16] > 64 + 1 + 16).all()


def test_ranking_distances_feed_the_rank_accumulator():
    rng = np.random.default_rng(4)
    gallery, queries = planted_pyramid(rng, 150), planted_pyramid(rng, 20)
    g_pids, g_camids = rng.integers(0, 10, 150), rng.integers(0, 3, 150)
    q_pids, q_camids = rng.integers(0, 10, 20), rng.integers(0, 3, 20)
    index = make_index(gallery, candidates=(60, 20))
    accumulator = RankAccumulator(g_pids, g_camids, max_rank=10)
    for rows, block in index.ranking_distances(queries, query_chunk=7):
        accumulator.add(block, q_pids[rows], q_camids[rows])
    whole = np.concatenate([block for _, block in index.ranking_distances(queries)])
    expected = evaluate_rank(whole, q_pids, g_pids, q_camids, g_camids, max_rank=10)
    np.testing.assert_allclose(accumulator.result()["cmc"], expected["cmc"])
    assert accumulator.result()["mAP"] == pytest.approx(expected["mAP"])


def test_planted_queries_recall():
    """Queries are noisy copies of known gallery items. The intact ones keep their item at every level
    and are found; for the rest the two short levels were scrambled, so a small candidate set loses them."""
    rng = np.random.default_rng(5)
    gallery = planted_pyramid(rng, 400)
    planted = rng.choice(400, size=40, replace=False)
    queries = planted_pyramid(rng, 40, flip=0.03, base=gallery[planted])
    scrambled = np.arange(40) >= 30
    queries[scrambled, 64:] = -gallery[planted[scrambled], 64:]  # every 16- and 8-bit code bit flipped
    index = make_index(gallery, candidates=(40, 8))
    exact = HammingIndex(64)
    exact.add(gallery[:, :64])
    assert (exact.search(queries[:, :64], 1)[1][:, 0] == planted).all()
    found = index.search(queries, 1)[1][:, 0] == planted
    assert found[~scrambled].all() and not found[scrambled].any()


def test_add_then_search_equals_building_at_once():
    rng = np.random.default_rng(6)
    gallery, queries = planted_pyramid(rng, 90), planted_pyramid(rng, 12)
    meta = GalleryMetadata([f"img_{i}.jpg" for i in range(90)], list(range(90)), [i % 3 for i in range(90)])
    whole = make_index(gallery, (30, 10), meta)
    parts = CoarseToFineIndex(LEVELS, (30, 10))
    parts.add(gallery[:50], {"paths": meta.paths[:50], "pids": meta.pids[:50], "camids": meta.camids[:50]})
    parts.search(queries, 3)  # builds the cached scan index, which add() must extend
    parts.add(gallery[50:], GalleryMetadata(meta.paths[50:], meta.pids[50:], meta.camids[50:]))
    for got, want in zip(parts.search(queries, 5), whole.search(queries, 5), strict=True):
        np.testing.assert_array_equal(got, want)
    assert parts.metadata == meta
    hamming_whole, hamming_parts = HammingIndex(64), HammingIndex(64)
    hamming_whole.add(gallery[:, :64])
    hamming_parts.add(gallery[:40, :64])
    hamming_parts.add(gallery[40:, :64])
    np.testing.assert_array_equal(
        hamming_parts.search(queries[:, :64], 9)[1], hamming_whole.search(queries[:, :64], 9)[1]
    )
    float_whole, float_parts = FloatIndex(88), FloatIndex(88)
    float_whole.add(gallery)
    float_parts.add(gallery[:10])
    float_parts.add(gallery[10:])
    np.testing.assert_array_equal(float_parts.search(queries, 9)[1], float_whole.search(queries, 9)[1])
    with pytest.raises(ValueError, match="must then pass metadata"):
        parts.add(gallery[:2])
    with pytest.raises(ValueError, match="describes 3 items but 2 codes"):
        parts.add(gallery[:2], GalleryMetadata(["a", "b", "c"], [1, 2, 3], [0, 0, 0]))


def test_empty_indexes_search_and_round_trip(tmp_path):
    queries = planted_pyramid(np.random.default_rng(15), 3)
    for index, query in (
        (FloatIndex(88), queries),
        (HammingIndex(64), queries[:, :64]),
        (CoarseToFineIndex(LEVELS, (4, 2)), queries),
    ):
        distances, indices = index.search(query, 5)
        assert distances.shape == indices.shape == (3, 0)
        index.save(tmp_path / index.kind)
        assert load_index(tmp_path / index.kind).ntotal == 0


def test_faiss_names_and_how_k_is_clamped():
    """ntotal and d as in faiss; k must be a positive int, and more than ntotal gives ntotal columns."""
    gallery = planted_pyramid(np.random.default_rng(16), 6)
    float_index, hamming_index = FloatIndex(88), HammingIndex(64)
    float_index.add(gallery)
    hamming_index.add(gallery[:, :64])
    pyramid = make_index(gallery, (4, 2))
    assert (float_index.d, hamming_index.d, pyramid.d) == (88, 64, sum(LEVELS))
    for index, query in ((float_index, gallery), (hamming_index, gallery[:, :64]), (pyramid, gallery)):
        assert index.ntotal == len(index) == 6
        assert index.clamp_k(3) == 3 and index.clamp_k(np.int64(50)) == 6
        distances, indices = index.search(query[:2], 50)
        assert distances.shape == indices.shape == (2, 6)
        for bad in (0, -1, True, 2.0, None):
            with pytest.raises(ValueError, match="k must be a positive int"):
                index.search(query[:2], bad)


def test_stage_accessors_replay_the_search():
    """scan, rerank, level_codes and stage_codes, chained by hand, give what search gives."""
    rng = np.random.default_rng(17)
    gallery, queries = planted_pyramid(rng, 100), planted_pyramid(rng, 9)
    index = make_index(gallery, (30, 10))
    per_stage = index.stage_codes(queries)
    for stage, packed in enumerate(packed_levels(queries)):
        np.testing.assert_array_equal(per_stage[stage], packed)
    for stage, packed in enumerate(packed_levels(gallery)):
        np.testing.assert_array_equal(index.level_codes(stage), packed)
    assert not index.level_codes(0).flags.writeable
    survivors = index.scan(0, per_stage[0], 30)[1]
    survivors = index.rerank(1, per_stage[1], survivors, 10)[2]
    _, distances, indices = index.rerank(2, per_stage[2], survivors, 4, sort=True)
    for got, want in zip((distances, indices), index.search(queries, 4), strict=True):
        np.testing.assert_array_equal(got, want)
    rebuilt = CoarseToFineIndex.from_stage_codes(LEVELS, [index.level_codes(s) for s in range(3)])
    rebuilt.candidates = (30, 10)
    np.testing.assert_array_equal(rebuilt.search(queries, 4)[1], indices)
    with pytest.raises(ValueError, match="different numbers of codes"):
        CoarseToFineIndex.from_stage_codes(LEVELS, [index.level_codes(0)[:5], *per_stage[1:]])


def test_pyramid_input_layouts_and_bad_candidates():
    rng = np.random.default_rng(7)
    gallery = planted_pyramid(rng, 40)
    from_concat = make_index(gallery, (10, 5))
    per_level = [pack_codes(part) for part in split_levels(gallery, LEVELS)]
    from_list = CoarseToFineIndex(LEVELS, (10, 5))
    from_list.add(per_level)
    np.testing.assert_array_equal(from_list.search(gallery[:4], 3)[1], from_concat.search(gallery[:4], 3)[1])
    with pytest.raises(ValueError, match=r"\(N, 88\) concatenated codes"):
        from_concat.search(gallery[:, :64], 3)
    with pytest.raises(ValueError, match="must not increase"):
        CoarseToFineIndex(LEVELS, (5, 10))
    with pytest.raises(ValueError, match="needs 2 counts"):
        CoarseToFineIndex(LEVELS, (5,))
    with pytest.raises(ValueError, match="candidates are not set"):
        make_index(gallery).search(gallery[:1], 1)


# --- fitting candidate counts ------------------------------------------------------------------------------


FIT_LEVELS = (2048, 64, 16)  # a long full-length code: pruning pays only when the last level is costly


def correlated_pyramid(rng, prototypes, ids, projections, noise=0.3):
    """Pyramid codes whose levels are sign projections of one noisy latent vector per image."""
    latent = prototypes[ids] + noise * rng.standard_normal((len(ids), prototypes.shape[1]))
    return np.concatenate([latent @ projection for projection in projections], axis=1)


def test_fit_candidates_reaches_the_target_and_ignores_labels():
    rng = np.random.default_rng(8)
    projections = [rng.standard_normal((16, bits)) for bits in FIT_LEVELS]
    prototypes = rng.standard_normal((400, 16))
    gallery_ids = rng.integers(0, 300, 4000)  # test identities 0-299; validation (training) ones 300-399
    gallery = correlated_pyramid(rng, prototypes, gallery_ids, projections)
    validation_gallery = correlated_pyramid(rng, prototypes, rng.integers(300, 400, 1300), projections)
    validation = correlated_pyramid(rng, prototypes, rng.integers(300, 400, 300), projections)
    test_queries = correlated_pyramid(rng, prototypes, rng.integers(0, 300, 500), projections)
    cams, paths = list(rng.integers(0, 4, 4000)), [f"g/{i}.jpg" for i in range(4000)]
    index, shuffled = CoarseToFineIndex(FIT_LEVELS), CoarseToFineIndex(FIT_LEVELS)
    index.add(gallery, GalleryMetadata(paths, list(gallery_ids), cams))
    shuffled.add(gallery, GalleryMetadata(paths, list(rng.permutation(gallery_ids)), cams))

    counts = fit_candidates(index, validation, validation_gallery=validation_gallery, target_recall=0.95)
    assert counts == fit_candidates(shuffled, validation, validation_gallery=validation_gallery, target_recall=0.95)
    assert len(counts) == 2 and 1 <= counts[1] <= counts[0] <= 4000 and counts[1] < 4000

    # The guarantee: recall@1 of the exact result on the validation queries over the joint gallery.
    joint = CoarseToFineIndex(FIT_LEVELS, counts)
    joint.add(np.concatenate([gallery, validation_gallery]))
    exact_joint = HammingIndex(2048)
    exact_joint.add(np.concatenate([gallery, validation_gallery])[:, :2048])
    found, exact = joint.search(validation, 1)[1], exact_joint.search(validation[:, :2048], 1)[1]
    assert np.mean(found == exact) >= 0.95
    # And on held-out test queries against the test gallery (seeded: 0.972).
    index.candidates = counts
    exact_test = HammingIndex(2048)
    exact_test.add(gallery[:, :2048])
    found, exact = index.search(test_queries, 1)[1], exact_test.search(test_queries[:, :2048], 1)[1]
    assert np.mean(found == exact) >= 0.95


def test_fit_skips_levels_that_carry_no_information():
    rng = np.random.default_rng(9)
    gallery, validation = planted_pyramid(rng, 300), planted_pyramid(rng, 50)  # levels are unrelated
    assert fit_candidates(make_index(gallery), validation, target_recall=0.99) == (300, 300)
    # Pruning saves nothing on a tiny gallery with a short full-length code: the exact scan is kept.


# --- persistence -------------------------------------------------------------------------------------------


def built_indexes(rng):
    gallery = planted_pyramid(rng, 80)
    meta = GalleryMetadata([f"cam{i % 3}/ü_{i}.jpg" for i in range(80)], list(range(80)), [i % 3 for i in range(80)])
    float_index, hamming_index = FloatIndex(88), HammingIndex(64)
    float_index.add(gallery, meta)
    hamming_index.add(gallery[:, :64], meta)
    return gallery, {
        "float": float_index,
        "hamming": hamming_index,
        "c2f": make_index(gallery, (20, 6), meta),
    }


def queries_for(name, gallery):
    return gallery[:7, :64] if name == "hamming" else gallery[:7]


@pytest.mark.parametrize("name", ["float", "hamming", "c2f"])
def test_save_load_round_trip(tmp_path, name):
    gallery, indexes = built_indexes(np.random.default_rng(10))
    index = indexes[name]
    index.save(tmp_path / "index")
    loaded = type(index).load(tmp_path / "index")
    assert type(load_index(tmp_path / "index")) is type(index)
    assert loaded.ntotal == index.ntotal == 80 and loaded.metadata == index.metadata
    queries = queries_for(name, gallery)
    for got, want in zip(loaded.search(queries, 5), index.search(queries, 5), strict=True):
        np.testing.assert_array_equal(got, want)
    if name == "c2f":
        assert loaded.candidates == (20, 6) and loaded.code_lengths == LEVELS
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["format_version"] == storage_module.FORMAT_VERSION and manifest["count"] == 80


def test_save_without_metadata_and_replace(tmp_path):
    rng = np.random.default_rng(11)
    small, large = HammingIndex(32), HammingIndex(32)
    small.add(random_bits(rng, 5, 32))
    large.add(random_bits(rng, 9, 32))
    small.save(tmp_path / "index")
    large.save(tmp_path / "index")
    loaded = HammingIndex.load(tmp_path / "index")
    assert loaded.ntotal == 9 and loaded.metadata is None
    np.testing.assert_array_equal(loaded.codes, large.codes)
    assert folder_entries(tmp_path / "index") == INDEX_ENTRIES  # one data folder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\] .* refusing to write an index over other files"):
        small.save(tmp_path / "other")


INDEX_ENTRIES = [".read.lock", ".save.lock", "data-*", "manifest.json"]


def folder_entries(directory) -> list[str]:
    """The names in an index folder, data folders masked as `data-*`."""
    return sorted("data-*" if p.name.startswith("data-") else p.name for p in directory.iterdir())


def data_file(directory, array_name):
    manifest = json.loads((directory / "manifest.json").read_text())
    return directory / manifest["data_dir"] / manifest["files"][array_name]["file"]


def test_corrupted_truncated_missing_and_foreign_files_are_named(tmp_path):
    _, indexes = built_indexes(np.random.default_rng(12))
    directory = tmp_path / "index"
    indexes["c2f"].save(directory)
    codes = data_file(directory, "codes_64")

    content = bytearray(codes.read_bytes())
    content[-3] ^= 0x01
    codes.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=rf"{codes}: checksum mismatch"):
        CoarseToFineIndex.load(directory)

    codes.write_bytes(bytes(content[:-10]))
    with pytest.raises(ValueError, match=rf"{codes}: {len(content) - 10} bytes, expected {len(content)}"):
        CoarseToFineIndex.load(directory)

    codes.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{codes}: missing"):
        CoarseToFineIndex.load(directory)

    indexes["c2f"].save(directory)
    with pytest.raises(ValueError, match=r"holds a 'coarse_to_fine' index, expected 'hamming'"):
        HammingIndex.load(directory)

    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match=r"manifest.json: format_version 99 is not supported \(expected 1\)"):
        load_index(directory)

    manifest_path.write_text(json.dumps({**manifest, "candidates": [6, 20]}))
    with pytest.raises(ValueError, match=r"manifest.json: does not describe a valid 'coarse_to_fine' index"):
        load_index(directory)

    manifest_path.write_text(json.dumps({key: value for key, value in manifest.items() if key != "levels"}))
    assert load_index(directory).levels == (8, 16, 64)  # informative key: not needed to load
    manifest_path.write_text(json.dumps({**manifest, "files": {"codes_64": {}}}))
    with pytest.raises(ValueError, match=r"manifest.json: files.codes_64.file is None; expected a str"):
        load_index(directory)

    manifest_path.write_text(json.dumps(manifest)[:-20])
    with pytest.raises(ValueError, match=r"manifest.json: not valid JSON"):
        load_index(directory)

    manifest_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest.json: not found"):
        load_index(directory)


def test_a_crafted_manifest_reads_nothing_outside_its_folder_and_allocates_nothing(tmp_path):
    """Every file a manifest names is confined to the index folder; a malformed manifest or an .npy header
    declaring 10^12 rows is a ValueError naming the file, never another exception or a huge allocation."""
    _, indexes = built_indexes(np.random.default_rng(14))
    directory = tmp_path / "index"
    indexes["hamming"].save(directory)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    outside = tmp_path / "outside"
    shutil.copytree(directory / manifest["data_dir"], outside)  # a valid data folder, but not the index's own
    (directory / "data-link").symlink_to(outside)
    entry = manifest["files"]["codes"]
    crafted = {
        "data_dir '../outside'": {**manifest, "data_dir": "../outside"},
        f"data_dir {str(outside)!r}": {**manifest, "data_dir": str(outside)},
        "data_dir 'data-link'": {**manifest, "data_dir": "data-link"},
        "files.codes.file '../../outside/codes.npy'": {
            **manifest,
            "files": {**manifest["files"], "codes": {**entry, "file": "../../outside/codes.npy"}},
        },
    }
    for what, payload in crafted.items():
        manifest_path.write_text(json.dumps(payload))
        with pytest.raises(ValueError, match=rf"{re.escape(what)} is not a file name inside"):
            load_index(directory)
    malformed = {
        "'files' must map each array name": {**manifest, "files": list(manifest["files"])},
        r"files.codes: negative size or shape \[-5, 8\]": {
            **manifest,
            "files": {**manifest["files"], "codes": {**entry, "shape": [-5, 8]}},
        },
    }
    for message, payload in malformed.items():
        manifest_path.write_text(json.dumps(payload))
        with pytest.raises(ValueError, match=message):
            load_index(directory)
    manifest_path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_index(directory)

    codes = directory / manifest["data_dir"] / entry["file"]
    with open(codes, "wb") as handle:  # a header alone, declaring 8 TB of codes; the manifest agrees with it
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": (10**12, 8)})
    declared = {**entry, "bytes": codes.stat().st_size, "sha256": file_sha256(codes), "shape": [10**12, 8]}
    manifest_path.write_text(json.dumps({**manifest, "files": {**manifest["files"], "codes": declared}}))
    with pytest.raises(ValueError, match=rf"{codes}: its header declares \|u1 \[1000000000000, 8\] \(8000000000"):
        load_index(directory)


def test_failed_save_leaves_the_old_index_loadable(tmp_path, monkeypatch):
    gallery, indexes = built_indexes(np.random.default_rng(13))
    directory = tmp_path / "index"
    indexes["c2f"].save(directory)
    replacement = make_index(gallery[:30], (10, 5))

    calls = []
    real_write = storage_module._write_array

    def failing_write(path, array):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(path, array)

    monkeypatch.setattr(storage_module, "_write_array", failing_write)
    with pytest.raises(OSError, match="disk full"):
        replacement.save(directory)
    monkeypatch.undo()

    def failing_replace(source, target):
        raise OSError("power cut")

    monkeypatch.setattr(storage_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="power cut"):
        replacement.save(directory)
    monkeypatch.undo()

    loaded = CoarseToFineIndex.load(directory)
    assert loaded.ntotal == 80 and loaded.metadata == indexes["c2f"].metadata
    assert folder_entries(directory) == INDEX_ENTRIES  # no leftovers


def test_record_travels_in_the_manifest_and_must_be_json(tmp_path):
    index = HammingIndex(32)
    index.add(random_bits(np.random.default_rng(14), 5, 32))
    record = {"ckpt": "/models/a.ckpt", "ckpt_sha256": "ab" * 32, "image_size": [256, 128]}
    index.save(tmp_path / "index", record=record)
    assert HammingIndex.load(tmp_path / "index").record == record == index.record
    loaded = load_index(tmp_path / "index")
    loaded.save(tmp_path / "copy")  # no record given: the index keeps its own
    assert load_index(tmp_path / "copy").record == record
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["record"] == record and not (tmp_path / "index" / "model.json").exists()

    with pytest.raises(ValueError, match=r"record: must be None or a JSON-able dict"):
        index.save(tmp_path / "bad", record={"when": object()})
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    (tmp_path / "index" / "manifest.json").write_text(json.dumps({**manifest, "record": [1, 2]}))
    with pytest.raises(ValueError, match=r"manifest.json: record: must be None or a JSON-able dict"):
        load_index(tmp_path / "index")


def versioned_index(version: int) -> HammingIndex:
    """An index whose every array and record say `version`, so a mix of two saves shows."""
    rows = 10 + version
    index = HammingIndex(64)
    paths = [f"v{version}/{row}.jpg" for row in range(rows)]
    index.add(np.full((rows, 8), version, dtype=np.uint8), GalleryMetadata(paths, [version] * rows, [0] * rows))
    index.record = {"version": version}
    return index


def assert_one_version(index: HammingIndex) -> int:
    version = index.record["version"]
    assert index.ntotal == 10 + version and np.all(index.codes == version)
    assert index.metadata.pids == [version] * index.ntotal
    return version


def test_concurrent_saves_and_loads_see_one_complete_version(tmp_path):
    """The fault drill: with unlocked saves, one save deleted the data folder another's manifest named."""
    directory = tmp_path / "index"
    writers, saves_each, readers = 6, 4, 3
    done = threading.Event()
    seen: list[int] = []

    def write(version: int) -> None:
        index = versioned_index(version)
        for _ in range(saves_each):
            index.save(directory)

    def read() -> None:
        while not done.is_set():
            if (directory / "manifest.json").is_file():
                seen.append(assert_one_version(HammingIndex.load(directory)))

    with ThreadPoolExecutor(writers + readers) as pool:
        reading = [pool.submit(read) for _ in range(readers)]
        writing = [pool.submit(write, version) for version in range(writers)]
        for future in writing:
            future.result()
        done.set()
        for future in reading:
            future.result()
    assert seen and set(seen) <= set(range(writers))
    last = assert_one_version(HammingIndex.load(directory))
    versioned_index(last).save(directory)  # no reader now: older data folders go
    assert folder_entries(directory) == INDEX_ENTRIES


def test_a_reader_keeps_its_data_folder_and_saves_take_turns(tmp_path):
    directory = tmp_path / "index"
    versioned_index(1).save(directory)
    old_data = directory / json.loads((directory / "manifest.json").read_text())["data_dir"]
    with open(directory / storage_module.READ_LOCK) as reader:
        fcntl.flock(reader, fcntl.LOCK_SH)  # a load in progress
        versioned_index(2).save(directory)
        assert old_data.is_dir()  # still being read: not deleted under the reader
    versioned_index(3).save(directory)
    assert not old_data.exists() and folder_entries(directory) == INDEX_ENTRIES

    with open(directory / storage_module.SAVE_LOCK) as other_save:
        fcntl.flock(other_save, fcntl.LOCK_EX)
        waiting = threading.Thread(target=versioned_index(4).save, args=(directory,))
        waiting.start()
        waiting.join(timeout=0.3)
        assert waiting.is_alive()  # waits for the other save
        assert assert_one_version(HammingIndex.load(directory)) == 3  # readers are not blocked by it
    waiting.join(timeout=10)
    assert assert_one_version(HammingIndex.load(directory)) == 4


def test_faiss_loader_chatter_stays_below_warning():
    """faiss logs every CPU-specific build it tries at INFO, ending in ModuleNotFoundError lines that read
    as errors; with logging at INFO (as every command runs), building an index prints none of them."""
    import subprocess
    import sys

    code = (
        "import logging; logging.basicConfig(level=logging.INFO); "
        "from agw_light.search import FloatIndex; FloatIndex(8); import faiss; print('loaded', faiss.__name__)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "loaded faiss" and "faiss.loader" not in run.stderr, run.stderr
