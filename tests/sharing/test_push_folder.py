"""What reaches the Hub: cards that say what was measured and whose ids hold, no local path in any uploaded
file, and one upload path whichever door (`slca-peft push`, `SLCAModel.push_to_hub`, `SLCATrainer.push_to_hub`)."""

import json
import logging
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import TrainingArguments

from slca_peft import SLCAConfig, SLCAModel, SLCATrainer, export_model
from slca_peft.continual import load_checkpoint, save_checkpoint
from slca_peft.method import ClassStatistics
from slca_peft.sharing.card import build_export_card, build_model_card

SETTINGS = {"base_model_name_or_path": "google/vit-base-patch16-224-in21k", "task_sizes": [2, 2, 2]}
# A continuation whose old tasks' test data was not at hand after task 2, and was again for task 3.
CONTINUED = {
    "accuracy_matrix": [[90.0], [None, 70.0], [60.0, 50.0, 80.0]], "seen_accuracy": [90.0, 70.0, 63.3],
    "task_test_sizes": [4, 4, 4], "tasks_learned": 3, "task_sizes": [2, 2, 2], "method": "slca++",
    "label_names": ["a", "b", "c", "d", "e", "f"], "class_ids": [0, 1, 2, 3, 4, 5], "dataset": "me/six",
}


def valid_metadata(card) -> dict:
    """The card's metadata, after huggingface_hub parsed it back (`model-index` included) as the Hub does."""
    from huggingface_hub import ModelCardData

    parsed = ModelCard(str(card))
    data = parsed.data.to_dict()
    assert ModelCardData(**data).to_dict() == data
    return data


def results(card) -> dict[str, float]:
    return {r.metric_name: r.metric_value for r in card.data.eval_results or []}


@pytest.mark.parametrize("build", ["checkpoint", "export"])
def test_local_data_gives_no_dataset_id_and_a_hub_dataset_its_own(build, tmp_path):
    """Image folders (or `imagefolder`, a local path) are no Hub dataset: no placeholder id in `datasets` or
    `model-index`, whose entries must name one; the figures stay in the metadata, saying what they are over."""
    def card_of(state, given=None):
        if build == "checkpoint":
            return build_model_card(SETTINGS, state, datasets=given)
        return build_export_card(SETTINGS["base_model_name_or_path"], dict(enumerate("abcdef")), state,
                                 datasets=given)

    folders = f"image folders {tmp_path / 'birds' / 'train'}, {tmp_path / 'birds' / 'test'}"
    whole = {**CONTINUED, "accuracy_matrix": [[90.0], [80.0, 70.0], [60.0, 50.0, 80.0]], "task_data": [folders] * 3}
    del whole["dataset"]
    for given in (None, ["imagefolder"], [str(tmp_path / "birds")]):
        card = card_of(whole, given)
        data = valid_metadata(card)
        assert "datasets" not in data and "model-index" not in data, data
        assert "custom" not in str(card) and str(tmp_path) not in str(card)
        assert data["local_results"] == {"over": "the test data of image folders train, test", "Last-Acc": 63.3333,
                                         "Inc-Acc": 76.1111, "Forgetting": 25.0}
    # Data from the Hub: its id, in `datasets` and in every `model-index` entry.
    for state, given in (({**whole, "task_data": ["me/birds"] * 3}, None), (whole, ["me/birds"])):
        data = valid_metadata(card_of(state, given))
        assert data["datasets"] == ["me/birds"] and "local_results" not in data
        assert {r["dataset"]["type"] for r in data["model-index"][0]["results"]} == {"me/birds"}


