"""Convert timm-style ViT weights (MoCo v3, DeiT, the authors' checkpoints) to a transformers `ViTModel`.

    slca-peft convert vit-b-300ep.pth.tar checkpoints/mocov3-vit-base-hf

MoCo v3 releases its self-supervised ViT-B/16 as a training checkpoint: the weights sit under
`"state_dict"` with `module.base_encoder.` prefixes, next to a momentum encoder, a predictor and a
projection head that are not part of the backbone. `load_timm_state_dict` finds the backbone weights
in such a file (or a plain timm `state_dict`, or one nested under `"model"`), and `convert_timm_vit`
maps them onto transformers' ViT:

=============================  ==========================================================
timm                           transformers (v5 `ViTModel`)
=============================  ==========================================================
cls_token, pos_embed           embeddings.cls_token, embeddings.position_embeddings
patch_embed.proj               embeddings.patch_embeddings.projection
blocks.N.norm1 / norm2         layers.N.layernorm_before / layernorm_after
blocks.N.attn.qkv (fused)      layers.N.attention.q_proj, k_proj, v_proj (rows split in 3)
blocks.N.attn.proj             layers.N.attention.o_proj
blocks.N.mlp.fc1 / fc2         layers.N.mlp.fc1 / fc2
norm                           layernorm
=============================  ==========================================================

The checkpoint is read with `torch.load(..., weights_only=True)`: tensors and plain containers only,
no code. The result is saved with safetensors, together with an image processor (224 px, bicubic,
ImageNet mean/std, the normalisation MoCo v3 and timm's ViTs were trained with), so the directory
works anywhere a Hub id does (`--model_name_or_path checkpoints/mocov3-vit-base-hf`).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from ..utils.errors import UserError
from ..utils.reading import open_regular, require_path

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Prefixes stripped from checkpoint keys (MoCo v3's DistributedDataParallel-wrapped base encoder first).
PREFIXES = ("module.base_encoder.", "base_encoder.", "module.encoder.", "module.", "encoder.", "backbone.")
#: timm keys that are not part of the backbone (classifier / projection heads, MoCo's other networks).
SKIPPED = re.compile(r"^(module\.)?(head|fc_norm|pre_logits|momentum_encoder|predictor)\b")


def load_timm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone weights of a timm-style checkpoint file, with wrapper prefixes removed."""
    require_path(path, folder=False, what="slca-peft convert:",
                 fix="give the timm-style checkpoint file (.pth, .pt or .bin) to convert")
    try:
        with open_regular(path, fix="give the checkpoint file") as handle:
            checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # torch names the refused global; anything else is a damaged file
            raise UserError(f"{path} is not a readable PyTorch checkpoint; it may be damaged ({err}).") from err
        raise UserError(
            f"{path} holds objects other than tensors and plain containers, so it was not loaded (unpickling "
            "arbitrary objects can run code). Re-save only the state dict from the source you trust."
        ) from err
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:
        raise UserError(f"{path} is not a readable PyTorch checkpoint; it may be damaged ({err}).") from err
    return extract_backbone(checkpoint)


