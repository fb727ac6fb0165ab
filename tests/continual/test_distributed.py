"""Two real gloo processes (torchrun, --use_cpu) against one process: same statistics and accuracy, one
set of checkpoints. The reduction itself and the refusal of a launch without a backend are checked in
this process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from slca_peft import ContinualLearner, EvalTransform, SLCAConfig, TaskSequence
from slca_peft.continual.steps import EvaluationStep, StatisticsStep
from slca_peft.data.transforms import eval_transform_config
from slca_peft.method import ClassStatistics
from slca_peft.utils.errors import UserError


def free_port() -> int:
    """A port nobody listens on, so concurrent test runs do not collide."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_launch_that_would_duplicate_training_is_refused(monkeypatch, recipe, tmp_path):
    """Each process of such a launch parses the same arguments, so each stops here, before writing anything."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="the launcher started 2 processes .* Pass --use_cpu true"):
        recipe.parse_args(["--model_config", "m.json", "--dataset", "digits", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_statistics_reduced_over_three_fake_processes_equal_the_all_data_computation():
    import threading

    import numpy as np

    rng = np.random.RandomState(0)
    feats = torch.tensor(rng.randn(101, 5) * 3 + 1)  # 101 samples: uneven shards of 34, 34, 33
    labels = torch.tensor(rng.randint(0, 4, size=101))
    reference = ClassStatistics(5)
    reference.update(feats, labels)
    reference.finalize(0, classes=[0, 1, 2, 3])

    world = 3
    barrier = threading.Barrier(world)
    slots: list = [None] * world
    shards = [ClassStatistics(5) for _ in range(world)]
    errors = []

    def process(rank: int) -> None:
        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total

        try:
            shards[rank].update(feats[rank::world], labels[rank::world])
            shards[rank].finalize(0, classes=[0, 1, 2, 3], reduce=all_reduce)
        except Exception as err:  # pragma: no cover - surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for shard in shards:
        for c in range(4):
            assert shard.counts[c] == reference.counts[c]
            torch.testing.assert_close(shard.means[c], reference.means[c], rtol=0, atol=1e-12)
            torch.testing.assert_close(shard.covariances[c], reference.covariances[c], rtol=0, atol=1e-10)


@pytest.mark.slow
def test_two_processes_train_like_one_and_write_one_set_of_checkpoints(tmp_path, base_model_dir):
    from conftest import write_image_folder

    # 7 images per class and a first task of 3 classes: 21 images, uneven across the two processes.
    train_dir = write_image_folder(tmp_path / "train", num_classes=5, per_class=7, seed=3)
    test_dir = write_image_folder(tmp_path / "test", num_classes=5, per_class=3, seed=4)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    recipe = ROOT / "recipes" / "train_seq.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(recipe), "--model_name_or_path", str(base_model_dir), "--train_dir", str(train_dir),
           "--test_dir", str(test_dir), "--init_cls", "3", "--increment", "2", "--num_train_epochs", "1",
           "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "1", "--ca_samples_per_class", "32",
           "--ca_batch_size", "32", "--use_cpu", "true", "--bf16", "false", "--disable_tqdm", "true",
           "--output_dir", str(out)]  # fp32, as the single-process recomputation below
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Last-Acc") == 1  # the summary is printed by the main process only
    assert done.stdout.count("task 1/2 |") == 1 and done.stdout.count("task 2/2 |") == 1  # task results: once
    # One set of checkpoints and one report (written at the end of the run by the main process).
    assert sorted(p.name for p in out.iterdir()) == [
        ".slca-manifest.json", ".slca-run.lock", "accuracy_curve.png", "accuracy_matrix.png", "metrics.json",
        "results.md", "run_fingerprint.json", "task_1", "task_2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2]
    # 21 and 14 training images over 2 shards (11 + 10 for the first task): none padded, none lost.
    assert [ClassStatistics.load(out / "task_2").counts[c] for c in range(5)] == [7, 7, 7, 7, 7]

    # The same checkpoints in this single process. Batches of one make every feature bit-identical
    # (float32 matmuls depend on batch shape) and one thread the summation order, as in the workers,
    # so what is compared is the reduction across processes itself.
    args = SLCAConfig(output_dir=str(tmp_path / "single"), use_cpu=True, per_device_eval_batch_size=1,
                      report_to="none", init_cls=3, increment=2)
    tasks = TaskSequence.from_image_folders(train_dir, test_dir, init_cls=3, increment=2, seed=args.class_order_seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        after_first = ContinualLearner.from_checkpoint(out / "task_1", args, tasks)
        transform = EvalTransform(eval_transform_config(after_first.model))
        single = ContinualLearner(after_first.model, args, tasks, eval_transform=transform)
        single.get_callback(StatisticsStep).compute(single, tasks[0])
        after_last = ContinualLearner.from_checkpoint(out / "task_2", args, tasks, eval_transform=transform)
        row, _, sizes = after_last.get_callback(EvaluationStep).evaluate(after_last, 1)
    finally:
        torch.set_num_threads(threads)
    ddp = after_first.statistics  # task 1's statistics, reduced over the two processes
    assert ddp.classes == single.statistics.classes == [0, 1, 2]
    for c in ddp.classes:
        assert ddp.counts[c] == single.statistics.counts[c] == 7
        torch.testing.assert_close(ddp.means[c], single.statistics.means[c], rtol=0, atol=1e-8)
        torch.testing.assert_close(ddp.covariances[c], single.statistics.covariances[c], rtol=0, atol=1e-8)
    # Every test image counted once by the two processes: the same accuracies as one process.
    assert sizes == [9, 6] and row == metrics["accuracy_matrix"][1]
