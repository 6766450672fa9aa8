"""Re-id metrics against a hand-computed case and a slow, obvious per-query reference."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import agw_light.metrics.rank as rank_module
from agw_light.metrics import evaluate_rank, evaluate_retrieval, pairwise_distance


def reference_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50) -> dict:
    """The protocol written plainly: stable argsort per row, drop junk, read the match positions."""
    distmat = np.asarray(distmat, dtype=np.float64)
    cmcs, aps, inps, invalid = [], [], [], 0
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")  # ties: lower gallery index first
        junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        hits = (g_pids[order] == q_pids[i])[~junk]
        if not hits.any():
            invalid += 1
            continue
        match_ranks = np.flatnonzero(hits) + 1
        cmcs.append((np.arange(1, max_rank + 1) >= match_ranks[0]).astype(float))
        aps.append(np.mean(np.arange(1, len(match_ranks) + 1) / match_ranks))
        inps.append(len(match_ranks) / match_ranks[-1])
    if not aps:  # the documented convention: zeros, weighted by num_valid_queries = 0 when merging
        return {
            "cmc": np.zeros(max_rank),
            "mAP": 0.0,
            "mINP": 0.0,
            "num_valid_queries": 0,
            "num_invalid_queries": invalid,
        }
    return {
        "cmc": np.mean(cmcs, axis=0),
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "num_valid_queries": len(aps),
        "num_invalid_queries": invalid,
    }


def assert_results_equal(ours: dict, expected: dict) -> None:
    assert ours["num_valid_queries"] == expected["num_valid_queries"]
    assert ours["num_invalid_queries"] == expected["num_invalid_queries"]
    assert ours["cmc"].shape == expected["cmc"].shape
    np.testing.assert_allclose(ours["cmc"], expected["cmc"], rtol=0, atol=1e-6)
    assert ours["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert ours["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)


# Gallery of 6: (pid, camera) per item.
HAND_G_PIDS = np.array([1, 2, 1, 3, 1, 2])
HAND_G_CAMS = np.array([0, 1, 1, 0, 2, 2])
HAND_Q_PIDS = np.array([1, 2, 3])
HAND_Q_CAMS = np.array([0, 1, 0])
HAND_DISTMAT = np.array(
    [
        # q0 (pid 1, cam 0): item 0 is junk. Kept order by (distance, index): 2 (hit) 3 1 4 (hit) 5
        #   -> hits at ranks 1 and 4: AP = (1/1 + 2/4) / 2 = 0.75, INP = 2/4 = 0.5, first hit at 1.
        [0.1, 0.5, 0.3, 0.3, 0.5, 0.6],
        # q1 (pid 2, cam 1): item 1 is junk. Kept order: 0 3 4 5 (hit) 2 -> one hit at rank 4:
        #   AP = 1/4, INP = 1/4, first hit at 4.
        [0.2, 0.0, 0.9, 0.4, 0.4, 0.4],
        # q2 (pid 3, cam 0): its only same-pid item (3) has its camera -> no match, invalid.
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    ]
)


def test_hand_computed_case():
    result = evaluate_rank(HAND_DISTMAT, HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS, HAND_G_CAMS, max_rank=5)
    np.testing.assert_allclose(result["cmc"], [0.5, 0.5, 0.5, 1.0, 1.0])
    assert result["mAP"] == pytest.approx((0.75 + 0.25) / 2)
    assert result["mINP"] == pytest.approx((0.5 + 0.25) / 2)
    assert (result["num_valid_queries"], result["num_invalid_queries"]) == (2, 1)


def test_max_rank_beyond_gallery_keeps_cmc_definition():
    result = evaluate_rank(HAND_DISTMAT, HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS, HAND_G_CAMS, max_rank=9)
    np.testing.assert_allclose(result["cmc"], [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_torch_and_numpy_inputs_agree():
    arrays = (HAND_DISTMAT, HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS, HAND_G_CAMS)
    as_numpy = evaluate_rank(*arrays, max_rank=5)
    tensors = [torch.from_numpy(array) for array in arrays]
    assert_results_equal(evaluate_rank(*tensors, max_rank=5), as_numpy)
    tensors[0] = torch.from_numpy(HAND_DISTMAT.T.astype(np.float16).copy()).T  # non-contiguous half floats
    assert_results_equal(evaluate_rank(*tensors, max_rank=5), as_numpy)


def random_problem(rng, kind: str):
    num_query, num_gallery = int(rng.integers(1, 40)), int(rng.integers(1, 400))
    num_ids, num_cams = int(rng.integers(1, 12)), int(rng.integers(1, 4))
    shape = (num_query, num_gallery)
    if kind == "integer float32":  # Hamming-like: massive ties
        distmat = rng.integers(0, 6, shape).astype(np.float32)
    elif kind == "half-integer float64":  # float32 values held as float64: packed keys
        distmat = rng.integers(0, 6, shape) * 0.5 + 0.25
    elif kind == "tenths float64":  # ties float32 would round apart: compared with the tie rule spelled out
        distmat = rng.integers(0, 6, shape) * 0.1
    elif kind == "signed float32 with zeros":  # negative keys, and -0.0 tying with 0.0
        distmat = rng.choice(np.array([-np.inf, -2.5, -1.0, -0.0, 0.0, 1e-30, 1.0, 3.5], dtype=np.float32), shape)
    elif kind == "int64":
        distmat = rng.integers(-3, 3, shape)
    elif kind == "float32 with inf":
        distmat = rng.random(shape, dtype=np.float32)
        distmat[rng.random(shape) < 0.1] = np.inf
        distmat[rng.random(shape) < 0.05] = -np.inf
    elif kind == "constant":
        distmat = np.full(shape, 0.7, dtype=np.float32)
    else:
        distmat = rng.random(shape)
    pids = rng.integers(0, num_ids, num_query), rng.integers(0, num_ids, num_gallery)
    cams = rng.integers(0, num_cams, num_query), rng.integers(0, num_cams, num_gallery)
    return distmat, pids[0], pids[1], cams[0], cams[1]


KINDS = [
    "float64",
    "integer float32",
    "half-integer float64",
    "tenths float64",
    "signed float32 with zeros",
    "int64",
    "float32 with inf",
    "constant",
]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_on_random_data(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    for _ in range(60):
        problem = random_problem(rng, kind)
        max_rank = int(rng.integers(1, 60))
        assert_results_equal(evaluate_rank(*problem, max_rank=max_rank), reference_rank(*problem, max_rank))


@pytest.mark.parametrize("kind", ["integer float32", "tenths float64"])
def test_chunks_and_steps_do_not_change_results(monkeypatch, kind):
    """Chunks of rows and steps of comparisons down to one row and one match at a time."""
    rng = np.random.default_rng(7)
    problems = [random_problem(rng, kind) for _ in range(5)]
    expected = [reference_rank(*problem, 20) for problem in problems]
    for chunk_elements, comparisons in ((1, 1), (37, 5), (1000, 150), (1000, 10**6)):
        monkeypatch.setattr(rank_module, "CHUNK_ELEMENTS", chunk_elements)
        monkeypatch.setattr(rank_module, "COMPARISONS_PER_STEP", comparisons)
        for problem, reference in zip(problems, expected, strict=True):
            assert_results_equal(evaluate_rank(*problem, max_rank=20), reference)


def test_gallery_too_large_for_packed_keys_uses_the_tie_rule(monkeypatch):
    monkeypatch.setattr(rank_module, "INDEX_BITS", 3)  # packed keys only for galleries of up to 8 items
    rng = np.random.default_rng(8)
    for _ in range(20):
        problem = random_problem(rng, "integer float32")
        assert_results_equal(evaluate_rank(*problem, max_rank=10), reference_rank(*problem, 10))


def test_accumulator_fed_in_blocks_equals_whole_matrix():
    rng = np.random.default_rng(9)
    distmat, q_pids, g_pids, q_cams, g_cams = random_problem(rng, "integer float32")
    accumulator = rank_module.RankAccumulator(g_pids, g_cams, max_rank=15)
    for start in range(0, len(distmat), 3):
        rows = slice(start, start + 3)
        accumulator.add(torch.from_numpy(distmat[rows]), q_pids[rows], q_cams[rows])
    assert_results_equal(accumulator.result(), reference_rank(distmat, q_pids, g_pids, q_cams, g_cams, 15))


@pytest.mark.parametrize("distance", ["cosine", "hamming"])
def test_realistic_distances_match_reference(distance):
    """Larger rows, features clustered by identity: matches near the top of the ranking; 32-bit Hamming
    distances tie by the hundreds."""
    rng = np.random.default_rng(3)
    g_pids, q_pids = rng.integers(0, 50, 2000), rng.integers(0, 50, 60)
    centers = rng.normal(size=(50, 32))
    gallery = centers[g_pids] + rng.normal(size=(2000, 32))
    query = centers[q_pids] + rng.normal(size=(60, 32))
    distmat = pairwise_distance(torch.tensor(query), torch.tensor(gallery), distance).float().numpy()
    q_cams, g_cams = rng.integers(0, 4, 60), rng.integers(0, 4, 2000)
    expected = reference_rank(distmat, q_pids, g_pids, q_cams, g_cams)
    assert expected["mAP"] > 0.3  # the setting is meaningful: matches rank high
    assert_results_equal(evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams), expected)


def test_no_valid_query_gives_zeros_and_counts():
    result = evaluate_rank(np.ones((2, 3)), [5, 6], [1, 2, 3], [0, 0], [0, 0, 0])
    assert (result["num_valid_queries"], result["num_invalid_queries"]) == (0, 2)
    assert result["mAP"] == 0.0 and result["mINP"] == 0.0 and not result["cmc"].any()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((np.ones(3), [1], [1, 2, 3], [0], [0, 1, 2]), "distmat must have shape"),
        ((np.ones((2, 3)), [1], [1, 2, 3], [0, 0], [0, 1, 2]), r"q_pids must have shape \(num_query,\)"),
        ((np.ones((2, 3)), [1, 2], [1, 2, 3], [0, 0], [0, 1]), r"g_camids must have shape \(num_gallery,\)"),
        ((np.ones((2, 3)), [1.0, 2.0], [1, 2, 3], [0, 0], [0, 1, 2]), "q_pids must hold integers"),
        ((np.full((2, 3), np.nan), [1, 2], [1, 2, 3], [0, 0], [0, 1, 2]), "NaN"),
    ],
)
def test_bad_input_is_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        evaluate_rank(*arguments)


def test_bad_max_rank():
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        evaluate_rank(HAND_DISTMAT, HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS, HAND_G_CAMS, max_rank=0)


def test_pairwise_distances_against_direct_formulas():
    rng = np.random.default_rng(0)
    query, gallery = rng.normal(size=(7, 16)), rng.normal(size=(11, 16))
    norms = np.outer(np.linalg.norm(query, axis=1), np.linalg.norm(gallery, axis=1))
    cosine = 1 - (query @ gallery.T) / norms
    euclidean = np.linalg.norm(query[:, None] - gallery[None], axis=2)
    hamming = ((query[:, None] > 0) != (gallery[None] > 0)).sum(2)
    q32, g32 = torch.tensor(query, dtype=torch.float32), torch.tensor(gallery, dtype=torch.float32)
    np.testing.assert_allclose(pairwise_distance(q32, g32, "cosine").numpy(), cosine, atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(query, gallery, "euclidean").numpy(), euclidean, atol=1e-6)
    np.testing.assert_array_equal(pairwise_distance(q32, g32, "hamming").numpy(), hamming)  # exact
    assert pairwise_distance(q32, g32, "hamming").dtype == torch.float32


def test_pairwise_distance_errors():
    with pytest.raises(ValueError, match="same feature dimension"):
        pairwise_distance(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="distance metric must be one of"):
        pairwise_distance(torch.ones(2, 3), torch.ones(2, 3), "manhattan")
    with pytest.raises(ValueError, match=r"query must have shape \(num_items, feature_dim\)"):
        pairwise_distance(torch.ones(3), torch.ones(2, 3))


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "hamming"])
def test_evaluate_retrieval_in_blocks_equals_full_matrix(distance):
    rng = np.random.default_rng(1)
    query, gallery = torch.randn(23, 8, dtype=torch.float64), torch.randn(90, 8, dtype=torch.float64)
    q_pids, g_pids = rng.integers(0, 6, 23), rng.integers(0, 6, 90)
    q_cams, g_cams = rng.integers(0, 3, 23), rng.integers(0, 3, 90)
    full = evaluate_rank(pairwise_distance(query, gallery, distance), q_pids, g_pids, q_cams, g_cams)
    blocks = evaluate_retrieval(query, gallery, q_pids, g_pids, q_cams, g_cams, distance=distance, query_chunk=4)
    assert_results_equal(blocks, full)


def test_import_of_evaluate_rank_does_not_import_torchmetrics():
    code = "import sys; from agw_light.metrics import evaluate_rank; print('torchmetrics' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


def distributed_batches(num_samples: int, world_size: int, batch_size: int):
    """Index batches each rank sees under DistributedSampler(shuffle=False): strided, padded by repeats."""
    per_rank = math.ceil(num_samples / world_size)
    padded = list(range(num_samples)) + list(range(per_rank * world_size - num_samples))
    for rank in range(world_size):
        indices = padded[rank::world_size]
        yield from (indices[i : i + batch_size] for i in range(0, len(indices), batch_size))


def test_reid_metric_deduplicates_ddp_padding_and_is_independent_of_world_size():
    from agw_light.metrics import ReIDMetric

    rng = np.random.default_rng(5)
    num_samples = 83
    codes = torch.tensor(rng.normal(size=(num_samples, 6)), dtype=torch.float32)  # 6-bit codes: ties
    pids = torch.tensor(rng.integers(0, 8, num_samples))
    camids = torch.tensor(rng.integers(0, 3, num_samples))
    is_query = torch.tensor(rng.random(num_samples) < 0.3)
    expected = reference_rank(
        pairwise_distance(codes[is_query], codes[~is_query], "hamming").numpy(),
        pids[is_query].numpy(),
        pids[~is_query].numpy(),
        camids[is_query].numpy(),
        camids[~is_query].numpy(),
    )
    # The state of one rank after Lightning's all-gather is the ranks' updates concatenated.
    for world_size in (1, 2, 3):
        metric = ReIDMetric(distance="hamming", max_rank=10)
        for batch in distributed_batches(num_samples, world_size, batch_size=8):
            index = torch.tensor(batch)
            metric.update(codes[index], pids[index], camids[index], is_query[index], index)
        values = metric.compute()
        assert set(values) == {"R1", "R5", "R10", "mAP", "mINP"}
        assert all(isinstance(value, float) for value in values.values())
        for k in (1, 5, 10):
            assert values[f"R{k}"] == pytest.approx(expected["cmc"][k - 1], abs=1e-6)
        assert values["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
        assert values["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)


def test_reid_metric_without_gallery_warns_and_reports_nan():
    from agw_light.metrics import ReIDMetric

    metric = ReIDMetric()
    metric.update(torch.randn(4, 3), torch.arange(4), torch.zeros(4), torch.ones(4, dtype=torch.bool))
    with pytest.warns(UserWarning, match="undefined"):
        values = metric.compute()
    assert all(math.isnan(value) for value in values.values())


def test_reid_metric_rejects_bad_input():
    from agw_light.metrics import ReIDMetric

    with pytest.raises(ValueError, match="distance must be one of"):
        ReIDMetric(distance="manhattan")
    with pytest.raises(ValueError, match="max_rank must be an integer >= 10"):
        ReIDMetric(max_rank=5)
    metric = ReIDMetric()
    features, pids = torch.randn(4, 3), torch.arange(4)
    queries, galleries = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"camids must be a tensor of shape \(4,\)"):
        metric.update(features, pids, torch.zeros(3), queries)
    metric.update(features, pids, torch.zeros(4), queries, torch.arange(4))
    metric.update(features, pids, torch.zeros(4), galleries)
    with pytest.raises(ValueError, match="pass index to every update or to none"):
        metric.compute()
