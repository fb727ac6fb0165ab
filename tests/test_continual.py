import json

import numpy as np
import pytest

from slca_peft import (
    ContinualLearner,
    EvalTransform,
    ImageTransformConfig,
    SLCAConfig,
    SLCAModel,
    TaskSequence,
    TrainTransform,
)


def run(tmp_path, base_model_dir, image_folders, **kw):
    train_dir, test_dir = image_folders
    values = dict(output_dir=str(tmp_path / "run"), use_cpu=True, num_train_epochs=4, per_device_train_batch_size=8,
                  learning_rate=0.05, init_cls=2, increment=2, seed=0, disable_tqdm=True, report_to="none",
                  ca_samples_per_class=128, ca_batch_size=32, ca_epochs=5)
    values.update(kw)
    args = SLCAConfig(**values)
    tasks = TaskSequence.from_image_folders(train_dir, test_dir, init_cls=2, increment=2, seed=1993)
    model = SLCAModel.from_backbone(str(base_model_dir), args)
    tc = ImageTransformConfig.from_model_config(model.config)
    learner = ContinualLearner(model, args, tasks, train_transform=TrainTransform(tc, scale=(0.8, 1.0), flip_p=0.0),
                               eval_transform=EvalTransform(tc))
    computed = []
    original = learner.statistics.finalize

    def spy(task_id, classes=None, reduce=None):
        computed.append((task_id, list(classes)))
        return original(task_id, classes, reduce)

    learner.statistics.finalize = spy
    result = learner.run()
    return learner, result, computed


def test_three_task_run_on_an_image_folder(tmp_path, base_model_dir, image_folders):
    learner, result, computed = run(tmp_path, base_model_dir, image_folders)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    matrix = metrics["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3]
    # Each task, right after it is learned, beats chance among all classes seen so far.
    for t, row in enumerate(matrix):
        assert row[t] > 100.0 / (2 * (t + 1)), matrix
    assert metrics["average_incremental_accuracy"] == pytest.approx(np.mean(metrics["seen_accuracy"]))
    assert metrics["last_accuracy"] == pytest.approx(metrics["seen_accuracy"][-1])
    assert metrics["class_order"] == learner.tasks.order
    # Statistics: computed once per task, for exactly the new classes.
    assert computed == [(0, [0, 1]), (1, [2, 3]), (2, [4, 5])]
    assert learner.statistics.task_of_class == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    for t in range(3):
        assert (tmp_path / "run" / f"task_{t}" / "classifier.safetensors").is_file()
    # After the run the model holds the unaligned heads (representation learning continues from them),
    # and all scales are back to 1.
    assert learner.model.classifier.scales.tolist() == [1.0, 1.0, 1.0]


def test_every_method_runs(tmp_path, base_model_dir, image_folders):
    for method in ("slca", "sl", "seq_ft"):
        _, result, computed = run(tmp_path / method, base_model_dir, image_folders, method=method,
                                  num_train_epochs=1)
        assert len(result.accuracy_matrix) == 3
        assert len(computed) == 3  # statistics are cheap and kept for every method
