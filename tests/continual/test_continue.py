"""Continue learning later: a checkpoint goes on with new classes from new data (ContinuedStream,
ContinualLearner.from_pretrained, the recipe's --continue_from)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import recipe_argv, write_image_folder

from slca_peft import EvalTransform, ImageTransformConfig, TaskSequence, export_model
from slca_peft.continual import load_checkpoint
from slca_peft.data.continuation import ContinuedStream
from slca_peft.data.formats import load_split_image_folders
from slca_peft.method.statistics import ClassStatistics
from slca_peft.metrics import summarize_accuracy_matrix
from slca_peft.utils.errors import UserError

SETTINGS = dict(use_cpu=True, num_train_epochs=2, per_device_train_batch_size=8, learning_rate=0.05, ca_lr=0.01,
                seed=0, disable_tqdm=True, report_to="none", ca_samples_per_class=32, ca_batch_size=32, ca_epochs=2,
                init_cls=2, increment=2)


def copy_classes(src: Path, dst: Path, names: list[str]) -> Path:
    for name in names:
        shutil.copytree(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Six classes; set A (class_00..03) and set B (class_04, class_05) as separate image folders."""
    root = tmp_path_factory.mktemp("continue")
    full = {split: write_image_folder(root / "full" / split, 6, per_class=n, seed=s)
            for split, n, s in (("train", 8, 1), ("test", 3, 2))}
    a_names, b_names = [f"class_{k:02d}" for k in range(4)], ["class_04", "class_05"]
    sets = {"full": (full["train"], full["test"])}
    for key, names in (("a", a_names), ("b", b_names)):
        sets[key] = tuple(copy_classes(full[split], root / key / split, names) for split in ("train", "test"))
    return sets


def sequence(pair, seed=None):
    return TaskSequence.from_image_folders(*pair, init_cls=2, increment=2, seed=seed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folders, make_learner, frozen_gc):
    """An uninterrupted run over all six classes, and phase 1 over set A (two tasks)."""
    root = tmp_path_factory.mktemp("runs")
    full = make_learner(sequence(folders["full"]), root / "full", **SETTINGS)
    full.run()
    phase1 = make_learner(sequence(folders["a"]), root / "phase1", **SETTINGS)
    phase1.run()
    return {"root": root, "full": full, "phase1": phase1, "checkpoint": root / "phase1" / "task_2"}


def old_test_data(folders):
    return load_split_image_folders(*folders["a"])["test"]


@pytest.mark.slow
def test_continuing_with_the_next_classes_ends_like_the_uninterrupted_run(runs, folders, tmp_path, make_learner):
    learner = make_learner(sequence(folders["b"]), tmp_path / "phase2", continue_from=runs["checkpoint"],
                           old_test=old_test_data(folders), **SETTINGS)
    assert len(learner.result.accuracy_matrix) == 2  # the learned tasks' rows come with the checkpoint
    learned_timings = json.loads((runs["checkpoint"] / "continual_state.json").read_text())["timings"]
    assert learner.result.timings == learned_timings and len(learned_timings) == 2 and all(learned_timings)  # and times
    result = learner.run()
    full = runs["full"]
    assert result.accuracy_matrix == full.result.accuracy_matrix
    assert result.seen_accuracy == full.result.seen_accuracy
    ours, theirs = learner.model.state_dict(), full.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for c in range(6):
        assert torch.equal(learner.statistics.means[c], full.statistics.means[c])
        assert torch.equal(learner.statistics.covariances[c], full.statistics.covariances[c])

    # The final checkpoint knows every class by name; the old ones kept their ids.
    final = tmp_path / "phase2" / "task_3"
    model, stats, state, _ = load_checkpoint(final)
    names = [f"class_{k:02d}" for k in range(6)]
    assert model.label_names == state["label_names"] == names
    assert state["class_order"] == [0, 1, 2, 3, 4, 5] and state["task_sizes"] == [2, 2, 2]
    assert sorted(stats.classes) == list(range(6))
    assert state["task_data"][:2] == [None, None] and len(state["segments"]) == 2
    assert state["segments"][1]["first_task"] == 2 and state["segments"][1]["continued_from"] == str(runs["checkpoint"])
    card = (final / "README.md").read_text()
    assert "class_05" in card and "class_00" in card


