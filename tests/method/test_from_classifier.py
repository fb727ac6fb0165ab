"""SLCATrainer takes what transformers' example scripts build: an `AutoModelForImageClassification` model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit_config
from peft import LoraConfig
from transformers import AutoModelForImageClassification, TrainingArguments, ViTForImageClassification, ViTModel

from slca_peft import SLCAModel, SLCATrainer
from slca_peft.utils.errors import UserError

NAMES = ["ant", "bee", "cow"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "tiny-vit-classifier"
    config = tiny_vit_config(initializer_range=1.0, id2label=dict(enumerate(NAMES)),
                             label2id={n: i for i, n in enumerate(NAMES)})
    ViTForImageClassification(config).save_pretrained(path)
    return path


def args(tmp_path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")


def test_a_transformers_classifier_becomes_the_slow_learner(classifier_dir, tmp_path):
    classifier = AutoModelForImageClassification.from_pretrained(classifier_dir)
    trainer = SLCATrainer(model=classifier, args=args(tmp_path))
    model = trainer.slca_model
    assert isinstance(model, SLCAModel) and model.slca_config.use_lora
    assert model.label_names == NAMES and model.class_ids == [0, 1, 2] and model.classifier.task_sizes == [3]
    assert model.config.id2label == dict(enumerate(NAMES))
    assert model.slca_config.base_model_name_or_path == str(classifier_dir.resolve())
    # The backbone is the classifier's, its weights the checkpoint's; the classifier's own head is gone.
    vit = classifier.vit
    assert model.base_backbone is vit and not any("classifier.weight" == n for n, _ in model.named_parameters())
    reference = ViTModel.from_pretrained(classifier_dir, add_pooling_layer=False)
    torch.testing.assert_close(vit.embeddings.cls_token, reference.embeddings.cls_token)
    # Saved and loaded back, it references the base model it came from.
    trainer.save_model()
    loaded = SLCAModel.from_pretrained(tmp_path / "out")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)


def test_peft_config_shapes_the_adapters(classifier_dir, tmp_path):
    classifier = AutoModelForImageClassification.from_pretrained(classifier_dir)
    trainer = SLCATrainer(model=classifier, args=args(tmp_path),
                          peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lora = trainer.slca_model.backbone.peft_config["default"]
    assert lora.r == 2 and set(lora.target_modules) == {"q_proj", "v_proj"}
    model = SLCAModel.from_backbone(str(classifier_dir))
    model.grow(3)
    with pytest.raises(ValueError, match="peft_config shapes the model built from a transformers classifier"):
        SLCATrainer(model=model, args=args(tmp_path), peft_config=LoraConfig(r=2))


def test_what_is_no_image_classifier_is_refused_naming_what_works(classifier_dir, tmp_path):
    with pytest.raises(UserError, match="AutoModelForImageClassification.from_pretrained"):
        SLCATrainer(model=ViTModel(tiny_vit_config()), args=args(tmp_path))
    gappy = tiny_vit_config(id2label={0: "a", 2: "c"}, label2id={"a": 0, "c": 2})
    with pytest.raises(UserError, match="must name the classes 0..n-1"):
        SLCATrainer(model=ViTForImageClassification(gappy), args=args(tmp_path))
