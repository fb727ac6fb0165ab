"""The continual loop's hooks, its tracker run and its output: callbacks see each task once, in order,
after alignment; TensorBoard gets one run with a step that keeps counting; nothing is logged twice."""

import ast
import json
from pathlib import Path

import pytest
from conftest import ROOT, recipe_argv

from slca_peft import TaskSequence
from slca_peft.artifacts.layout import task_dir_name
from slca_peft.continual.callbacks import ContinualCallback, load_callback
from slca_peft.continual.steps import CheckpointStep, EvaluationStep, ReportStep, StatisticsStep


class Recorder(ContinualCallback):
    """Records every hook call, the accuracy row and the head scales it sees."""

    def __init__(self):
        self.calls: list[tuple[str, int | None]] = []
        self.rows: list[list[float]] = []
        self.scales: list[list[float]] = []

    def on_run_begin(self, learner):
        self.calls.append(("run_begin", None))

    def on_task_begin(self, learner, task):
        self.calls.append(("task_begin", task.task_id))

    def on_evaluate(self, learner, task, metrics):
        self.calls.append(("evaluate", task.task_id))
        self.rows.append([metrics[f"accuracy_task_{j + 1}"] for j in range(task.task_id + 1)])

    def on_task_end(self, learner, task):
        self.calls.append(("task_end", task.task_id))
        self.scales.append(learner.model.classifier.scales.tolist())
        assert (learner.output_dir / task_dir_name(task.task_id) / "continual_state.json").is_file()

    def on_run_end(self, learner, result):
        self.calls.append(("run_end", None))


class Failing(ContinualCallback):
    def on_task_end(self, learner, task):
        raise KeyError("replay buffer full")


def tasks(image_folders):
    return TaskSequence.from_image_folders(*image_folders, init_cls=2, increment=2, seed=1993)


@pytest.mark.slow
def test_a_user_callback_is_called_once_per_task_in_order_after_alignment(tmp_path, make_learner, image_folders):
    recorder = Recorder()
    learner = make_learner(tasks(image_folders), tmp_path / "run", num_train_epochs=1, callbacks=[recorder])
    result = learner.run()
    assert recorder.calls == [
        ("run_begin", None),
        ("task_begin", 0), ("evaluate", 0), ("task_end", 0),
        ("task_begin", 1), ("evaluate", 1), ("task_end", 1),
        ("task_begin", 2), ("evaluate", 2), ("task_end", 2),
        ("run_end", None),
    ]
    assert recorder.rows == result.accuracy_matrix
    # After alignment, SLCA++ scales old heads by 1 + mu_s (T_old - j): the hook sees the aligned model.
    expected = [[1.0], [1.02, 1.0], [1.04, 1.02, 1.0]]
    assert [len(s) for s in recorder.scales] == [1, 2, 3]
    assert [v for s in recorder.scales for v in s] == pytest.approx([v for s in expected for v in s])
    # ... and the next task starts from the unaligned heads again.
    assert learner.model.classifier.scales.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_a_failing_callback_stops_the_run_and_is_named(tmp_path, make_learner, image_folders):
    learner = make_learner(tasks(image_folders), tmp_path / "run", num_train_epochs=1, ca_epochs=1,
                           callbacks=[Failing()])
    with pytest.raises(RuntimeError, match=r"continual callback Failing\.on_task_end failed: KeyError"):
        learner.run()
    assert len(learner.result.accuracy_matrix) == 1  # stopped after the first task


def test_callbacks_are_refused_when_they_are_neither_kind(tmp_path, make_learner, image_folders):
    with pytest.raises(TypeError, match="ContinualCallback or TrainerCallback"):
        make_learner(tasks(image_folders), tmp_path / "run", callbacks=[object()])


class FixedScores(ContinualCallback):
    """Stands in for the evaluation step: appends a made-up row and fires on_evaluate as it does."""

    def on_task_end(self, learner, task):
        t = task.task_id
        learner.result.accuracy_matrix.append([float(10 * t + j) for j in range(t + 1)])
        learner.result.seen_accuracy.append(float(t))
        learner.result.task_test_sizes = [1] * (t + 1)
        learner.call_event("on_evaluate", task, EvaluationStep.continual_metrics(learner))


