"""One order of class names everywhere: `label_names[k]` names class id k (the model's output k), whatever
order the classes were learned in; a version-1 file (names in learning order) is converted on read."""

import json

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value

from slca_peft import SLCAModel, TaskSequence
from slca_peft.artifacts import manifest
from slca_peft.artifacts.layout import CONFIG_FILE, FORMAT_VERSION, MANIFEST_FILE, STATE_FILE
from slca_peft.artifacts.task_history import read_state
from slca_peft.continual.checkpoint import save_learner_state
from slca_peft.data.continuation import ContinuedStream
from slca_peft.data.tasks import stream_position_names
from slca_peft.models.config import SLCAModelConfig
from slca_peft.sharing.card import build_model_card
from slca_peft.utils.errors import UserError

NAMES = ["ant", "bee", "cat", "dog", "eel", "fox"]


def labelled(labels, names) -> Dataset:
    return Dataset.from_dict({"image": list(range(len(labels))), "label": labels},
                             features=Features({"image": Value("int64"), "label": ClassLabel(names=names)}))


def stream(names=NAMES, seed=7, **cut) -> tuple[TaskSequence, Dataset]:
    raw = labelled([c for c in range(len(names)) for _ in range(2)], names)
    cut = {"init_cls": 2, "increment": 2, **cut}
    return TaskSequence(raw, labelled(list(range(len(names))), names), seed=seed, **cut), raw


def model_for(base_model_dir, tasks, learned: int) -> SLCAModel:
    """A model that learned the first `learned` tasks of `tasks`, named as the learner names it."""
    model = SLCAModel.from_backbone(str(base_model_dir))
    for size in tasks.task_sizes[:learned]:
        model.grow(size)
    model.class_ids = tasks.class_ids[: model.classifier.num_classes]
    model.label_names = tasks.label_names
    return model


def predicted_names(model: SLCAModel, positions: list[int]) -> list[str]:
    """`model.label_names[model(x).logits.argmax(-1)]` for a head that is right on every image: it scores
    each image's own position (the stream's label) highest."""
    width = model.classifier.num_classes
    model.features = lambda pixel_values: pixel_values
    model.classifier.forward = lambda features: features
    with torch.no_grad():
        logits = model(torch.nn.functional.one_hot(torch.tensor(positions), width).float()).logits
    return [model.label_names[k] for k in logits.argmax(-1).tolist()]


def test_the_argmax_of_a_permuted_model_names_the_true_class(base_model_dir):
    tasks, raw = stream()
    assert tasks.class_ids != list(range(6))  # learned in another order than the dataset's ids
    model = model_for(base_model_dir, tasks, learned=3)
    truth = [NAMES[y] for y in raw["label"]]
    assert predicted_names(model, tasks.train["label"]) == truth
    assert [model.id2label[k] for k in range(6)] == model.label_names == NAMES == tasks.label_names
    # The stream's data is labelled by position; its ClassLabel (`position_names`) names those positions.
    assert tasks.train.features["label"].int2str(tasks.train["label"]) == truth
    assert tasks.position_names == stream_position_names(tasks) == [NAMES[i] for i in tasks.class_ids]
    # transformers' scripts name a model's classes with the dataset's names, in class-id order: the same.
    model.label_names = raw.features["label"].names
    assert predicted_names(model, tasks.train["label"]) == truth


def test_mid_stream_the_names_of_classes_not_learned_yet_stay_and_the_files_are_by_class_id(base_model_dir,
                                                                                          tmp_path):
    tasks, raw = stream()
    model = model_for(base_model_dir, tasks, learned=1)
    first = tasks[0]
    rows = [i for i, y in enumerate(tasks.train["label"]) if y in first.classes]
    assert predicted_names(model, [tasks.train["label"][i] for i in rows]) == [NAMES[raw["label"][i]] for i in rows]
    assert model.id2label == {k: NAMES[k] for k in range(max(tasks.class_ids[:2]) + 1)}
    model.save_pretrained(tmp_path / "m")
    save_learner_state(tmp_path / "m", state=tasks.describe())
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    state = json.loads((tmp_path / "m" / STATE_FILE).read_text())
    assert config["label_names"] == state["label_names"] == NAMES
    assert config["format_version"] == state["format_version"] == FORMAT_VERSION == 2
    assert state["class_order"] == tasks.class_ids
    assert SLCAModel.from_pretrained(tmp_path / "m").label_names == NAMES and read_state(tmp_path / "m") == state


