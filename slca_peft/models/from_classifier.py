"""An `SLCAModel` from a transformers image classifier, so `SLCATrainer` takes what a stock script builds.

transformers' example scripts load `AutoModelForImageClassification.from_pretrained(name, config=config)`
with the dataset's `id2label` in the config and hand that model to `Trainer`. `SLCATrainer` hands such a
model to `slow_learner_from_classifier`: the classifier's base model (its backbone, without the
classification head, whose weights are the checkpoint's) becomes the slow learner's backbone, with the
adapters of the run's `SLCAConfig` or of a `peft_config` (as trl's trainers take one), and the config's
`id2label` becomes the classes, learned as one task in class-id order. The classifier's own head (random
for a new label set) is dropped: SLCA's continual head replaces it.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedModel

from ..utils.errors import UserError
from .loading import portable_name
from .model import SLCAModel

logger = logging.getLogger(__name__)


def classifier_backbone(classifier: PreTrainedModel) -> PreTrainedModel:
    """The base model of a transformers image classifier (`ViTForImageClassification.vit`, ...)."""
    prefix = getattr(classifier, "base_model_prefix", "")
    backbone = getattr(classifier, prefix, None) if prefix else None
    if not isinstance(backbone, PreTrainedModel) or backbone is classifier:
        raise UserError(
            f"SLCATrainer: {type(classifier).__name__} has no base model under a classification head "
            f"(base_model_prefix {prefix!r}); pass an image classifier (AutoModelForImageClassification."
            "from_pretrained(...)) or an SLCAModel (SLCAModel.from_backbone(...))."
        )
    return backbone


def class_names(config: Any) -> list[str]:
    """`config.id2label` as a list in class-id order; the ids must be 0..n-1."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if not id2label or sorted(id2label) != list(range(len(id2label))):
        raise UserError(
            f"SLCATrainer: the classifier's config.id2label {dict(sorted(id2label.items())[:5])} must name the "
            "classes 0..n-1; load it with AutoConfig.from_pretrained(name, num_labels=..., id2label=..., "
            "label2id=...) as transformers' example scripts do."
        )
    return [id2label[i] for i in range(len(id2label))]


def slow_learner_from_classifier(classifier: PreTrainedModel, args: Any | None = None,
                                 peft_config: Any | None = None) -> SLCAModel:
    """An `SLCAModel` over `classifier`'s backbone (the checkpoint's weights, its head dropped), with
    `args`' adapters (an `SLCAConfig`) or `peft_config`'s, and one task of the config's classes."""
    names = class_names(classifier.config)
    backbone = classifier_backbone(classifier)
    source = getattr(classifier, "name_or_path", None) or getattr(backbone, "name_or_path", None) or None
    extra = {"peft_config": peft_config} if peft_config is not None else {}
    model = SLCAModel.from_backbone(backbone, args, **extra)
    model.slca_config.base_model_name_or_path = portable_name(source)
    model.to(classifier.device)
    model.grow(len(names))
    model.label_names = names
    logger.info("SLCATrainer: %s's backbone (%s) with %s, learning its %d classes as one task; the classifier's "
                "own head is replaced by the continual head.", type(classifier).__name__,
                model.slca_config.base_model_name_or_path or "built from a config",
                "the given peft_config" if peft_config is not None else "the default adapters", len(names))
    return model


def trainer_model(model: Any, args: Any, peft_config: Any | None = None) -> SLCAModel | None:
    """What `SLCATrainer` trains, given its `model` argument: an `SLCAModel` as it is, a transformers image
    classifier converted (`slow_learner_from_classifier`); anything else is refused."""
    if isinstance(model, PreTrainedModel):
        return slow_learner_from_classifier(model, args, peft_config)
    if model is not None and not isinstance(model, SLCAModel):
        raise TypeError(f"SLCATrainer trains an SLCAModel or a transformers image classifier, got "
                        f"{type(model).__name__}; wrap your backbone with SLCAModel.from_backbone(...).")
    if peft_config is not None:
        raise UserError("SLCATrainer: peft_config shapes the model built from a transformers classifier; an "
                         "SLCAModel has its adapters already (SLCAModel.from_backbone(..., peft_config=...)).")
    return model
