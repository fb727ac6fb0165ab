"""Class ids: output positions follow the continual class order inside, the dataset's label ids at the boundary."""

import json

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value

from slca_peft import SLCAModel, TaskSequence, export_model
from slca_peft.artifacts.layout import task_dir_name
from slca_peft.artifacts.task_history import validate_state
from slca_peft.artifacts.values import MAX_CLASSES
from slca_peft.data.domains import DomainSequence
from slca_peft.data.tasks import class_order, stream_class_ids
from slca_peft.models.config import SLCAModelConfig, fit_class_ids


def labelled(labels, names=None) -> Dataset:
    feature = ClassLabel(names=names) if names else Value("int64")
    return Dataset.from_dict({"image": list(range(len(labels))), "label": labels},
                             features=Features({"image": Value("int64"), "label": feature}))


def test_a_task_sequence_s_class_ids_are_the_dataset_label_of_each_position():
    names = [f"c{i}" for i in range(6)]
    train = labelled([c for c in range(6) for _ in range(2)], names)
    seq = TaskSequence(train, labelled(list(range(6)), names), init_cls=2, increment=2, seed=7)
    assert seq.class_ids == class_order(6, 7) != list(range(6))
    # Position p's images carry dataset label class_ids[p], and its name is that label's name.
    for image, position in zip(seq.train["image"], seq.train["label"], strict=True):
        assert seq.class_ids[position] == train["label"][image]
    # Names by class id, as the dataset's; the relabelled data's ClassLabel names the positions.
    assert seq.label_names == names and seq.position_names == [names[i] for i in seq.class_ids]
    assert seq.train.features["label"].names == seq.position_names
    assert stream_class_ids(seq) == seq.class_ids


def test_a_domain_sequence_s_ids_are_the_identity_and_a_custom_stream_defaults_to_it():
    names = ["a", "b", "c"]
    domain = (labelled([0, 1, 2, 0], names), labelled([2, 1, 0], names))
    assert DomainSequence([domain, domain]).class_ids == [0, 1, 2]

    class Custom:  # a stream written before class ids existed
        num_classes = 4

    assert stream_class_ids(Custom()) == [0, 1, 2, 3]


def test_the_config_refuses_class_ids_that_cannot_name_outputs():
    SLCAModelConfig(task_sizes=[2, 1], class_ids=[4, 0, 2])
    SLCAModelConfig(class_ids=[3, 1])  # task sizes not known yet: any length
    for ids, message in [([1, 1, 0], "repeats the class id"), ([0, -1, 2], r"class_ids\[1\] must be in"),
                         ([0, 1, MAX_CLASSES], r"class_ids\[2\] must be in"), ([0, 1.0, 2], "must be an integer"),
                         ([0, 1], "has 2 entries for 3 classes"), ("012", "must be a list")]:
        with pytest.raises(ValueError, match=message):
            SLCAModelConfig(task_sizes=[2, 1], class_ids=ids)
    with pytest.raises(ValueError, match="repeats the class id"):
        validate_state({"class_ids": [3, 3]})


def test_outputs_added_later_take_the_next_free_ids():
    assert fit_class_ids([4, 2], 5) == [4, 2, 5, 6, 7]
    assert fit_class_ids([4, 2, 0], 3) == [4, 2, 0] and fit_class_ids(None, 3) is None


def test_model_ids_names_and_files(tmp_path, base_model_dir):
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    assert model.class_ids == [0, 1] and model.id2label == {0: "class_0", 1: "class_1"}  # identity before ids
    model.class_ids = [3, 1]
    model.label_names = ["zero", "one"]  # by class id: ids 3 (learned) and 2 (not yet) are unnamed
    # One name per output of forward (output k = class id k); an id with no name is a placeholder.
    assert model.id2label == {0: "zero", 1: "one", 2: "class_2", 3: "class_3"}
    model.label_names = ["zero", "one", "two", "three", "four"]  # a dataset's whole class list
    assert model.id2label == {0: "zero", 1: "one", 2: "two", 3: "three"}
    assert model.label2id["one"] == 1 and model.label2id["three"] == 3
    assert model.config.id2label == model.id2label and model.config.num_labels == 4
    model.grow(2)  # grown without new ids: the next free ones, never a change to the old
    assert model.class_ids == [3, 1, 4, 5]
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "slca_config.json").read_text())
    assert saved["class_ids"] == [3, 1, 4, 5] and saved["task_sizes"] == [2, 2]
    assert SLCAModel.from_pretrained(tmp_path / "m").class_ids == [3, 1, 4, 5]
    # Files written before class ids existed load with the positions as ids.
    del saved["class_ids"]
    (tmp_path / "m" / "slca_config.json").write_text(json.dumps(saved))
    old = SLCAModel.from_pretrained(tmp_path / "m")
    assert old.slca_config.class_ids is None and old.class_ids == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="has 3 entries for 4 classes"):
        old.class_ids = [0, 1, 2]


