"""Export to a plain `AutoModelForImageClassification` checkpoint that needs no slca-peft.

Each backbone's route (which stock head reads the feature the continual heads were trained on) is
in `slca_peft.backbones`; backbones with no such head are refused with the reason. The adapter is
merged into the frozen weights, the trained LayerNorms/biases/class token are taken over, and the
per-task heads with their scales are folded into one linear layer:
`head_j(s_j * f) = (s_j W_j) f + b_j`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from transformers import AutoModelForImageClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .backbones import CLS_MEAN_HEAD, POOLER_HEAD, TIMM_HEAD
from .checkpoint import atomic_directory
from .transforms import EVAL_RESIZE_RATIO, ImageTransformConfig, eval_transform_config

if TYPE_CHECKING:
    from .model import SLCAModel

def folded_head(model: SLCAModel) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight and bias equal to the concatenated, scaled task heads."""
    clf = model.classifier
    weight = torch.cat([head.weight.detach() * clf.scales[i] for i, head in enumerate(clf.heads)])
    bias = torch.cat([head.bias.detach() for head in clf.heads])
    return weight, bias


def export_route(model: SLCAModel) -> str:
    """The backbone table's export route for `model`, or one error saying why there is none (raised
    before any work: a stock head reading another feature would silently change every prediction)."""
    spec = model.backbone_spec
    if spec.export_route is None:
        raise ValueError(
            f"export: a {spec.model_type} backbone cannot become a stock *ForImageClassification model: "
            f"{spec.export_refusal}. Keep it as an slca-peft checkpoint (save_pretrained / from_pretrained)."
        )
    return spec.export_route


def merged_backbone(model: SLCAModel) -> torch.nn.Module:
    """A copy of the backbone with the adapter merged into its weights (PEFT's merge_and_unload)."""
    backbone = copy.deepcopy(model.backbone)
    if not isinstance(backbone, PeftModel):
        return backbone
    method = getattr(backbone.peft_config["default"].peft_type, "value", "LoRA")
    try:
        return backbone.merge_and_unload()
    except (NotImplementedError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(
            f"export: PEFT cannot merge this {method} adapter into the backbone ({err}); a stock model has no "
            "place for unmerged adapter weights. Keep it as an slca-peft checkpoint, or train with a method PEFT "
            "merges (LoRA, DoRA, LoHa, LoKr, IA3)."
        ) from err


def _classifier_config(model: SLCAModel, names: list[str]):
    config = copy.deepcopy(model.config)
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    for timm_field, value in (("label_names", list(names)), ("num_classes", len(names))):
        if hasattr(config, timm_field):  # TimmWrapperConfig writes these instead of id2label
            setattr(config, timm_field, value)
    # The plain *ForImageClassification (DeiT also maps to a distillation variant reading two tokens).
    stock = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[config.model_type]
    config.architectures = [stock if isinstance(stock, str) else stock[0]]
    return config


def _load_backbone(classifier, backbone: torch.nn.Module, route: str) -> None:
    """Copy the merged backbone's weights into the stock model's backbone, refusing any mismatch."""
    state = backbone.state_dict()
    if route == TIMM_HEAD:  # both hold the timm module as `timm_model`; only timm's head is new
        missing, unexpected = classifier.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("timm_model.head.")]
    else:
        target = getattr(classifier, classifier.base_model_prefix)
        missing, unexpected = target.load_state_dict(state, strict=False)
        if route != POOLER_HEAD:  # ViT/DeiT keep no pooler; BEiT and Swin read theirs
            missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise RuntimeError(f"backbone weights do not fit the exported model: missing {missing}, "
                           f"unexpected {unexpected}.")


def export_model(
    model: SLCAModel, directory: str | Path, label_names: list[str] | None = None, image_processor=None
) -> Path:
    """Write `directory` for `pipeline("image-classification", model=directory)`."""
    route = export_route(model)
    num_classes = model.classifier.num_classes
    if label_names is None and model.label_names:
        label_names = model.label_names[:num_classes]
    names = list(label_names) if label_names else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} label names for {num_classes} classes; pass one name per class seen.")
    config = _classifier_config(model, names)
    if model.reset_final_norm and getattr(config, "layer_norm_eps", model.final_norm_eps) != model.final_norm_eps:
        # One eps serves every LayerNorm of a transformers ViT: the fresh final norm's cannot be kept.
        logging.getLogger(__name__).warning(
            "the final LayerNorm uses eps %g but the exported %s config has layer_norm_eps %g for every norm; "
            "exported logits differ from the model's by a tiny amount.",
            model.final_norm_eps, config.model_type, config.layer_norm_eps,
        )
    backbone = merged_backbone(model)
    classifier = AutoModelForImageClassification.from_config(config)
    _load_backbone(classifier, backbone, route)
    weight, bias = folded_head(model)
    head = classifier.timm_model.get_classifier() if route == TIMM_HEAD else classifier.classifier
    with torch.no_grad():
        if route == CLS_MEAN_HEAD:
            # DINOv2's head reads [class token, mean patch token]: the patch half gets zero weight.
            head.weight.zero_()
            head.weight[:, : weight.shape[1]].copy_(weight)
        else:
            head.weight.copy_(weight)
        head.bias.copy_(bias)
    processor = image_processor or default_image_processor(model)
    with atomic_directory(directory) as tmp:
        classifier.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(directory)


def eval_image_processor(config: ImageTransformConfig) -> CLIPImageProcessorPil:
    """A transformers image processor that computes `EvalTransform(config)`: shorter side to
    round(size * 256 / 224) with PIL's bicubic (the longer side truncated), centre crop, rescale
    by 1/255, normalise. Saved as `CLIPImageProcessor`; the PIL backend (the one used where
    torchvision is not installed, or with `backend="pil"`) gives the same pixels."""
    size = config.size
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": round(size * EVAL_RESIZE_RATIO)},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(config.mean),
        image_std=list(config.std),
        do_convert_rgb=config.num_channels == 3,
    )


def default_image_processor(model: SLCAModel) -> CLIPImageProcessorPil:
    """The processor matching the transform slca-peft evaluates `model` with."""
    return eval_image_processor(eval_transform_config(model))