@pytest.mark.parametrize("build", ["checkpoint", "export"])
def test_model_index_carries_only_figures_over_every_class_and_labels_partial_ones(build):
    def card_of(state):
        if build == "checkpoint":
            return build_model_card(SETTINGS, state)
        return build_export_card(SETTINGS["base_model_name_or_path"], dict(enumerate("abcdef")), state)

    # The last row measured every task: Last-Acc is whole; Inc-Acc and forgetting read the partial row.
    card = card_of(CONTINUED)
    assert set(results(card)) == {"Last-Acc"}
    partial = card.data.to_dict()["partial_results"]
    assert partial["partial"] is True and partial["missing_entries"] == 1
    assert set(partial) >= {"Inc-Acc", "Forgetting"} and "Last-Acc" not in partial
    assert "Inc-Acc 74.44 (partial)" in card.text and "Last-Acc 63.33," in card.text
    # The last row itself is partial: nothing measured over every class, so no model-index at all.
    cut = {**CONTINUED, "accuracy_matrix": CONTINUED["accuracy_matrix"][:2], "tasks_learned": 2,
           "seen_accuracy": [90.0, 70.0], "task_test_sizes": [4, 4]}
    card = card_of(cut)
    assert results(card) == {} and "model-index" not in card.data.to_dict()
    assert set(card.data.to_dict()["partial_results"]) >= {"Last-Acc", "Inc-Acc", "Forgetting"}
    assert "Last-Acc 70.00 (partial)" in card.text
    # Every entry measured: everything in model-index, nothing labelled partial.
    whole = {**cut, "accuracy_matrix": [[90.0], [80.0, 70.0]], "seen_accuracy": [90.0, 75.0]}
    card = card_of(whole)
    assert set(results(card)) == {"Last-Acc", "Inc-Acc", "Forgetting"}
    assert "partial_results" not in card.data.to_dict() and "(partial)" not in card.text


def test_the_id_statement_names_whose_ids_hold_and_how_to_score_continued_data():
    one_stream = {**CONTINUED, "segments": [{"first_task": 0, "tasks": 3, "data": "uoft-cs/cifar100"}]}
    card = build_export_card("google/vit-tiny", dict(enumerate("abcdef")), one_stream)
    assert "Output k is the class `uoft-cs/cifar100` labels k" in card.text and "label2id" not in card.text
    continued = {**CONTINUED, "segments": [{"first_task": 0, "tasks": 2, "data": "uoft-cs/cifar100"},
                                           {"first_task": 2, "tasks": 1, "data": "image folders /data/birds/train, "
                                            "/data/birds/test", "continued_from": "/runs/cifar/task_1"}]}
    for card in (build_export_card("google/vit-tiny", dict(enumerate("abcdef")), continued),
                 build_model_card({**SETTINGS, "class_ids": [0, 1, 2, 3, 4, 5]}, continued)):
        assert "Output k is the class `uoft-cs/cifar100` labels k" in card.text
        assert "from `image folders train, test` (continued), took the next free class ids" in card.text
        assert "model.config.label2id[n] for n in names" in card.text and "/data/birds" not in card.text
    # Image folders first: named as a dataset, not as "the class `image folders ...` labels k".
    folders = {**CONTINUED, "segments": [{"first_task": 0, "tasks": 3, "data": "image folders /d/train, /d/test"}]}
    card = build_export_card("google/vit-tiny", dict(enumerate("abcdef")), folders)
    assert "Output k is the class the image-folder dataset `train, test` labels k" in card.text
    # An export's weights are merged (no adapter), a full fine-tuning has none: neither is tagged lora.
    assert "lora" not in card.data.tags and "slca" in card.data.tags
    assert "lora" not in build_model_card({**SETTINGS, "use_lora": False}, folders).data.tags
    assert "lora" in build_model_card(SETTINGS, folders).data.tags


def test_local_results_say_what_the_figures_were_measured_on():
    """`over` names the test data of each part of the history: a trainer run's eval_dataset, image folders by
    their names, and after a continuation the old tasks' test data it was given (--old_test_dir)."""
    from slca_peft.method.trainer_checkpoint import trainer_segment
    from slca_peft.sharing.card import results_over

    folders = "image folders /data/birds/train, /data/birds/test"
    trainer = {**CONTINUED, "accuracy_matrix": [[90.0]], "tasks_learned": 1, "task_sizes": [2], "task_data": [None],
               "segments": [trainer_segment(1)]}
    assert results_over(trainer) == "the eval_dataset given to SLCATrainer"
    continued = {**CONTINUED, "accuracy_matrix": [[90.0], [80.0, 70.0], [60.0, 50.0, 80.0]],
                 "task_data": [None, folders, folders],
                 "segments": [trainer_segment(1), {"first_task": 1, "tasks": 2, "data": folders}], "dataset": None}
    card = build_model_card(SETTINGS, continued)
    assert valid_metadata(card)["local_results"]["over"] == (
        "task 1: the eval_dataset given to SLCATrainer; tasks 2-3: the test data of image folders train, test; "
        "the earlier tasks after a continuation: the old test data it was given (--old_test_dir)")
    # No old test data at the continuation: the old tasks were not scored again, and `over` does not say so.
    unscored = {**continued, "accuracy_matrix": [[90.0], [None, 70.0], [None, None, 80.0]]}
    assert "--old_test_dir" not in results_over(unscored)
    # A run that recorded no data name.
    assert results_over({"accuracy_matrix": [[1.0]], "tasks_learned": 1}) == (
        "the evaluation data the run was given (no name recorded)")


