"""Mixed precision and loader settings: bf16 end to end on the CPU, checks against the hardware."""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_vit_config

from slca_peft import ClassStatistics, SLCAConfig, SLCAModel, TaskSequence
from slca_peft.hardware import available_cores, check_hardware
from slca_peft.inference import inference_context


def test_bf16_run_end_to_end_on_the_cpu(tmp_path, make_learner, image_folders):
    tasks = TaskSequence.from_image_folders(*image_folders, init_cls=3, increment=3, seed=1993)
    learner = make_learner(tasks, tmp_path / "run", init_cls=3, increment=3, bf16=True, ca_epochs=2)
    seen = []
    features = learner.model.features

    def spy(pixel_values):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return features(pixel_values)

    learner.model.features = spy
    result = learner.run()
    training = [s for s in seen if s[0]]
    assert training and all(enabled and dtype == torch.bfloat16 for _, enabled, dtype in training)
    assert [len(row) for row in result.accuracy_matrix] == [1, 2]
    for t, row in enumerate(result.accuracy_matrix):
        assert row[t] > 100.0 / (3 * (t + 1)), result.accuracy_matrix  # learned, not noise
    # Mixed precision: the weights and statistics themselves stay full precision.
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    assert all(m.dtype == torch.float64 and torch.isfinite(m).all() for m in learner.statistics.means.values())


def test_statistics_under_bf16_equal_float32_within_bf16_rounding():
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(tiny_vit_config(initializer_range=1.0), task_sizes=[4]).eval()
    pixels = torch.randn(200, 3, 32, 32)
    labels = torch.arange(4).repeat_interleave(50)
    computed, features = {}, {}
    for name, bf16 in (("float32", False), ("bfloat16", True)):
        stats = ClassStatistics(model.feature_dim)
        with inference_context(model, SimpleNamespace(bf16=bf16, fp16=False)):
            features[name] = model.features(pixels)
        stats.update(features[name], labels)
        stats.finalize(0)
        computed[name] = stats
    full, half = computed["float32"], computed["bfloat16"]
    # The accumulator loses nothing: bfloat16 features give the float64 statistics of their exact values.
    low, exact = ClassStatistics(model.feature_dim), ClassStatistics(model.feature_dim)
    low.update(features["bfloat16"].bfloat16(), labels)
    exact.update(features["bfloat16"].bfloat16().double(), labels)
    for stats in (low, exact):
        stats.finalize(0)
    for c in range(4):
        assert low.means[c].dtype == torch.float64
        torch.testing.assert_close(low.means[c], exact.means[c], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(low.covariance(c), exact.covariance(c), rtol=1e-10, atol=1e-12)
    # Against float32: bf16 keeps 8 significant bits (0.4 % per rounding), compounded over this tiny
    # ViT's wide-initialised (std 1) layers into up to ~6 % of a class's spread (measured):
    # bound at 10 % of the spread for means and 15 % relative (Frobenius) for covariances.
    for c in range(4):
        spread = full.covariance(c).diagonal().sqrt().mean()
        assert (half.means[c] - full.means[c]).abs().max() < 0.10 * spread
        difference = torch.linalg.matrix_norm(half.covariance(c) - full.covariance(c))
        assert difference < 0.15 * torch.linalg.matrix_norm(full.covariance(c))
    assert any((half.means[c] != full.means[c]).any() for c in range(4))  # bf16 really ran


def test_fp16_on_the_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16=True needs a CUDA GPU.*--bf16"):
        SLCAConfig(output_dir=str(tmp_path), use_cpu=True, fp16=True)


def test_bf16_without_a_gpu_names_use_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU.*--use_cpu"):
        SLCAConfig(output_dir=str(tmp_path), bf16=True)


def test_bf16_on_a_gpu_without_bf16_suggests_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    args = SimpleNamespace(use_cpu=False, fp16=False, bf16=True, dataloader_num_workers=None,
                           dataloader_persistent_workers=None)
    with pytest.raises(ValueError, match="Tesla V100 has no bfloat16 support.*--fp16"):
        check_hardware(args)


def test_loader_defaults_follow_the_device(tmp_path, monkeypatch):
    args = SLCAConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (args.dataloader_num_workers, args.dataloader_persistent_workers, args.dataloader_pin_memory) == (
        0, False, False
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = SimpleNamespace(use_cpu=False, fp16=True, bf16=False, dataloader_num_workers=None,
                          dataloader_persistent_workers=None)
    check_hardware(gpu)
    assert gpu.dataloader_num_workers == min(4, available_cores()) and gpu.dataloader_persistent_workers


def test_more_workers_than_cores_falls_back_with_one_warning(tmp_path, caplog):
    cores = available_cores()
    with caplog.at_level(logging.WARNING, logger="slca_peft.hardware"):
        args = SLCAConfig(output_dir=str(tmp_path), use_cpu=True, dataloader_num_workers=cores + 3)
    assert args.dataloader_num_workers == cores and args.dataloader_persistent_workers
    warnings = [r.getMessage() for r in caplog.records if r.name == "slca_peft.hardware"]
    assert len(warnings) == 1 and f"more than the {cores} CPU cores available; using {cores}" in warnings[0]
