"""Export to a plain `AutoModelForImageClassification` checkpoint that needs no slca-peft.

LoRA is merged into the frozen weights, the trained LayerNorms/biases/class token are taken over,
and the per-task heads with their scales are folded into one linear layer:
`head_j(s_j * f) = (s_j W_j) f + b_j`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from transformers import AutoImageProcessor, AutoModelForImageClassification
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .checkpoint import atomic_directory
from .transforms import EVAL_RESIZE_RATIO, ImageTransformConfig

if TYPE_CHECKING:
    from .model import SLCAModel

# Model types whose *ForImageClassification head reads the class token after the final LayerNorm,
# the same feature SLCA trains its heads on.
CLS_TOKEN_HEADS = ("vit", "deit")


def folded_head(model: SLCAModel) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight and bias equal to the concatenated, scaled task heads."""
    clf = model.classifier
    weight = torch.cat([head.weight.detach() * clf.scales[i] for i, head in enumerate(clf.heads)])
    bias = torch.cat([head.bias.detach() for head in clf.heads])
    return weight, bias


def export_model(
    model: SLCAModel, directory: str | Path, label_names: list[str] | None = None, image_processor=None
) -> Path:
    """Write `directory` for `pipeline("image-classification", model=directory)`."""
    config = copy.deepcopy(model.config)
    if config.model_type not in CLS_TOKEN_HEADS:
        raise NotImplementedError(
            f"export supports {CLS_TOKEN_HEADS} backbones, whose classification head reads the class token; "
            f"{config.model_type} heads read another feature. Save with save_pretrained instead."
        )
    num_classes = model.classifier.num_classes
    if label_names is None and model.label_names:
        label_names = model.label_names[:num_classes]
    names = list(label_names) if label_names else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} label names for {num_classes} classes; pass one name per class seen.")
    config.num_labels = num_classes
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    config.architectures = None
    if model.reset_final_norm and getattr(config, "layer_norm_eps", model.final_norm_eps) != model.final_norm_eps:
        # One eps serves every LayerNorm of a transformers ViT: the fresh final norm's cannot be kept.
        logging.getLogger(__name__).warning(
            "the final LayerNorm uses eps %g but the exported %s config has layer_norm_eps %g for every norm; "
            "exported logits differ from the model's by a tiny amount.",
            model.final_norm_eps, config.model_type, config.layer_norm_eps,
        )

    backbone = copy.deepcopy(model.backbone)
    if isinstance(backbone, PeftModel):
        backbone = backbone.merge_and_unload()
    classifier = AutoModelForImageClassification.from_config(config)
    base_prefix = classifier.base_model_prefix
    missing, unexpected = getattr(classifier, base_prefix).load_state_dict(backbone.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise RuntimeError(f"backbone weights do not fit the exported model: missing {missing}, "
                           f"unexpected {unexpected}.")
    weight, bias = folded_head(model)
    with torch.no_grad():
        classifier.classifier.weight.copy_(weight)
        classifier.classifier.bias.copy_(bias)
    processor = image_processor or default_image_processor(model)
    with atomic_directory(directory) as tmp:
        classifier.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(directory)


def eval_transform_config(model: SLCAModel) -> ImageTransformConfig:
    """Crop size and normalisation of the evaluation transform: the base model's image processor
    statistics, or ViT's defaults (mean = std = 0.5) when it ships none."""
    base = model.base_model_name_or_path
    if base:
        try:
            processor = AutoImageProcessor.from_pretrained(base, revision=model.revision)
            return ImageTransformConfig.from_image_processor(processor)
        except (OSError, ValueError, TypeError):
            pass
    return ImageTransformConfig.from_model_config(model.config)


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