def test_the_card_s_usage_offers_the_hub_id_and_a_peft_snippet_that_runs(tmp_path, base_model_dir, hub):
    """pipeline() on the Hub id gives the trained model (a push names the repo in adapter_config.json), so the card
    offers it; the PEFT snippet, run as written (a local base: its path for the placeholder), gives the model's
    features; a push naming the base's Hub id makes the snippet runnable as written."""
    import re

    from slca_peft.sharing.card import LOCAL_BASE_PLACEHOLDER

    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "model")
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert "random head" not in card.text and "snapshot_download" not in card.text
    assert 'pipeline("image-classification", model="<this repo or directory>")' in card.text
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", card.text, re.S) if "PeftModel" in b]
    assert f'"{LOCAL_BASE_PLACEHOLDER}"' in snippet and "add_pooling_layer=False" in snippet
    assert f"replace `{LOCAL_BASE_PLACEHOLDER}` with its path" in card.text
    code = snippet.replace(LOCAL_BASE_PLACEHOLDER, str(base_model_dir)).replace(
        "<this repo or directory>", str(tmp_path / "model"))
    pixel_values = torch.randn(2, 3, 32, 32)
    scope = {"pixel_values": pixel_values}
    exec(code, scope)  # noqa: S102 - the card's own snippet
    with torch.no_grad():
        torch.testing.assert_close(scope["features"].detach(), model.features(pixel_values))
    # A Hub base: the snippet names it, as written; a full fine-tuning has no adapter to load with PEFT.
    hub_card = build_model_card(SETTINGS, None, backbone={"class": "AutoModel", "kwargs": {"add_pooling_layer": False}})
    assert ('AutoModel.from_pretrained("google/vit-base-patch16-224-in21k", add_pooling_layer=False)' in hub_card.text
            and LOCAL_BASE_PLACEHOLDER not in hub_card.text)
    assert "PeftModel" not in build_model_card({**SETTINGS, "use_lora": False}, None).text
    # Pushed with the base model's Hub id: the snippet loads that, and says nothing of a local copy.
    model.push_to_hub("me/tiny-slca", base_model_id="me/tiny-vit")
    pushed = hub.uploads[-1]["card"]
    assert 'AutoModel.from_pretrained("me/tiny-vit", add_pooling_layer=False)' in pushed
    assert LOCAL_BASE_PLACEHOLDER not in pushed and "a local copy" not in pushed
    assert 'PeftModel.from_pretrained(base, "me/tiny-slca")' in pushed


def trained_model(base_model_dir, **settings) -> SLCAModel:
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(str(base_model_dir), **settings)
    model.grow(2)
    model.grow(2)
    return model.eval()


def statistics(model) -> ClassStatistics:
    stats = ClassStatistics(model.feature_dim)
    stats.update(torch.randn(16, model.feature_dim), torch.arange(4).repeat(4))
    stats.finalize(0)
    return stats


def local_state(tmp_path) -> dict:
    """A continued run's history as it is recorded on disk: data folders and checkpoints by their paths."""
    data = f"image folders {tmp_path}/birds/train, {tmp_path}/birds/test"
    return {"accuracy_matrix": [[90.0], [80.0, 70.0]], "seen_accuracy": [90.0, 75.0], "task_test_sizes": [4, 4],
            "tasks_learned": 2, "task_sizes": [2, 2], "method": "slca++", "label_names": ["a", "b", "c", "d"],
            "class_ids": [0, 1, 2, 3], "task_data": [str(tmp_path / "cifar"), data], "dataset": str(tmp_path / "x"),
            "segments": [{"first_task": 0, "tasks": 1, "data": str(tmp_path / "cifar")},
                         {"first_task": 1, "tasks": 1, "data": data, "continued_from": str(tmp_path / "run/task_0")}]}


def uploaded_text(upload) -> str:
    return json.dumps(upload["json"]) + (upload["card"] or "")


