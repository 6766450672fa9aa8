"""The light model: KD losses, the frozen teacher, and a tiny distillation run on generated data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agw_light.builders import loss_entries
from agw_light.cli.train import train
from agw_light.files import file_sha256
from agw_light.inference.checkpoint import load_checkpoint
from agw_light.lit.module import LitReID
from agw_light.lit.teacher import resolve_teacher_checkpoint
from agw_light.losses import KLDivergenceKD, SimilarityKD

SMALL = ["model.backbone=resnet18", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"]
CE_WRT = [
    {"name": "ce", "type": "cross_entropy", "weight": 1.0, "output": "logits"},
    {"name": "wrt", "type": "weighted_triplet", "weight": 1.0, "output": "features"},
]


def test_kd_is_zero_for_identical_logits_and_matches_hand_value():
    logits = torch.randn(4, 6)
    assert KLDivergenceKD(4.0)(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)

    student, teacher, t = [2.0, 0.0], [0.0, 1.0], 2.0

    def softmax(values):
        exps = [math.exp(v / t) for v in values]
        return [e / sum(exps) for e in exps]

    p_teacher, p_student = softmax(teacher), softmax(student)
    expected = t * t * sum(pt * math.log(pt / ps) for pt, ps in zip(p_teacher, p_student, strict=True))
    value = KLDivergenceKD(t)(torch.tensor([student]), torch.tensor([teacher])).item()
    assert value == pytest.approx(expected, rel=1e-6)


def test_kd_class_count_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"student \(2, 5\).*teacher \(2, 7\)"):
        KLDivergenceKD()(torch.randn(2, 5), torch.randn(2, 7))


def test_similarity_kd_compares_relations_across_feature_sizes():
    teacher = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    rotated_student = torch.tensor([[0.0, 3.0], [2.0, 0.0]])  # same relations, other size and scale
    assert SimilarityKD()(rotated_student, teacher).item() == pytest.approx(0.0, abs=1e-7)
    collapsed_student = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # similarity 1 where the teacher has 0
    assert SimilarityKD()(collapsed_student, teacher).item() == pytest.approx(2 / 4)


def test_distillation_keeps_the_teacher_frozen_and_the_student_self_contained(tiny_teacher, compose_config, tmp_path):
    import pytorch_lightning as pl

    teacher_path, datamodule = tiny_teacher
    cfg = compose_config(*SMALL, "light=model", f"light.teacher_ckpt={teacher_path}", "light.kd_similarity_weight=1.0")
    student = LitReID(
        model=dict(cfg.model),
        losses=loss_entries(cfg),
        num_classes=datamodule.num_classes,
        teacher_ckpt=str(teacher_path),
    )
    before = {name: value.clone() for name, value in student.teacher.state_dict().items()}
    assert any("running_mean" in name for name in before)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
    )
    trainer.fit(student, datamodule=datamodule)

    assert trainer.global_step == 2
    assert not student.teacher.training
    for name, value in student.teacher.state_dict().items():
        assert torch.equal(value, before[name]), name  # weights and BN statistics bit-identical
    assert not any(name.startswith("teacher") for name in student.state_dict())
    assert student.hparams.teacher_sha256 == file_sha256(teacher_path)
    assert all(p.requires_grad is False for p in student.teacher.parameters())


@pytest.mark.slow
def test_tiny_distillation_run_and_test_without_the_teacher(tiny_teacher, compose_config, tmp_path):
    teacher_path, _ = tiny_teacher
    cfg = compose_config(
        *SMALL,
        "light=model",
        f"light.teacher_ckpt={teacher_path}",
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
    )
    row = train(cfg)
    assert row["feature_dim"] == 512 and row["metric"] == "cosine"
    teacher_path.unlink()  # the student checkpoint must not need its teacher any more
    student = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert student.hparams["teacher_sha256"] is not None  # recorded, not needed
    assert student.network(torch.zeros(1, 3, 64, 32)).shape == (1, 512)


def test_teacher_errors_fail_before_training(tiny_teacher, compose_config, tmp_path):
    teacher_path, datamodule = tiny_teacher
    losses = [*CE_WRT, {"name": "kd", "type": "kd_kl", "output": "logits", "target": "teacher_logits"}]
    model = {"backbone": "resnet18", "pretrained": "none"}
    with pytest.raises(ValueError, match=r"classifies 8 training identities but the student's dataset has 9"):
        LitReID(model=model, losses=losses, num_classes=9, teacher_ckpt=str(teacher_path))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        LitReID(model=model, losses=losses, num_classes=8, teacher_ckpt=str(tmp_path / "missing.ckpt"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="garbage.ckpt"):
        LitReID(model=model, losses=losses, num_classes=8, teacher_ckpt=str(garbage))
    with pytest.raises(ValueError, match="teacher_logits.*light.teacher_ckpt"):
        LitReID(model=model, losses=losses, num_classes=8)
    with pytest.raises(ValueError, match="changed since"):
        LitReID(model=model, losses=losses, num_classes=8, teacher_ckpt=str(teacher_path), teacher_sha256="0" * 64)


@pytest.mark.parametrize(
    ("neck", "code_lengths", "head"), [("hash", [64], "HashHead"), ("pyramid", [64, 32], "CodePyramidHead")]
)
def test_a_code_head_teacher_is_refused_at_construction_naming_both_heads(tmp_path, neck, code_lengths, head):
    torch.manual_seed(0)
    coded = LitReID(
        model={"backbone": "resnet18", "pretrained": "none", "neck": neck, "code_lengths": code_lengths},
        losses=[{"name": "ce", "type": "cross_entropy", "weight": 1.0, "output": "logits_64"}],
        num_classes=8,
    )
    path = tmp_path / f"{neck}.ckpt"
    torch.save({"hyper_parameters": dict(coded.hparams), "state_dict": coded.state_dict()}, path)
    losses = [*CE_WRT, {"name": "kd", "type": "kd_kl", "output": "logits", "target": "teacher_logits"}]
    with pytest.raises(ValueError, match=rf"{neck}.ckpt has a {head}; .* of a float head"):
        LitReID(model={"backbone": "resnet18", "pretrained": "none"}, losses=losses, num_classes=8, teacher_ckpt=path)


def test_a_teacher_checkpoint_holding_code_is_refused_and_the_code_never_runs(
    compose_config, crafted_checkpoint, tmp_path
):
    crafted, marker = crafted_checkpoint
    cfg = compose_config(*SMALL, "light=model", f"light.teacher_ckpt={crafted}")
    with pytest.raises(ValueError, match=r"checkpoint .*crafted\.ckpt cannot be read safely"):
        train(cfg)
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_light_model_without_a_trained_teacher_says_how_to_get_one(compose_config, tmp_path):
    cfg = compose_config(*SMALL, "light=model", f"light.teacher_ckpt={tmp_path / 'sweep' / 'synthetic' / 'full'}")
    with pytest.raises(FileNotFoundError, match=r"put light=full first in the same sweep"):
        train(cfg)


def test_teacher_run_folder_stands_for_its_evaluated_checkpoint(tmp_path):
    run = tmp_path / "full"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no metrics.json, so its training did not finish"):
        resolve_teacher_checkpoint(run)
    best = run / "checkpoints" / "best-epoch003-mAP0.5000.ckpt"
    best.parent.mkdir()
    best.write_bytes(b"weights")
    (run / "metrics.json").write_text(json.dumps({"checkpoint": str(best), "mAP": 0.5}))
    assert resolve_teacher_checkpoint(run) == best
    assert resolve_teacher_checkpoint(best) == best
    # Recorded relative to another working directory (or before the sweep folder moved): found in checkpoints/.
    (run / "metrics.json").write_text(json.dumps({"checkpoint": f"elsewhere/checkpoints/{best.name}"}))
    assert resolve_teacher_checkpoint(run) == best
    (run / "metrics.json").write_text(json.dumps({"checkpoint": "elsewhere/checkpoints/gone.ckpt"}))
    with pytest.raises(FileNotFoundError, match=r"names checkpoint elsewhere/checkpoints/gone.ckpt, which is neither"):
        resolve_teacher_checkpoint(run)
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"metrics.json: expected a JSON object with key 'checkpoint'"):
        resolve_teacher_checkpoint(run)
