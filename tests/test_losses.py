"""Losses against hand-computed cases and slow per-anchor references."""

from __future__ import annotations

import math

import pytest
import torch

from agw_light.losses import (
    CrossEntropyLabelSmooth,
    WeightedRegularizedTriplet,
    build_loss_stack,
    expand_level_losses,
    pairwise_euclidean,
)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_wrt_hand_computed_one_dimensional_batch():
    # Points 0, 1 (identity 0) and 3, 5 (identity 1) on a line.
    features = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    pids = torch.tensor([0, 0, 1, 1])

    def weighted(distances: list[float], sign: float) -> float:
        weights = [math.exp(sign * d) for d in distances]
        return sum(w * d for w, d in zip(weights, distances, strict=True)) / sum(weights)

    # anchor: (positive distances incl. itself, negative distances)
    pairs = {0: ([0, 1], [3, 5]), 1: ([1, 0], [2, 4]), 2: ([0, 2], [3, 2]), 3: ([2, 0], [5, 4])}
    expected = sum(_softplus(weighted(p, 1.0) - weighted(n, -1.0)) for p, n in pairs.values()) / 4
    assert WeightedRegularizedTriplet()(features, pids).item() == pytest.approx(expected, rel=1e-6)


def test_wrt_matches_per_anchor_reference_on_random_batch():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    pids = torch.arange(4).repeat_interleave(4)
    expected = 0.0
    for a in range(16):
        pos = [torch.dist(features[a], features[j]).item() for j in range(16) if pids[j] == pids[a]]
        neg = [torch.dist(features[a], features[j]).item() for j in range(16) if pids[j] != pids[a]]
        wp = [math.exp(d) for d in pos]
        wn = [math.exp(-d) for d in neg]
        d_pos = sum(w * d for w, d in zip(wp, pos, strict=True)) / sum(wp)
        d_neg = sum(w * d for w, d in zip(wn, neg, strict=True)) / sum(wn)
        expected += _softplus(d_pos - d_neg) / 16
    assert WeightedRegularizedTriplet()(features, pids).item() == pytest.approx(expected, rel=1e-5)


def test_wrt_gradient_finite_with_duplicate_features():
    features = torch.zeros(4, 3, requires_grad=True)
    loss = WeightedRegularizedTriplet()(features, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(features.grad).all()


def test_wrt_needs_two_identities():
    with pytest.raises(ValueError, match="two identities"):
        WeightedRegularizedTriplet()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_pairwise_euclidean_matches_cdist():
    x = torch.randn(10, 5, dtype=torch.float64)
    torch.testing.assert_close(pairwise_euclidean(x), torch.cdist(x, x), atol=1e-5, rtol=0)


def test_label_smoothing_target_is_one_minus_eps_plus_uniform():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    pids = torch.tensor([0, 2])
    eps, classes = 0.1, 3
    expected = 0.0
    for row, pid in zip(logits.tolist(), pids.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        for c, v in enumerate(row):
            target = (1 - eps) * (c == pid) + eps / classes
            expected -= target * (v - log_z) / 2
    assert CrossEntropyLabelSmooth(eps)(logits, pids).item() == pytest.approx(expected, rel=1e-6)


def test_loss_stack_weights_and_reports_each_term():
    stack = build_loss_stack(
        [
            {"name": "ce", "type": "cross_entropy", "weight": 0.5, "output": "logits", "epsilon": 0.0},
            {"name": "wrt", "type": "weighted_triplet", "weight": 2.0, "output": "features"},
        ],
        num_classes=4,
    )
    outputs = {"logits": torch.randn(8, 4), "features": torch.randn(8, 6)}
    pids = torch.arange(4).repeat_interleave(2)
    total, terms = stack(outputs, {"pids": pids})
    ce = torch.nn.functional.cross_entropy(outputs["logits"], pids)
    wrt = WeightedRegularizedTriplet()(outputs["features"], pids)
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["wrt"], wrt)
    torch.testing.assert_close(total, 0.5 * ce + 2.0 * wrt)


@pytest.mark.parametrize(
    ("specs", "error", "match"),
    [
        ([], ValueError, "empty"),
        ([{"name": "x", "type": "arcface", "output": "logits"}], ValueError, "arcface.*known types"),
        ([{"name": "x", "type": "cross_entropy"}], ValueError, "missing key.*output"),
        ([{"name": "x", "type": "cross_entropy", "output": "logits", "margin": 1}], ValueError, "margin"),
        (
            [
                {"name": "x", "type": "cross_entropy", "output": "logits"},
                {"name": "x", "type": "weighted_triplet", "output": "features"},
            ],
            ValueError,
            "unique",
        ),
    ],
)
def test_bad_loss_specs_are_named(specs, error, match):
    with pytest.raises(error, match=match):
        build_loss_stack(specs, num_classes=4)


def test_stack_names_a_missing_model_output():
    stack = build_loss_stack([{"name": "kd", "type": "cross_entropy", "output": "teacher_logits"}], num_classes=4)
    with pytest.raises(KeyError, match="teacher_logits.*logits"):
        stack({"logits": torch.randn(2, 4)}, {"pids": torch.tensor([0, 1])})


def test_per_level_entries_follow_the_code_lengths():
    specs = [
        {"name": "ce", "type": "cross_entropy", "output": "logits", "weight": 0.5, "per_level": "every"},
        {"name": "wrt", "type": "weighted_triplet", "output": "features"},
        {"name": "sd", "type": "prob_self_distill", "output": "logits", "target": "logits", "per_level": "shorter"},
    ]
    assert expand_level_losses(specs, [64, 16, 8]) == [
        {"name": "ce_64", "type": "cross_entropy", "output": "logits_64", "weight": 0.5},
        {"name": "ce_16", "type": "cross_entropy", "output": "logits_16", "weight": 0.5},
        {"name": "ce_8", "type": "cross_entropy", "output": "logits_8", "weight": 0.5},
        {"name": "wrt", "type": "weighted_triplet", "output": "features"},
        {"name": "sd_16", "type": "prob_self_distill", "output": "logits_16", "target": "logits_64"},
        {"name": "sd_8", "type": "prob_self_distill", "output": "logits_8", "target": "logits_64"},
    ]
    assert expand_level_losses(specs[1:2], None) == specs[1:2]  # nothing per level: no pyramid needed


@pytest.mark.parametrize(
    ("spec", "code_lengths", "match"),
    [
        ({"name": "ce", "output": "logits", "per_level": "each"}, [8], "per_level='each': expected one of"),
        ({"name": "ce", "output": "logits", "per_level": "every"}, None, "no code lengths"),
        ({"name": "sd", "output": "logits", "per_level": "shorter"}, [8, 4], r"missing key\(s\) \['target'\]"),
    ],
)
def test_bad_per_level_entries_are_named(spec, code_lengths, match):
    with pytest.raises(ValueError, match=match):
        expand_level_losses([spec], code_lengths)


def test_the_stack_refuses_entries_not_written_out_per_level():
    spec = {"name": "ce", "type": "cross_entropy", "output": "logits", "per_level": "every"}
    with pytest.raises(ValueError, match="expand_level_losses"):
        build_loss_stack([spec], num_classes=4)