def extract_backbone(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Unwrap `{"state_dict": ...}` / `{"model": ...}` and strip MoCo v3 / DDP prefixes."""
    for key in ("state_dict", "model", "module"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    keys = list(checkpoint)
    if any(k.startswith("module.base_encoder.") for k in keys):
        # MoCo v3: keep the base encoder only (the momentum encoder has the same shapes).
        keys = [k for k in keys if k.startswith("module.base_encoder.")]
    weights: dict[str, torch.Tensor] = {}
    for key in keys:
        value = checkpoint[key]
        if not isinstance(value, torch.Tensor):
            continue
        name = key
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        weights[name] = value
    if "cls_token" not in weights or "patch_embed.proj.weight" not in weights:
        raise UserError(
            "no timm ViT backbone found: expected keys cls_token, pos_embed, patch_embed.proj.weight, blocks.N.* "
            f"(optionally under 'state_dict' with 'module.base_encoder.' prefixes); got e.g. {keys[:5]}."
        )
    return weights


def vit_config_from_timm(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
) -> ViTConfig:
    """A `ViTConfig` matching the shapes of a timm ViT state dict.

    Head count is not stored in the weights; it defaults to `hidden_size // 64` (ViT-S/B/L: 6/12/16).
    timm's LayerNorm eps is 1e-6 (transformers' ViT default is 1e-12) and its GELU is the exact one.
    """
    hidden = int(state_dict["cls_token"].shape[-1])
    patch = int(state_dict["patch_embed.proj.weight"].shape[-1])
    channels = int(state_dict["patch_embed.proj.weight"].shape[1])
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    intermediate = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    num_patches = int(state_dict["pos_embed"].shape[1]) - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise UserError(f"pos_embed has {num_patches} patch positions (+1 class token), not a square grid.")
    heads = num_attention_heads or max(1, hidden // 64)
    if hidden % heads:
        raise UserError(f"hidden size {hidden} is not divisible by {heads} attention heads.")
    return ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
        image_size=side * patch, patch_size=patch, num_channels=channels, hidden_act="gelu",
        layer_norm_eps=layer_norm_eps, qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def convert_timm_vit(state_dict: Mapping[str, torch.Tensor], config: ViTConfig | None = None) -> ViTModel:
    """A transformers `ViTModel` (no pooler) carrying the weights of a timm ViT `state_dict`.

    `state_dict` uses timm names (see the module docstring; wrapper prefixes are stripped first).
    `config` defaults to `vit_config_from_timm(state_dict)`. Every backbone weight must be used and every
    model parameter set; anything else raises, so a mismatched checkpoint cannot load half-way.
    """
    weights = extract_backbone(state_dict)
    config = config or vit_config_from_timm(weights)
    d = config.hidden_size

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise UserError(f"the timm checkpoint has no {name!r}; is it a plain ViT (class token, final norm)?")
        return weights.pop(name)

    mapped: dict[str, torch.Tensor] = {
        "embeddings.cls_token": take("cls_token"),
        "embeddings.position_embeddings": take("pos_embed"),
        "embeddings.patch_embeddings.projection.weight": take("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": take("patch_embed.proj.bias"),
        "layernorm.weight": take("norm.weight"),
        "layernorm.bias": take("norm.bias"),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        qkv_w = take(src + "attn.qkv.weight")
        if qkv_w.shape != (3 * d, d):
            raise UserError(f"{src}attn.qkv.weight has shape {tuple(qkv_w.shape)}, expected {(3 * d, d)}.")
        qkv_b = weights.pop(src + "attn.qkv.bias", None)
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            # timm reshapes qkv output to (B, N, 3, heads, head_dim): rows [0,d) are q, [d,2d) k, [2d,3d) v.
            mapped[f"{dst}attention.{name}.weight"] = qkv_w[part * d:(part + 1) * d]
            if qkv_b is not None:
                mapped[f"{dst}attention.{name}.bias"] = qkv_b[part * d:(part + 1) * d]
        renames = {
            "attn.proj": "attention.o_proj", "norm1": "layernorm_before", "norm2": "layernorm_after",
            "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        }
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                mapped[f"{dst}{new}.{kind}"] = take(f"{src}{old}.{kind}")
    leftover = sorted(k for k in weights if not SKIPPED.match(k))
    if leftover:
        raise UserError(f"timm weights not used by a {config.num_hidden_layers}-layer ViT: {leftover[:8]}.")

    model = ViTModel(config, add_pooling_layer=False)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise UserError(f"the checkpoint has no weights for {missing[:8]}.")
    for name, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected[name].shape)}."
            )
    model.load_state_dict({k: v.detach().to(expected[k].dtype).contiguous() for k, v in mapped.items()}, strict=True)
    return model.eval()


def convert_checkpoint(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    num_attention_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
) -> Path:
    """`torch.load(weights_only=True)` a timm/MoCo v3 checkpoint and save it as a transformers ViT directory."""
    weights = load_timm_state_dict(input_path)
    config = vit_config_from_timm(weights, num_attention_heads=num_attention_heads, layer_norm_eps=layer_norm_eps)
    model = convert_timm_vit(weights, config)
    out = Path(output_dir)
    model.save_pretrained(out)  # model.safetensors
    processor = ViTImageProcessor(
        size={"height": config.image_size, "width": config.image_size}, resample=3,  # PIL bicubic
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )
    processor.save_pretrained(out)
    logger.info("converted %s -> %s (%d layers, hidden %d)", input_path, out, config.num_hidden_layers,
                config.hidden_size)
    return out
