"""A run killed with SIGKILL loses at most the task in progress; `--resume_from auto` finishes it
with the same metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(base_model_dir, image_folders, out, *extra):
    train_dir, test_dir = image_folders
    return [sys.executable, str(ROOT / "recipes" / "train_seq.py"), "--model_name_or_path", str(base_model_dir),
            "--train_dir", str(train_dir), "--test_dir", str(test_dir), "--init_cls", "2", "--increment", "2",
            "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "0.05",
            "--ca_samples_per_class", "64", "--ca_batch_size", "32", "--use_cpu", "true", "--disable_tqdm", "true",
            "--seed", "5", "--output_dir", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


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


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path, base_model_dir, image_folders):
    full = tmp_path / "full"
    subprocess.run(command(base_model_dir, image_folders, full), env=ENV, check=True, capture_output=True)
    expected = json.loads((full / "metrics.json").read_text())

    run = tmp_path / "killed"
    cmd = command(base_model_dir, image_folders, run, "--resume_from", "auto")
    # Killed while task 2 trains (task 1's checkpoint is complete), then while task 3 trains or writes.
    assert kill_when(cmd, lambda: (run / "task_0").is_dir()) == -signal.SIGKILL
    assert not (run / "metrics.json").exists()
    assert kill_when(cmd, lambda: (run / "task_1").is_dir() or any(run.glob(".task_2.tmp-*"))) == -signal.SIGKILL
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert not list(run.glob(".task_*"))  # no half-written checkpoint left behind