@pytest.mark.slow
def test_a_built_in_step_is_replaced_in_place_or_removed(tmp_path, make_learner, image_folders):
    recorder = Recorder()
    learner = make_learner(tasks(image_folders), tmp_path / "run", num_train_epochs=1, ca_epochs=1,
                           callbacks=[recorder])
    statistics_step = learner.get_callback(StatisticsStep)
    assert learner.statistics is statistics_step.statistics  # the step owns them; the learner forwards
    learner.replace_callback(EvaluationStep, FixedScores())
    checkpoint = learner.pop_callback(CheckpointStep)
    learner.remove_callback(ReportStep)
    assert isinstance(checkpoint, CheckpointStep) and learner.pop_callback(CheckpointStep) is None
    assert [type(c).__name__ for c in learner.callbacks] == [
        "StatisticsStep", "AlignmentStep", "FixedScores", "PushStep", "TrackerStep", "Recorder"]
    with pytest.raises(ValueError, match=r"no callback CheckpointStep to replace; the learner runs \['Statis"):
        learner.replace_callback(CheckpointStep, FixedScores())
    learner.callbacks.remove(recorder)  # the Recorder checks for checkpoints, which are gone
    result = learner.run()
    assert result.accuracy_matrix == [[0.0], [10.0, 11.0], [20.0, 21.0, 22.0]]
    assert learner.statistics.classes == [0, 1, 2, 3, 4, 5]
    assert not (tmp_path / "run" / "metrics.json").exists() and not list((tmp_path / "run").glob("task_*"))


def test_load_callback_by_import_path():
    assert isinstance(load_callback("slca_peft.continual.callbacks:ContinualCallback"), ContinualCallback)
    with pytest.raises(ValueError, match="cannot be imported"):
        load_callback("slca_peft.continual.callbacks:Missing")


def _scalars(log_dir: Path) -> tuple[dict[str, list[int]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in tags["scalars"]}, tags["images"]


@pytest.mark.slow
def test_one_tensorboard_run_with_continual_metrics_and_a_global_step(tmp_path, make_learner, image_folders):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    learner = make_learner(tasks(image_folders), out, num_train_epochs=2, ca_epochs=1, report_to="tensorboard",
                           logging_steps=1)
    learner.run()
    event_dirs = {p.parent for p in out.rglob("events.out.tfevents.*")}
    assert len(event_dirs) == 1, event_dirs  # one run for the whole stream
    scalars, images = _scalars(event_dirs.pop())
    for key in ("seen_accuracy", "last_accuracy", "average_incremental_accuracy", "average_forgetting",
                "backward_transfer", "accuracy_task_1"):
        steps = scalars[f"eval/{key}"]
        assert steps == sorted(set(steps)), (key, steps)
    assert len(scalars["eval/seen_accuracy"]) == 3 and len(scalars["eval/accuracy_task_3"]) == 1
    # The trainer's loss keeps counting across tasks: the step never restarts.
    loss_steps = scalars["train/loss"]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] > 2 * loss_steps[0]
    # Each task's metrics are logged at the step its training ended.
    assert scalars["eval/seen_accuracy"][-1] == loss_steps[-1]
    assert "eval/accuracy_matrix" in images
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 3
    assert (out / "accuracy_matrix.png").is_file() and (out / "results.md").is_file()


def test_no_module_outside_the_streams_branches_on_the_kind_of_stream():
    """Class- and domain-incremental runs go through the same loop code."""
    offenders = []
    for path in sorted((ROOT / "slca_peft").rglob("*.py")):
        if path.name in ("tasks.py", "domains.py", "continuation.py", "__init__.py", "recipe.py"):
            continue  # the streams themselves; the package exports; the recipe builds the stream it is asked for
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "getattr", "hasattr"):
                text = ast.unparse(node)
                if any(word in text for word in ("DomainSequence", "TaskSequence", "domain")):
                    offenders.append(f"{path.name}: {text}")
            if isinstance(node, (ast.Name, ast.Attribute)):
                name = node.id if isinstance(node, ast.Name) else node.attr
                if name in ("DomainSequence", "domain_incremental"):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


