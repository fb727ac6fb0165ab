"""SLCATrainer in transformers' stock image-classification script.

`run_image_classification` below has the shape of transformers'
`examples/pytorch/image-classification/run_image_classification.py`: `HfArgumentParser` over its model and
data dataclasses and `TrainingArguments`, an `imagefolder` dataset with `with_transform`, the last checkpoint
detected in `output_dir`, and the `Trainer` doing the rest (train, save_model, metrics, state, evaluate), with
`SLCATrainer` and an `SLCAModel` swapped in. It runs with the script's usual flags (`eval_strategy`/
`save_strategy` epoch, `load_best_model_at_end` with `metric_for_best_model`, `save_total_limit`), and a run
SIGKILLed mid-way resumes with `resume_from_checkpoint` to the weights an uninterrupted run reaches: the
optimizer, scheduler and random number generator states are saved as safetensors + JSON, never pickles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import recipe_argv, run_forked, tiny_vit_config, write_image_folder
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
    ViTImageProcessor,
    ViTModel,
)
from transformers.trainer_utils import get_last_checkpoint

from slca_peft import EvalTransform, ImageTransformConfig, SLCAModel, SLCATrainer, TrainTransform, verify_checkpoint
from slca_peft.artifacts.layout import PICKLE_SUFFIXES
from slca_peft.artifacts.manifest import read_manifest
from slca_peft.continual import load_checkpoint
from slca_peft.utils.errors import UserError


@dataclass
class DataTrainingArguments:
    train_dir: str | None = field(default=None, metadata={"help": "A folder containing the training data."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder containing the validation data."})
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="google/vit-base-patch16-224-in21k")
    config_name: str | None = field(default=None)
    cache_dir: str | None = field(default=None)
    model_revision: str = field(default="main")
    image_processor_name: str | None = field(default=None)
    token: str | None = field(default=None)
    trust_remote_code: bool = field(default=False)
    ignore_mismatched_sizes: bool = field(default=False)


def collate_fn(examples):
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example["label"] for example in examples])
    return {"pixel_values": pixel_values, "labels": labels}


def run_image_classification(argv: list[str], callbacks=()) -> int:
    """The stock script's main() with SLCATrainer in place of Trainer: the model is the script's
    `AutoModelForImageClassification` with the dataset's labels in its config."""
    from datasets import load_dataset

    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)

    data_files = {"train": os.path.join(data_args.train_dir, "**"),
                  "validation": os.path.join(data_args.validation_dir, "**")}
    dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    labels = dataset["train"].features[data_args.label_column_name].names

    def compute_metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

    label2id, id2label = {}, {}
    for i, label in enumerate(labels):
        label2id[label] = str(i)
        id2label[str(i)] = label
    # The keywords the stock script passes, with its defaults (from_tf=False, revision "main", ...).
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token,
           "trust_remote_code": model_args.trust_remote_code}
    config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path,
                                        num_labels=len(labels), label2id=label2id, id2label=id2label,
                                        finetuning_task="image-classification", **hub)
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, from_tf=bool(".ckpt" in model_args.model_name_or_path), config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub)
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path, **hub)
    config = ImageTransformConfig.from_image_processor(image_processor)
    _train_transforms, _val_transforms = TrainTransform(config, scale=(0.5, 1.0)), EvalTransform(config)

    def train_transforms(example_batch):
        example_batch["pixel_values"] = [_train_transforms(image.convert("RGB"))
                                         for image in example_batch[data_args.image_column_name]]
        return example_batch

    def val_transforms(example_batch):
        example_batch["pixel_values"] = [_val_transforms(image.convert("RGB"))
                                         for image in example_batch[data_args.image_column_name]]
        return example_batch

    dataset["train"] = dataset["train"].with_transform(train_transforms)
    dataset["validation"] = dataset["validation"].with_transform(val_transforms)

    trainer = SLCATrainer(  # the one change: was Trainer
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
        callbacks=list(callbacks),
    )
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "image-classification", "dataset": None,
              "tags": ["image-classification", "vision"]}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    return 0


