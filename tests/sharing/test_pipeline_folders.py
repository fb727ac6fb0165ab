"""Every folder slca-peft writes works with transformers' `pipeline()`: the run's image processor travels with the
model files (a trainer's output folder, a recipe's `task_N`, an export, every push), so the pipeline scores what
the run's evaluation reported; a pushed repo loads by its Hub id (base and adapter), never as a random head."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stats_for, trained_model
from datasets import Dataset
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTModel, pipeline

from slca_peft import SLCAConfig, SLCAModel, SLCATrainer, TaskSequence, export_model
from slca_peft.artifacts.layout import PROCESSOR_FILE
from slca_peft.artifacts.manifest import read_manifest
from slca_peft.continual import load_checkpoint, save_checkpoint
from slca_peft.data.transforms import (
    EvalTransform,
    ImageTransformConfig,
    collate_fn,
    default_image_processor,
    eval_image_processor,
    make_batch_transform,
)


def folder_images(test_dir: Path) -> tuple[list[Image.Image], list[str]]:
    """The test images of an image-folder dataset and their class names (the folder names)."""
    paths = sorted(test_dir.glob("*/*.png"))
    return [Image.open(p).convert("RGB") for p in paths], [p.parent.name for p in paths]


def pipeline_answers(folder: str | Path, images: list[Image.Image]) -> list[str]:
    classify = pipeline("image-classification", model=str(folder))
    return [top[0]["label"] for top in classify(images, top_k=1, batch_size=8)]


def own_answers(model: SLCAModel, images: list[Image.Image], config: ImageTransformConfig) -> list[str]:
    """What the model predicts for `images` through the evaluation transform, as class names."""
    transform = EvalTransform(config)
    with torch.no_grad():
        logits = model.eval()(pixel_values=torch.stack([transform(im) for im in images])).logits
    return [model.config.id2label[int(k)] for k in logits.argmax(-1)]


def accuracy(answers: list[str], names: list[str]) -> float:
    return 100.0 * float(np.mean([a == n for a, n in zip(answers, names, strict=True)]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_learner, image_folders):
    """A three-task run of the continual learner, as the recipe runs it (EvalTransform for evaluation)."""
    tasks = TaskSequence.from_image_folders(*image_folders, init_cls=2, increment=2, seed=1993)
    learner = make_learner(tasks, tmp_path_factory.mktemp("run") / "run", init_cls=2, increment=2,
                           num_train_epochs=2, ca_epochs=1)
    return learner, learner.run()


def test_a_task_checkpoint_and_its_export_answer_in_pipeline_as_the_run_evaluated(run, image_folders, tmp_path):
    learner, result = run
    task = learner.output_dir / "task_3"
    # The processor of the run's EvalTransform, in the checkpoint and in its manifest (what a push sends).
    assert PROCESSOR_FILE in read_manifest(task)
    config = ImageTransformConfig.from_model_config(learner.model.config)
    assert AutoImageProcessor.from_pretrained(task).to_dict() == eval_image_processor(config).to_dict()
    images, names = folder_images(image_folders[1])
    answers = pipeline_answers(task, images)
    # Every class is learned after task 3: the pipeline scores the whole test set as the run did.
    assert accuracy(answers, names) == pytest.approx(result.seen_accuracy[-1], abs=100 / len(images) + 1e-6)
    # The model loaded back (the aligned heads the run scored: the learner's own are unaligned again after the
    # run) carries the processor; the export takes it over and answers alike.
    model = load_checkpoint(task).model
    assert answers == own_answers(model, images, config)
    assert model.image_processor.to_dict() == eval_image_processor(config).to_dict()
    export_model(model, tmp_path / "export")
    assert pipeline_answers(tmp_path / "export", images) == answers


def test_every_push_of_a_run_carries_its_image_processor(run, hub, tmp_path, base_model_dir):
    learner, _ = run
    learner.push_to_hub("me/run", base_model_id="me/tiny-vit")
    uploaded = hub.uploads[-1]
    assert PROCESSOR_FILE in uploaded["files"]
    assert uploaded["json"][PROCESSOR_FILE] == json.loads((learner.output_dir / "task_3" / PROCESSOR_FILE).read_text())
    assert PROCESSOR_FILE in {f["path"] for f in uploaded["json"][".slca-manifest.json"]["files"]}
    # A checkpoint written without one (by an earlier release): `slca-peft push` gives it the processor of
    # slca-peft's evaluation, so the repo still loads in pipeline().
    from slca_peft.commands.cli import main as cli_main

    model = trained_model(base_model_dir)
    save_checkpoint(model, tmp_path / "old", statistics=stats_for(model), state={"accuracy_matrix": [[90.0]]})
    assert not (tmp_path / "old" / PROCESSOR_FILE).exists()
    cli_main(["push", str(tmp_path / "old"), "me/old", "--base_model_id", "me/tiny-vit"])
    assert hub.uploads[-1]["json"][PROCESSOR_FILE] == json.loads(default_image_processor(model).to_json_string())
    assert not (tmp_path / "old" / PROCESSOR_FILE).exists()  # the folder itself is left as it is
    # One whose processor file sits beside it, unlisted (a trainer's output_dir before processors were listed):
    # the upload carries that processor, the one the model loads with, not the default.
    from transformers import ViTImageProcessor

    save_checkpoint(model, tmp_path / "older", statistics=stats_for(model), state={"accuracy_matrix": [[90.0]]})
    own = ViTImageProcessor(size={"height": 32, "width": 32}, resample=2)
    own.save_pretrained(tmp_path / "older")
    cli_main(["push", str(tmp_path / "older"), "me/older", "--base_model_id", "me/tiny-vit"])
    assert hub.uploads[-1]["json"][PROCESSOR_FILE] == json.loads(own.to_json_string())


def test_a_trainers_output_folder_answers_in_pipeline_as_its_evaluation_scored(tmp_path, base_model_dir,
                                                                               image_folders, hub, hub_cache):
    train_dir, test_dir = image_folders
    names = sorted(p.name for p in train_dir.iterdir())

    def dataset(root: Path) -> Dataset:
        paths = sorted(root.glob("*/*.png"))
        return Dataset.from_dict({"image": [Image.open(p).convert("RGB") for p in paths],
                                  "label": [names.index(p.parent.name) for p in paths]})

    args = SLCAConfig(output_dir=str(tmp_path / "out"), use_cpu=True, num_train_epochs=3, learning_rate=0.05,
                      per_device_train_batch_size=8, seed=0, disable_tqdm=True, report_to="none",
                      remove_unused_columns=False, save_strategy="no", hub_model_id="me/out",
                      hub_base_model_id="me/tiny-vit")
    model = SLCAModel.from_backbone(str(base_model_dir), args)
    model.grow(len(names))
    model.label_names = names
    config = ImageTransformConfig.from_model_config(model.config)
    batches = make_batch_transform(EvalTransform(config))

    def compute_metrics(prediction) -> dict[str, float]:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = SLCATrainer(model=model, args=args, train_dataset=dataset(train_dir).with_transform(batches),
                          eval_dataset=dataset(test_dir).with_transform(batches), data_collator=collate_fn,
                          processing_class=eval_image_processor(config), compute_metrics=compute_metrics)
    trainer.train()
    reported = 100.0 * trainer.evaluate()["eval_accuracy"]
    trainer.save_model()
    out = Path(args.output_dir)
    assert PROCESSOR_FILE in read_manifest(out)
    images, labels = folder_images(test_dir)
    answers = pipeline_answers(out, images)
    assert accuracy(answers, labels) == pytest.approx(reported, abs=100 / len(images) + 1e-6)
    assert answers == own_answers(model, images, config)
    trainer.push_to_hub()
    assert PROCESSOR_FILE in hub.uploads[-1]["files"]
    # The pushed repo, loaded back, scores what its card reports and what the run evaluated.
    from huggingface_hub import ModelCard

    # A folder of images names no Hub dataset, so the card's figures are its local_results, not a model-index.
    shown = ModelCard(hub.uploads[-1]["card"]).data.local_results
    assert shown["Last-Acc"] == pytest.approx(reported, abs=1e-4)
    hub_cache("me/tiny-vit", base_model_dir)
    hub_cache("me/out", hub.uploads[-1]["folder"])
    loaded = SLCAModel.from_pretrained("me/out")
    assert own_answers(loaded, images, config) == answers
    assert pipeline_answers("me/out", images) == answers


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub cache on disk (huggingface_hub's layout) that `lay_out(repo_id, folder)` fills."""
    import huggingface_hub.constants as hub_constants
    from models.test_model_hub import lay_out_hub_cache

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return lambda repo_id, folder: lay_out_hub_cache(cache, repo_id, folder)


