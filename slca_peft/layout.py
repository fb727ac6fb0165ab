"""How the backbone is adapted beyond plain per-linear LoRA: the fused-qkv LoRA layout and a fresh
final LayerNorm, the two structural choices of the authors' released SLCA++ code.

Fused qkv: one rank-r adapter on the concatenated query/key/value weight `W_qkv` (3d x d), i.e. one
A (r x d) shared by the three projections and a B of 3d rows. For backbones with separate q/k/v
linears (transformers' ViT) PEFT puts LoRA on each projection and the three `lora_A` modules are
tied to one module, so `[B_q; B_k; B_v] A` is exactly the rank-r update of `W_qkv`; PEFT saves,
loads and merges each projection as usual. A backbone with a real fused `qkv` linear needs no
tying: ordinary LoRA on it already is this layout.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

# Names of the separate attention projections, per model family (transformers v5 ViT, older ViT/BERT).
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
FUSED_QKV_NAMES = ("qkv",)
# Attribute names of a backbone's final norm (ViT/DeiT/DINOv2, CLIP vision, timm).
FINAL_NORM_NAMES = ("layernorm", "post_layernorm", "norm", "final_layernorm")


def _looked_for() -> str:
    separate = " / ".join("+".join(names) for names in QKV_NAMES)
    return f"a module with separate {separate} linears, or a fused {' / '.join(FUSED_QKV_NAMES)} linear"


def attention_projections(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(attention module name, names of its q/k/v children) for every attention block: three names
    for separate projections, one for a fused qkv linear."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        for names in QKV_NAMES:
            if all(n in children for n in names):
                found.append((name, list(names)))
                break
        else:
            fused = [n for n in FUSED_QKV_NAMES if n in children]
            if fused:
                found.append((name, fused[:1]))
    return found


def check_fused_qkv_backbone(model: nn.Module, target_modules: list[str]) -> list[str]:
    """The q/k/v child names the fused layout adapts; refuses a backbone without them."""
    blocks = attention_projections(model)
    if not blocks:
        raise ValueError(
            f"lora_layout='fused_qkv' (set by released_code) needs attention blocks with query/key/value "
            f"projections; {type(model).__name__} has no {_looked_for()}. Use lora_layout='per_projection' "
            "and lora_target_modules naming its attention linears."
        )
    names = blocks[0][1]
    missing = [n for n in names if n not in target_modules]
    if missing:
        raise ValueError(
            f"lora_layout='fused_qkv' adapts the concatenated {'/'.join(names)} weight of "
            f"{type(model).__name__}, but lora_target_modules {target_modules} lacks {missing}; add them."
        )
    return names


@torch.no_grad()
def tie_fused_qkv(model: nn.Module, svd_init: bool, adapter_name: str = "default") -> int:
    """Tie the `lora_A` of each attention block's q/k/v LoRA layers to one module (the first
    projection's) and, with `svd_init`, set it to the top-r right singular vectors of the
    concatenated W_qkv with every B zero. Returns the number of blocks tied."""
    count = 0
    for name, names in attention_projections(model):
        parent = model.get_submodule(name)
        layers = [getattr(parent, n) for n in names]
        if not all(isinstance(layer, LoraLayer) and adapter_name in layer.lora_A for layer in layers):
            continue
        shared = layers[0].lora_A[adapter_name]
        for layer in layers[1:]:
            layer.lora_A[adapter_name] = shared
        if svd_init:
            weight = torch.cat([layer.get_base_layer().weight.detach().to(torch.float32) for layer in layers])
            rank = shared.weight.shape[0]
            if rank > min(weight.shape):
                raise ValueError(f"LoRA rank {rank} exceeds min(W_qkv shape) {tuple(weight.shape)}; lower lora_rank.")
            _, _, vh = torch.linalg.svd(weight, full_matrices=False)
            shared.weight.copy_(vh[:rank].to(shared.weight.dtype))
            for layer in layers:
                layer.lora_B[adapter_name].weight.zero_()
        count += 1
    return count


def fused_qkv_delta(parent: nn.Module, names: list[str], adapter_name: str = "default") -> torch.Tensor:
    """scale * B A of one attention block as the (3d x d) update of the concatenated W_qkv."""
    layers = [getattr(parent, n) for n in names]
    b = torch.cat([layer.lora_B[adapter_name].weight for layer in layers])
    a = layers[0].lora_A[adapter_name].weight
    return layers[0].scaling[adapter_name] * (b @ a)


def reset_final_norm(backbone: nn.Module, eps: float) -> str:
    """Replace the backbone's final LayerNorm by a fresh one (gamma 1, beta 0, `eps`), as the released
    code does; returns its attribute name (its path for norms below the top level, e.g. timm's)."""
    from .backbones import SPECS, backbone_spec

    spec = backbone_spec(backbone)
    if spec.model_type in SPECS and spec.final_norm and "." in spec.final_norm:
        parent_path, attr = spec.final_norm.rsplit(".", 1)
        parent = backbone.get_submodule(parent_path)
        norm = getattr(parent, attr)
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"reset_final_norm (set by released_code) replaces the final LayerNorm, but "
                             f"{spec.final_norm} is a {type(norm).__name__}; set reset_final_norm=false.")
        fresh = nn.LayerNorm(norm.normalized_shape, eps=eps, elementwise_affine=True)
        setattr(parent, attr, fresh.to(device=norm.weight.device, dtype=norm.weight.dtype))
        return spec.final_norm
    for attr in FINAL_NORM_NAMES:
        norm = getattr(backbone, attr, None)
        if norm is None:
            continue
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(
                f"reset_final_norm (set by released_code) replaces the final LayerNorm, but "
                f"{type(backbone).__name__}.{attr} is a {type(norm).__name__}; set reset_final_norm=false."
            )
        fresh = nn.LayerNorm(norm.normalized_shape, eps=eps, elementwise_affine=True)
        fresh.to(device=norm.weight.device, dtype=norm.weight.dtype)
        setattr(backbone, attr, fresh)
        return attr
    raise ValueError(
        f"reset_final_norm (set by released_code) replaces the final LayerNorm, but {type(backbone).__name__} "
        f"has none of the attributes {list(FINAL_NORM_NAMES)}; set reset_final_norm=false."
    )
