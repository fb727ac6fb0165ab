"""SLCATrainer's output_dir as a continual checkpoint: which images and transform the class statistics use,
and a run without evaluation, continued with new classes (its task is a missing entry, not 0)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import write_image_folder

from slca_peft import (
    EvalTransform,
    ImageTransformConfig,
    SLCAConfig,
    SLCAModel,
    SLCATrainer,
    TaskSequence,
    TrainTransform,
)
from slca_peft.artifacts.manifest import read_manifest
from slca_peft.continual import load_checkpoint, verify_checkpoint
from slca_peft.data.formats import load_split_image_folders
from slca_peft.data.transforms import collate_fn, make_batch_transform


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_continues")
    return (write_image_folder(root / "train", num_classes=4, per_class=6, seed=1),
            write_image_folder(root / "test", num_classes=4, per_class=2, seed=2))


def first_two_classes(folders):
    """Classes 0 and 1 as HF datasets (train, test), their labels the positions 0 and 1."""
    splits = load_split_image_folders(*folders)
    keep = lambda d: d.filter(lambda label: label < 2, input_columns="label")  # noqa: E731
    return keep(splits["train"]), keep(splits["test"])


def trainer_for(model, out, train, evaluation=None, **kwargs):
    args = SLCAConfig(output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, num_train_epochs=1,
                      per_device_train_batch_size=4, per_device_eval_batch_size=4, remove_unused_columns=False,
                      learning_rate=0.05, seed=0)
    return SLCATrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collate_fn,
                       **kwargs)


def views(model, train, test):
    tc = ImageTransformConfig.from_model_config(model.config)
    training = make_batch_transform(TrainTransform(tc, scale=(0.5, 1.0)), "image", "label")
    evaluation = make_batch_transform(EvalTransform(tc), "image", "label")
    return train.with_transform(training), test.with_transform(evaluation), train.with_transform(evaluation)


def test_the_statistics_borrow_the_eval_transform_or_say_they_use_the_training_one(base_model_dir, folders, tmp_path,
                                                                                 caplog):
    train, test = first_two_classes(folders)
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    augmented, evaluated, plain = views(model, train, test)
    reference = trainer_for(model, tmp_path / "a", plain).gather_class_statistics(plain)
    with caplog.at_level(logging.INFO, logger="slca_peft"):
        # The stock-script shape: the training rows with eval_dataset's transform, exactly as given explicitly.
        borrowed = trainer_for(model, tmp_path / "b", augmented, evaluated).gather_class_statistics()
        # No eval_dataset to borrow from: the training transform, said in one line.
        trainer_for(model, tmp_path / "c", augmented).gather_class_statistics()
        # statistics_dataset wins.
        chosen = trainer_for(model, tmp_path / "d", augmented, statistics_dataset=plain).gather_class_statistics()
    for stats in (borrowed, chosen):
        assert stats.counts == reference.counts == {0: 6, 1: 6}
        for c in (0, 1):
            torch.testing.assert_close(stats.means[c], reference.means[c], rtol=0, atol=1e-10)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("class statistics")]
    assert said[0].startswith("class statistics: on the 12 training images with eval_dataset's transform")
    assert said[1].startswith("class statistics: on train_dataset as given, with its training transform")
    assert said[2] == "class statistics: on statistics_dataset (12 images)."
    # A model that learned earlier tasks: their statistics are not the trainer's, so none are gathered.
    model.grow(2)
    assert trainer_for(model, tmp_path / "e", plain).gather_class_statistics() is None


def test_a_run_without_evaluation_continues_with_its_task_unscored(base_model_dir, folders, tmp_path, make_learner):
    train, test = first_two_classes(folders)
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    model.label_names = ["class_00", "class_01"]
    augmented, _, _ = views(model, train, test)
    out = tmp_path / "trainer"
    trainer = trainer_for(model, out, augmented)
    trainer.train()
    trainer.save_model()
    state = json.loads((out / "continual_state.json").read_text())
    assert state["accuracy_matrix"] == [[None]] and state["seen_accuracy"] == [None]
    assert state["label_names"] == ["class_00", "class_01"] and state["task_sizes"] == [2]
    assert sorted(load_checkpoint(out).statistics.classes) == [0, 1]
    kept = out.parent / "kept"
    shutil.copytree(out, kept)
    # A later save without statistics leaves no stale run state behind (nor in the manifest).
    trainer.class_statistics = None
    trainer.save_model()
    assert not {"class_statistics.safetensors", "continual_state.json"} & {p.name for p in out.iterdir()}
    assert verify_checkpoint(out) == [] and "continual_state.json" not in read_manifest(out)
    out = kept

    # Classes 2 and 3 from their own folders, the old test images given: the old task is scored from now on.
    new = tmp_path / "new"
    for split, source in zip(("train", "test"), folders, strict=True):
        for name in ("class_02", "class_03"):
            (new / split / name).mkdir(parents=True)
            for image in (source / name).iterdir():
                (new / split / name / image.name).write_bytes(image.read_bytes())
    tasks = TaskSequence.from_image_folders(new / "train", new / "test", init_cls=2, increment=2, min_classes=1)
    learner = make_learner(tasks, tmp_path / "continued", continue_from=out, old_test=test, num_train_epochs=1,
                           ca_samples_per_class=16, ca_epochs=1)
    result = learner.run()
    assert result.accuracy_matrix[0] == [None] and None not in result.accuracy_matrix[1]
    summary = result.summary()
    assert summary["accuracy_per_step"][0] is None
    assert summary["average_incremental_accuracy"] == pytest.approx(summary["last_accuracy"])
    metrics = json.loads((tmp_path / "continued" / "metrics.json").read_text())
    assert metrics["seen_accuracy"][0] is None and metrics["task_sizes"] == [2, 2]


def test_statistics_that_cannot_be_gathered_leave_a_model_folder_and_say_why(base_model_dir, folders, tmp_path,
                                                                             caplog):
    train, test = first_two_classes(folders)
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(3)  # a class the training data has no image of
    augmented, _, plain = views(model, train, test)
    trainer = trainer_for(model, tmp_path / "out", augmented)
    with caplog.at_level(logging.WARNING, logger="slca_peft"):
        trainer.train()
    assert trainer.class_statistics is None
    assert any("class 2 of task 0 has no training sample" in r.getMessage() and "model files only" in r.getMessage()
               for r in caplog.records)
    trainer.save_model()
    assert not (tmp_path / "out" / "continual_state.json").exists()
    assert (tmp_path / "out" / "slca_config.json").is_file()


def test_a_data_problem_of_one_process_stops_every_process_instead_of_hanging(base_model_dir, tmp_path, monkeypatch):
    """The other processes learn of it in one sum before the statistics' own sums (where they would wait)."""
    from slca_peft.method import gathering
    from slca_peft.method.statistics import ClassStatistics
    from slca_peft.utils.errors import UserError

    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    args = SLCAConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    batches = [{"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 0, 1])}]
    sums = []

    def another_process_failed(tensor):  # this process's flag, plus one process that failed
        sums.append(tensor.clone())
        return tensor + 1

    monkeypatch.setattr(gathering, "sum_over_processes", another_process_failed)
    statistics = ClassStatistics(model.feature_dim)
    with pytest.raises(UserError, match="1 other process"):
        gathering.add_class_statistics(statistics, model, args, batches, 0, [0, 1])
    assert len(sums) == 1 and statistics.classes == []  # nothing finalized, no further sum to wait in

    def outside(labels):
        raise UserError("label 7 is outside the task")

    sums.clear()
    with pytest.raises(UserError, match="label 7"):  # the process that found it raises its own error, after the sum
        gathering.add_class_statistics(ClassStatistics(model.feature_dim), model, args, batches, 0, [0, 1], outside)
    assert len(sums) == 1 and sums[0].item() == 1.0


def test_the_task_history_names_classes_by_id_when_the_model_has_no_names(base_model_dir, folders, tmp_path):
    train, _ = first_two_classes(folders)
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(3)
    model.class_ids = [2, 0, 1]  # learned in another order than the ids
    assert trainer_for(model, tmp_path / "a", train).task_history()["label_names"] == ["class_0", "class_1",
                                                                                       "class_2"]
    gaps = SLCAModel.from_backbone(str(base_model_dir))
    gaps.grow(2)
    gaps.class_ids = [7, 5]
    names = trainer_for(gaps, tmp_path / "b", train).task_history()["label_names"]
    assert names == [f"class_{k}" for k in range(8)]  # entry k names id k, each once


def test_an_accuracy_reported_in_percent_stays_in_percent():
    from slca_peft.method.trainer_checkpoint import _as_percent

    assert _as_percent(0.8, [{"eval_accuracy": 0.8}, {"eval_accuracy": 0.5}]) == pytest.approx(80.0)
    assert _as_percent(0.8, [{"eval_accuracy": 55.0}, {"eval_accuracy": 0.8}]) == pytest.approx(0.8)
    assert _as_percent(1.0, [{"eval_accuracy": 1.0}]) == pytest.approx(100.0)
    assert _as_percent(120.0, [{"eval_accuracy": 120.0}]) is None
