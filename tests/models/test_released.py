"""The released-code setting and its knobs: fused-qkv LoRA, a fresh final LayerNorm, CA at the
training rate, and the errors for backbones that lack what they need."""

import json
import logging

import pytest
import torch
from conftest import tiny_vit_config
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModelForImageClassification, ViTModel

from slca_peft import SLCAConfig, SLCAModel, SLCATrainer, export_model
from slca_peft.method import AlignmentSettings
from slca_peft.models.inference import adapters_merged_into_weights

QKV = ("q_proj", "k_proj", "v_proj")


def released_args(**overrides):
    return SLCAConfig(output_dir="unused", released_code=True, use_cpu=True, report_to="none", **overrides)


def blocks(model):
    return list(model.base_backbone.layers)


def qkv_weight(block):
    return torch.cat([getattr(block.attention, n).get_base_layer().weight for n in QKV]).detach()


def qkv_lora(block):
    """(A, B) of the block's fused adapter: the shared A and the 3d-row B."""
    layers = [getattr(block.attention, n) for n in QKV]
    a = layers[0].lora_A["default"].weight
    assert all(layer.lora_A["default"].weight is a for layer in layers)
    return a, torch.cat([layer.lora_B["default"].weight for layer in layers])


def perturb(model, seed=0):
    """Give every trainable tensor non-initial values, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_released_config_sets_its_knobs_and_explicit_values_win(caplog):
    args = released_args()
    assert (args.lora_layout, args.reset_final_norm, args.lora_target_modules) == ("fused_qkv", True, list(QKV))
    paper = SLCAConfig(output_dir="unused")
    assert (paper.lora_layout, paper.reset_final_norm) == ("per_projection", False)
    assert paper.lora_target_modules == ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
    with caplog.at_level(logging.WARNING):
        ablation = released_args(reset_final_norm=False)
    assert (ablation.lora_layout, ablation.reset_final_norm) == ("fused_qkv", False)
    assert "reset_final_norm=False" in caplog.text and "not the released code" in caplog.text
    with pytest.raises(ValueError, match="lora_layout='fused' is not one of"):
        SLCAConfig(output_dir="unused", lora_layout="fused")


def test_released_trainable_set_on_a_tiny_vit(base_model_dir):
    config = tiny_vit_config()
    d, m, n_layers, r = config.hidden_size, config.intermediate_size, config.num_hidden_layers, 4
    model = SLCAModel.from_backbone(str(base_model_dir), released_args())
    model.grow(3)
    for block in blocks(model):
        a, b = qkv_lora(block)
        assert tuple(a.shape) == (r, d) and tuple(b.shape) == (3 * d, r)
        assert a.requires_grad and torch.count_nonzero(b) == 0
        # SVD initialisation of the concatenated weight: A spans W_qkv's top-r right singular subspace.
        _, _, vh = torch.linalg.svd(qkv_weight(block), full_matrices=False)
        torch.testing.assert_close(a.detach().T @ a.detach(), vh[:r].T @ vh[:r], atol=1e-5, rtol=1e-5)
        assert not any(isinstance(layer, LoraLayer) for layer in block.mlp.modules())
        assert not isinstance(block.attention.o_proj, LoraLayer)
    final = model.base_backbone.layernorm.modules_to_save["default"]
    assert torch.equal(final.weight, torch.ones(d)) and torch.equal(final.bias, torch.zeros(d))
    assert final.eps == 1e-5 and final.weight.requires_grad
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(n.endswith("modules_to_save.default.weight") for n in names) == 2 * n_layers + 1
    assert any(n.endswith("cls_token") for n in names)
    assert all(any(n.endswith(f"{lin}.bias") or n.endswith(f"{lin}.base_layer.bias") for n in names)
               for lin in (*QKV, "o_proj", "fc1", "fc2"))
    lora = n_layers * (r * d + 3 * d * r)
    norms = (2 * n_layers + 1) * 2 * d
    biases = d + n_layers * (4 * d + m + d)  # patch projection + q, k, v, o, fc1, fc2 per block
    expected = lora + norms + biases + d + (3 * d + 3)  # + class token + head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    # The optimizer sees the shared A once.
    trainer = SLCATrainer(model=model, args=released_args(disable_tqdm=True))
    optimizer = trainer.create_optimizer()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len({id(p) for p in params}) == len(params) and sum(p.numel() for p in params) == expected


def test_fused_update_is_a_rank_r_update_of_w_qkv_and_survives_save_load_export(tmp_path, base_model_dir):
    args = released_args(reset_final_norm=False)
    model = SLCAModel.from_backbone(str(base_model_dir), args).eval()
    model.grow(3)
    perturb(model)
    x = torch.randn(5, 32)
    for block in blocks(model):
        a, b = qkv_lora(block)
        assert torch.linalg.matrix_rank(b.detach() @ a.detach()) == 4
        bias = torch.cat([getattr(block.attention, n).get_base_layer().bias for n in QKV]).detach()
        expected = x @ (qkv_weight(block) + args.lora_scale * b.detach() @ a.detach()).T + bias
        with torch.no_grad():
            got = torch.cat([getattr(block.attention, n)(x) for n in QKV], dim=1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(pixels).logits
    with adapters_merged_into_weights(model):  # statistics and evaluation passes merge the shared A in each projection
        torch.testing.assert_close(model(pixels).logits, logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, logits)  # and the weights come back exactly
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = SLCAModel.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert loaded.slca_config.lora_layout == "fused_qkv"
    for before, after in zip(blocks(model), blocks(loaded), strict=True):
        a0, b0 = qkv_lora(before)
        a1, b1 = qkv_lora(after)  # still tied after loading
        assert torch.equal(a0, a1) and torch.equal(b0, b1)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, logits)
    export_model(loaded, str(tmp_path / "exported"))
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "exported").eval()
    for block, exported in zip(blocks(model), plain.vit.layers, strict=True):
        a, b = qkv_lora(block)
        merged = torch.cat([getattr(exported.attention, n).weight for n in QKV]).detach()
        torch.testing.assert_close(merged, qkv_weight(block) + args.lora_scale * b.detach() @ a.detach(),
                                   atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=pixels).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["slca++", "slca"])
def test_fresh_final_norm_and_its_eps_reload_exactly(tmp_path, base_model_dir, method):
    model = SLCAModel.from_backbone(str(base_model_dir), released_args(method=method, final_norm_eps=1e-2)).eval()
    model.grow(3)
    perturb(model)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.features(pixels)
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = SLCAModel.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert loaded.slca_config.reset_final_norm and loaded.slca_config.final_norm_eps == 1e-2
    with torch.no_grad():
        assert torch.equal(loaded.features(pixels), features)


def test_ca_lr_unset_follows_learning_rate():
    assert AlignmentSettings.from_config(SLCAConfig(output_dir="unused", learning_rate=0.2)).lr == 0.2
    args = SLCAConfig(output_dir="unused", learning_rate=0.2)
    args.learning_rate = 0.3  # read when alignment starts, not frozen at construction
    assert AlignmentSettings.from_config(args).lr == 0.3
    assert AlignmentSettings.from_config(SLCAConfig(output_dir="unused", learning_rate=0.2, ca_lr=0.03)).lr == 0.03


def test_fused_layout_refuses_a_backbone_without_qkv_projections(vit_config):
    backbone = ViTModel(vit_config, add_pooling_layer=False)
    for layer in backbone.layers:
        layer.attention = nn.Identity()
    with pytest.raises(ValueError, match="q_proj\\+k_proj\\+v_proj") as err:
        SLCAModel(backbone, lora_layout="fused_qkv", lora_target_modules=["fc1"])
    assert "lora_layout='per_projection'" in str(err.value)


def test_fused_layout_needs_all_three_projections_targeted(vit_config):
    with pytest.raises(ValueError, match="lacks \\['v_proj'\\]"):
        SLCAModel(ViTModel(vit_config, add_pooling_layer=False), lora_layout="fused_qkv",
                  lora_target_modules=["q_proj", "k_proj"])


def test_reset_final_norm_refuses_a_final_norm_that_is_not_a_layernorm(vit_config):
    backbone = ViTModel(vit_config, add_pooling_layer=False)
    backbone.layernorm = nn.RMSNorm(vit_config.hidden_size)
    with pytest.raises(ValueError, match="ViTModel.layernorm is a RMSNorm"):
        SLCAModel(backbone, reset_final_norm=True)
    del backbone.layernorm
    with pytest.raises(ValueError, match="has none of the attributes \\['layernorm'"):
        SLCAModel(backbone, reset_final_norm=True)


def test_paired_comparison_of_two_seed_runs(tmp_path, load_script):
    compare = load_script("compare_seeds")
    for name, values in {"a": [70.0, 60.0, 80.0], "b": [65.0, 58.0, 71.0]}.items():
        runs = {str(s): {"last_accuracy": v, "average_incremental_accuracy": v + 10} for s, v in enumerate(values)}
        (tmp_path / name).mkdir()
        (tmp_path / name / "seeds.json").write_text(json.dumps({"runs": runs}))
    result = compare.main([str(tmp_path / "a"), str(tmp_path / "b")])["Last-Acc"]
    # differences 5, 2, 9: mean 16/3, sample std sqrt(37/3), t = mean / (std / sqrt(3))
    assert result["diff_mean"] == pytest.approx(16 / 3) and result["diff_std"] == pytest.approx((37 / 3) ** 0.5)
    assert result["t"] == pytest.approx((16 / 3) / ((37 / 3) ** 0.5 / 3**0.5))
    assert result["first_mean"] == pytest.approx(70.0) and result["second_std"] == pytest.approx((127 / 3) ** 0.5)
