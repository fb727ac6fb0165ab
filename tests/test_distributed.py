"""Two real gloo processes (torchrun, --use_cpu) against one process: same statistics and accuracy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from slca_peft import (
    ClassStatistics,
    ContinualLearner,
    EvalTransform,
    ImageTransformConfig,
    SLCAConfig,
    SLCAModel,
    TaskSequence,
)

WORKER = r'''
import json, sys, torch
from accelerate import PartialState
from slca_peft import ContinualLearner, EvalTransform, ImageTransformConfig, SLCAConfig, SLCAModel, TaskSequence
base, train_dir, test_dir, out = sys.argv[1:5]
args = SLCAConfig(output_dir=out, use_cpu=True, per_device_eval_batch_size=1, report_to="none")
state = PartialState()
tasks = TaskSequence.from_image_folders(train_dir, test_dir, init_cls=3, increment=3, seed=1993)
torch.manual_seed(0)
model = SLCAModel.from_backbone(base)
model.grow(3)
transform = EvalTransform(ImageTransformConfig.from_model_config(model.config))
learner = ContinualLearner(model, args, tasks, eval_transform=transform)
learner.compute_statistics(tasks[0])
row, seen, sizes = learner.evaluate(0)
record = {"rank": state.process_index, "world_size": state.num_processes, "args_world_size": args.world_size,
          "row": row, "sizes": sizes}
with open(f"{out}/rank{state.process_index}.json", "w") as fh:
    json.dump(record, fh)
if state.is_main_process:
    learner.statistics.save(out)
'''


def test_two_processes_compute_the_same_statistics_and_accuracy(tmp_path, base_model_dir, image_folders):
    train_dir, test_dir = image_folders
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(worker), str(base_model_dir), str(train_dir), str(test_dir), str(out)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["args_world_size"]) for r in records] == [(0, 2, 2), (1, 2, 2)]

    # The same model and data in this single process. Batches of one make every feature bit-identical
    # (float32 matmuls depend on batch shape), so what is compared is the reduction itself.
    tasks = TaskSequence.from_image_folders(train_dir, test_dir, init_cls=3, increment=3, seed=1993)
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(3)
    args = SLCAConfig(output_dir=str(tmp_path / "single"), use_cpu=True, per_device_eval_batch_size=1,
                      report_to="none")
    learner = ContinualLearner(model, args, tasks,
                               eval_transform=EvalTransform(ImageTransformConfig.from_model_config(model.config)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): same float32 summation order
    try:
        learner.compute_statistics(tasks[0])
        row, _, sizes = learner.evaluate(0)
    finally:
        torch.set_num_threads(threads)

    ddp = ClassStatistics.load(out)
    assert ddp.classes == learner.statistics.classes == [0, 1, 2]
    for c in ddp.classes:
        # 36 training images over 2 processes: each counted once (no sampler padding).
        assert ddp.counts[c] == learner.statistics.counts[c] == 12
        torch.testing.assert_close(ddp.means[c], learner.statistics.means[c], rtol=0, atol=1e-8)
        torch.testing.assert_close(ddp.covariances[c], learner.statistics.covariances[c], rtol=0, atol=1e-8)
    for record in records:
        assert record["row"] == row and record["sizes"] == sizes == [15]


def test_a_launch_that_would_duplicate_training_is_refused(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_seq", Path(__file__).parents[1] / "recipes" / "train_seq.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_seq"] = module
    spec.loader.exec_module(module)
    monkeypatch.setenv("WORLD_SIZE", "2")
    import pytest

    with pytest.raises(SystemExit, match="--use_cpu true"):
        module.parse_args(["--model_config", "m.json", "--dataset", "digits", "--output_dir", "o"])