@pytest.mark.slow
def test_a_run_records_the_class_ids_in_the_model_and_the_task_history(tmp_path, make_learner, tiny_image_folders,
                                                                        hub):
    tasks = TaskSequence.from_image_folders(*tiny_image_folders, init_cls=2, increment=2, seed=3)
    assert tasks.class_ids != [0, 1, 2, 3]
    learner = make_learner(tasks, tmp_path / "run", num_train_epochs=1, ca_epochs=1, per_device_train_batch_size=16)
    learner.run()
    assert learner.model.class_ids == tasks.class_ids
    # The learner owns the run state and pushes it: the last task's continual checkpoint, one commit.
    learner.push_to_hub("me/run", base_model_id="me/tiny-vit")
    (upload,) = hub.uploads
    assert upload["message"] == "task 2/2" and {"class_statistics.safetensors", "continual_state.json",
                                                   "classifier_unaligned.safetensors"} <= set(upload["files"])
    for t in (0, 1):
        folder = tmp_path / "run" / task_dir_name(t)
        config = json.loads((folder / "slca_config.json").read_text())
        state = json.loads((folder / "continual_state.json").read_text())
        assert config["class_ids"] == tasks.class_ids[: 2 * (t + 1)]
        assert state["class_ids"] == tasks.class_ids
        # Names by class id in both files (the dataset's), whatever the learning order.
        names = [f"class_{k:02d}" for k in range(4)]
        assert config["label_names"] == state["label_names"] == tasks.label_names == names
        assert config["format_version"] == state["format_version"] == 2


def test_a_mid_stream_export_puts_each_output_at_its_class_id(tmp_path, base_model_dir):
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    with torch.no_grad():
        model.classifier.heads[0].weight.add_(torch.randn_like(model.classifier.heads[0].weight))
    model.class_ids = [3, 1]  # the first task of a stream learned labels 3 and 1; 0 and 2 come later
    model.label_names = ["zero", "one", "two", "three", "four"]  # by class id, the dataset's whole list
    export_model(model.eval(), tmp_path / "exported")
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "exported").eval()
    assert plain.config.id2label == {0: "zero", 1: "one", 2: "two", 3: "three"}
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        logits, expected = plain(pixel_values=x).logits, model(x).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)  # the model's own logits, in class ids
    assert plain.config.id2label == model.config.id2label
    probabilities = logits.softmax(-1)
    assert probabilities[:, [0, 2]].max() == 0 and set(logits.argmax(-1).tolist()) <= {1, 3}


@pytest.mark.slow
def test_the_model_answers_in_class_ids_as_its_export_does(tmp_path, make_learner, tiny_image_folders):
    """`config.id2label[logits.argmax(-1)]` and `argmax == label` on the dataset's own labels score an
    SLCAModel as they score its export; SLCATrainer.evaluate/predict report in the same ids."""
    import numpy as np
    import torch.nn.functional as F
    from transformers import AutoModelForImageClassification

    from slca_peft import EvalTransform, ImageTransformConfig, SLCAConfig, SLCATrainer, collate_fn
    from slca_peft.data.formats import load_split_image_folders

    tasks = TaskSequence.from_image_folders(*tiny_image_folders, init_cls=2, increment=2, seed=3)
    assert tasks.class_ids != [0, 1, 2, 3]  # learned in another order than the dataset's ids
    learner = make_learner(tasks, tmp_path / "run", num_train_epochs=1, ca_epochs=1, per_device_train_batch_size=16)
    reported = learner.run().seen_accuracy[-1]
    model = SLCAModel.from_pretrained(tmp_path / "run" / task_dir_name(1))
    assert not model.training  # eval mode, as transformers' from_pretrained
    raw = load_split_image_folders(*tiny_image_folders)["test"]  # the dataset's own label ids
    transform = EvalTransform(ImageTransformConfig.from_model_config(model.config))
    pixels, labels = torch.stack([transform(im) for im in raw["image"]]), torch.tensor(raw["label"])
    with torch.no_grad():
        logits = model(pixels).logits
        positions = model(pixels, positions=True).logits
    assert logits.shape == (len(raw), 4) and torch.equal(logits[:, model.class_ids], positions)
    names = raw.features["label"].names
    predicted = [model.config.id2label[k] for k in logits.argmax(-1).tolist()]
    by_name = 100.0 * np.mean([p == names[y] for p, y in zip(predicted, raw["label"], strict=True)])
    by_id = 100.0 * (logits.argmax(-1) == labels).float().mean().item()
    assert by_name == pytest.approx(reported) and by_id == pytest.approx(reported)
    export_model(model, tmp_path / "exported")
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=pixels).logits, logits, rtol=1e-5, atol=1e-5)
    assert plain.config.id2label == model.config.id2label == dict(enumerate(names))
    assert plain.config.label2id == model.config.label2id
    # The model's loss takes class ids, as its logits are ordered; a label it never learned is refused.
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, labels=labels).loss, F.cross_entropy(logits, labels))
        with pytest.raises(ValueError, match=r"label\(s\) \[7\] are not class ids this model has learned"):
            model(pixels, labels=torch.full_like(labels, 7))
    # The trainer takes the stream's data (labels are positions) and reports in class ids.
    args = SLCAConfig(output_dir=str(tmp_path / "eval"), use_cpu=True, report_to="none", disable_tqdm=True,
                      per_device_eval_batch_size=3)
    trainer = SLCATrainer(model=model, args=args, data_collator=collate_fn, compute_metrics=lambda p: {
        "accuracy": 100.0 * float((p.predictions.argmax(-1) == p.label_ids).mean())})
    test = tasks.test.with_transform(learner.eval_transform)
    assert tasks.test["label"] != raw["label"]
    prediction = trainer.predict(test)
    assert prediction.label_ids.tolist() == raw["label"]
    np.testing.assert_allclose(prediction.predictions, logits.numpy(), rtol=1e-5, atol=1e-5)
    assert prediction.metrics["test_accuracy"] == pytest.approx(reported)
    evaluated = trainer.evaluate(test)
    assert evaluated["eval_accuracy"] == pytest.approx(reported)
    assert evaluated["eval_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
