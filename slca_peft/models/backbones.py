"""What slca-peft needs to know about each backbone family, in one table.

For every supported `model_type`: which pooled feature the continual heads read, the default LoRA
targets, where the final norm, the class token and the attention projections live, and how
`export()` turns a trained model into a stock `*ForImageClassification` (or why it cannot).
Code elsewhere asks this module (`backbone_spec`) instead of hard-coding ViT names; a backbone not
in the table gets a spec inferred from its modules and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..utils.errors import UserError

# How the head input is read from the backbone output.
CLS, POOLER = "cls", "pooler"
# Export routes: how the folded heads become the classifier of a stock *ForImageClassification.
CLS_HEAD = "cls_head"  # classifier(last_hidden_state[:, 0]) after the final norm (ViT, DeiT)
POOLER_HEAD = "pooler_head"  # classifier(pooler_output) (BEiT, Swin)
CLS_MEAN_HEAD = "cls_mean_head"  # classifier([class token, mean patch token]): patch half set to zero (DINOv2)
TIMM_HEAD = "timm_head"  # timm's forward_head, whose pre-logits feature is pooler_output


@dataclass(frozen=True)
class BackboneSpec:
    """Per-architecture facts. Module and parameter paths are relative to the bare backbone (the
    `AutoModel`), `None` when the family has no such part."""

    model_type: str
    feature: str
    feature_doc: str
    lora_targets: tuple[str, ...]
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    mlp: tuple[str, ...] = ("fc1", "fc2")
    final_norm: str | None = "layernorm"
    class_token: str | None = "embeddings.cls_token"
    export_route: str | None = None
    export_refusal: str | None = None
    drop_pooler: bool = False

    @property
    def fused_qkv(self) -> bool:
        """Whether q, k and v are one linear layer (timm's `qkv`): LoRA on it is the released layout."""
        return len(self.qkv) == 1


_VIT_TARGETS = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")
_CLS_DOC = "class token after the final LayerNorm"

SPECS: dict[str, BackboneSpec] = {
    spec.model_type: spec
    for spec in (
        BackboneSpec("vit", CLS, _CLS_DOC, _VIT_TARGETS, export_route=CLS_HEAD, drop_pooler=True),
        BackboneSpec("deit", CLS, _CLS_DOC, _VIT_TARGETS, export_route=CLS_HEAD, drop_pooler=True),
        BackboneSpec("dinov2", CLS, _CLS_DOC, _VIT_TARGETS, export_route=CLS_MEAN_HEAD),
        BackboneSpec("dinov2_with_registers", CLS, _CLS_DOC, _VIT_TARGETS, export_route=CLS_MEAN_HEAD),
        BackboneSpec(
            "clip_vision_model", POOLER, "class token after `post_layernorm` (pooler_output)", _VIT_TARGETS,
            final_norm="post_layernorm", class_token="embeddings.class_embedding",
            export_refusal="CLIPForImageClassification averages the patch tokens before `post_layernorm`, "
            "not the normed class token the heads were trained on, and needs the text tower's config",
        ),
        BackboneSpec(
            "siglip_vision_model", POOLER, "attention-pooling head output (pooler_output)", _VIT_TARGETS,
            final_norm="post_layernorm", class_token=None,
            export_refusal="SiglipForImageClassification averages the patch tokens and drops the "
            "attention-pooling head whose output the heads were trained on",
        ),
        BackboneSpec(
            "beit", POOLER, "mean patch token after the pooler's LayerNorm (pooler_output; the class token "
            "after the final LayerNorm when use_mean_pooling is false)", _VIT_TARGETS,
            final_norm="pooler.layernorm", export_route=POOLER_HEAD,
        ),
        BackboneSpec(
            "swin", POOLER, "average of the last stage after the final LayerNorm (pooler_output)", _VIT_TARGETS,
            class_token=None, export_route=POOLER_HEAD,
        ),
        BackboneSpec(
            "timm_wrapper", POOLER, "timm's pre-logits feature (pooler_output): the class token after the "
            "final norm for a ViT with global_pool='token'", ("qkv", "fc1", "fc2"), qkv=("qkv",),
            final_norm="timm_model.norm", class_token="timm_model.cls_token", export_route=TIMM_HEAD,
        ),
    )
}


def linear_names(model: nn.Module) -> list[str]:
    """The short names of every linear layer (what LoRA targets and error messages name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def _get(model: nn.Module, path: str | None) -> nn.Module | nn.Parameter | None:
    if path is None:
        return None
    target = model
    for part in path.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


def backbone_spec(backbone: nn.Module) -> BackboneSpec:
    """The table row of `backbone` (a bare `AutoModel`), or one inferred from its modules: class token
    at `embeddings.cls_token` if present, else `pooler_output`; LoRA on the ViT names it has."""
    config = getattr(backbone, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = SPECS.get(model_type)
    if spec is not None and model_type == "timm_wrapper" and hasattr(backbone, "timm_model"):
        return _timm_spec(backbone, spec)
    if spec is not None and (spec.feature != CLS or isinstance(_get(backbone, spec.class_token), nn.Parameter)):
        return spec
    has_token = isinstance(_get(backbone, "embeddings.cls_token"), nn.Parameter)
    available = set(linear_names(backbone))
    return BackboneSpec(
        model_type=str(model_type),
        feature=CLS if has_token else POOLER,
        feature_doc=_CLS_DOC if has_token else "pooler_output",
        lora_targets=tuple(t for t in _VIT_TARGETS if t in available) or _VIT_TARGETS,
        final_norm="layernorm" if isinstance(_get(backbone, "layernorm"), nn.LayerNorm) else None,
        class_token="embeddings.cls_token" if has_token else None,
        drop_pooler=has_token,
        export_refusal=f"no stock classification head of {model_type} is known to read the feature slca-peft "
        "trains on",
    )


def _timm_spec(backbone: nn.Module, spec: BackboneSpec) -> BackboneSpec:
    """timm models differ per architecture: keep only the parts this one has."""
    timm_model = backbone.timm_model
    fc_norm = getattr(timm_model, "fc_norm", None)
    final_norm = "timm_model.fc_norm" if isinstance(fc_norm, nn.LayerNorm) else spec.final_norm
    if not isinstance(_get(backbone, final_norm), nn.Module):
        final_norm = None
    token = spec.class_token if isinstance(_get(backbone, spec.class_token), nn.Parameter) else None
    available = set(linear_names(backbone))
    targets = tuple(t for t in spec.lora_targets if t in available) or spec.lora_targets
    return replace(spec, final_norm=final_norm, class_token=token, lora_targets=targets)


def input_size(config) -> int:
    """The square input size a backbone config expects (timm configs keep it in `model_args` or
    `pretrained_cfg` instead of `image_size`)."""
    size = getattr(config, "image_size", None)
    if size is None:
        size = (getattr(config, "model_args", None) or {}).get("img_size")
    if size is None:
        size = (getattr(config, "pretrained_cfg", None) or {}).get("input_size", [224])[-1]
    return int(size if isinstance(size, int) else size[0])


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled feature (timm: `num_features`; transformers: `hidden_size`)."""
    timm_model = getattr(backbone, "timm_model", None)
    if timm_model is not None:
        return int(timm_model.num_features)
    return int(backbone.config.hidden_size)


#: transformers' names of the separate attention projections, as settings spell them.
SEPARATE_QKV = ("q_proj", "k_proj", "v_proj")
#: Attention projection names the fused-qkv layout looks for: the table's (separate, then fused), and the
#: older ViT/BERT names for a backbone outside it.
QKV_NAMES = (*dict.fromkeys(s.qkv for s in SPECS.values() if len(s.qkv) > 1), ("query", "key", "value"))
FUSED_QKV_NAMES = tuple(dict.fromkeys(s.qkv[0] for s in SPECS.values() if len(s.qkv) == 1))
#: Top-level attribute names of a final norm: the table's, then timm's and others' for a backbone outside it.
FINAL_NORM_NAMES = (
    *dict.fromkeys(s.final_norm for s in SPECS.values() if s.final_norm and "." not in s.final_norm),
    "norm", "final_layernorm",
)


def lora_targets_for(backbone: nn.Module, targets: list[str] | None) -> list[str]:
    """The LoRA targets on this backbone: the table's default when `targets` is None; on a backbone
    whose attention has one fused qkv linear (timm), q_proj/k_proj/v_proj mean that linear, so the
    paper's and the released code's settings carry over unchanged."""
    spec = backbone_spec(backbone)
    if targets is None:
        return list(spec.lora_targets)
    available = set(linear_names(backbone))
    if not spec.fused_qkv or any(t in available for t in SEPARATE_QKV):
        return list(targets)
    resolved: list[str] = []
    for target in targets:
        for name in spec.qkv if target in SEPARATE_QKV else (target,):
            if name not in resolved:
                resolved.append(name)
    return resolved


def class_token(backbone: nn.Module) -> nn.Parameter | None:
    """The learnable class token of a bare backbone (trained in Hybrid-SL), if it has one."""
    token = _get(backbone, backbone_spec(backbone).class_token)
    return token if isinstance(token, nn.Parameter) else None


def final_norm(backbone: nn.Module) -> nn.Module | None:
    """The norm applied to the feature last (for resetting it, as the authors' released code does)."""
    module = _get(backbone, backbone_spec(backbone).final_norm)
    return module if isinstance(module, nn.Module) else None


def attention_linears(backbone: nn.Module) -> dict[str, list[str]]:
    """Full module names of the q, k, v (or fused qkv) linears of every block, by projection name."""
    names = backbone_spec(backbone).qkv
    found: dict[str, list[str]] = {n: [] for n in names}
    for full, module in backbone.named_modules():
        short = full.rsplit(".", 1)[-1]
        if short in found and isinstance(module, nn.Linear):
            found[short].append(full)
    return found


def pooled_feature(spec: BackboneSpec, output) -> torch.Tensor:
    """The head input from a backbone output."""
    if spec.feature == CLS:
        return output.last_hidden_state[:, 0]
    return output.pooler_output


def check_pooled_feature(backbone: nn.Module, spec: BackboneSpec) -> None:
    """Refuse a backbone whose output has no pooled image feature, naming it, before any training."""
    if spec.feature == CLS:
        return
    config = backbone.config
    if spec.model_type == "timm_wrapper":
        if getattr(config, "do_pooling", True) is False:
            raise UserError("the timm backbone's config sets do_pooling=False, so it returns no pooler_output "
                             "(timm's pre-logits feature) for the classifier; set config.do_pooling=True.")
        return
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    channels = getattr(config, "num_channels", 3)
    with torch.no_grad():
        out = backbone(pixel_values=torch.zeros(1, channels, size, size))
    if getattr(out, "pooler_output", None) is None:
        raise UserError(
            f"{type(backbone).__name__} has no class token (embeddings.cls_token) and returns no "
            "pooler_output, so there is no pooled image feature for the classifier. Use a ViT-family "
            "backbone (ViT, DeiT, DINOv2, CLIP vision) or one whose output has pooler_output."
        )


def norm_module_names(backbone: nn.Module) -> list[str]:
    """LayerNorms to train (PEFT `modules_to_save`). PEFT matches these names as suffixes of module
    names, so a short name is used only where every module it would match is a LayerNorm."""
    modules = dict(backbone.named_modules())
    norms = [n for n, m in modules.items() if n and isinstance(m, nn.LayerNorm)]
    chosen: set[str] = set()
    for full in norms:
        short = full.rsplit(".", 1)[-1]
        matched = [m for n, m in modules.items() if n.endswith(short)]
        chosen.add(short if all(isinstance(m, nn.LayerNorm) for m in matched) else full)
    return sorted(chosen)


def reset_final_norm(backbone: nn.Module, eps: float) -> str:
    """Replace the backbone's final LayerNorm by a fresh one (gamma 1, beta 0, `eps`), as the released
    code does; returns its attribute name (its path for norms below the top level, e.g. timm's)."""
    spec = backbone_spec(backbone)
    if spec.model_type in SPECS and spec.final_norm and "." in spec.final_norm:
        parent_path, attr = spec.final_norm.rsplit(".", 1)
        parent, where = backbone.get_submodule(parent_path), spec.final_norm
    else:
        parent = backbone
        attr = next((a for a in FINAL_NORM_NAMES if getattr(backbone, a, None) is not None), None)
        if attr is None:
            raise UserError(
                f"reset_final_norm (set by released_code) replaces the final LayerNorm, but {type(backbone).__name__} "
                f"has none of the attributes {list(FINAL_NORM_NAMES)}; set reset_final_norm=false."
            )
        where = f"{type(backbone).__name__}.{attr}"
    norm = getattr(parent, attr)
    if not isinstance(norm, nn.LayerNorm):
        raise UserError(f"reset_final_norm (set by released_code) replaces the final LayerNorm, but "
                         f"{where} is a {type(norm).__name__}; set reset_final_norm=false.")
    fresh = nn.LayerNorm(norm.normalized_shape, eps=eps, elementwise_affine=True)
    setattr(parent, attr, fresh.to(device=norm.weight.device, dtype=norm.weight.dtype))
    return spec.final_norm if parent is not backbone else attr
