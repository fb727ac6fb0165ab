"""A run killed with SIGKILL loses at most the task in progress; `--resume_from auto` finishes it
with the same metrics as an uninterrupted run.

One run directory is killed four times, each restart resuming what the previous one left: while a
task trains (from outside), in the statistics pass, in classifier alignment and halfway through a
checkpoint write (from inside, at an exact call). Each killed run is a forked copy of the test
process, so it dies as a crash kills it without a fresh interpreter. The last restart finishes and
must give the uninterrupted run's metrics exactly."""

import importlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import recipe_argv, run_forked, start_forked, wait_forked

pytestmark = pytest.mark.slow

#: Two tasks of 2 classes, long enough to be killed in each phase.
FLAGS = dict(num_train_epochs=2, learning_rate=0.05, ca_samples_per_class=64, ca_batch_size=32, ca_epochs=3,
             per_device_eval_batch_size=4, seed=5, report_to=None)


def single_threaded(recipe, args) -> int:
    """The recipe on one thread (the same float32 sums in every run of this module); 0 once it has finished."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe.main(args)
    finally:
        torch.set_num_threads(threads)
    return 0


def killed_from_outside(recipe, args, when) -> int:
    pid = start_forked(lambda: single_threaded(recipe, args))
    deadline = time.monotonic() + 300
    while not when() and time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        assert not done, "the run ended before the kill"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return wait_forked(pid)


def killed_inside(recipe, args, target, skip) -> int:
    """The recipe SIGKILLed from inside at the (skip+1)-th call of `target` ("module:Class.method")."""

    def child() -> int:
        module, _, path = target.partition(":")
        owner = importlib.import_module(module)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original, calls = getattr(owner, name), []

        def wrapper(*a, **kw):
            calls.append(1)
            if len(calls) > skip:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*a, **kw)

        setattr(owner, name, wrapper)
        return single_threaded(recipe, args)

    return run_forked(child)


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("task_*"))


def test_a_run_killed_four_times_resumes_to_the_uninterrupted_metrics(tmp_path, base_model_dir, image_folders,
                                                                      recipe):
    single_threaded(recipe, recipe_argv(base_model_dir, image_folders, tmp_path / "full", **FLAGS))
    uninterrupted = json.loads((tmp_path / "full" / "metrics.json").read_text())

    run = tmp_path / "killed"
    args = recipe_argv(base_model_dir, image_folders, run, "--resume_from", "auto", **FLAGS)
    # Killed from outside while task 2 trains (task 1's checkpoint is complete).
    assert killed_from_outside(recipe, args, lambda: (run / "task_0").is_dir()) == -signal.SIGKILL
    assert checkpoints(run) == ["task_0"] and not (run / "metrics.json").exists()
    # Task 2's statistics, after one batch has been accumulated (the restart retrains task 2 first).
    assert killed_inside(recipe, args, "slca_peft.method.statistics:ClassStatistics.update", 1) == -signal.SIGKILL
    assert checkpoints(run) == ["task_0"]
    # Task 2's classifier alignment, in its second epoch of 8 batches.
    assert killed_inside(recipe, args, "slca_peft.method.alignment:normalized_logits", 10) == -signal.SIGKILL
    assert checkpoints(run) == ["task_0"]
    # Task 3's checkpoint write: the adapter and heads are on disk, the statistics not yet (task 2's
    # checkpoint is the first save of this restart).
    assert killed_inside(recipe, args, "slca_peft.method.statistics:ClassStatistics.save", 1) == -signal.SIGKILL
    assert checkpoints(run) == ["task_0", "task_1"]
    partial = list(run.glob(".task_2.tmp-*"))
    assert len(partial) == 1 and (partial[0] / "classifier.safetensors").is_file()
    assert not (partial[0] / "class_statistics.safetensors").exists()

    assert run_forked(lambda: single_threaded(recipe, args)) == 0
    assert not list(run.glob(".task_*"))  # the half-written checkpoint is gone
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == uninterrupted["accuracy_matrix"]
    assert resumed["seen_accuracy"] == uninterrupted["seen_accuracy"]
