import pytest
import torch
from conftest import tiny_vit_config
from peft.tuners.lora import LoraLayer

from slca_peft import SLCAModel
from slca_peft.models.inference import adapters_merged_into_weights, inference_context


def trained_lora_model(**kwargs):
    """A Hybrid-SL model whose LoRA matrices are non-zero, as after training."""
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(tiny_vit_config(initializer_range=1.0), task_sizes=[3], **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return model.eval()


def bits(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(before, model):
    after = model.state_dict()
    assert set(before) == set(after)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_merged_features_agree_and_weights_come_back_bit_identical():
    model = trained_lora_model()
    pixels = torch.randn(5, 3, 32, 32)
    before = bits(model)
    with torch.no_grad():
        unmerged = model.features(pixels)
    with adapters_merged_into_weights(model), torch.no_grad():
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(m.merged for m in layers)  # the forward skips the low-rank path
        merged_weight = layers[0].get_base_layer().weight.clone()
        merged = model.features(pixels)
    assert not torch.equal(merged_weight, before[next(k for k in before if k.endswith("base_layer.weight"))])
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert not any(m.merged for m in layers)
    assert_bit_identical(before, model)
    with torch.no_grad():
        assert torch.equal(model.features(pixels), unmerged)  # training resumes from the same function


def test_weights_are_restored_after_an_exception_inside():
    model = trained_lora_model()
    before = bits(model)
    with pytest.raises(RuntimeError, match="boom"), model.merged_adapters():
        raise RuntimeError("boom")
    assert_bit_identical(before, model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))


def test_full_fine_tuning_is_left_alone():
    model = trained_lora_model(use_lora=False)
    before = bits(model)
    with adapters_merged_into_weights(model) as inside:
        assert inside is model
        assert_bit_identical(before, model)
    assert_bit_identical(before, model)


def test_inference_context_runs_bf16_and_restores_the_mode():
    class Args:
        bf16, fp16 = True, False

    model = trained_lora_model().train()
    before = bits(model)
    pixels = torch.randn(4, 3, 32, 32)
    with inference_context(model, Args()):
        assert not model.training and not torch.is_grad_enabled()
        logits = model(pixel_values=pixels).logits
    assert logits.dtype == torch.bfloat16
    assert model.training
    assert_bit_identical(before, model)
    with torch.no_grad():
        reference = model.eval()(pixel_values=pixels).logits
    torch.testing.assert_close(logits.float(), reference, rtol=0.1, atol=0.1)
