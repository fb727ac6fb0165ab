import json

import numpy as np
import pytest
import torch

from slca_peft import TaskSequence
from slca_peft.artifacts.layout import task_dir_name

pytestmark = pytest.mark.slow


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
        assert (tmp_path / "run" / task_dir_name(t) / "classifier.safetensors").is_file()
    # After the run the model holds the unaligned heads (representation learning continues from them),
    # and all scales are back to 1.
    assert learner.model.classifier.scales.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("method", ["slca", "sl", "seq_ft"])
def test_each_method_trains_what_it_names(method, tmp_path, make_learner, tiny_image_folders):
    """SLCA++'s ablations: LoRA (sl) leaves the backbone's linear weights as they were, full fine-tuning
    (slca, seq_ft) changes every one; only the aligning methods (slca) leave aligned heads that differ from
    the trained ones; statistics are kept for every method."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file
    from torch import nn

    tasks = TaskSequence.from_image_folders(*tiny_image_folders, init_cls=2, increment=2, seed=1993)
    learner = make_learner(tasks, tmp_path / "run", init_cls=2, increment=2, method=method, num_train_epochs=1,
                           ca_epochs=1, ca_samples_per_class=16)
    model = learner.model
    linears = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and "lora_" not in name and name.startswith("backbone")}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = learner.run()
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    lora = any(isinstance(m, LoraLayer) for m in model.modules())
    assert lora == (method == "sl") and len(linears) >= 8  # q, k, v, out, fc1, fc2 of two blocks
    assert changed & linears == (set() if lora else linears)
    if lora:
        assert any("lora_B" in name for name in changed)
    task = tmp_path / "run" / "task_2"
    aligned, trained = load_file(task / "classifier.safetensors"), load_file(task / "classifier_unaligned.safetensors")
    assert any(not torch.equal(aligned[k], trained[k]) for k in trained) == (method == "slca")
    assert [len(row) for row in result.accuracy_matrix] == [1, 2]
    assert learner.statistics.classes == [0, 1, 2, 3]  # statistics are cheap and kept for every method


def test_push_to_hub_uploads_each_task_checkpoint_as_one_commit(tmp_path, make_learner, image_folders, hub,
                                                                 base_model_dir, caplog):
    hub.fail_uploads = {2, 3}  # a failed push must not stop the run
    push = dict(push_to_hub=True, hub_model_id="me/slca-run", hub_private_repo=True, num_train_epochs=1, ca_epochs=1)
    # The base model is a local directory: refused before any training unless its Hub id is given.
    with pytest.raises(ValueError, match="push_to_hub is on but its base model is the local path .*hub_base_model_id"):
        run(tmp_path, make_learner, image_folders, **push)
    assert not (tmp_path / "run").exists() and hub.uploads == []
    with caplog.at_level("INFO", logger="slca_peft.continual.steps"):
        learner, result, _ = run(tmp_path, make_learner, image_folders, hub_base_model_id="me/tiny-vit", **push)
    assert [u["repo_id"] for u in hub.uploads] == ["me/slca-run"] * 3
    assert [u["message"].split(":")[0] for u in hub.uploads] == ["task 1/3", "task 2/3", "task 3/3"]
    assert [u["json"]["continual_state.json"]["tasks_learned"] for u in hub.uploads] == [1, 2, 3]
    assert {u["json"]["slca_config.json"]["base_model_name_or_path"] for u in hub.uploads} == {"me/tiny-vit"}
    assert hub.repos == [("me/slca-run", True)] * 3
    retry = f"slca-peft push {tmp_path / 'run' / 'task_2'} me/slca-run --base_model_id me/tiny-vit --private"
    assert retry in caplog.text
    # A Hub that fails at every task warns once per run; the repeats (each with its retry command) are INFO.
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.levelname for r in failed] == ["WARNING", "INFO"] and "task_3" in failed[1].getMessage()
    assert len(result.accuracy_matrix) == 3
    # The local checkpoints keep the path they were built from; only the uploads name the Hub id.
    saved = json.loads((tmp_path / "run" / "task_3" / "slca_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_model_dir)