@pytest.mark.slow
def test_damaged_timings_in_the_continued_checkpoint_are_one_error_naming_it(runs, folders, tmp_path, make_learner):
    copy = tmp_path / "ck"
    shutil.copytree(runs["checkpoint"], copy)
    state = json.loads((copy / "continual_state.json").read_text())
    (copy / "continual_state.json").write_text(json.dumps({**state, "timings": 5}))
    with pytest.raises(ValueError, match=rf"{copy}.*timings must be a list"):
        make_learner(sequence(folders["b"]), tmp_path / "phase2", continue_from=copy, **SETTINGS)


@pytest.mark.slow
def test_export_after_continuation_names_classes_of_both_sets(runs, folders, tmp_path, make_learner):
    from transformers import pipeline

    learner = make_learner(sequence(folders["b"]), tmp_path / "phase2", continue_from=runs["checkpoint"],
                           old_test=old_test_data(folders), **SETTINGS)
    result = learner.run()
    model, *_ = load_checkpoint(tmp_path / "phase2" / "task_3")
    model.eval()
    export_model(model, tmp_path / "exported")
    test = load_split_image_folders(*folders["full"])["test"]
    names = test.features["label"].names
    truth = [names[y] for y in test["label"]]
    pipe = pipeline("image-classification", model=str(tmp_path / "exported"), device="cpu")
    predicted = [r[0]["label"] for r in pipe(list(test["image"]), top_k=1)]
    assert set(predicted) <= set(names)
    assert set(predicted) & {"class_00", "class_01", "class_02", "class_03"} and set(predicted) & {"class_04",
                                                                                                   "class_05"}
    accuracy = 100.0 * np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
    assert accuracy == pytest.approx(result.seen_accuracy[-1], abs=100.0 / len(truth) + 1e-6)


@pytest.mark.slow
def test_without_the_old_test_data_old_tasks_are_missing_not_zero(runs, folders, tmp_path, hub, make_learner):
    push = dict(push_to_hub=True, hub_model_id="me/continued", hub_base_model_id="me/tiny-vit")
    new = sequence(folders["b"])
    new.source = "me/new-classes"
    learner = make_learner(new, tmp_path / "phase2", continue_from=runs["checkpoint"], **SETTINGS, **push)
    result = learner.run()
    # What going on again needs is pushed: statistics, unaligned heads, the history with each task's data.
    (upload,) = hub.uploads
    assert {"class_statistics.safetensors", "classifier_unaligned.safetensors", "continual_state.json",
            "README.md"} <= set(upload["files"])
    pushed = upload["json"]["continual_state.json"]
    assert pushed["task_data"] == [None, None, "me/new-classes"] and pushed["accuracy_matrix"][2][:2] == [None, None]
    assert "| 3 | class_04, class_05 | me/new-classes |" in upload["card"]
    assert "| 1 | class_00, class_01 | not recorded |" in upload["card"]
    first = runs["phase1"].result
    assert result.accuracy_matrix[:2] == first.accuracy_matrix
    last = result.accuracy_matrix[2]
    assert last[:2] == [None, None] and 0.0 <= last[2] <= 100.0
    assert result.seen_accuracy[2] == last[2]  # over the measured task only
    summary = result.summary()
    assert summary["missing_entries"] == 2 and summary["forgetting_tasks"] == []
    assert summary["last_accuracy"] == pytest.approx(last[2])
    metrics = json.loads((tmp_path / "phase2" / "metrics.json").read_text())
    assert metrics["accuracy_matrix"][2][:2] == [None, None] and metrics["missing_entries"] == 2
    state = json.loads((tmp_path / "phase2" / "task_3" / "continual_state.json").read_text())
    assert state["accuracy_matrix"][2][:2] == [None, None]
    card = (tmp_path / "phase2" / "task_3" / "README.md").read_text()
    assert "| 3 | — | — |" in card and "measured entries only" in card
    # A checkpoint with missing entries goes on again (a second continuation), history growing.
    load_checkpoint(tmp_path / "phase2" / "task_3")