def test_nothing_uploaded_names_a_path_of_this_machine(tmp_path, base_model_dir, hub):
    from slca_peft.commands.cli import main as cli_main

    model = trained_model(base_model_dir)
    save_checkpoint(model, tmp_path / "run" / "task_1", statistics=statistics(model), state=local_state(tmp_path),
                    unaligned_head=model.classifier.snapshot())
    cli_main(["push", str(tmp_path / "run" / "task_1"), "me/birds", "--base_model_id", "me/tiny-vit"])
    export_model(load_checkpoint(tmp_path / "run" / "task_1")[0], tmp_path / "exported")
    cli_main(["push", str(tmp_path / "exported"), "me/birds-exported"])
    full = trained_model(base_model_dir, use_lora=False)  # its weights travel: a local base is not refused
    full.push_to_hub("me/full", state=local_state(tmp_path))
    checkpoint, exported, full_upload = hub.uploads
    for upload in hub.uploads:
        text = uploaded_text(upload)
        assert str(tmp_path) not in text and str(base_model_dir) not in text
    state = checkpoint["json"]["continual_state.json"]
    assert state["task_data"] == ["cifar", "image folders train, test"] and state["dataset"] == "x"
    assert [s["data"] for s in state["segments"]] == ["cifar", "image folders train, test"]
    assert state["segments"][1]["continued_from"] == "task_0 (a local checkpoint)"
    assert "| 2 | c, d | image folders train, test |" in checkpoint["card"]
    assert "`task_1 (a local checkpoint)`" in exported["card"] and "`tiny-vit` backbone" in full_upload["card"]
    assert full_upload["json"]["slca_config.json"]["base_model_name_or_path"] == "tiny-vit"
    # The checkpoint on disk keeps its paths: a resumed continuation still finds what it continued from.
    on_disk = json.loads((tmp_path / "run" / "task_1" / "continual_state.json").read_text())
    assert on_disk["segments"][1]["continued_from"] == str(tmp_path / "run/task_0")


def keep_uploads(hub, into: Path):
    """Copy every uploaded folder into `into`/<n> before the recorder sees it."""
    record = hub.upload_folder

    def upload_folder(repo_id, folder_path, *args, **kwargs):
        shutil.copytree(folder_path, into / str(len(hub.uploads)))
        return record(repo_id, folder_path, *args, **kwargs)

    hub.upload_folder = upload_folder


def test_a_checkpoint_folder_uploads_its_run_state_and_a_model_its_model_files(tmp_path, base_model_dir, hub):
    from slca_peft.continual.checkpoint import load_learner_state
    from slca_peft.sharing.hub import push_folder

    keep_uploads(hub, tmp_path / "uploaded")
    model = trained_model(base_model_dir)
    state = local_state(tmp_path)
    save_checkpoint(model, tmp_path / "ckpt", statistics=statistics(model), state=state,
                    unaligned_head=model.classifier.snapshot())
    loaded, stats, _, _ = load_checkpoint(tmp_path / "ckpt")
    push_folder(tmp_path / "ckpt", "me/again", base_model_id="me/tiny-vit", commit_description="the birds")
    (upload,) = hub.uploads
    assert {"class_statistics.safetensors", "continual_state.json", "classifier_unaligned.safetensors"} <= set(
        upload["files"]) and upload["description"] == "the birds"
    assert "--continue_from me/again" in upload["card"]
    copy = tmp_path / "uploaded" / "0"
    restored_stats, restored_state, unaligned = load_learner_state(copy, loaded)
    assert restored_stats.classes == stats.classes and unaligned is not None
    assert restored_state["task_sizes"] == [2, 2] and restored_state["task_data"][0] == "cifar"
    # The model is the model: its push sends its model files, and its card says it cannot be continued.
    loaded.push_to_hub("me/bare", base_model_id="me/tiny-vit")
    assert "continual_state.json" not in hub.uploads[-1]["files"]
    assert "class_statistics.safetensors" not in hub.uploads[-1]["files"]
    assert "cannot go on from here" in hub.uploads[-1]["card"]


def toy_dataset(n: int = 8) -> datasets.Dataset:
    rng = np.random.RandomState(0)
    labels = [i % 2 for i in range(n)]
    return datasets.Dataset.from_dict({"pixel_values": rng.randn(n, 3, 32, 32).astype(np.float32),
                                       "labels": labels}).with_format("torch")


