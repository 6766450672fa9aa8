"""Fast defaults (issue 16): mixed precision, channels_last and pinned memory on CUDA only, loader workers capped
at the available cores, and the opt-in `model.compile`, checked on the CPU with a tiny ResNet-18."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from agw_light.builders import build_datamodule, build_module, model_arguments, trainer_arguments
from agw_light.lit.datamodule import ReIDDataModule
from agw_light.lit.module import LitReID


def fake_cuda(monkeypatch, *, bf16: bool) -> None:
    """Makes the builders see a CUDA GPU (with or without bf16), without touching one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)


def test_auto_defaults_are_float32_without_channels_last_or_pinning_on_the_cpu(compose_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_config()
    assert trainer_arguments(cfg)["precision"] == "32-true"
    assert model_arguments(cfg)["channels_last"] is False
    assert build_datamodule(cfg).pin_memory is False


@pytest.mark.parametrize(("bf16", "precision"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_defaults_on_cuda_are_mixed_precision_channels_last_and_pinned_memory(
    compose_config, monkeypatch, bf16, precision
):
    fake_cuda(monkeypatch, bf16=bf16)
    cfg = compose_config("loader.num_workers=1")
    assert trainer_arguments(cfg)["precision"] == precision
    assert model_arguments(cfg)["channels_last"] is True
    datamodule = build_datamodule(cfg)
    assert datamodule.pin_memory is True
    assert datamodule._loader_options() == {"num_workers": 1, "pin_memory": True, "persistent_workers": True}


def test_explicit_settings_and_a_cpu_accelerator_override_auto(compose_config, monkeypatch):
    fake_cuda(monkeypatch, bf16=True)
    cpu = compose_config("trainer.accelerator=cpu")
    assert trainer_arguments(cpu)["precision"] == "32-true"
    assert model_arguments(cpu)["channels_last"] is False
    assert build_datamodule(cpu).pin_memory is False
    forced = compose_config("trainer.precision=16-mixed", "model.channels_last=false")
    assert trainer_arguments(forced)["precision"] == "16-mixed"
    assert model_arguments(forced)["channels_last"] is False


def test_evaluate_pins_memory_for_a_cuda_device_only(compose_config, monkeypatch):
    """evaluate/visualize have no trainer accelerator: their `device` decides."""
    fake_cuda(monkeypatch, bf16=True)
    assert build_datamodule(compose_config(config_name="evaluate")).pin_memory is True
    assert build_datamodule(compose_config("device=cpu", config_name="evaluate")).pin_memory is False


def test_loader_workers_are_capped_at_the_available_cores(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level(logging.INFO, logger="agw_light.lit.datamodule"):
        capped = ReIDDataModule(name="synthetic", root=str(tmp_path), num_workers=4)
    assert capped.num_workers == 2
    assert "num_workers=4 capped at the 2 CPU cores available" in caplog.text
    caplog.clear()
    assert ReIDDataModule(name="synthetic", root=str(tmp_path), num_workers=2).num_workers == 2
    assert ReIDDataModule(name="synthetic", root=str(tmp_path), num_workers=0).num_workers == 0
    assert "capped" not in caplog.text


@pytest.mark.slow
def test_model_compile_compiles_the_forward_and_keeps_eager_results_and_weight_names(compose_config):
    """`model.compile=true` reaches LitReID; the compiled ResNet-18 matches the eager one at a tiny input.

    Slow: inductor compiles C++ kernels, about a CPU minute here with a cold compile cache.
    """
    cfg = compose_config("model.backbone=resnet18", "model.compile=true")
    torch.manual_seed(0)
    compiled = build_module(cfg, num_classes=4).eval()
    eager_model = {**model_arguments(cfg), "compile": False}
    eager = LitReID(model=eager_model, losses=[dict(term) for term in cfg.losses], num_classes=4).eval()
    eager.load_state_dict(compiled.state_dict(), strict=True)  # same weight names: checkpoints are unchanged
    assert compiled.hparams.model["compile"] and compiled.model._compiled_call_impl is not None
    images = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-4)
