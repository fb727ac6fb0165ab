"""Where a run's time goes: every phase of every task is timed, in the right phase, adds up to no more
than the run took, reaches metrics.json, results.md, the log and the trackers, and survives a resume."""

from __future__ import annotations

import json
import logging
import time

import pytest
from transformers import TrainerCallback

from slca_peft import TaskSequence
from slca_peft.continual.callbacks import ContinualCallback
from slca_peft.continual.steps import AlignmentStep
from slca_peft.sharing.report import write_report
from slca_peft.utils.timing import PHASES, checked_timings, finish_timing, phases_of, timing_summary, with_rates

pytestmark = pytest.mark.usefixtures("frozen_gc")

PAUSE = 0.3  # seconds a stand-in slows one phase by


def tasks(folders):
    return TaskSequence.from_image_folders(*folders, init_cls=2, increment=2, seed=1993)


class SlowTraining(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        time.sleep(PAUSE)


class SlowAlignment(AlignmentStep):
    def on_task_end(self, learner, task):
        time.sleep(PAUSE)
        super().on_task_end(learner, task)


@pytest.mark.slow
def test_every_phase_is_timed_where_it_runs_and_reported_everywhere(tmp_path, make_learner, tiny_image_folders,
                                                                    caplog):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    learner = make_learner(tasks(tiny_image_folders), out, num_train_epochs=2, ca_epochs=1, ca_samples_per_class=16,
                           report_to="tensorboard", callbacks=[SlowTraining()])
    learner.replace_callback(AlignmentStep, SlowAlignment())  # a subclass keeps the step's phase
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="slca_peft.continual.steps"):
        result = learner.run()
    wall = time.perf_counter() - start

    timings = result.timings
    assert len(timings) == 2
    for record in timings:
        assert all(record[f"{phase}_seconds"] > 0 for phase in PHASES), record
        # The pauses land in the phase they were put in.
        assert record["training_seconds"] >= PAUSE and record["alignment_seconds"] >= PAUSE
        # 2 epochs over 2 classes x 4 training images; the statistics pass sees each training image once.
        assert record["training_images"] == 16 and record["statistics_images"] == 8
    assert [r["evaluation_images"] for r in timings] == [4, 8]  # 2 test images per class, every seen task
    assert sum(v for r in timings for k, v in r.items() if k.endswith("_seconds")) <= wall

    metrics = json.loads((out / "metrics.json").read_text())["timings"]
    assert [r["task"] for r in metrics["per_task"]] == [1, 2]
    for record, saved in zip(timings, metrics["per_task"], strict=True):
        for phase in ("training", "statistics", "evaluation"):
            assert saved[f"{phase}_images_per_second"] == pytest.approx(
                record[f"{phase}_images"] / record[f"{phase}_seconds"])
        assert saved["total_seconds"] == pytest.approx(sum(record[f"{p}_seconds"] for p in (*PHASES, "other")))
    total = metrics["total"]
    assert total["training_seconds"] == pytest.approx(sum(r["training_seconds"] for r in timings))
    assert total["training_images_per_second"] == pytest.approx(32 / total["training_seconds"])
    assert total["total_seconds"] == pytest.approx(sum(r["total_seconds"] for r in metrics["per_task"]))

    results = (out / "results.md").read_text()
    assert "## Where the time went" in results
    rows = [line for line in results.splitlines() if line.startswith(("| 1 |", "| 2 |", "| all |"))]
    assert len(rows) == 3 and f"{total['total_seconds']:.2f}" in rows[-1]
    assert "img/s" in rows[0]

    lines = [r.getMessage() for r in caplog.records if " took " in r.getMessage()]
    assert len(lines) == 2 and lines[1].startswith("task 2/2 took ")
    # The line is logged by a step, before the task's `other` phase (its own time included) is known.
    logged = metrics["per_task"][1]["total_seconds"] - metrics["per_task"][1]["other_seconds"]
    assert f"{logged:.1f} s" in lines[1] and "alignment" in lines[1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dir = next(out.rglob("events.out.tfevents.*")).parent
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for phase in PHASES:  # under their own names, not filed under train/
        assert len(acc.Scalars(f"time/{phase}_seconds")) == 2
    assert [e.value for e in acc.Scalars("time/training_seconds")] == pytest.approx(
        [r["training_seconds"] for r in timings])


@pytest.mark.slow
def test_a_resumed_run_keeps_the_earlier_tasks_timings(tmp_path, make_learner, tiny_image_folders):
    pytest.importorskip("matplotlib")
    stream = tasks(tiny_image_folders)
    settings = dict(num_train_epochs=1, ca_epochs=1, ca_samples_per_class=16)
    first = make_learner(stream, tmp_path / "first", **settings)
    first.run()
    saved = json.loads((tmp_path / "first" / "task_1" / "continual_state.json").read_text())["timings"]
    # A checkpoint holds its task's times up to its own write.
    assert len(saved) == 1 and set(saved[0]) >= {f"{p}_seconds" for p in PHASES[:-1]}
    assert saved[0] == {k: v for k, v in first.result.timings[0].items()
                        if k not in ("checkpoint_seconds", "other_seconds")}

    resumed = make_learner(stream, tmp_path / "first", resume_from=tmp_path / "first" / "task_1", **settings)
    result = resumed.run()
    assert result.timings[0] == saved[0]  # kept, not measured again
    assert all(result.timings[1][f"{p}_seconds"] > 0 for p in PHASES)
    per_task = json.loads((tmp_path / "first" / "metrics.json").read_text())["timings"]["per_task"]
    assert [r["task"] for r in per_task] == [1, 2] and "checkpoint_seconds" not in per_task[0]


class SlowUntimedStep(ContinualCallback):
    """A step without a `phase`: its time is the task's `other` phase."""

    def on_task_end(self, learner, task):
        time.sleep(PAUSE)


class WallClock(ContinualCallback):
    """Each task's wall time from before the loop asks for it to after its last step."""

    def __init__(self):
        self.walls, self.started = [], None

    def on_run_begin(self, learner):
        self.started = time.perf_counter()

    def on_task_end(self, learner, task):
        now = time.perf_counter()
        self.walls.append(now - self.started)
        self.started = now


@pytest.mark.slow
def test_the_phases_of_a_task_add_up_to_its_wall_time(tmp_path, make_learner, tiny_image_folders):
    clock = WallClock()
    learner = make_learner(tasks(tiny_image_folders), tmp_path / "run", [SlowUntimedStep(), clock],
                           num_train_epochs=1, ca_epochs=1, ca_samples_per_class=16)
    result = learner.run()
    for record, wall in zip(result.timings, clock.walls, strict=True):
        assert record["other_seconds"] >= PAUSE  # the untimed step's pause, not lost
        phases = sum(v for k, v in record.items() if k.endswith("_seconds"))
        # The clock callback runs last: only the bookkeeping after it is outside its wall time.
        assert phases == pytest.approx(wall, rel=0.02, abs=0.01)
    per_task = json.loads((tmp_path / "run" / "metrics.json").read_text())["timings"]["per_task"]
    assert list(per_task[0])[-2:] == ["other_seconds", "total_seconds"]



def test_metrics_without_timings_still_report_and_damaged_timings_are_one_error(tmp_path):
    pytest.importorskip("matplotlib")
    run = {"accuracy_matrix": [[90.0], [80.0, 70.0]], "seen_accuracy": [90.0, 75.0], "task_sizes": [2, 2],
           "last_accuracy": 75.0, "average_incremental_accuracy": 82.5, "method": "slca++"}
    (tmp_path / "metrics.json").write_text(json.dumps(run))
    write_report(tmp_path)
    results = (tmp_path / "results.md").read_text()
    assert "Last-Acc" in results and "Where the time went" not in results
    (tmp_path / "metrics.json").write_text(json.dumps({**run, "timings": {"per_task": [{"task": 1}], "total": 3}}))
    with pytest.raises(Exception, match=r"metrics.json: timings must hold per_task"):
        write_report(tmp_path)


def test_timing_summary_sums_and_rates():
    timings = [{}, {"training_seconds": 2.0, "training_images": 10, "alignment_seconds": 1.0},
               {"training_seconds": 3.0, "training_images": 20, "checkpoint_seconds": 0.5}]
    summary = timing_summary(timings)
    assert [r["task"] for r in summary["per_task"]] == [2, 3]
    assert summary["per_task"][0]["training_images_per_second"] == 5.0
    assert summary["per_task"][0]["total_seconds"] == 3.0
    assert summary["total"]["training_images_per_second"] == 6.0
    assert summary["total"]["total_seconds"] == 6.5
    # A callback's own `phase` counts too, after the built-in ones.
    assert phases_of({"replay_seconds": 1.0, "training_seconds": 2.0}) == ["training", "replay"]
    assert phases_of({"other_seconds": 1.0, "replay_seconds": 1.0, "training_seconds": 2.0}) == [
        "training", "replay", "other"]  # the rest of the task's time comes last
    record = {"training_seconds": 2.0, "training_images": 10, "alignment_seconds": 1.0}
    finish_timing(record, 3.5)
    assert record["other_seconds"] == pytest.approx(0.5) and with_rates(record)["total_seconds"] == 3.5
    finish_timing(record, 3.25)  # timed again: what the phases leave, never counting the old rest
    assert record["other_seconds"] == pytest.approx(0.25)
    assert timing_summary([{"replay_seconds": 1.0}])["total"]["total_seconds"] == 1.0
    assert with_rates(with_rates(timings[1])) == with_rates(timings[1])  # a record with rates is not counted twice
    assert checked_timings([{"training_seconds": 1}, {}], 2, "x") == [{"training_seconds": 1}, {}]
    for damaged in (None, [{"training_seconds": 1}], [{"training_seconds": -1}, {}], [{}, {}, {}], {"a": 1},
                    [{"training_seconds": True}, {}]):
        with pytest.raises(ValueError, match="x: timings must be a list"):
            checked_timings(damaged, 2, "x")
