import json

import numpy as np
import pytest

from slca_peft import TaskSequence


def run(tmp_path, make_learner, image_folders, **kw):
    tasks = TaskSequence.from_image_folders(*image_folders, init_cls=2, increment=2, seed=1993)
    learner = make_learner(tasks, tmp_path / "run", init_cls=2, increment=2, **kw)
    computed = []
    original = learner.statistics.finalize

    def spy(task_id, classes=None, reduce=None):
        computed.append((task_id, list(classes)))
        return original(task_id, classes, reduce)

    learner.statistics.finalize = spy
    result = learner.run()
    return learner, result, computed


def test_three_task_run_on_an_image_folder(tmp_path, make_learner, image_folders):
    learner, result, computed = run(tmp_path, make_learner, image_folders)
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


def test_every_method_runs(tmp_path, make_learner, image_folders):
    for method in ("slca", "sl", "seq_ft"):
        _, result, computed = run(tmp_path / method, make_learner, image_folders, method=method,
                                  num_train_epochs=1)
        assert len(result.accuracy_matrix) == 3
        assert len(computed) == 3  # statistics are cheap and kept for every method


def test_push_to_hub_uploads_each_task_checkpoint_as_one_commit(tmp_path, make_learner, image_folders, hub,
                                                                 base_model_dir, caplog):
    hub.fail_uploads = {2}  # a failed push must not stop the run
    push = dict(push_to_hub=True, hub_model_id="me/slca-run", hub_private_repo=True, num_train_epochs=1, ca_epochs=1)
    # The base model is a local directory: refused before any training unless its Hub id is given.
    with pytest.raises(ValueError, match="push_to_hub is on but its base model is the local path .*hub_base_model_id"):
        run(tmp_path, make_learner, image_folders, **push)
    assert not (tmp_path / "run").exists() and hub.uploads == []
    with caplog.at_level("WARNING", logger="slca_peft.steps"):
        learner, result, _ = run(tmp_path, make_learner, image_folders, hub_base_model_id="me/tiny-vit", **push)
    assert [u["repo_id"] for u in hub.uploads] == ["me/slca-run"] * 3
    assert [u["message"].split(":")[0] for u in hub.uploads] == ["task 1/3", "task 2/3", "task 3/3"]
    assert [u["json"]["continual_state.json"]["tasks_learned"] for u in hub.uploads] == [1, 2, 3]
    assert {u["json"]["slca_config.json"]["base_model_name_or_path"] for u in hub.uploads} == {"me/tiny-vit"}
    assert hub.repos == [("me/slca-run", True)] * 3
    retry = f"slca-peft push {tmp_path / 'run' / 'task_1'} me/slca-run --base_model_id me/tiny-vit --private"
    assert retry in caplog.text
    assert len(result.accuracy_matrix) == 3
    # The local checkpoints keep the path they were built from; only the uploads name the Hub id.
    saved = json.loads((tmp_path / "run" / "task_2" / "slca_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_model_dir)
