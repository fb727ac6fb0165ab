"""timm / MoCo v3 ViT weights -> transformers ViTModel: same features as timm's forward."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel

from slca_peft.commands.cli import main as cli_main
from slca_peft.models.convert import convert_timm_vit, extract_backbone, vit_config_from_timm

DIM, DEPTH, HEADS, PATCH, IMAGE, MLP = 32, 2, 4, 8, 32, 64


def timm_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with timm's VisionTransformer names and shapes (fused qkv, pos_embed with class slot)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    n = (IMAGE // PATCH) ** 2
    sd = {
        "cls_token": rand(1, 1, DIM), "pos_embed": rand(1, n + 1, DIM),
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": rand(DIM),
        "norm.weight": 1 + rand(DIM), "norm.bias": rand(DIM),
        "head.weight": rand(10, DIM), "head.bias": rand(10),  # classifier: not part of the backbone
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + rand(DIM), b + "norm1.bias": rand(DIM),
            b + "attn.qkv.weight": rand(3 * DIM, DIM), b + "attn.qkv.bias": rand(3 * DIM),
            b + "attn.proj.weight": rand(DIM, DIM), b + "attn.proj.bias": rand(DIM),
            b + "norm2.weight": 1 + rand(DIM), b + "norm2.bias": rand(DIM),
            b + "mlp.fc1.weight": rand(MLP, DIM), b + "mlp.fc1.bias": rand(MLP),
            b + "mlp.fc2.weight": rand(DIM, MLP), b + "mlp.fc2.bias": rand(DIM),
        })
    return sd


def timm_forward(sd: dict[str, torch.Tensor], images: torch.Tensor, heads: int = HEADS, eps: float = 1e-6):
    """timm's VisionTransformer.forward_features, written out: patchify, class token, position
    embedding, pre-norm blocks (fused qkv split as (B, N, 3, heads, head_dim)), final LayerNorm."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    B, N, C = x.shape
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (C,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (C,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], eps)


def test_config_is_read_from_the_weights():
    config = vit_config_from_timm(timm_state_dict(), num_attention_heads=HEADS)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (DIM, DEPTH, HEADS)
    assert (config.intermediate_size, config.patch_size, config.image_size) == (MLP, PATCH, IMAGE)
    assert config.layer_norm_eps == 1e-6 and config.hidden_act == "gelu" and config.qkv_bias


def test_converted_model_matches_the_timm_forward():
    sd = timm_state_dict()
    model = convert_timm_vit(sd, vit_config_from_timm(sd, num_attention_heads=HEADS))
    names = {n for n, _ in model.named_parameters()}
    assert "layers.1.attention.q_proj.weight" in names and "embeddings.position_embeddings" in names
    torch.manual_seed(1)
    images = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ours = model(pixel_values=images).last_hidden_state
        reference = timm_forward(sd, images)
    assert ours.shape == reference.shape == (3, (IMAGE // PATCH) ** 2 + 1, DIM)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_moco_v3_checkpoint_is_unwrapped_and_mismatches_are_refused():
    sd = timm_state_dict()
    other = timm_state_dict(seed=5)
    checkpoint = {
        "epoch": 300, "arch": "vit_base",
        "state_dict": {
            **{f"module.base_encoder.{k}": v for k, v in sd.items()},
            **{f"module.momentum_encoder.{k}": v for k, v in other.items()},
            "module.predictor.0.weight": torch.zeros(4, DIM),
        },
    }
    backbone = extract_backbone(checkpoint)
    assert set(backbone) == set(sd) and torch.equal(backbone["cls_token"], sd["cls_token"])
    broken = dict(sd)
    del broken["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.bias"):
        convert_timm_vit(broken, vit_config_from_timm(sd, num_attention_heads=HEADS))
    with pytest.raises(ValueError, match="no timm ViT backbone"):
        extract_backbone({"state_dict": {"conv1.weight": torch.zeros(1)}})


def test_cli_converts_a_weights_only_checkpoint_to_a_safetensors_directory(tmp_path, capsys):
    sd = timm_state_dict()
    source = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"epoch": 1, "state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}}, source)
    out = tmp_path / "mocov3-hf"
    cli_main(["convert", str(source), str(out), "--num_attention_heads", str(HEADS)])
    assert "converted" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "vit"
    model = AutoModel.from_pretrained(out)
    # transformers writes its original (pre-v5) key names, so older versions load the directory too.
    assert len(load_file(out / "model.safetensors")) == len([k for k in model.state_dict() if "pooler" not in k])
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images).last_hidden_state, timm_forward(sd, images),
                                   atol=1e-5, rtol=1e-5)


def test_damaged_files_are_reported_as_damaged_and_name_the_file(tmp_path):
    from slca_peft.models.convert import load_timm_state_dict

    torch.save({"state_dict": timm_state_dict()}, tmp_path / "good.pth")
    raw = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "notes.pth").write_text("hello\n")
    for name in ("truncated.pth", "random.pth", "notes.pth"):
        with pytest.raises(ValueError, match=rf"{name} is not a readable PyTorch checkpoint; it may be damaged"):
            load_timm_state_dict(tmp_path / name)