def test_slca_trainer_pushes_the_library_s_files_and_card(tmp_path, base_model_dir, hub, caplog):
    def trainer(**args):
        config = SLCAConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                            per_device_train_batch_size=4, hub_model_id="me/trained", **{"num_train_epochs": 1, **args})
        model = SLCAModel.from_backbone(str(base_model_dir), config)
        model.grow(2)
        return SLCATrainer(model=model, args=config, train_dataset=toy_dataset())

    # A local base model is refused as `slca-peft push` refuses it: by the explicit push, and before training
    # when every save would push.
    with pytest.raises(ValueError, match="push_to_hub: its base model is the local path .*base_model_id"):
        trainer().push_to_hub()
    with pytest.raises(ValueError, match="push_to_hub: its base model is the local path"):
        trainer(push_to_hub=True)
    # Given a plain TrainingArguments (an example script's parser has no hub_base_model_id), the refusal
    # names what that entry point accepts.
    stock_model = SLCAModel.from_backbone(str(base_model_dir))
    stock_model.grow(2)
    stock = SLCATrainer(model=stock_model, args=TrainingArguments(output_dir=str(tmp_path / "stock"), use_cpu=True,
                                                                   report_to="none"))
    with pytest.raises(ValueError, match=r"--model_name_or_path me/base.*hub_base_model_id='me/base'"):
        stock.push_to_hub()
    assert hub.uploads == []
    plain = trainer(hub_base_model_id="me/tiny-vit")
    plain.create_model_card(license="mit", dataset="me/toy")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "slca-peft" and card.data.license == "mit" and card.data.datasets == ["me/toy"]
    assert "trained from scratch" not in card.text
    # The keywords transformers' example scripts pass land on the card (a local finetuned_from stays off it).
    plain.create_model_card(finetuned_from=str(base_model_dir), tasks="image-classification", dataset=None,
                            tags=["image-classification", "vision"], language="en", dataset_args="full")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"image-classification", "vision", "slca"} <= set(card.data.tags) and card.data.language == "en"
    assert card.data.dataset_args == ["full"] and str(base_model_dir) not in str(card)
    plain.create_model_card(finetuned_from="google/vit-base-patch16-224-in21k")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.finetuned_from == "google/vit-base-patch16-224-in21k"
    with pytest.raises(TypeError, match="unexpected keyword"):
        plain.push_to_hub(licence="mit")
    url = plain.push_to_hub(commit_message="done", license="mit", finetuned_from="me/tiny-vit",
                            tasks="image-classification", dataset=None, tags=["image-classification", "vision"])
    (upload,) = hub.uploads
    assert "- vision" in upload["card"] and "finetuned_from: me/tiny-vit" in upload["card"]
    # The run's results travel with the push (one task, scored by the latest evaluate: none yet here).
    assert "1 of 1 tasks (2 classes so far)" in upload["card"]
    assert url == upload_url(upload) and upload["message"] == "done" and upload["repo_id"] == "me/trained"
    assert "library_name: slca-peft" in upload["card"] and "base_model: me/tiny-vit" in upload["card"]
    assert upload["json"]["slca_config.json"]["base_model_name_or_path"] == "me/tiny-vit"
    assert not any(name.endswith((".bin", ".pt")) for name in upload["files"]) and "training_args.json" not in \
        upload["files"]
    # push_to_hub=True: each save is uploaded the same way (no pickled training_args.bin, the library's card).
    pushing = trainer(push_to_hub=True, hub_base_model_id="me/tiny-vit", save_strategy="epoch", num_train_epochs=2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slca_peft"):
        pushing.train()
    assert [u["message"] for u in hub.uploads[1:]] == ["Training in progress, epoch 1", "Training in progress, epoch 2"]
    # A model push is the model's files: no warning at any save (the card says how to continue a run).
    assert not [r for r in caplog.records if "cannot be continued" in r.getMessage()]
    assert "library_name: slca-peft" in hub.uploads[-1]["card"]
    assert not any(name.endswith(".bin") for name in hub.uploads[-1]["files"])


def test_a_hub_failing_at_every_save_warns_once_per_run(tmp_path, base_model_dir, hub, caplog):
    hub.fail_uploads = set(range(1, 10))
    config = SLCAConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                        per_device_train_batch_size=4, hub_model_id="me/trained", hub_base_model_id="me/tiny-vit",
                        push_to_hub=True, save_strategy="steps", save_steps=1, num_train_epochs=1)
    model = SLCAModel.from_backbone(str(base_model_dir), config)
    model.grow(2)
    with caplog.at_level(logging.INFO, logger="slca_peft"):
        SLCATrainer(model=model, args=config, train_dataset=toy_dataset()).train()
    failed = [r for r in caplog.records if "failed (Hub unreachable)" in r.getMessage()]
    assert len(hub.uploads) == len(failed) == 2  # two saves (8 images, batch 4), each tried and failed
    assert [r.levelname for r in failed] == ["WARNING", "INFO"]
    assert "repeats in this run are logged at INFO level" in failed[0].getMessage()