def test_a_version_1_folder_is_converted_on_read(base_model_dir, tmp_path):
    tasks, _ = stream()
    model = model_for(base_model_dir, tasks, learned=1)
    model.save_pretrained(tmp_path / "m")
    ids = tasks.class_ids  # version 1 wrote the names in learning order
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    config.update(format_version=1, label_names=[NAMES[i] for i in ids])
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / "m" / STATE_FILE).write_text(json.dumps({**tasks.describe(), "label_names": [NAMES[i] for i in ids]}))
    document = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    (tmp_path / "m" / MANIFEST_FILE).write_text(json.dumps({**document, "format_version": 1}))
    assert manifest.read_manifest(tmp_path / "m")  # a version-1 manifest lists the same fields
    loaded = SLCAModel.from_pretrained(tmp_path / "m")
    # The config knows the learned classes' ids only: the others are unnamed until the history names them.
    learned = ids[:2]
    assert loaded.label_names == [NAMES[k] if k in learned else f"class_{k}" for k in range(max(learned) + 1)]
    assert loaded.id2label == model.id2label | {k: f"class_{k}" for k in range(max(learned) + 1) if k not in learned}
    state = read_state(tmp_path / "m")  # the history records every position's id: every name comes back
    assert state["label_names"] == NAMES and state["format_version"] == 2
    # A continued history recorded its ids (and skipped id 1: a class of the first data never learned).
    (tmp_path / "m" / STATE_FILE).write_text(json.dumps({"class_ids": [2, 0, 3], "label_names": ["c", "a", "d"],
                                                         "task_sizes": [2, 1]}))
    assert read_state(tmp_path / "m")["label_names"] == ["a", "class_1", "c", "d"]


def test_a_later_format_version_is_refused_in_one_line(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"format_version": 3, "label_names": ["a"]}))
    for read in (lambda: read_state(tmp_path), lambda: SLCAModelConfig.from_dict({"format_version": 3})):
        with pytest.raises(UserError, match=r"format_version 3; this slca-peft reads format_version 1, 2") as err:
            read()
        assert "\n" not in str(err.value)


def test_a_continuation_names_old_and_new_classes_by_class_id(base_model_dir, tmp_path):
    tasks, _ = stream(seed=7)
    # A checkpoint written after 2 of 3 tasks, by version 1 (names in learning order), read back.
    (tmp_path / STATE_FILE).write_text(json.dumps({
        **tasks.describe(), "label_names": [NAMES[i] for i in tasks.class_ids], "tasks_learned": 2,
        "accuracy_matrix": [[90.0], [80.0, 70.0]]}))
    previous = read_state(tmp_path)
    assert tasks.class_ids[:4] == [3, 5, 0, 2]  # learned: dog, fox, ant, cat; ids 1 (bee) and 4 (eel) skipped
    new_names = ["gnu", "hen", "bee"]  # "bee": the name of a skipped id, now a class of the new data
    new, new_raw = stream(new_names, seed=3, init_cls=1, increment=1)
    continued = ContinuedStream(previous, new)
    # Learned classes keep their ids and names, a skipped id keeps its name unless a class took it since,
    # new classes take the next ids in their own label-id order.
    assert continued.label_names == ["ant", "class_1", "cat", "dog", "eel", "fox", "gnu", "hen", "bee"]
    assert continued.class_ids[4:] == [6 + new.class_ids[p] for p in range(3)]
    model = model_for(base_model_dir, continued, learned=len(continued))
    assert model.label_names == continued.label_names
    truth = [new_names[y] for y in new_raw["label"]]
    assert predicted_names(model, continued.train["label"]) == truth
    assert continued.train.features["label"].int2str(continued.train["label"]) == truth
    assert continued.describe()["label_names"] == continued.label_names


def test_the_card_lists_each_task_s_classes_by_their_ids():
    settings = {"task_sizes": [2, 2], "class_ids": [3, 1, 0, 2], "label_names": ["ant", "bee", "cat", "dog"]}
    state = {"tasks_learned": 2, "task_sizes": [2, 2], "accuracy_matrix": [[90.0], [80.0, 70.0]]}
    text = str(build_model_card(settings, state))
    assert "| 1 | dog, bee |" in text and "| 2 | ant, cat |" in text
    assert "- 0: ant" in text and "- 3: dog" in text


def test_a_run_fingerprinted_by_version_1_still_resumes():
    """The data digest hashes the names in stream order, as the data's labels are: the value version 1
    recorded for this stream, so `--resume_from` of such a run sees the same data."""
    from slca_peft.continual.fingerprint import _data_digests

    digest, per_class = _data_digests(stream()[0])
    assert digest == "1dc2545ca5ffcde81e4760c83470b84baad658bd7a0deff2c7f6a6712726bbd2"
    assert per_class["dog"] == "bac2eab4600e9ad6" and per_class["ant"] == "0123457da1d314f2"


def test_a_version_1_history_with_an_impossible_class_id_is_refused_naming_the_file(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"class_order": [0, 1 << 21], "label_names": ["a", "b"]}))
    with pytest.raises(UserError, match=r"continual_state.json \(format_version 1\) names a class id of"):
        read_state(tmp_path)
