"""Light feature and light search, model side: hash head, code pyramid, self-distillation, row configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ONE_EPOCH

from agw_light.builders import loss_entries
from agw_light.cli.train import train
from agw_light.inference.checkpoint import load_checkpoint
from agw_light.lit.module import LitReID
from agw_light.losses import build_loss_stack
from agw_light.losses.self_distill import ProbSelfDistill, SIMSelfDistill
from agw_light.models import build_model
from agw_light.models.heads import CodePyramidHead, HashHead

PYRAMID = (2048, 1024, 512, 256, 128, 64, 32)
IMAGES = (4, 3, 64, 32)


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(*IMAGES, generator=torch.Generator().manual_seed(seed))


def gem(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)


def eval_bn(bn: torch.nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def warmed_up(model: torch.nn.Module) -> torch.nn.Module:
    """One train-mode pass moves BN running statistics off 0/1, so eval-mode BN is not the identity."""
    model.train()
    model(images(1))
    return model.eval()


def test_hash_head_train_and_eval_outputs_with_projection():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=5, neck="hash")
    head = model.head
    assert isinstance(head, HashHead) and head.code_lengths == (2048,) and model.feature_dim == 2048
    x = images()
    out = model.train()(x)
    assert set(out) == {"features", "bn_features", "logits", "features_2048", "codes_2048", "logits_2048"}
    assert out["codes_2048"].shape == out["bn_features"].shape == (4, 2048) and out["logits"].shape == (4, 5)
    # The triplet loss's input is the pooled feature before any BatchNorm, as in BNNeck (512 channels here).
    torch.testing.assert_close(out["features"], gem(model.forward_features(x)), rtol=1e-5, atol=1e-6)
    assert out["features_2048"] is out["features"]
    torch.testing.assert_close(out["codes_2048"], torch.tanh(out["bn_features"]))
    torch.testing.assert_close(out["logits"], out["codes_2048"] @ head.classifiers[0].weight.T)
    assert out["logits_2048"] is out["logits"]

    warmed_up(model)
    x = images(2)
    with torch.no_grad():
        codes = model(x)
        # resnet18 gives 512 channels: BN(pooled) -> bias-free linear -> BN -> tanh.
        bn_in, linear = head.input_projection
        pre_bn = eval_bn(bn_in, gem(model.forward_features(x))) @ linear.weight.T
        expected_bn = eval_bn(head.bottlenecks[0], pre_bn)
    assert linear.bias is None and codes.shape == (4, 2048)
    torch.testing.assert_close(codes, torch.tanh(expected_bn), rtol=1e-4, atol=1e-5)
    assert torch.equal(codes > 0, expected_bn > 0)  # the sign of the eval output is the code
    assert codes.abs().max() <= 1.0


def test_hash_head_without_projection_when_widths_match():
    head = HashHead(16, 3, code_length=16)
    assert head.input_projection is None
    head.train()(torch.rand(8, 16, 4, 2))
    head.eval()
    feature_map = torch.rand(2, 16, 4, 2)
    with torch.no_grad():
        expected = torch.tanh(eval_bn(head.bottlenecks[0], gem(feature_map)))
        torch.testing.assert_close(head(feature_map), expected, rtol=1e-5, atol=1e-6)
    assert head.bottlenecks[0].bias.requires_grad is False and head.classifiers[0].bias is None


def test_pyramid_outputs_and_eval_concatenation_in_decreasing_length():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=6, neck="pyramid")
    head = model.head
    assert isinstance(head, CodePyramidHead) and head.code_lengths == PYRAMID and model.feature_dim == 4064
    out = model.train()(images())
    expected_keys = {f"{kind}_{n}" for n in PYRAMID for kind in ("features", "codes", "logits")}
    assert set(out) == expected_keys | {"features", "bn_features", "logits"}
    for n in PYRAMID:
        assert out[f"codes_{n}"].shape == (4, n) and out[f"logits_{n}"].shape == (4, 6)
        assert out[f"features_{n}"].shape == ((4, 512) if n == 2048 else (4, n))
    assert out["features"] is out["features_2048"] and out["logits"] is out["logits_2048"]
    # features_1024 is the level's projection before its BatchNorm (train mode: batch statistics, weight 1).
    assert torch.equal(out["codes_1024"] > 0, (out["features_1024"] - out["features_1024"].mean(0)) > 0)

    warmed_up(model)
    x = images(3)
    with torch.no_grad():
        codes = model(x)
        bn_in, linear = head.input_projection
        pre_bn = eval_bn(bn_in, gem(model.forward_features(x))) @ linear.weight.T
        levels = []
        for level, n in enumerate(PYRAMID):
            if level > 0:
                pre_bn = pre_bn @ head.projections[level - 1].weight.T
            levels.append(torch.tanh(eval_bn(head.bottlenecks[level], pre_bn)))
            assert levels[-1].shape == (4, n)
    assert codes.shape == (4, 4064)
    torch.testing.assert_close(codes, torch.cat(levels, dim=1), rtol=1e-4, atol=1e-4)


def test_shorter_levels_learn_from_the_detached_longer_code():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, neck="pyramid").train()
    head = model.head
    out = model(images())
    pids = torch.tensor([0, 1, 2, 3])
    short_loss = (
        F.cross_entropy(out["logits_512"], pids) + out["codes_512"].pow(2).sum() + out["features_512"].pow(2).sum()
    )
    longer = [
        *model.backbone.parameters(),
        *head.input_projection.parameters(),
        head.projections[0].weight,
        head.bottlenecks[0].weight,
        head.bottlenecks[1].weight,
        head.classifiers[0].weight,
    ]
    longer = [p for p in longer if p.requires_grad]  # BNNeck biases are frozen
    own = [head.projections[1].weight, head.bottlenecks[2].weight, head.classifiers[2].weight]
    grads = torch.autograd.grad(short_loss, longer + own, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads[: len(longer)])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[len(longer) :])
    # ...while the full-length level's loss trains the backbone.
    full_loss = F.cross_entropy(out["logits_2048"], pids)
    grad = torch.autograd.grad(full_loss, model.backbone.conv1.weight)[0]
    assert grad.abs().sum() > 0


def test_build_model_checks_code_lengths():
    with pytest.raises(ValueError, match="one entry"):
        build_model("resnet18", num_classes=3, neck="hash", code_lengths=[64, 32])
    with pytest.raises(ValueError, match="bnneck.*learns no binary code"):
        build_model("resnet18", num_classes=3, code_lengths=[64])
    with pytest.raises(ValueError, match="strictly decreasing"):
        build_model("resnet18", num_classes=3, neck="pyramid", code_lengths=[64, 128])
    model = build_model("resnet18", num_classes=3, neck="pyramid", code_lengths=[512, 16])
    assert model.head.input_projection is None and model.feature_dim == 528


def test_prob_self_distill_is_symmetric_kl_and_zero_for_equal_logits():
    logits = torch.randn(3, 5)
    assert ProbSelfDistill()(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)

    def softmax(values, t):
        exps = [math.exp(v / t) for v in values]
        return [e / sum(exps) for e in exps]

    student, teacher = [2.0, 0.0, -1.0], [0.0, 1.0, 0.5]
    for t in (1.0, 3.0):
        p_s, p_t = softmax(student, t), softmax(teacher, t)
        kl_ts = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
        kl_st = sum(b * math.log(b / a) for a, b in zip(p_t, p_s, strict=True))
        value = ProbSelfDistill(t)(torch.tensor([student]), torch.tensor([teacher])).item()
        assert value == pytest.approx((kl_ts + kl_st) * t * t, rel=1e-5)
    with pytest.raises(ValueError, match=r"student \(2, 5\).*teacher \(2, 6\)"):
        ProbSelfDistill()(torch.randn(2, 5), torch.randn(2, 6))


def test_sim_self_distill_matches_row_normalised_similarities():
    teacher = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert SIMSelfDistill()(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-8)
    same_relations = torch.tensor([[0.0, 3.0], [3.0, 0.0]])  # other length and scale
    assert SIMSelfDistill()(same_relations, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # Student similarity [[1, 1], [1, 1]] -> rows (1/sqrt2, 1/sqrt2); teacher's rows are the identity.
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    r = 1 / math.sqrt(2)
    expected = (2 * (r - 1) ** 2 + 2 * r**2) / 4
    assert SIMSelfDistill()(collapsed, teacher).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same batch"):
        SIMSelfDistill()(torch.randn(3, 4), torch.randn(2, 4))


def test_loss_stack_reads_a_target_from_the_outputs_detached():
    stack = build_loss_stack(
        [
            {"name": "prob", "type": "prob_self_distill", "output": "logits_8", "target": "logits_16"},
            {"name": "sim", "type": "sim_self_distill", "weight": 1000.0, "output": "codes_8", "target": "codes_16"},
        ],
        num_classes=5,
    )
    generator = torch.Generator().manual_seed(0)
    shapes = {"logits_8": (4, 5), "logits_16": (4, 5), "codes_8": (4, 8), "codes_16": (4, 16)}
    outputs = {name: torch.randn(*shape, generator=generator, requires_grad=True) for name, shape in shapes.items()}
    total, terms = stack(outputs, {"pids": torch.arange(4)})
    prob = ProbSelfDistill()(outputs["logits_8"], outputs["logits_16"])
    sim = SIMSelfDistill()(outputs["codes_8"], outputs["codes_16"])
    torch.testing.assert_close(terms["prob"], prob.detach())
    torch.testing.assert_close(total, prob + 1000.0 * sim)
    total.backward()
    assert outputs["logits_8"].grad is not None and outputs["codes_8"].grad is not None
    assert outputs["logits_16"].grad is None and outputs["codes_16"].grad is None  # targets stay fixed

    with pytest.raises(KeyError, match=r"'logits_4'.*batch target \['pids'\].*model output \['codes_16'"):
        missing = {"name": "p", "type": "prob_self_distill", "output": "logits_8", "target": "logits_4"}
        build_loss_stack([missing], num_classes=5)(outputs, {"pids": torch.arange(4)})


def test_pyramid_validation_ranks_by_the_full_length_code():
    module = LitReID(
        model={"backbone": "resnet18", "neck": "pyramid"},
        losses=[
            {"name": "ce", "type": "cross_entropy", "output": "logits"},
        ],
        num_classes=4,
        distance="hamming",
    ).eval()
    batch = {
        "image": images(),
        "pid": torch.tensor([0, 0, 1, 1]),
        "camid": torch.tensor([0, 1, 0, 1]),
        "is_query": torch.tensor([True, False, True, False]),
        "index": torch.arange(4),
    }
    with torch.no_grad():
        module.validation_step(batch, 0)
        full = module(batch["image"])
    assert full.shape == (4, 4064)
    assert torch.equal(module.val_metric.features[0], full[:, :2048])


def _kd_entries(cfg) -> list[dict]:
    return [term for term in loss_entries(cfg) if term["name"].startswith("kd")]


def test_row_configs_compose_into_modules(compose_config):
    feat = compose_config("light=feat")
    assert (feat.model.neck, list(feat.model.code_lengths), feat.eval.distance) == ("hash", [2048], None)
    assert feat.model.backbone == "resnet34"  # the generated set's specialisation, as for row 1

    search = compose_config("light=search")
    assert search.model.neck == "pyramid" and list(search.model.code_lengths) == list(PYRAMID)
    by_type: dict[str, list] = {}
    for term in loss_entries(search):
        by_type.setdefault(term["type"], []).append(term)
    assert [t["output"] for t in by_type["cross_entropy"]] == [f"logits_{n}" for n in PYRAMID]
    assert [t["output"] for t in by_type["weighted_triplet"]] == [f"features_{n}" for n in PYRAMID]
    assert [(t["output"], t["target"], t["weight"]) for t in by_type["prob_self_distill"]] == [
        (f"logits_{n}", "logits_2048", 1.0) for n in PYRAMID[1:]
    ]
    assert [(t["output"], t["target"], t["weight"]) for t in by_type["sim_self_distill"]] == [
        (f"codes_{n}", "codes_2048", 1000.0) for n in PYRAMID[1:]
    ]

    everything = compose_config("light=all", "light.teacher_ckpt=/some/row1.ckpt")
    model = compose_config("light=model", "light.teacher_ckpt=/some/row1.ckpt")
    assert everything.model.backbone == "resnet18" and everything.model.neck == "pyramid"
    assert _kd_entries(everything) == _kd_entries(model) != []
    pyramid_terms = [t for t in loss_entries(everything) if not t["name"].startswith("kd")]
    assert pyramid_terms == loss_entries(search)

    for cfg in (feat, search):
        module = LitReID(model=dict(cfg.model), losses=loss_entries(cfg), num_classes=8, distance=cfg.eval.distance)
        assert module.model.head.code_lengths == tuple(cfg.model.code_lengths)
        assert module.model.distance == module.val_metric.distance == "hamming"  # the model's own


def _logged_losses(log_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    tags = [tag for tag in accumulator.Tags()["scalars"] if tag.startswith("train/loss_")]
    return {tag.removeprefix("train/loss_"): [event.value for event in accumulator.Scalars(tag)] for tag in tags}


@pytest.mark.slow
@pytest.mark.parametrize(("row", "dim"), [("feat", 2048), ("search", 4064)])
def test_tiny_training_run(row, dim, compose_config, tmp_path):
    cfg = compose_config(*ONE_EPOCH, f"light={row}")
    result = train(cfg)
    assert result["metric"] == "hamming"
    assert 0.0 <= result["R1"] <= 1.0 and 0.0 <= result["mAP"] <= 1.0
    # Same-person thresholds of a code row are whole numbers of bits, on the full-length code.
    assert all(
        isinstance(entry["threshold"], int) and -1 <= entry["threshold"] <= 2048 for entry in result["verification"]
    )
    if row == "search":  # coarse-to-fine rows also time the exact full-length scan they speed up
        assert result["exact_search_ms_per_query"] > 0 and 0.0 <= result["recall_at_1_of_exact"] <= 1.0
    logged = _logged_losses(tmp_path / "run/tensorboard")
    assert set(logged) == {term["name"] for term in loss_entries(cfg)}  # every level's and every distillation term
    assert all(math.isfinite(value) for values in logged.values() for value in values)
    loaded = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert loaded.network(torch.zeros(1, 3, 64, 32)).shape == (1, dim)
    assert loaded.hparams["model"]["neck"] == ("hash" if row == "feat" else "pyramid")


@pytest.mark.slow
def test_tiny_light_all_run_distils_into_a_pyramid_student(tiny_teacher, compose_config, tmp_path):
    teacher_path, _ = tiny_teacher
    result = train(compose_config(*ONE_EPOCH, "light=all", f"light.teacher_ckpt={teacher_path}"))
    assert result["metric"] == "hamming" and 0.0 <= result["mAP"] <= 1.0
    teacher_path.unlink()  # the student checkpoint stands alone
    student = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt").network
    assert student.head.code_lengths == PYRAMID
    assert student(torch.zeros(1, 3, 64, 32)).shape == (1, 4064)


# Rows 4 and 5's loss entries as conf/light/search.yaml wrote them out by hand before the builder generated
# them from model.code_lengths: the generated stack must be exactly this one (names, order, weights, targets).
HAND_WRITTEN_PYRAMID_LOSSES = """
- {name: ce_2048, type: cross_entropy, weight: 1.0, output: logits_2048, epsilon: 0.1}
- {name: ce_1024, type: cross_entropy, weight: 1.0, output: logits_1024, epsilon: 0.1}
- {name: ce_512, type: cross_entropy, weight: 1.0, output: logits_512, epsilon: 0.1}
- {name: ce_256, type: cross_entropy, weight: 1.0, output: logits_256, epsilon: 0.1}
- {name: ce_128, type: cross_entropy, weight: 1.0, output: logits_128, epsilon: 0.1}
- {name: ce_64, type: cross_entropy, weight: 1.0, output: logits_64, epsilon: 0.1}
- {name: ce_32, type: cross_entropy, weight: 1.0, output: logits_32, epsilon: 0.1}
- {name: wrt_2048, type: weighted_triplet, weight: 1.0, output: features_2048}
- {name: wrt_1024, type: weighted_triplet, weight: 1.0, output: features_1024}
- {name: wrt_512, type: weighted_triplet, weight: 1.0, output: features_512}
- {name: wrt_256, type: weighted_triplet, weight: 1.0, output: features_256}
- {name: wrt_128, type: weighted_triplet, weight: 1.0, output: features_128}
- {name: wrt_64, type: weighted_triplet, weight: 1.0, output: features_64}
- {name: wrt_32, type: weighted_triplet, weight: 1.0, output: features_32}
- {name: prob_sd_1024, type: prob_self_distill, output: logits_1024, target: logits_2048, weight: 1.0}
- {name: prob_sd_512, type: prob_self_distill, output: logits_512, target: logits_2048, weight: 1.0}
- {name: prob_sd_256, type: prob_self_distill, output: logits_256, target: logits_2048, weight: 1.0}
- {name: prob_sd_128, type: prob_self_distill, output: logits_128, target: logits_2048, weight: 1.0}
- {name: prob_sd_64, type: prob_self_distill, output: logits_64, target: logits_2048, weight: 1.0}
- {name: prob_sd_32, type: prob_self_distill, output: logits_32, target: logits_2048, weight: 1.0}
- {name: sim_sd_1024, type: sim_self_distill, output: codes_1024, target: codes_2048, weight: 1000.0}
- {name: sim_sd_512, type: sim_self_distill, output: codes_512, target: codes_2048, weight: 1000.0}
- {name: sim_sd_256, type: sim_self_distill, output: codes_256, target: codes_2048, weight: 1000.0}
- {name: sim_sd_128, type: sim_self_distill, output: codes_128, target: codes_2048, weight: 1000.0}
- {name: sim_sd_64, type: sim_self_distill, output: codes_64, target: codes_2048, weight: 1000.0}
- {name: sim_sd_32, type: sim_self_distill, output: codes_32, target: codes_2048, weight: 1000.0}
"""
HAND_WRITTEN_KD_LOSSES = """
- {name: kd, type: kd_kl, weight: 1.0, output: logits, target: teacher_logits, temperature: 4.0}
- {name: kd_sim, type: kd_similarity, weight: 0.0, output: bn_features, target: teacher_features}
"""


@pytest.mark.parametrize("dataset", ["market1501", "dukemtmcreid", "msmt17", "synthetic"])
def test_rows_4_and_5_build_the_hand_written_loss_stack(dataset):
    """The generated per-level entries are the 26 that light/search.yaml spelled out, in the same order, and
    the loss stack built from them holds the same terms and loss modules."""
    import yaml
    from hydra import compose, initialize_config_dir

    from agw_light.cli import CONF_DIR

    pyramid = yaml.safe_load(HAND_WRITTEN_PYRAMID_LOSSES)
    distill = yaml.safe_load(HAND_WRITTEN_KD_LOSSES)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        search = compose("config", overrides=[f"dataset={dataset}", "light=search"])
        everything = compose("config", overrides=[f"dataset={dataset}", "light=all", "light.teacher_ckpt=/t.ckpt"])
    for cfg, expected in ((search, pyramid), (everything, [*pyramid, *distill])):
        entries = loss_entries(cfg)
        assert entries == expected
        assert [list(entry) for entry in entries] == [list(entry) for entry in expected]  # key order too
        built, reference = (build_loss_stack(specs, num_classes=5) for specs in (entries, expected))
        assert built.terms == reference.terms
        assert [(type(a), vars(a).get("temperature")) for a in built.losses] == [
            (type(b), vars(b).get("temperature")) for b in reference.losses
        ]


def test_other_code_lengths_need_no_loss_edit(compose_config):
    """light=search with model.code_lengths changed: the loss stack follows the new levels, and a step runs."""
    cfg = compose_config(
        "light=search", "model.code_lengths=[64,16]", "model.backbone=resnet18", "model.pretrained=none"
    )
    entries = loss_entries(cfg)
    assert [entry["name"] for entry in entries] == ["ce_64", "ce_16", "wrt_64", "wrt_16", "prob_sd_16", "sim_sd_16"]
    assert [entry.get("target") for entry in entries[-2:]] == ["logits_64", "codes_64"]
    module = LitReID(model=dict(cfg.model), losses=entries, num_classes=4).train()
    total, values = module.loss_stack(module.model(images()), {"pids": torch.tensor([0, 0, 1, 1])})
    assert math.isfinite(total.item()) and set(values) == {entry["name"] for entry in entries}