def test_summaries_are_over_the_measured_entries():
    matrix = [[90.0], [70.0, 80.0], [None, None, 60.0], [None, 50.0, 40.0, 30.0]]
    summary = summarize_accuracy_matrix(matrix, [10, 10, 10, 20])
    assert summary["accuracy_per_step"] == pytest.approx([90.0, 75.0, 60.0, (500 + 400 + 600) / 40])
    assert summary["forgetting_tasks"] == [1, 2] and summary["missing_entries"] == 3
    assert summary["average_forgetting"] == pytest.approx(((80 - 50) + (60 - 40)) / 2)
    assert summary["backward_transfer"] == pytest.approx(((50 - 80) + (40 - 60)) / 2)
    with pytest.raises(ValueError, match="no measured entry"):
        summarize_accuracy_matrix([[90.0], [None, None]], [1, 1])
    # A step scored on no task (a trainer run without evaluation, continued): left out of Inc-Acc.
    summary = summarize_accuracy_matrix([[None], [60.0, 80.0]], [10, 10])
    assert summary["accuracy_per_step"] == [None, 70.0] and summary["average_incremental_accuracy"] == 70.0


def phase1_state(runs):
    return load_checkpoint(runs["checkpoint"])[2]


@pytest.mark.slow
def test_a_new_class_named_like_a_learned_one_is_refused(runs, folders, tmp_path):
    clash = copy_classes(folders["full"][0], tmp_path / "train", ["class_01", "class_04", "class_05"])
    clash_test = copy_classes(folders["full"][1], tmp_path / "test", ["class_01", "class_04", "class_05"])
    new = TaskSequence.from_image_folders(clash, clash_test, init_cls=3, increment=1, seed=None)
    with pytest.raises(ValueError, match=r"class\(es\) \['class_01'\] are already learned \(class ids \[1\]\).*"
                                         "merge_existing_classes"):
        ContinuedStream(phase1_state(runs), new)
    # Asked to, the images go to the learned class: no second output, ids of the new classes follow.
    stream = ContinuedStream(phase1_state(runs), new, merge_existing_classes=True)
    assert stream.label_names[4:] == ["class_04", "class_05"] and stream.class_ids == [0, 1, 2, 3, 4, 5]
    assert stream.task_sizes == [2, 2, 2]
    task = stream[2]
    assert task.head_size == 2 and task.merged_classes == [1] and sorted(task.classes) == [1, 4, 5]
    assert set(task.train["label"]) == {4, 5} and set(task.statistics_data["label"]) == {1, 4, 5}
    # A new task made only of learned classes would add no output: refused, naming them.
    only = TaskSequence.from_image_folders(clash, clash_test, init_cls=1, increment=2, seed=None)
    with pytest.raises(ValueError, match=r"only adds images to the learned class\(es\) \['class_01'\]"):
        ContinuedStream(phase1_state(runs), only, merge_existing_classes=True)


