"""Exports: the image processor reproduces the evaluation transform, pipeline() agrees with SLCAModel."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from slca_peft import export_model
from slca_peft.data.transforms import EvalTransform, ImageTransformConfig, eval_image_processor


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_exported_processor_gives_the_eval_transforms_pixels(mode):
    config = ImageTransformConfig(size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    processor, transform = eval_image_processor(config), EvalTransform(config)
    rng = np.random.default_rng(0)
    # Odd sizes and aspect ratios: the resize truncates the longer side, the crop offset is odd.
    for w, h in [(8, 8), (37, 50), (50, 37), (41, 97), (97, 41), (100, 33), (13, 29), (45, 44), (32, 32)]:
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        ours = transform(img)
        theirs = torch.from_numpy(np.asarray(processor(img, return_tensors="np")["pixel_values"][0]))
        assert theirs.shape == ours.shape == (3, 32, 32)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_pipeline_on_the_export_predicts_what_the_model_predicts(tmp_path, recipe):
    from transformers import pipeline

    from slca_peft.continual import load_checkpoint
    from slca_peft.data.formats import load_digits_dataset

    recipe.main(["--model_name_or_path", str(ROOT / "recipes" / "assets" / "tiny_vit_letters"), "--dataset", "digits",
                 "--init_cls", "5", "--increment", "5", "--num_train_epochs", "1", "--per_device_train_batch_size",
                 "64", "--learning_rate", "0.05", "--ca_epochs", "1", "--ca_samples_per_class", "32",
                 "--use_cpu", "true", "--seed", "0", "--report_to", "none", "--disable_tqdm", "true",
                 "--output_dir", str(tmp_path / "run")])
    model, *_ = load_checkpoint(tmp_path / "run" / "task_2")
    model.eval()
    export_model(model, tmp_path / "exported")  # class names come from the checkpoint
    test = load_digits_dataset()["test"]
    images, truth = list(test["image"]), [str(y) for y in test["label"]]
    from slca_peft.data.transforms import eval_transform_config

    transform = EvalTransform(eval_transform_config(model))  # what the run evaluated with
    with torch.no_grad():
        logits = model(torch.stack([transform(im) for im in images])).logits
    ours = [model.config.id2label[i] for i in logits.argmax(1).tolist()]  # the transformers idiom
    pipe = pipeline("image-classification", model=str(tmp_path / "exported"), device="cpu")
    theirs = [r[0]["label"] for r in pipe(images, top_k=1, batch_size=64)]
    agreement = np.mean([a == b for a, b in zip(ours, theirs, strict=True)])
    ours_acc = np.mean([a == b for a, b in zip(ours, truth, strict=True)])
    theirs_acc = np.mean([a == b for a, b in zip(theirs, truth, strict=True)])
    assert sorted(set(theirs)) <= [str(d) for d in range(10)]  # the real names, not class_<i>
    assert agreement >= 0.99 and abs(ours_acc - theirs_acc) <= 0.005
    assert ours_acc > 0.3  # a trained model, not chance (10 %)

    # The export's output k is the dataset's label k: the usual `argmax == batch["label"]` scores what
    # the run reported, although the run learned the digits in another order.
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    assert model.class_ids != list(range(10))
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "exported").eval()
    assert plain.config.id2label == {k: str(k) for k in range(10)}
    batch = AutoImageProcessor.from_pretrained(tmp_path / "exported")(images, return_tensors="pt")
    with torch.no_grad():
        predicted = plain(pixel_values=batch["pixel_values"]).logits.argmax(-1)
    scored = 100.0 * (predicted == torch.tensor(test["label"])).float().mean().item()
    reported = json.loads((tmp_path / "run" / "metrics.json").read_text())["seen_accuracy"][-1]
    assert abs(scored - reported) <= 0.5
    # The same idiom scores the SLCAModel itself: its output k is the dataset's label k too.
    model_scored = 100.0 * (logits.argmax(-1) == torch.tensor(test["label"])).float().mean().item()
    assert abs(model_scored - reported) <= 0.5 and abs(model_scored - scored) <= 0.5


def test_the_export_of_a_trainer_folder_keeps_the_runs_image_processor(tmp_path, base_model_dir):
    """SLCATrainer saves its `processing_class` beside the model files; the export carries that processor,
    so `pipeline()` preprocesses as the run evaluated (not slca-peft's default CLIP-style one)."""
    from conftest import trained_model
    from transformers import AutoImageProcessor, ViTImageProcessor

    from slca_peft import SLCAModel

    folder = tmp_path / "run"
    trained_model(base_model_dir).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.3] * 3, image_std=[0.2] * 3,
                      resample=0).save_pretrained(folder)
    export_model(SLCAModel.from_pretrained(folder), tmp_path / "export")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "export")
    assert type(processor).__name__.startswith("ViTImageProcessor")
    assert list(processor.image_mean) == [0.3] * 3 and list(processor.image_std) == [0.2] * 3


def test_the_export_card_names_the_export_and_tags_a_plain_classifier(tmp_path, base_model_dir):
    """No `lora`/`peft` tag (the adapter is merged), the architecture's and `vision` instead, and the export
    named after its folder (not a generic name); the metadata parses back as huggingface_hub reads it."""
    from conftest import trained_model
    from huggingface_hub import ModelCard, ModelCardData

    from slca_peft.commands.cli import main as cli_main
    from slca_peft.continual import save_checkpoint

    state = {"accuracy_matrix": [[80.0], [70.0, 60.0]], "seen_accuracy": [80.0, 65.0], "method": "slca++",
             "task_test_sizes": [10, 15], "tasks_learned": 2, "task_sizes": [2, 3], "dataset": "me/letters"}
    save_checkpoint(trained_model(base_model_dir), tmp_path / "run" / "task_2", state=state)
    cli_main(["export", str(tmp_path / "run"), str(tmp_path / "letters-vit-tiny")])
    card = ModelCard.load(tmp_path / "letters-vit-tiny" / "README.md")
    data = card.data.to_dict()
    assert ModelCardData(**data).to_dict() == data
    assert not {"lora", "peft"} & set(data["tags"]) and {"vit", "vision", "image-classification"} <= set(data["tags"])
    assert data["model-index"][0]["name"] == "letters-vit-tiny" and "# letters-vit-tiny\n" in card.text
    assert "SLCA++ continual model (exported)" not in str(card)
