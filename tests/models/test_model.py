import copy

import pytest
import torch
from conftest import tiny_vit_config
from peft.tuners.lora import LoraLayer
from transformers import ViTModel
from transformers.modeling_outputs import ImageClassifierOutput

from slca_peft import SLCAConfig, SLCAModel


def test_svd_init_sets_a_to_top_right_singular_vectors_and_b_to_zero(vit_config):
    model = SLCAModel.from_backbone(vit_config, lora_rank=4)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 5 * vit_config.num_hidden_layers
    for layer in layers:
        weight = layer.get_base_layer().weight.detach()
        _, _, vh = torch.linalg.svd(weight, full_matrices=False)
        a = layer.lora_A["default"].weight.detach()
        torch.testing.assert_close(a, vh[:4], rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert layer.scaling["default"] == pytest.approx(0.8)


def test_wrapped_model_equals_unwrapped_before_training(vit_config):
    torch.manual_seed(0)
    plain = ViTModel(vit_config, add_pooling_layer=False).eval()
    model = SLCAModel(copy.deepcopy(plain)).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model.features(x), plain(pixel_values=x).last_hidden_state[:, 0])


def test_exact_trainable_parameters_of_hybrid_sl(vit_config):
    model = SLCAModel.from_backbone(vit_config)
    model.grow(3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    h, m, layers, r = vit_config.hidden_size, vit_config.intermediate_size, vit_config.num_hidden_layers, 4
    lora = layers * (3 * (r * h + h * r) + (r * h + m * r) + (r * m + h * r))
    norms = layers * 2 * 2 * h + 2 * h
    biases = h + layers * (4 * h + m + h)  # patch projection + q, k, v, o, fc1, fc2 per block
    expected = lora + norms + biases + h + (3 * h + 3)  # + class token + head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum("lora_A" in n for n in names) == 5 * layers
    assert sum("cls_token" in n for n in names) == 1
    # Frozen: every pre-trained weight matrix, the position embeddings and the patch projection weight.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("position_embeddings" in n for n in frozen)
    assert any(n.endswith("q_proj.base_layer.weight") for n in frozen)
    assert any(n.endswith("o_proj.weight") for n in frozen)
    assert not any("original_module" in n for n in names)


def test_full_fine_tuning_trains_the_whole_backbone(vit_config):
    model = SLCAModel.from_backbone(vit_config, SLCAConfig(output_dir="x", method="slca"))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_forward_returns_hf_output_over_all_seen_classes(vit_config):
    model = SLCAModel.from_backbone(vit_config)
    model.grow(2)
    model.grow(3)
    out = model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 4, 2]))
    assert isinstance(out, ImageClassifierOutput)
    assert out.logits.shape == (4, 5) and out.loss.ndim == 0
    with pytest.raises(ValueError, match=r"label\(s\) \[5\] are not class ids this model has learned"):
        model(torch.randn(1, 3, 32, 32), labels=torch.tensor([5]))
    with pytest.raises(ValueError, match="beyond the 5 classes"):  # the heads' own order takes positions
        model(torch.randn(1, 3, 32, 32), labels=torch.tensor([5]), positions=True)


def test_unknown_lora_target_names_the_available_layers(vit_config):
    with pytest.raises(ValueError, match=r"\['query'\] match no linear layer.*q_proj"):
        SLCAModel.from_backbone(vit_config, lora_target_modules=["query", "fc1"])


def test_backbone_without_pooled_feature_is_refused():
    from transformers import Dinov2Config

    class NoPool(torch.nn.Module):
        config = tiny_vit_config()

        def forward(self, pixel_values):
            return type("Out", (), {"last_hidden_state": pixel_values, "pooler_output": None})()

    with pytest.raises(ValueError, match="no pooled image feature"):
        SLCAModel(NoPool(), use_lora=False)
    # A DINOv2 has a class token: accepted.
    cfg = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64)
    assert SLCAModel.from_backbone(cfg).slca_config.feature_source == "cls"


def test_model_settings_come_from_the_training_config_once():
    """`from_backbone` reads exactly the model fields SLCAConfig defines (not TrainingArguments' label_names,
    which are input keys), and SLCAConfig's defaults are SLCAModelConfig's."""
    from slca_peft import SLCAModelConfig

    args = SLCAConfig(output_dir="x", released_code=True, lora_rank=8, label_names=["labels"])
    assert SLCAModelConfig.fields_from(args) == {
        "use_lora": True, "lora_rank": 8, "lora_scale": 0.8, "lora_target_modules": ["q_proj", "k_proj", "v_proj"],
        "lora_svd_init": True, "lora_layout": "fused_qkv", "reset_final_norm": True, "final_norm_eps": 1e-5}
    plain = SLCAModelConfig()
    assert all(getattr(plain, k) == v for k, v in SLCAModelConfig.fields_from(SLCAConfig(output_dir="x")).items())


@pytest.mark.parametrize(("name", "value"), [("lora_rank", 4097), ("lora_scale", -0.5), ("final_norm_eps", 2.0)])
def test_model_setting_bounds_are_the_same_when_parsed_and_when_loaded(name, value):
    from slca_peft import SLCAModelConfig

    with pytest.raises(ValueError, match=f"--{name} .* is out of range"):
        SLCAConfig(output_dir="x", **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be in"):
        SLCAModelConfig(**{name: value})
