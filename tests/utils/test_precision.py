"""Mixed precision and loader settings: bf16 end to end on the CPU, checks against the hardware."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import recipe_argv, tiny_vit_config

from slca_peft import SLCAConfig, SLCAModel, TaskSequence
from slca_peft.method import ClassStatistics
from slca_peft.models.inference import inference_context
from slca_peft.utils import hardware
from slca_peft.utils.hardware import available_cores, check_hardware


@pytest.mark.slow
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
    with caplog.at_level(logging.WARNING, logger="slca_peft.utils.hardware"):
        args = SLCAConfig(output_dir=str(tmp_path), use_cpu=True, dataloader_num_workers=cores + 3)
    assert args.dataloader_num_workers == cores and args.dataloader_persistent_workers
    warnings = [r.getMessage() for r in caplog.records if r.name == "slca_peft.utils.hardware"]
    assert len(warnings) == 1 and f"more than the {cores} CPU cores available; using {cores}" in warnings[0]


# ---------------------------------------------------------------------------------------------- --bf16 auto
@pytest.fixture
def cpu_only(monkeypatch):
    """A machine without any GPU, whose CPU bf16 support the test sets with `cpu_only(found)`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_has_accelerator", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def set_cpu(found: list[str]) -> None:
        monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: found)

    return set_cpu


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, True, ["AVX512-BF16", "AMX"]), (True, False, ["AVX512-BF16"]), (False, False, []),
])
def test_cpu_bf16_detection_asks_torch(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert hardware.cpu_bf16_instructions() == expected


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu avx512f avx512_bf16 amx_tile amx_bf16", ["AVX512-BF16", "AMX"]), ("fpu avx2 avx512f", []),
])
def test_cpu_bf16_detection_falls_back_to_cpuinfo(monkeypatch, tmp_path, flags, expected):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\n")
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    assert hardware.cpu_bf16_instructions() == expected
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")  # not Linux: nothing detected
    assert hardware.cpu_bf16_instructions() == []


@pytest.mark.parametrize(("capability", "expected"), [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_cuda_bf16_needs_compute_capability_8(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU")
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: ["AMX"])
    bf16, why = hardware.choose_bf16(use_cpu=False)
    assert bf16 is expected and f"compute capability {capability[0]}.{capability[1]}" in why
    assert hardware.choose_bf16(use_cpu=True) == (True, "the CPU computes bfloat16 natively with AMX")


def test_resolve_precision(cpu_only):
    resolve = hardware.resolve_precision
    cpu_only(["AVX512-BF16"])
    # Explicit values pass through (strings as transformers reads them); auto resolves for this machine.
    for explicit, expected in ((False, False), (True, True), ("false", False), ("yes", True), ("1", True)):
        assert resolve(explicit, fp16=False, use_cpu=False) == (expected, False, None)
    bf16, use_cpu, why = resolve("auto", fp16=False, use_cpu=False)
    assert (bf16, use_cpu) == (True, True) and "AVX512-BF16" in why  # no GPU: CPU bf16 needs use_cpu
    assert resolve("AUTO", fp16=True, use_cpu=True)[:2] == (False, True)
    cpu_only([])
    assert resolve("auto", fp16=False, use_cpu=True)[:2] == (False, True)
    with pytest.raises(ValueError, match="not one of true, false or auto"):
        resolve("sometimes", fp16=False, use_cpu=False)


def test_recipe_resolves_bf16_auto_by_the_hardware_and_logs_it_once(recipe, cpu_only, tmp_path, caplog):
    argv = ["--model_config", "m.json", "--dataset", "digits", "--output_dir", str(tmp_path)]
    cpu_only(["AMX"])
    assert recipe.parse_args(argv)[2].bf16 is True  # the default is auto; no --use_cpu needed without a GPU
    assert recipe.parse_args(argv + ["--bf16", "false"])[2].bf16 is False
    assert recipe.parse_args(argv)[2].precision_choice == (
        "--bf16 auto chose bfloat16 autocast: the CPU computes bfloat16 natively with AMX "
        "(--bf16 true/false overrides)")
    assert recipe.parse_args(argv + ["--bf16", "false"])[2].precision_choice is None
    cpu_only([])
    assert recipe.parse_args(argv + ["--bf16", "auto"])[2].bf16 is False
    assert recipe.parse_args(argv + ["--bf16", "true", "--use_cpu", "true"])[2].bf16 is True
    # The Python API keeps transformers' default.
    assert SLCAConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is False


@pytest.mark.slow
def test_a_resumed_auto_run_resolves_as_it_started(recipe, cpu_only, tmp_path, base_model_dir, image_folders):
    out = tmp_path / "run"
    argv = recipe_argv(base_model_dir, image_folders, out, init_cls=4, ca_samples_per_class=16, ca_batch_size=32)
    cpu_only(["AVX512-BF16"])
    recipe.main(argv)
    assert json.loads((out / "run_fingerprint.json").read_text())["bf16"] is True
    # Resumed on the same machine, and on one without CPU bf16: both continue the bf16 run.
    for found in (["AVX512-BF16"], []):
        cpu_only(found)
        assert recipe.parse_args(argv + ["--resume_from", "auto"])[2].bf16 is True
        recipe.main(argv + ["--resume_from", "auto"])
    # Forcing the other precision is a different run, refused by name.
    with pytest.raises(ValueError, match=r"bf16 \(true -> false\)"):
        recipe.main(argv + ["--resume_from", "auto", "--bf16", "false"])


# ---------------------------------------------------------------------------------------------- CPU bf16 training
def test_cpu_bf16_training_keeps_autocast_values_and_restores_everything():
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(tiny_vit_config(initializer_range=0.5), task_sizes=[4])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    config = model.backbone.config
    assert config._attn_implementation == "sdpa"
    pixels, labels = torch.randn(6, 3, 32, 32), torch.arange(6) % 4

    def run(fast: bool):
        model.zero_grad(set_to_none=True)
        with hardware.cpu_bf16_training(model, SimpleNamespace(bf16=fast)):
            config._attn_implementation = "eager" if not fast else config._attn_implementation
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(pixel_values=pixels).logits
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_logits, plain_grads = run(False)  # autocast alone, with the same (eager) attention
    config._attn_implementation = "sdpa"
    seen = []
    model.backbone.register_forward_hook(lambda *a: seen.append(config._attn_implementation))
    fast_logits, fast_grads = run(True)
    assert seen[-1] == "eager" and config._attn_implementation == "sdpa"  # restored on exit
    loras = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert loras and all(m.cast_input_dtype_enabled for m in loras)
    # The forward is autocast's, value for value; gradients differ only by bf16 sums over a norm's readers.
    torch.testing.assert_close(fast_logits, plain_logits, rtol=0, atol=0)
    assert fast_grads.keys() == plain_grads.keys() and any("lora_A" in n for n in fast_grads)
    largest = max(g.abs().max() for g in plain_grads.values())
    for name, grad in fast_grads.items():  # (a key bias's gradient is 0 but for rounding: the absolute floor)
        bound = 0.02 * plain_grads[name].abs().max() + 1e-3 * largest
        assert (grad - plain_grads[name]).abs().max() <= bound, name
    # No-grad passes and other precisions are left alone.
    with hardware.cpu_bf16_training(model, SimpleNamespace(bf16=True)), torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.features(pixels).dtype == torch.float32  # the final norm is not cast
    with hardware.cpu_bf16_training(model, SimpleNamespace(bf16=False)):
        assert config._attn_implementation == "sdpa"
