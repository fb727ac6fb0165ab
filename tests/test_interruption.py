"""A run killed with SIGKILL loses at most the task in progress; `--resume_from auto` finishes it
with the same metrics as an uninterrupted run.

One run directory is killed four times, each restart resuming what the previous one left: while a
task trains (from outside), in the statistics pass, in classifier alignment and halfway through a
checkpoint write (from inside, `tests/helpers/kill_at.py`). The last restart finishes and must give
the uninterrupted run's metrics exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "recipes" / "train_seq.py")
KILL_AT = str(ROOT / "tests" / "helpers" / "kill_at.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def arguments(base_model_dir, image_folders, out, *extra):
    train_dir, test_dir = image_folders
    return ["--model_name_or_path", str(base_model_dir),
            "--train_dir", str(train_dir), "--test_dir", str(test_dir), "--init_cls", "2", "--increment", "2",
            "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "0.05",
            "--ca_samples_per_class", "64", "--ca_batch_size", "32", "--ca_epochs", "3",
            "--per_device_eval_batch_size", "4", "--use_cpu", "true", "--disable_tqdm", "true",
            "--seed", "5", "--output_dir", str(out), *extra]


def kill_when(cmd, condition, timeout=300):
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.time()
    try:
        while proc.poll() is None and time.time() - start < timeout:
            if condition():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        proc.wait()
    return proc.returncode


def killed_inside(target, marker, skip, args):
    """Run the recipe, SIGKILLed from inside at the (skip+1)-th call of `target` once `marker` exists."""
    proc = subprocess.run([sys.executable, KILL_AT, target, str(marker), str(skip), SCRIPT, *args],
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def checkpoints(run):
    return sorted(p.name for p in run.glob("task_*"))


def test_a_run_killed_four_times_resumes_to_the_uninterrupted_metrics(tmp_path, base_model_dir, image_folders,
                                                                      recipe):
    # The uninterrupted run, in this process with the subprocesses' single thread (same float32 sums).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe.main(arguments(base_model_dir, image_folders, tmp_path / "full"))
    finally:
        torch.set_num_threads(threads)
    uninterrupted = json.loads((tmp_path / "full" / "metrics.json").read_text())

    run = tmp_path / "killed"
    args = arguments(base_model_dir, image_folders, run, "--resume_from", "auto")
    # Killed from outside while task 2 trains (task 1's checkpoint is complete).
    assert kill_when([sys.executable, SCRIPT, *args], lambda: (run / "task_0").is_dir()) == -signal.SIGKILL
    assert checkpoints(run) == ["task_0"] and not (run / "metrics.json").exists()
    # Task 2's statistics, after one batch has been accumulated.
    killed_inside("slca_peft.statistics:ClassStatistics.update", run / "task_0", 1, args)
    assert checkpoints(run) == ["task_0"]
    # Task 2's classifier alignment, in its second epoch of 8 batches (the resumed run retrains task 2 first).
    killed_inside("slca_peft.alignment:normalized_logits", run / "task_0", 10, args)
    assert checkpoints(run) == ["task_0"]
    # Task 3's checkpoint write: the adapter and heads are on disk, the statistics not yet.
    killed_inside("slca_peft.statistics:ClassStatistics.save", run / "task_1", 0, args)
    assert checkpoints(run) == ["task_0", "task_1"]
    partial = list(run.glob(".task_2.tmp-*"))
    assert len(partial) == 1 and (partial[0] / "classifier.safetensors").is_file()
    assert not (partial[0] / "class_statistics.safetensors").exists()

    done = subprocess.run([sys.executable, SCRIPT, *args], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(run.glob(".task_*"))  # the half-written checkpoint is gone
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == uninterrupted["accuracy_matrix"]
    assert resumed["seen_accuracy"] == uninterrupted["seen_accuracy"]
