"""A run killed with SIGKILL loses at most the task in progress; `--resume_from auto` finishes it
with the same metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, base_model_dir, image_folders):
    out = tmp_path_factory.mktemp("full")
    cmd = [sys.executable, SCRIPT, *arguments(base_model_dir, image_folders, out)]
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    return json.loads((out / "metrics.json").read_text())


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


def finish(args, run):
    done = subprocess.run([sys.executable, SCRIPT, *args], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(run.glob(".task_*"))  # no half-written checkpoint left behind
    return json.loads((run / "metrics.json").read_text())


def test_sigkill_during_training_then_resume_auto_matches(tmp_path, base_model_dir, image_folders, uninterrupted):
    run = tmp_path / "killed"
    args = arguments(base_model_dir, image_folders, run, "--resume_from", "auto")
    cmd = [sys.executable, SCRIPT, *args]
    # Killed while task 2 trains (task 1's checkpoint is complete), then while task 3 trains or writes.
    assert kill_when(cmd, lambda: (run / "task_0").is_dir()) == -signal.SIGKILL
    assert not (run / "metrics.json").exists()
    assert kill_when(cmd, lambda: (run / "task_1").is_dir() or any(run.glob(".task_2.tmp-*"))) == -signal.SIGKILL
    assert finish(args, run)["accuracy_matrix"] == uninterrupted["accuracy_matrix"]


def test_sigkill_inside_statistics_alignment_and_a_checkpoint_write(
    tmp_path, base_model_dir, image_folders, uninterrupted
):
    run = tmp_path / "killed"
    args = arguments(base_model_dir, image_folders, run, "--resume_from", "auto")
    # Task 2's statistics, after one batch has been accumulated.
    killed_inside("slca_peft.statistics:ClassStatistics.update", run / "task_0", 1, args)
    assert sorted(p.name for p in run.glob("task_*")) == ["task_0"]
    # Task 2's classifier alignment, in its second epoch of 8 batches (the resumed run retrains task 2 first).
    killed_inside("slca_peft.alignment:normalized_logits", run / "task_0", 10, args)
    assert sorted(p.name for p in run.glob("task_*")) == ["task_0"]
    # Task 3's checkpoint write: the adapter and heads are on disk, the statistics not yet.
    killed_inside("slca_peft.statistics:ClassStatistics.save", run / "task_1", 0, args)
    assert sorted(p.name for p in run.glob("task_*")) == ["task_0", "task_1"]
    partial = list(run.glob(".task_2.tmp-*"))
    assert len(partial) == 1 and (partial[0] / "classifier.safetensors").is_file()
    assert not (partial[0] / "class_statistics.safetensors").exists()
    resumed = finish(args, run)
    assert resumed["accuracy_matrix"] == uninterrupted["accuracy_matrix"]
    assert resumed["seen_accuracy"] == uninterrupted["seen_accuracy"]