def test_a_pushed_repo_loads_by_its_hub_id_with_its_base_and_adapter(tmp_path, base_model_dir, hub, hub_cache):
    model = trained_model(base_model_dir)
    model.label_names = ["ant", "bee", "cow", "doe", "elk"]
    config = ImageTransformConfig.from_model_config(model.config)
    model.image_processor = eval_image_processor(config)
    model.push_to_hub("me/tiny-slca", base_model_id="me/tiny-vit")
    hub_cache("me/tiny-vit", base_model_dir)
    hub_cache("me/tiny-slca", hub.uploads[-1]["folder"])
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no Hub look-up of the base by PEFT, no unexpected keys
            loaded = SLCAModel.from_pretrained("me/tiny-slca")
        assert loaded.slca_config.base_model_name_or_path == "me/tiny-vit"
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected, rtol=0, atol=0)
        # transformers' Auto class on the repo id: the trained model, not the adapter's base with a random head.
        auto = AutoModelForImageClassification.from_pretrained("me/tiny-slca")
        assert isinstance(auto, SLCAModel)
        torch.testing.assert_close(auto(pixel_values=pixels).logits, expected, rtol=0, atol=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(6)]
    assert pipeline_answers("me/tiny-slca", images) == own_answers(model, images, config)


def test_plain_peft_loads_every_trained_tensor_of_a_pushed_repo_without_a_warning(base_model_dir, hub, hub_cache):
    from peft import PeftModel

    model = trained_model(base_model_dir)
    model.push_to_hub("me/tiny-slca", base_model_id="me/tiny-vit")
    hub_cache("me/tiny-slca", hub.uploads[-1]["folder"])
    base = ViTModel.from_pretrained(base_model_dir, add_pooling_layer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT's "Found unexpected adapter keys" among them
        backbone = PeftModel.from_pretrained(base, "me/tiny-slca").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # LoRA, every LayerNorm and bias, the class token: all of them loaded
        torch.testing.assert_close(backbone(pixel_values=pixels).last_hidden_state[:, 0], model.features(pixels),
                                   rtol=0, atol=0)


@pytest.mark.slow
def test_without_slca_peft_the_hub_id_is_refused_not_given_a_random_head(base_model_dir, hub, hub_cache, tmp_path):
    model = trained_model(base_model_dir)
    model.push_to_hub("me/tiny-slca", base_model_id="me/tiny-vit")
    hub_cache("me/tiny-vit", base_model_dir)
    hub_cache("me/tiny-slca", hub.uploads[-1]["folder"])
    code = "from transformers import pipeline\npipeline('image-classification', model='me/tiny-slca')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub-cache")})
    assert run.returncode != 0 and "model type `slca_peft`" in run.stderr