@pytest.mark.slow
def test_recipe_output_has_no_line_twice(recipe, tmp_path, base_model_dir, image_folders, capsys):
    for out in (tmp_path / "run", tmp_path / "run2"):  # two runs in one process
        recipe.main(recipe_argv(base_model_dir, image_folders, out, "--increment", "3", init_cls=3))
    out = capsys.readouterr().out
    task_lines = [line.split(": ", 1)[1] for line in out.splitlines() if "| seen classes" in line]
    # Two runs of two tasks each: four task lines, none repeated within a run (the handler is added once).
    assert len(task_lines) == 4 and task_lines[0].startswith("task 1/2") and task_lines[1].startswith("task 2/2")
    assert out.count("Last-Acc") == 2


# ---------------------------------------------------------------------- steps own what they hold
class HoldsTracker(ContinualCallback):
    """Keeps the tracker the run had, and records on_exception."""

    def __init__(self, fail_on_exception: bool = False):
        self.tracker = None
        self.errors: list[str] = []
        self.fail_on_exception = fail_on_exception

    def on_run_begin(self, learner):
        self.tracker = learner.tracker

    def on_exception(self, learner, error):
        self.errors.append(type(error).__name__)
        if self.fail_on_exception:
            raise OSError("disk full while closing")


def _tensorboard_writer_open(tracker) -> bool:
    return any(getattr(c, "tb_writer", None) is not None for c in tracker.callbacks)


def tiny_tasks(folders):
    return TaskSequence.from_image_folders(*folders, init_cls=2, increment=2, seed=1993)


def test_removing_the_report_step_still_closes_the_trackers_at_run_end(tmp_path, make_learner, tiny_image_folders):
    pytest.importorskip("tensorboard")
    holder = HoldsTracker()
    learner = make_learner(tiny_tasks(tiny_image_folders), tmp_path / "run", num_train_epochs=1, ca_epochs=1,
                           ca_samples_per_class=16, report_to="tensorboard", callbacks=[holder])
    learner.remove_callback(ReportStep)
    assert learner.tracker is None  # built when the run begins, by the TrackerStep
    learner.run()
    assert holder.tracker is not None and holder.tracker.callbacks  # the trainers reported to it ...
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert not _tensorboard_writer_open(holder.tracker)  # ... and it was closed at the end
    assert learner.tracker is None and not (tmp_path / "run" / "metrics.json").exists()


def test_a_failing_run_closes_the_trackers_and_every_callback_hears_of_it(tmp_path, make_learner,
                                                                         tiny_image_folders, caplog):
    pytest.importorskip("tensorboard")
    first, second = HoldsTracker(fail_on_exception=True), HoldsTracker()
    learner = make_learner(tiny_tasks(tiny_image_folders), tmp_path / "run", num_train_epochs=1, ca_epochs=1,
                           ca_samples_per_class=16, report_to="tensorboard", callbacks=[first, Failing(), second])
    with caplog.at_level("WARNING", logger="slca_peft.continual.callbacks"):
        with pytest.raises(RuntimeError, match=r"Failing\.on_task_end failed: KeyError"):  # the run's error
            learner.run()
    assert first.errors == second.errors == ["RuntimeError"]  # one on_exception failing does not stop the others
    assert "HoldsTracker.on_exception failed after RuntimeError: OSError: disk full" in caplog.text
    assert not _tensorboard_writer_open(first.tracker) and learner.tracker is None