class KillAfterSave(TrainerCallback):
    """SIGKILLs the process once checkpoint-`step` is written: a crash mid-task."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def stock_inputs(tmp_path_factory):
    """A tiny ViT with dropout (so resuming needs torch's generator state) and its image processor, and
    3 classes of local images."""
    root = tmp_path_factory.mktemp("stock")
    torch.manual_seed(0)
    base = root / "tiny-vit"
    ViTModel(tiny_vit_config(initializer_range=1.0, hidden_dropout_prob=0.1), add_pooling_layer=False).save_pretrained(
        base)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(base)
    train = write_image_folder(root / "train", num_classes=3, per_class=8, seed=1)
    validation = write_image_folder(root / "validation", num_classes=3, per_class=3, seed=2)
    return base, train, validation, root / "cache"


def flags(inputs, out: Path, *extra: str) -> list[str]:
    base, train, validation, cache = inputs
    return ["--model_name_or_path", str(base), "--train_dir", str(train), "--validation_dir", str(validation),
            "--cache_dir", str(cache), "--output_dir", str(out), "--do_train", "--do_eval",
            "--remove_unused_columns", "false", "--eval_strategy", "epoch", "--save_strategy", "epoch",
            "--load_best_model_at_end", "--metric_for_best_model", "accuracy", "--save_total_limit", "2",
            "--num_train_epochs", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
            "--learning_rate", "0.05", "--optim", "sgd", "--logging_strategy", "epoch", "--use_cpu",
            "--seed", "7", "--report_to", "none", "--disable_tqdm", "true", *extra]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for name in ("adapter_model.safetensors", "classifier.safetensors", "optimizer.safetensors"):
        if (folder / name).is_file():
            found.update({f"{name}:{k}": v for k, v in load_file(folder / name).items()})
    return found


def assert_same_tensors(a: Path, b: Path) -> None:
    left, right = tensors(a), tensors(b)
    assert left.keys() == right.keys() and left
    for key in left:
        assert torch.equal(left[key], right[key]), f"{a.name}/{key} differs"


@pytest.mark.slow
def test_stock_script_trains_evaluates_keeps_the_best_and_resumes_a_killed_run_exactly(stock_inputs, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    steps_per_epoch = 3  # 24 images, batches of 8
    assert run_forked(lambda: run_image_classification(flags(stock_inputs, whole))) == 0
    # Killed right after the checkpoint of epoch 2 is written, then the same command: the script finds the
    # checkpoint and resumes from it; --resume_from_checkpoint names it the other way.
    assert run_forked(lambda: run_image_classification(
        flags(stock_inputs, killed), callbacks=[KillAfterSave(2 * steps_per_epoch)])) == -signal.SIGKILL
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    resumed = flags(stock_inputs, killed, "--resume_from_checkpoint", str(killed / "checkpoint-6"))
    assert run_forked(lambda: run_image_classification(resumed)) == 0

    # The checkpoints each run kept (save_total_limit 2, the best one among them) and the final model.
    kept = sorted(p.name for p in whole.glob("checkpoint-*"))
    assert kept == sorted(p.name for p in killed.glob("checkpoint-*")) and len(kept) <= 3
    for name in kept:
        assert_same_tensors(whole / name, killed / name)
        assert {"optimizer.json", "scheduler.json", "rng_state.json", "trainer_state.json"} <= {
            p.name for p in (whole / name).iterdir()}
    assert_same_tensors(whole, killed)
    state = json.loads((whole / "trainer_state.json").read_text())
    resumed_state = json.loads((killed / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith(resumed_state["best_model_checkpoint"].rsplit("/", 1)[-1])
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses == [e["loss"] for e in resumed_state["log_history"] if "loss" in e] and len(losses) == 4

    # load_best_model_at_end: the model saved at the end is the best checkpoint's.
    best = Path(state["best_model_checkpoint"]).name
    final, best_files = tensors(whole), tensors(whole / best)
    for key in [k for k in final if not k.startswith("optimizer")]:
        assert torch.equal(final[key], best_files[key])
    evaluated = json.loads((whole / "eval_results.json").read_text())
    assert evaluated["eval_accuracy"] == state["best_metric"]
    # Nothing anywhere is a pickle.
    written = [p.name for run in (whole, killed) for p in run.rglob("*") if p.is_file()]
    assert not [n for n in written if n.endswith(PICKLE_SUFFIXES)], written
    assert SLCAModel.from_pretrained(whole / best).classifier.num_classes == 3

    # Plain transformers on the output folder: the trained model, scoring what evaluation reported.
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(whole))
    _, _, validation, _ = stock_inputs
    images = sorted(validation.glob("*/*.png"))
    answers = classify([str(p) for p in images], top_k=1)
    accuracy = np.mean([a[0]["label"] == p.parent.name for a, p in zip(answers, images, strict=True)])
    assert accuracy == pytest.approx(evaluated["eval_accuracy"])
    assert isinstance(AutoModelForImageClassification.from_pretrained(whole), SLCAModel)
    card = ModelCard.load(whole / "README.md")
    assert "vision" in card.data.tags and str(stock_inputs[0]) not in str(card)
    # The card's results are the run's: one task of the 3 classes, scored as evaluate() reported.
    # An imagefolder run names no Hub dataset, so no model-index (whose entries must name one): local_results.
    assert card.data.eval_results is None and "datasets" not in card.data.to_dict()
    assert card.data.local_results["Last-Acc"] == pytest.approx(round(100 * evaluated["eval_accuracy"], 4))
    assert "on\n1 of 1 tasks (3 classes so far)" in card.text and "No task has been learned yet" not in card.text


def new_classes(root: Path, split: str, per_class: int, seed: int) -> Path:
    """Two classes the stock run did not learn (class_03, class_04: squares at other places)."""
    folder = write_image_folder(root / split, num_classes=5, per_class=per_class, seed=seed)
    for old in ("class_00", "class_01", "class_02"):
        shutil.rmtree(folder / old)
    return folder


def test_the_stock_script_s_output_continues_with_new_classes(stock_inputs, tmp_path, recipe, caplog):
    """The stock script (Trainer swapped, nothing else) leaves a continual checkpoint in output_dir: the
    class statistics of its classes (gathered on the training images with the validation split's eval
    transform), its task history, the heads; `slca-peft train --continue_from OUTPUT_DIR` teaches new
    classes from new folders and scores Last-Acc over old and new."""
    base, train, validation, _ = stock_inputs
    out = tmp_path / "stock"
    with caplog.at_level(logging.INFO, logger="slca_peft"):
        assert run_image_classification(flags(stock_inputs, out)) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("class statistics")]
    assert said == ["class statistics: on the 24 training images with eval_dataset's transform (as SLCA computes "
                    "them); statistics_dataset= chooses other images or another transform."]
    trainer_files = {"trainer_state.json", "all_results.json", "train_results.json", "eval_results.json",
                     "training_args.json", "README.md"}
    assert trainer_files | {"class_statistics.safetensors", "continual_state.json", "classifier_unaligned.safetensors",
                            "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    assert list(out.glob("checkpoint-*")) and verify_checkpoint(out) == []
    listed = read_manifest(out)
    assert "class_statistics.safetensors" in listed and not trainer_files - {"README.md"} & set(listed)
    state = json.loads((out / "continual_state.json").read_text())
    evaluated = json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
    assert state["task_sizes"] == [3] and state["class_ids"] == [0, 1, 2] and state["tasks_learned"] == 1
    assert state["label_names"] == ["class_00", "class_01", "class_02"]
    assert state["accuracy_matrix"] == [[pytest.approx(100 * evaluated)]] and state["task_test_sizes"] == [9]
    assert "--continue_from" in (out / "README.md").read_text()  # the card says the folder continues
    # The card: titled as a checkpoint, the one task's "all seen" is its accuracy, and its figures say they are
    # over the evaluation data (the script's --validation_dir); the export's card says the same.
    card = ModelCard.load(out / "README.md")
    shown = f"{100 * evaluated:.1f}"
    assert card.text.startswith("\n# SLCA++ continual checkpoint\n") and f"| 1 | {shown} | {shown} |" in card.text
    assert "nan" not in card.text and state["seen_accuracy"] == [pytest.approx(100 * evaluated)]
    assert card.data.local_results["over"] == "the eval_dataset given to SLCATrainer"
    from slca_peft.commands.cli import main as cli_main

    cli_main(["export", str(out), str(tmp_path / "exported")])
    assert ModelCard.load(tmp_path / "exported" / "README.md").data.local_results["over"] == (
        "the eval_dataset given to SLCATrainer")

    # The statistics are the training images' features under the evaluation transform (SLCA's choice).
    checkpoint = load_checkpoint(out)
    model, statistics = checkpoint.model, checkpoint.statistics
    transform = EvalTransform(ImageTransformConfig.from_image_processor(ViTImageProcessor.from_pretrained(base)))
    images = sorted(train.glob("*/*.png"))
    with torch.no_grad():
        model.eval()
        feats = model.features(torch.stack([transform(Image.open(p).convert("RGB")) for p in images]))
    for k, name in enumerate(state["label_names"]):
        rows = [i for i, p in enumerate(images) if p.parent.name == name]
        assert torch.allclose(statistics.means[k].float(), feats[rows].mean(0), atol=1e-4)
    assert statistics.counts == {0: 8, 1: 8, 2: 8} and statistics.task_of_class == {0: 0, 1: 0, 2: 0}

    # A damaged slca-peft file is still refused; the Trainer's files beside them are not looked at.
    damaged = shutil.copytree(out, tmp_path / "damaged")
    (damaged / "trainer_state.json").write_text("{}")
    assert verify_checkpoint(damaged) == []
    raw = bytearray((damaged / "class_statistics.safetensors").read_bytes())
    raw[-1] ^= 1
    (damaged / "class_statistics.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="class_statistics.safetensors was edited"):
        verify_checkpoint(damaged)

    # slca-peft train --continue_from OUTPUT_DIR: two new classes, the old test images to keep scoring the old.
    new = tmp_path / "new"
    folders = (new_classes(new, "train", 8, 3), new_classes(new, "test", 3, 4))
    run = tmp_path / "continued"
    recipe.main(recipe_argv(None, folders, run, "--continue_from", str(out), "--old_test_dir", str(validation),
                            init_cls=2, num_train_epochs=4, learning_rate=0.5, horizontal_flip=False,
                            crop_scale_min=0.8, ca_samples_per_class=16, ca_epochs=4))
    metrics = json.loads((run / "metrics.json").read_text())
    print("accuracy matrix", metrics["accuracy_matrix"], "Last-Acc", metrics["last_accuracy"])
    assert metrics["task_sizes"] == [3, 2] and [len(row) for row in metrics["accuracy_matrix"]] == [1, 2]
    assert metrics["accuracy_matrix"][0] == state["accuracy_matrix"][0] and None not in metrics["accuracy_matrix"][1]
    old, fresh = metrics["accuracy_matrix"][1]  # Last-Acc: over the 9 old and 6 new test images
    assert metrics["last_accuracy"] == pytest.approx((9 * old + 6 * fresh) / 15)
    continued = load_checkpoint(run / "task_2")
    # The continuation preprocessed with the stock run's own processor (resize to 32 x 32, bilinear) and wrote it.
    assert json.loads((run / "task_2" / "preprocessor_config.json").read_text()) == json.loads(
        (out / "preprocessor_config.json").read_text())
    assert continued.task_history["label_names"] == ["class_00", "class_01", "class_02", "class_03", "class_04"]
    for k in range(3):  # the old classes' statistics are the trainer run's, carried over
        assert torch.equal(continued.statistics.means[k], statistics.means[k])
        assert torch.equal(continued.statistics.covariance(k), statistics.covariance(k))
    assert sorted(continued.statistics.classes) == [0, 1, 2, 3, 4]
    # The continued card's figures: task 1 on the trainer's eval_dataset, then re-scored on --old_test_dir's.
    over = ModelCard.load(run / "task_2" / "README.md").data.local_results["over"]
    assert over == ("task 1: the eval_dataset given to SLCATrainer; task 2: the test data of image folders train, "
                    "test; the earlier tasks after a continuation: the old test data it was given (--old_test_dir)")


@pytest.mark.slow
def test_two_processes_gather_the_statistics_of_one_and_write_one_checkpoint(stock_inputs, tmp_path):
    """The stock script under torchrun (2 gloo processes): every training image counted once in the class
    statistics, which equal one process's computation on the saved model; the main process alone writes."""
    import subprocess
    import sys

    from conftest import ROOT

    driver = tmp_path / "run_image_classification.py"
    driver.write_text(f"import sys\nsys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT / 'tests' / 'method')!r}]\n"
                      "from test_stock_script import run_image_classification\n"
                      "sys.exit(run_image_classification(sys.argv[1:]))\n")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(driver), *flags(stock_inputs, out, "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
                               "--per_device_eval_batch_size", "1")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert verify_checkpoint(out) == [] and not list(out.glob(".slca-save-*"))
    checkpoint = load_checkpoint(out)
    assert checkpoint.statistics.counts == {0: 8, 1: 8, 2: 8}  # 24 images over 2 shards: none padded, none lost

    base, train, _, _ = stock_inputs
    transform = EvalTransform(ImageTransformConfig.from_image_processor(ViTImageProcessor.from_pretrained(base)))
    images = sorted(train.glob("*/*.png"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            model = checkpoint.model.eval()
            feats = torch.cat([model.features(transform(Image.open(p).convert("RGB"))[None]) for p in images])
    finally:
        torch.set_num_threads(threads)
    for k, name in enumerate(checkpoint.task_history["label_names"]):
        rows = [i for i, p in enumerate(images) if p.parent.name == name]
        torch.testing.assert_close(checkpoint.statistics.means[k], feats[rows].double().mean(0), rtol=0, atol=1e-6)


def test_the_stock_script_loads_its_own_output_again(stock_inputs, tmp_path):
    """The stock script run on its own output (`--model_name_or_path OUT --do_eval`): its keywords at their
    defaults (`from_tf=False`, `revision="main"`, `trust_remote_code=False`, `ignore_mismatched_sizes=False`,
    ...) load the trained model, which scores what the first run's final evaluation reported."""
    base, train, validation, cache = stock_inputs
    out, again = tmp_path / "out", tmp_path / "again"
    assert run_image_classification(flags(stock_inputs, out, "--num_train_epochs", "2")) == 0
    first = json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
    argv = ["--model_name_or_path", str(out), "--train_dir", str(train), "--validation_dir", str(validation),
            "--cache_dir", str(cache), "--output_dir", str(again), "--do_eval", "--remove_unused_columns", "false",
            "--per_device_eval_batch_size", "4", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true"]
    assert run_image_classification(argv) == 0
    assert json.loads((again / "eval_results.json").read_text())["eval_accuracy"] == pytest.approx(first)
    # Data of other classes: the config the script builds names outputs the model was not trained on.
    other = new_classes(tmp_path / "other", "train", 2, 5)
    argv[argv.index("--train_dir") + 1] = argv[argv.index("--validation_dir") + 1] = str(other)
    with pytest.raises(UserError, match="the config passed names the outputs"):
        run_image_classification(argv)