@pytest.mark.slow
def test_merging_into_a_learned_class_adds_its_statistics_exactly(runs, folders, tmp_path, make_learner):
    clash = copy_classes(folders["full"][0], tmp_path / "train", ["class_01", "class_04", "class_05"])
    clash_test = copy_classes(folders["full"][1], tmp_path / "test", ["class_01", "class_04", "class_05"])
    new = TaskSequence.from_image_folders(clash, clash_test, init_cls=3, increment=1, seed=None)
    learner = make_learner(new, tmp_path / "merged", continue_from=runs["checkpoint"], merge_existing_classes=True,
                           **SETTINGS)
    before = learner.statistics
    old_count, old_mean = before.counts[1], before.means[1].clone()
    old_scatter = (before.covariances[1] - before.ridge * torch.eye(before.feature_dim, dtype=torch.float64)) * (
        old_count - 1)
    learner.run()
    stats = learner.statistics
    assert learner.model.classifier.task_sizes == [2, 2, 2]  # no second output for class_01
    assert stats.task_of_class[1] == 0 and stats.counts[1] == old_count + 8
    # The statistics pass read the merged class's images too (3 classes x 8), training only the new ones.
    assert learner.result.timings[-1]["statistics_images"] == 24
    assert learner.result.timings[-1]["training_images"] == 2 * 16
    # The merged Gaussian is the one of the union: old sums plus the new images' features.
    from slca_peft.models.inference import inference_context

    tc = ImageTransformConfig.from_model_config(learner.model.config)
    transform = EvalTransform(tc)
    images = [im for im, y in zip(new.train["image"], new.train["label"], strict=True) if y == 0]
    with torch.no_grad(), inference_context(learner.model, learner.args) as model:
        # The statistics were computed before alignment changed the heads; features do not depend on them.
        feats = model.features(torch.stack([transform(im) for im in images])).double()
    n = old_count + len(images)
    mean = (old_mean * old_count + feats.sum(0)) / n
    outer = old_scatter + old_count * torch.outer(old_mean, old_mean) + feats.T @ feats
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1) + stats.ridge * torch.eye(stats.feature_dim,
                                                                                     dtype=torch.float64)
    torch.testing.assert_close(stats.means[1], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.covariances[1], cov, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_task_of_one_new_class_says_that_only_alignment_fits_it(runs, folders, tmp_path, make_learner):
    import logging

    learner = make_learner(TaskSequence.from_image_folders(*folders["b"], init_cls=1, increment=1, seed=None),
                           tmp_path / "one", continue_from=runs["checkpoint"], **SETTINGS)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("slca_peft").addHandler(handler)
    try:
        learner.run()
    finally:
        logging.getLogger("slca_peft").removeHandler(handler)
    messages = [r.getMessage() for r in records if "one new class" in r.getMessage()]
    assert [m.split(" brings")[0] for m in messages] == ["task 3", "task 4"]
    assert learner.model.classifier.task_sizes == [2, 2, 1, 1]


def test_reopened_statistics_equal_those_of_the_union():
    torch.manual_seed(0)
    for form in ("exact", "full"):
        for d in (8, 150):  # 150: more than one block of the outer-product layout
            a, b = torch.randn(30, d) * 2 + 1, torch.randn(12, d) + 3
            merged = ClassStatistics(d, covariance_form=form)
            merged.update(a, torch.zeros(30))
            merged.finalize(0, [0])
            merged.reopen([0])
            merged.update(b, torch.zeros(12))
            merged.finalize(3, [0])
            union = ClassStatistics(d, covariance_form=form)
            union.update(torch.cat([a, b]), torch.zeros(42))
            union.finalize(0, [0])
            assert merged.task_of_class == {0: 0} and merged.counts == {0: 42}
            torch.testing.assert_close(merged.means[0], union.means[0], rtol=0, atol=1e-12)
            torch.testing.assert_close(merged.covariances[0], union.covariances[0], rtol=0, atol=1e-10)


def test_a_continuation_without_new_data_is_refused_in_one_line_not_given_the_demo(recipe, tmp_path):
    out = ["--output_dir", str(tmp_path / "e8"), "--use_cpu", "true", "--num_train_epochs", "1"]
    for flags in (["--continue_from", "me/model"], ["--continue_from=me/model", "--old_test_dir", "old/test"]):
        with pytest.raises(UserError, match=r"--continue_from needs the new data .*--train_dir DIR --test_dir DIR"
                                            r".* or --dataset NAME") as refused:
            recipe.parse_args(flags + out)
        assert "\n" not in str(refused.value)
    # Any flag naming the user's data, model or checkpoint switches the demo off; its refusal names the fix.
    with pytest.raises(UserError, match="--resume_from goes on with the run's own data"):
        recipe.parse_args(["--resume_from", "auto", *out])
    for flag in ("--data_dir", "--test-dir"):
        with pytest.raises(UserError, match="give --dataset NAME, both --train_dir and --test_dir"):
            recipe.parse_args([flag, str(tmp_path), "--model_name_or_path", "google/vit-base-patch16-224", *out])
    # The demo itself, tuned by flags or resumed in its own output directory, still loads its config.
    for argv in (["--num_train_epochs", "1"], ["--resume_from", "auto"]):
        _, data_args, args = recipe.parse_args(argv)
        assert data_args.dataset == "digits" and args.output_dir == "outputs/demo_digits"
    # A demo run in another output directory resumes as the demo with the same command; another run there does not.
    from conftest import ROOT

    demo, other = tmp_path / "demo_run", tmp_path / "other_run"
    for folder, base in ((demo, ROOT / "recipes" / "assets" / "tiny_vit_letters"), (other, tmp_path / "mine")):
        folder.mkdir()
        (folder / "run_fingerprint.json").write_text(json.dumps({"base_model": str(base)}))
    _, data_args, args = recipe.parse_args(["--resume_from", "auto", "--output_dir", str(demo)])
    assert data_args.dataset == "digits" and args.output_dir == str(demo)
    with pytest.raises(UserError, match="--resume_from goes on with the run's own data"):
        recipe.parse_args(["--resume_from", "auto", "--output_dir", str(other)])


#: Tasks of one class; no --model_name_or_path: a continuation takes the checkpoint's base model.
FLAGS = dict(init_cls=1, increment=1, learning_rate=0.05, ca_samples_per_class=16, ca_batch_size=None,
             crop_scale_min=0.8, horizontal_flip=False, seed=0)


@pytest.mark.slow
def test_the_recipe_continues_a_checkpoint_and_resumes_the_continuation(recipe, runs, folders, base_model_dir,
                                                                          tmp_path):
    out = tmp_path / "next"
    args = recipe_argv(None, folders["b"], out, "--continue_from", str(runs["checkpoint"]),
                       "--old_test_dir", str(folders["a"][1]), "--class_order_seed", "7", **FLAGS)
    summary = recipe.main(args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(row) for row in metrics["accuracy_matrix"]] == [1, 2, 3, 4]
    assert None not in metrics["accuracy_matrix"][-1]  # the old test data was given
    assert metrics["task_sizes"] == [2, 2, 1, 1]
    state = json.loads((out / "task_4" / "continual_state.json").read_text())
    assert state["label_names"][:4] == [f"class_{k:02d}" for k in range(4)]
    assert sorted(state["label_names"][4:]) == ["class_04", "class_05"]
    assert state["class_ids"][:4] == [0, 1, 2, 3] and sorted(state["class_ids"][4:]) == [4, 5]
    assert state["task_data"][2:] == [f"image folders {folders['b'][0]}, {folders['b'][1]}"] * 2
    fingerprint = json.loads((out / "run_fingerprint.json").read_text())
    assert fingerprint["continue_from"] == str(runs["checkpoint"]) and len(fingerprint["continue_sha256"]) == 64

    assert fingerprint["base_model"] is None  # the checkpoint names its base

    # The same command again reports the finished continuation (all its tasks, old and new), as does
    # --resume_from auto; nothing is trained or written.
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    without_source = list(args)
    i = without_source.index("--continue_from")
    del without_source[i : i + 2]
    for again in (args, without_source + ["--resume_from", "auto"]):
        assert recipe.main(again) == summary
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == written

    # An interrupted continuation: the same command says how to resume it, which resumes it exactly.
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    shutil.rmtree(partial / "task_4")
    (partial / "metrics.json").unlink()
    with pytest.raises(UserError, match="continue it with --resume_from auto in place of --continue_from"):
        recipe.main([a if a != str(out) else str(partial) for a in args])
    resumed = [a if a != str(out) else str(partial) for a in without_source]
    recipe.main(resumed + ["--resume_from", "auto"])
    assert json.loads((partial / "metrics.json").read_text())["accuracy_matrix"] == metrics["accuracy_matrix"]


@pytest.mark.slow
def test_a_continuation_preprocesses_as_the_checkpoint_s_image_processor(recipe, folders, tmp_path, make_learner,
                                                                          monkeypatch):
    """A checkpoint whose image processor is not the recipe's (a stock script's ViTImageProcessor: resize to
    32 x 32, bilinear, its own normalisation) computed its statistics on that processor's pixels: the
    continuation's statistics, evaluation and written processor follow it, and the log says so."""
    import logging

    from transformers import ViTImageProcessor

    from slca_peft import ContinualLearner, TrainTransform
    from slca_peft.data.transforms import ProcessorTransform

    vit = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4] * 3, image_std=[0.3] * 3)
    first = make_learner(TaskSequence.from_image_folders(*folders["a"], init_cls=4, increment=4, seed=None),
                         tmp_path / "stock", **{**SETTINGS, "init_cls": 4, "increment": 4, "num_train_epochs": 1})
    first.set_transforms(TrainTransform(ImageTransformConfig.from_image_processor(vit), scale=(0.8, 1.0), flip_p=0.0),
                         ProcessorTransform(vit))
    first.run()
    checkpoint = tmp_path / "stock" / "task_1"
    written = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert written["image_processor_type"] == "ViTImageProcessor" and written["size"] == {"height": 32, "width": 32}

    used, original = [], ContinualLearner.set_transforms
    monkeypatch.setattr(ContinualLearner, "set_transforms",
                        lambda self, train, evaluation: (used.append((train, evaluation)),
                                                         original(self, train, evaluation))[1])
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logging.getLogger("slca_peft").addHandler(handler)
    out = tmp_path / "next"
    try:
        recipe.main(recipe_argv(None, folders["b"], out, "--continue_from", str(checkpoint),
                                "--brightness_jitter", "0.1", "--bf16", "false", **FLAGS))
    finally:
        logging.getLogger("slca_peft").removeHandler(handler)
    for task in ("task_2", "task_3"):
        assert json.loads((out / task / "preprocessor_config.json").read_text()) == written
    train, evaluation = used[-1]
    assert isinstance(evaluation, ProcessorTransform) and evaluation.processor.to_dict() == vit.to_dict()
    expected = ImageTransformConfig(size=32, mean=(0.4,) * 3, std=(0.3,) * 3)
    assert evaluation.config == expected and train.config == ImageTransformConfig(**{**vars(expected),
                                                                                     "brightness": 0.1})
    said = [r.getMessage() for r in records if r.getMessage().startswith("preprocessing:")]
    assert len(said) == 1 and "the checkpoint's image processor (ViTImageProcessor, resize" in said[0], said
    # The first new class's statistics are its training images' features under the checkpoint's processor.
    model, stats, state, _ = load_checkpoint(out / "task_2")
    class_id = state["class_ids"][4]
    train_images = load_split_image_folders(*folders["b"])["train"]
    label = train_images.features["label"].names.index(state["label_names"][class_id])
    images = [im for im, y in zip(train_images["image"], train_images["label"], strict=True) if y == label]
    with torch.no_grad():
        model.eval()
        feats = model.features(torch.stack([vit(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
                                            for im in images])).double()
    torch.testing.assert_close(stats.means[class_id], feats.mean(0), rtol=0, atol=1e-5)

    # In Python, an eval transform of other pixels than the checkpoint's processor is named in a warning.
    from slca_peft import SLCAConfig
    from slca_peft.data.transforms import checkpoint_eval_transform

    records.clear()
    logging.getLogger("slca_peft").addHandler(handler)
    try:
        for transform in (checkpoint_eval_transform(vit), EvalTransform(expected)):
            ContinualLearner.from_pretrained(checkpoint, SLCAConfig(output_dir=str(tmp_path / "py"), use_cpu=True),
                                             sequence(folders["b"]), eval_transform=transform)
    finally:
        logging.getLogger("slca_peft").removeHandler(handler)
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING and "preprocesses otherwise" in
              r.getMessage()]
    assert len(warned) == 1 and "ViTImageProcessor" in warned[0] and "CLIPImageProcessor" in warned[0], warned