def test_without_the_tracker_step_nothing_reports_to_trackers(tmp_path, make_learner, tiny_image_folders):
    from slca_peft.continual.steps import TrackerStep

    learner = make_learner(tiny_tasks(tiny_image_folders), tmp_path / "run", num_train_epochs=1, ca_epochs=1,
                           ca_samples_per_class=16, report_to="tensorboard")
    learner.remove_callback(TrackerStep)
    learner.run()
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))  # the task trainers' trackers are off too
    assert (tmp_path / "run" / "metrics.json").is_file()  # the ReportStep reports to the log and files only


def test_push_to_hub_is_checked_when_the_run_begins_and_a_step_added_later_makes_its_statistics(
        tmp_path, make_learner, tiny_image_folders, hub):
    learner = make_learner(tiny_tasks(tiny_image_folders), tmp_path / "run", push_to_hub=True)  # built: no check
    with pytest.raises(ValueError, match="push_to_hub is on but its base model is the local path"):
        learner.run()
    assert not (tmp_path / "run").exists() and learner.model.classifier.num_tasks == 0  # before any training
    learner = make_learner(tiny_tasks(tiny_image_folders), tmp_path / "run", num_train_epochs=1, ca_epochs=1,
                           ca_samples_per_class=16, ca_covariance_form="diagonal")
    learner.replace_callback(StatisticsStep, StatisticsStep())  # no statistics yet: made when the run begins
    assert learner.statistics is None
    learner.run()
    assert learner.statistics.covariance_form == "diagonal" and learner.statistics.classes == [0, 1, 2, 3]


def test_the_alignment_step_owns_the_unaligned_heads_and_puts_them_back_after_growing():
    import torch

    from slca_peft.continual.steps import AlignmentStep
    from slca_peft.models.head import ContinualClassifier

    class Learner:  # what the step reads of a learner
        def __init__(self, classifier):
            self.model = type("Model", (), {"classifier": classifier})()

    torch.manual_seed(0)
    classifier = ContinualClassifier(8)
    classifier.grow(3)
    step = AlignmentStep()
    step.unaligned_head = classifier.snapshot()
    with torch.no_grad():  # as alignment does: other weights, other scales
        classifier.heads[0].weight.mul_(3)
        classifier.scales.fill_(1.5)
    reference = ContinualClassifier(8)
    reference.grow(3)
    reference.restore(step.unaligned_head)
    torch.manual_seed(1)
    reference.grow(2)
    torch.manual_seed(1)
    classifier.grow(2)
    step.restore(Learner(classifier))  # after the next task's head was grown: it keeps its new weights
    for key, value in reference.state_dict().items():
        assert torch.equal(classifier.state_dict()[key], value), key
    assert not classifier.heads[0].weight.requires_grad and classifier.heads[1].weight.requires_grad
    with pytest.raises(ValueError, match="do not match this classifier"):
        step.unaligned_head = {"other.weight": torch.zeros(1)}
        step.restore(Learner(classifier))


def test_the_evaluation_makes_each_seen_task_s_test_view_once(monkeypatch):
    """`with_transform` fingerprints the transform (tens of ms): made once per task, not after every task."""
    from types import SimpleNamespace

    from datasets import Dataset

    made = []
    original = Dataset.with_transform
    monkeypatch.setattr(Dataset, "with_transform", lambda self, *a, **k: made.append(1) or original(self, *a, **k))
    tests = [Dataset.from_dict({"image": [j, j], "label": [j, j]}) for j in range(3)]
    learner = SimpleNamespace(eval_transform=lambda batch: batch)
    step = EvaluationStep()
    views = [[step.test_view(learner, j, tests[j]) for j in range(t + 1)] for t in range(3)]  # after each task
    assert len(made) == 3 and all(views[2][j] is views[j][j] for j in range(3))
    assert views[2][1]["image"] == [1, 1]
    learner.eval_transform = lambda batch: dict(batch)  # another transform, or other data: a new view
    assert step.test_view(learner, 0, tests[0]) is not views[0][0] and len(made) == 4
    assert step.test_view(learner, 0, tests[1])["image"] == [1, 1] and len(made) == 5
    step.on_run_end(learner, None)
    step.test_view(learner, 0, tests[1])
    assert len(made) == 6