def upload_url(upload) -> str:
    return f"https://huggingface.co/{upload['repo_id']}/commit/1"


def test_a_finished_trainer_run_pushes_its_continual_checkpoint(tmp_path, base_model_dir, hub, caplog):
    """Saves while training push the model files; once training ended, output_dir is a continual checkpoint
    (class statistics, task history) and `push_to_hub` sends it, with a card saying how to continue it."""
    config = SLCAConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                        per_device_train_batch_size=4, num_train_epochs=2, save_strategy="epoch", push_to_hub=True,
                        hub_model_id="me/trained", hub_base_model_id="me/tiny-vit")
    model = SLCAModel.from_backbone(str(base_model_dir), config)
    model.grow(2)
    trainer = SLCATrainer(model=model, args=config, train_dataset=toy_dataset())
    with caplog.at_level(logging.INFO, logger="slca_peft"):
        trainer.train()
        trainer.push_to_hub(commit_message="done")
    assert [u["message"] for u in hub.uploads] == ["Training in progress, epoch 1", "Training in progress, epoch 2",
                                                   "done"]
    for upload in hub.uploads[:2]:  # while training: the model files, no statistics yet
        assert "class_statistics.safetensors" not in upload["files"]
    final = hub.uploads[-1]
    assert {"class_statistics.safetensors", "continual_state.json", "classifier_unaligned.safetensors"} <= set(
        final["files"])
    assert not {"trainer_state.json", "training_args.json"} & set(final["files"])
    assert "--continue_from me/trained" in final["card"] and "cannot go on from here" not in final["card"]
    assert final["json"]["continual_state.json"]["task_sizes"] == [2]
    assert final["json"]["slca_config.json"]["base_model_name_or_path"] == "me/tiny-vit"
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "cannot be continued" in m or "cannot go on" in m]
    # No eval_dataset: the statistics used the training data as given, and said so once.
    assert len([m for m in messages if m.startswith("class statistics: on train_dataset as given")]) == 1


def test_a_bug_in_an_upload_is_not_taken_for_the_hub_failing(tmp_path, base_model_dir, hub, monkeypatch):
    """Only the network, the Hub and a folder the user can fix are logged and let training go on; anything else
    is a bug of slca-peft and keeps its traceback."""
    import slca_peft.method.trainer_hub as trainer_hub

    def broken(*args, **kwargs):
        raise TypeError("build_model_card() got an unexpected keyword")

    monkeypatch.setattr(trainer_hub.TrainerHub, "_upload", broken)
    config = SLCAConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                        per_device_train_batch_size=4, hub_model_id="me/trained", hub_base_model_id="me/tiny-vit",
                        push_to_hub=True, save_strategy="steps", save_steps=1, num_train_epochs=1)
    model = SLCAModel.from_backbone(str(base_model_dir), config)
    model.grow(2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        SLCATrainer(model=model, args=config, train_dataset=toy_dataset()).train()


def test_a_repo_id_the_hub_would_refuse_is_refused_before_training(tmp_path, base_model_dir, hub):
    from slca_peft.sharing.hub import check_run_repo_id, push_folder
    from slca_peft.utils.errors import UserError

    out = tmp_path / "cifar100_slca++"  # the default repo id is the output directory's name
    config = SLCAConfig(output_dir=str(out), use_cpu=True, report_to="none", push_to_hub=True,
                        hub_base_model_id="me/tiny-vit")
    model = SLCAModel.from_backbone(str(base_model_dir), config)
    model.grow(2)
    with pytest.raises(UserError, match=r"'cifar100_slca\+\+' is not a valid Hub repo id .*--hub_model_id") as err:
        SLCATrainer(model=model, args=config, train_dataset=toy_dataset())
    assert "\n" not in str(err.value)
    config.hub_model_id = "me/cifar100-slca"
    assert check_run_repo_id(config) == "me/cifar100-slca"
    with pytest.raises(UserError, match="not a valid Hub repo id"):
        push_folder(tmp_path, "me/a b")
    assert hub.uploads == []