@pytest.mark.slow
def test_continuing_from_an_edited_checkpoint_is_refused(recipe, runs, folders, base_model_dir, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(runs["checkpoint"], edited)
    state = json.loads((edited / "continual_state.json").read_text())
    state["accuracy_matrix"][-1][0] = 100.0  # a better-looking history
    (edited / "continual_state.json").write_text(json.dumps(state))
    out = tmp_path / "next"
    with pytest.raises(UserError, match="continual_state.json"):
        recipe.main(recipe_argv(None, folders["b"], out, "--continue_from", str(edited), **FLAGS))
    assert not (out / "task_3").exists()


@pytest.mark.slow
def test_the_recipe_refuses_a_continuation_it_cannot_make(recipe, runs, folders, base_model_dir, tmp_path):
    out = tmp_path / "next"
    base = recipe_argv(None, folders["b"], out, "--continue_from", str(runs["checkpoint"]), **FLAGS)
    with pytest.raises(UserError, match="--continue_from teaches .* --resume_from finishes"):
        recipe.parse_args(base + ["--resume_from", "auto"])
    with pytest.raises(UserError, match="--old_test_dir go with --continue_from"):
        recipe.parse_args(recipe_argv(None, folders["b"], out, "--model_name_or_path", str(base_model_dir),
                                      "--old_test_dir", "x", **FLAGS))
    with pytest.raises(ValueError, match="trained with method 'slca\\+\\+', not 'slca'"):
        recipe.main(base + ["--method", "slca"])
    with pytest.raises(ValueError, match="lora_layout='per_projection', this run asks for 'fused_qkv'"):
        recipe.main(base + ["--released_code", "true"])
    other = shutil.copytree(base_model_dir, tmp_path / "other-vit")
    with pytest.raises(ValueError, match="base_model_name_or_path is .* but this run uses .*; leave out "
                                         "--model_name_or_path"):
        recipe.main(base + ["--model_name_or_path", str(other)])
    clash = recipe_argv(None, folders["full"], out, "--continue_from", str(runs["checkpoint"]), **FLAGS)
    with pytest.raises(ValueError, match=r"\['class_00', 'class_01', 'class_02', 'class_03'\] are already learned"):
        recipe.main(clash)
    assert not out.exists()  # every refusal came before any training and left nothing


def test_new_classes_take_the_next_free_ids_in_their_own_label_order(folders):
    # A history cut with a class-order seed, written mid-stream: 1 of 2 tasks learned.
    previous = {"tasks_learned": 1, "task_sizes": [2, 2], "class_order": [2, 0, 3, 1],
                "label_names": ["class_00", "class_01", "class_02", "class_03"], "accuracy_matrix": [[80.0]],
                "seen_accuracy": [80.0], "task_test_sizes": [6], "seed": 1993, "init_cls": 2, "increment": 2}
    new = TaskSequence.from_image_folders(*folders["b"], init_cls=1, increment=1, seed=0)  # order [1, 0]
    stream = ContinuedStream(previous, new)
    assert new.order == [1, 0]
    # By class id: the learned 0 and 2, the skipped 1 (not learned, never will be), the new 3 and 4.
    assert stream.label_names == ["class_00", "class_01", "class_02", "class_04", "class_05"]
    assert stream.position_names == ["class_02", "class_00", "class_05", "class_04"]
    assert stream.train.features["label"].names == stream.position_names  # the data is labelled by position
    assert stream.class_ids == stream.order == [2, 0, 4, 3]  # next free after max(2, 0) = 2: ids 3, 4
    assert stream.task_sizes == [2, 1, 1] and stream.num_old_tasks == 1 and len(stream) == 3
    old, first_new = stream[0], stream[1]
    assert (old.classes, old.train, old.test) == ([0, 1], None, None)
    assert first_new.task_id == 1 and first_new.classes == [2] and set(first_new.train["label"]) == {2}
    described = stream.describe()
    assert [s["first_task"] for s in described["segments"]] == [0, 1]
    assert described["task_sizes"] == [2, 1, 1] and described["class_ids"] == [2, 0, 4, 3]


@pytest.mark.parametrize("clashing", [6, 13])
def test_the_already_learned_refusal_names_every_clash_or_counts_the_rest_on_one_line(clashing):
    import datasets
    from PIL import Image

    def split(names, per_class):
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        image = Image.new("RGB", (4, 4))
        rows = [(image, k) for k in range(len(names)) for _ in range(per_class)]
        return datasets.Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]},
                                          features=features)

    names = [f"c{k:02d}" for k in range(clashing)]
    previous = {"tasks_learned": 1, "task_sizes": [clashing], "class_order": list(range(clashing)),
                "label_names": names, "accuracy_matrix": [[80.0]], "seen_accuracy": [80.0],
                "task_test_sizes": [clashing], "seed": None, "init_cls": clashing, "increment": clashing}
    new = TaskSequence(split(names, 1), split(names, 1), init_cls=None, increment=None, seed=None)
    with pytest.raises(UserError) as refused:
        ContinuedStream(previous, new)
    message = str(refused.value)
    assert "\n" not in message and f"the new data's {clashing} class(es)" in message
    listed = [n for n in names if f"'{n}'" in message.split("are already learned")[0]]
    if clashing <= 10:  # a few: every one named
        assert listed == names
    else:  # many: the first ten named, the rest counted
        assert listed == names[:10] and f" and {clashing - 10} more are already learned" in message


def test_new_data_of_learned_classes_only_is_refused_as_adding_no_class():
    import datasets
    from PIL import Image

    def split(names):
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * len(names),
                                           "label": list(range(len(names)))}, features=features)

    names = ["c0", "c1", "c2"]
    previous = {"tasks_learned": 1, "task_sizes": [3], "class_order": [0, 1, 2], "label_names": names,
                "accuracy_matrix": [[80.0]], "seen_accuracy": [80.0], "task_test_sizes": [3], "seed": None,
                "init_cls": 3, "increment": 3}
    new = TaskSequence(split(names[1:]), split(names[1:]), init_cls=None, increment=None, seed=None)
    with pytest.raises(UserError, match=r"the new data holds no new class: its 2 class\(es\) \['c1', 'c2'\] are all "
                                        "already learned") as refused:
        ContinuedStream(previous, new, merge_existing_classes=True)
    assert "init_cls" not in str(refused.value)


def test_a_run_fingerprint_without_a_base_model_records_null(tmp_path):
    from slca_peft import SLCAConfig
    from slca_peft.artifacts.layout import FINGERPRINT_FILE
    from slca_peft.continual.fingerprint import read_fingerprint, run_fingerprint

    fingerprint = run_fingerprint(SLCAConfig(output_dir=str(tmp_path), use_cpu=True), base_model=None)
    assert fingerprint["base_model"] is None and fingerprint["base_model_sha256"] is None
    # A run directory written when a missing base was the string "None" still matches it.
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps({**fingerprint, "base_model": "None"}))
    assert read_fingerprint(tmp_path) == fingerprint


def test_the_checkpoint_s_processor_gives_the_eval_transform_of_its_pixels():
    from transformers import ViTImageProcessor

    from slca_peft.data.transforms import ProcessorTransform, checkpoint_eval_transform, eval_image_processor

    config = ImageTransformConfig(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    own = checkpoint_eval_transform(eval_image_processor(config))  # the processor slca-peft writes: its transform
    assert type(own) is EvalTransform and own.config == config
    vit = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    other = checkpoint_eval_transform(vit)  # another resize (32 x 32, bilinear): the processor itself
    assert isinstance(other, ProcessorTransform) and other.processor is vit and other.config == config
    from PIL import Image

    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3)).astype(np.uint8))
    assert torch.equal(other(image), vit(images=image, return_tensors="pt")["pixel_values"][0])
    assert not torch.allclose(other(image), own(image))
