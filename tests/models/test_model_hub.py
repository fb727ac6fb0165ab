"""Continual checkpoints: files, PEFT compatibility, the Hub cache path, push, export, bad input."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import stats_for, trained_model
from peft import PeftModel
from transformers import AutoModelForImageClassification, ViTModel

from slca_peft import SLCAModel, export_model
from slca_peft.continual import load_checkpoint, save_checkpoint


def test_round_trip_gives_identical_logits_and_keeps_every_part(tmp_path, base_model_dir):
    model = trained_model(base_model_dir)
    unaligned = model.classifier.snapshot()
    unaligned["scales"] = torch.ones(2)
    x = torch.randn(3, 3, 32, 32)
    expected = model(x).logits
    save_checkpoint(model, tmp_path / "ckpt", statistics=stats_for(model), state={"accuracy_matrix": [[90.0]]},
                    unaligned_head=unaligned)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == [".slca-manifest.json", "README.md",
                     "adapter_config.json", "adapter_model.safetensors", "class_statistics.safetensors",
                     "classifier.safetensors", "classifier_unaligned.safetensors", "config.json",
                     "continual_state.json", "slca_config.json"]
    loaded, stats, state, restored_unaligned = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.eval()(x).logits, expected, rtol=0, atol=0)
    assert stats.classes == [0, 1, 2, 3, 4] and state == {"accuracy_matrix": [[90.0]], "format_version": 2}
    assert restored_unaligned["scales"].tolist() == [1.0, 1.0]
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "ckpt").iterdir())


# Plain PEFT, as a user calls it (outside the library's filter of transformers' rename warning).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_adapter_directory_loads_with_peft_onto_the_base_model(tmp_path, base_model_dir):
    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    base = ViTModel.from_pretrained(base_model_dir, add_pooling_layer=False)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ckpt").eval()
    x = torch.randn(2, 3, 32, 32)
    # LoRA, LayerNorms, biases and the class token all come back through PEFT's own loader.
    torch.testing.assert_close(peft_model(pixel_values=x).last_hidden_state[:, 0], model.features(x))


def lay_out_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "0123456789abcdef") -> None:
    """The on-disk layout huggingface_hub uses: models--owner--name/{refs/main, snapshots/<rev>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision)


def test_loading_by_repo_id_from_an_offline_hub_cache(tmp_path, base_model_dir, monkeypatch):
    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "someone/tiny-slca", tmp_path / "ckpt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    loaded = SLCAModel.from_pretrained("someone/tiny-slca")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits, rtol=0, atol=0)


def test_push_to_hub_uploads_the_checkpoint_in_one_commit(tmp_path, base_model_dir, hub):
    model = trained_model(base_model_dir)
    state = {"accuracy_matrix": [[80.0], [70.0, 60.0]], "seen_accuracy": [80.0, 65.0], "method": "slca++",
             "tasks_learned": 2, "task_sizes": [2, 3], "seed": 1993}
    # The base model is a local directory here: nobody could load the upload, so it is refused.
    with pytest.raises(ValueError, match="its base model is the local path .* pass its Hub id as base_model_id"):
        model.push_to_hub("me/slca-tiny", state=state)
    assert hub.uploads == [] and hub.repos == []
    out = model.push_to_hub("me/slca-tiny", private=True, commit_message="task 2", state=state,
                            base_model_id="me/tiny-vit")
    assert out.endswith("/commit/1") and hub.repos == [("me/slca-tiny", True)] and hub.branches == []
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/slca-tiny" and upload["message"] == "task 2" and upload["revision"] is None
    # Model files only: the learner's run state is not part of the model.
    assert set(upload["files"]) == {"adapter_config.json", "adapter_model.safetensors", "classifier.safetensors",
                                    "slca_config.json", "config.json", "README.md", ".slca-manifest.json"}
    # The upload carries a manifest of the files as uploaded (edited base model id and card included).
    listed = {f["path"] for f in upload["json"][".slca-manifest.json"]["files"]}
    assert listed == set(upload["files"]) - {".slca-manifest.json"}
    assert "base_model" not in upload["json"][".slca-manifest.json"]
    card = upload["card"]
    assert "library_name: slca-peft" in card and "- continual-learning" in card and "| 2 | 70.0 | 60.0 |" in card
    assert "base_model: me/tiny-vit" in card
    # The adapter config names the repo, so transformers' Auto classes given its id read its config.json.
    bases = [upload["json"][f]["base_model_name_or_path"] for f in ("slca_config.json", "adapter_config.json")]
    assert bases == ["me/tiny-vit", "me/slca-tiny"]
    # A saved checkpoint pushed from the command line: same check, and the directory itself is unchanged.
    from slca_peft.commands.cli import main as cli_main

    save_checkpoint(model, tmp_path / "ckpt", statistics=stats_for(model), state=state)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    with pytest.raises(ValueError, match="its base model is the local path"):
        cli_main(["push", str(tmp_path / "ckpt"), "me/slca-tiny"])
    cli_main(["push", str(tmp_path / "ckpt"), "me/slca-tiny", "--base_model_id", "me/tiny-vit", "--revision", "v2"])
    assert hub.uploads[-1]["json"]["slca_config.json"]["base_model_name_or_path"] == "me/tiny-vit"
    assert hub.uploads[-1]["revision"] == "v2" and hub.branches == [("me/slca-tiny", "v2")]
    assert "continual_state.json" in hub.uploads[-1]["files"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before


def test_push_to_a_new_branch_or_as_a_pull_request_like_transformers(base_model_dir, hub):
    from huggingface_hub import ModelCard

    model = trained_model(base_model_dir)
    model.label_names = ["ant", "bee", "cat", "dog", "eel"]
    state = {"accuracy_matrix": [[80.0], [70.0, 60.0]], "seen_accuracy": [80.0, 65.0], "method": "slca++",
             "task_test_sizes": [10, 15], "tasks_learned": 2, "task_sizes": [2, 3]}
    model.push_to_hub("me/slca-tiny", revision="dev", base_model_id="me/tiny-vit", tags=["digits-demo"],
                      state=state, card={"license": "apache-2.0", "datasets": ["me/digits"]})
    model.push_to_hub("me/slca-tiny", create_pr=True, commit_message="try", base_model_id="me/tiny-vit")
    assert hub.branches == [("me/slca-tiny", "dev")]  # created for the first push; main needs none
    first, second = hub.uploads  # one commit per push
    assert (first["revision"], first["create_pr"]) == ("dev", False)
    assert (second["revision"], second["create_pr"], second["message"]) == (None, True, "try")
    card = ModelCard(first["card"])
    data = card.data.to_dict()
    assert data["base_model"] == "me/tiny-vit" and data["license"] == "apache-2.0"
    assert data["datasets"] == ["me/digits"] and "digits-demo" in data["tags"]
    assert data["label_names"] == ["ant", "bee", "cat", "dog", "eel"]
    from slca_peft.metrics import summarize_accuracy_matrix

    expected = summarize_accuracy_matrix(state["accuracy_matrix"], state["task_test_sizes"])
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == pytest.approx({"Last-Acc": expected["last_accuracy"],
                                     "Inc-Acc": expected["average_incremental_accuracy"],
                                     "Forgetting": expected["average_forgetting"]}, abs=1e-4)
    assert results["Last-Acc"] == pytest.approx(64.0)  # (10 * 70 + 15 * 60) / 25
    assert 'SLCAModel.from_pretrained("me/slca-tiny")' in first["card"]


def test_a_local_base_is_never_named_as_the_cards_base_model(tmp_path, base_model_dir):
    from huggingface_hub import ModelCard

    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    assert "base_model" not in ModelCard.load(tmp_path / "ckpt" / "README.md").data.to_dict()


@pytest.mark.slow
def test_export_matches_the_model_and_needs_no_slca_peft(tmp_path, base_model_dir):
    model = trained_model(base_model_dir)
    names = ["ant", "bee", "cat", "dog", "eel"]
    export_model(model, str(tmp_path / "exported"), label_names=names)
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "exported").eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(plain(pixel_values=x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    assert plain.config.id2label == dict(enumerate(names))
    # pipeline() in a fresh interpreter where importing slca_peft fails.
    from PIL import Image

    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()).save(path)
        images.append(str(path))
    script = f"""
import sys, json
sys.modules["slca_peft"] = None
from transformers import pipeline
pipe = pipeline("image-classification", model={str(tmp_path / 'exported')!r}, device="cpu")
print(json.dumps([r[0]["label"] for r in pipe({images!r}, top_k=1)]))
assert not any(m.startswith("slca_peft") and sys.modules[m] is not None for m in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    predicted = json.loads(out.stdout.strip().splitlines()[-1])
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tmp_path / "exported")
    pixels = processor([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    assert predicted == [names[i] for i in model(pixels).logits.argmax(1).tolist()]


def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path, base_model_dir):
    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    # A truncated tensor file.
    broken = tmp_path / "truncated"
    shutil.copytree(tmp_path / "ckpt", broken)
    data = (broken / "classifier.safetensors").read_bytes()
    (broken / "classifier.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="classifier.safetensors is not a valid safetensors file"):
        load_checkpoint(broken)
    # A missing file.
    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "ckpt", missing)
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        load_checkpoint(missing)
    # Pickle offered as a checkpoint, as a file or inside the directory.
    (tmp_path / "model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="Pickle files are never loaded"):
        load_checkpoint(tmp_path / "model.bin")
    with_pickle = tmp_path / "with_pickle"
    shutil.copytree(tmp_path / "ckpt", with_pickle)
    (with_pickle / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match=r"pickle-based files \['pytorch_model.bin'\]"):
        load_checkpoint(with_pickle)
    # A checkpoint of another base model.
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        load_checkpoint(tmp_path / "ckpt", expected_base="google/vit-base-patch16-224-in21k")


def test_a_pickle_that_runs_code_is_never_unpickled(tmp_path, base_model_dir, exploit):
    from slca_peft.commands.cli import main as cli_main

    payload, marker = exploit
    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "model.bin").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="Pickle files are never loaded"):
        load_checkpoint(tmp_path / "model.bin")
    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=r"pickle-based files \['pytorch_model.bin'\]"):
        load_checkpoint(tmp_path / "ckpt")
    # `convert` reads third-party .pth files, with torch's weights-only unpickler.
    torch.save({"state_dict": {"blocks.0.norm1.weight": torch.ones(2)}, "hook": payload}, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"vit.pth holds objects other than tensors"):
        cli_main(["convert", str(tmp_path / "vit.pth"), str(tmp_path / "out")])
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_tensors_with_another_dtype_or_non_finite_values_are_refused(tmp_path, base_model_dir):
    from safetensors.torch import load_file, save_file

    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "classifier.safetensors"
    head = load_file(path)
    save_file({**head, "heads.0.weight": head["heads.0.weight"].to(torch.int32)}, path)
    with pytest.raises(ValueError, match="heads.0.weight is stored as I32, the model expects torch.float32"):
        load_checkpoint(tmp_path / "ckpt")
    save_file({**head, "heads.0.weight": head["heads.0.weight"].to(torch.bfloat16)}, path)
    restored = load_checkpoint(tmp_path / "ckpt")[0]  # another float precision is a legitimate checkpoint
    torch.testing.assert_close(restored.classifier.heads[0].weight, head["heads.0.weight"].bfloat16().float())
    poisoned = head["heads.1.bias"].clone()
    poisoned[0] = float("nan")
    save_file({**head, "heads.1.bias": poisoned}, path)
    with pytest.raises(ValueError, match="heads.1.bias has non-finite values"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_failed_save_leaves_the_previous_checkpoint_untouched(tmp_path, base_model_dir, monkeypatch):
    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    import slca_peft.models.saving

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(slca_peft.models.saving, "write_model_card", boom)
    with torch.no_grad():
        model.classifier.heads[0].bias.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_tampered_safetensors_are_refused(tmp_path, base_model_dir):
    import struct

    from safetensors.torch import load_file, save_file

    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    # A well-formed file whose tensor does not have the layout the model expects.
    reshaped = tmp_path / "reshaped"
    shutil.copytree(tmp_path / "ckpt", reshaped)
    head = load_file(reshaped / "classifier.safetensors")
    head["heads.0.weight"] = torch.zeros(7, 32)
    save_file(head, reshaped / "classifier.safetensors")
    with pytest.raises(ValueError, match=r"heads.0.weight has shape \(7, 32\), the model expects \(2, 32\)"):
        load_checkpoint(reshaped)
    # A header whose offsets point past the end of the data.
    lying = tmp_path / "lying"
    shutil.copytree(tmp_path / "ckpt", lying)
    raw = (lying / "classifier.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**9]
    encoded = json.dumps(header).encode()
    (lying / "classifier.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])
    with pytest.raises(ValueError, match="classifier.safetensors is not a valid safetensors file"):
        load_checkpoint(lying)


def test_cli_export_uses_the_real_class_names(tmp_path, base_model_dir):
    from slca_peft.commands.cli import main

    model = trained_model(base_model_dir)
    save_checkpoint(model, tmp_path / "ckpt", state={"label_names": ["a", "b", "c", "d", "e", "f"]})
    main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"}


def test_a_base_model_with_remote_code_never_runs_it(tmp_path, base_model_dir):
    """A checkpoint names its base model; a base whose config asks for custom code must not run it."""
    base = tmp_path / "base-with-code"
    shutil.copytree(base_model_dir, base)
    marker = tmp_path / "pwned"
    (base / "modeling_evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (base / "config.json").write_text(json.dumps(config))
    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    model.save_pretrained(tmp_path / "ckpt")
    settings = json.loads((tmp_path / "ckpt" / "slca_config.json").read_text())
    settings["base_model_name_or_path"] = str(base)
    (tmp_path / "ckpt" / "slca_config.json").write_text(json.dumps(settings))
    restored = load_checkpoint(tmp_path / "ckpt")[0]
    assert type(restored.base_backbone).__name__ == "ViTModel"  # the library's class; auto_map ignored
    assert not marker.exists()


def test_a_checkpoint_can_name_its_base_by_any_accepted_name(tmp_path, base_model_dir):
    """A pushed copy names the base by its Hub id, a local run by its path: resume accepts either."""
    other_name = tmp_path / "same-weights"
    shutil.copytree(base_model_dir, other_name)
    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    settings = json.loads((tmp_path / "ckpt" / "slca_config.json").read_text())
    settings["base_model_name_or_path"] = str(other_name)
    (tmp_path / "ckpt" / "slca_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="base_model_name_or_path is .*same-weights"):
        load_checkpoint(tmp_path / "ckpt", expected_base=str(base_model_dir))
    restored = load_checkpoint(tmp_path / "ckpt", expected_base=[str(base_model_dir), None, str(other_name)])[0]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(restored.eval()(x).logits, model(x).logits, rtol=0, atol=0)


STATE = {"accuracy_matrix": [[80.0], [70.0, 60.0]], "seen_accuracy": [80.0, 65.0], "method": "slca++",
         "task_test_sizes": [10, 15], "tasks_learned": 2, "task_sizes": [2, 3],
         "dataset": "me/letters"}  # a Hub dataset: the results go to model-index


def test_a_checkpoint_card_claims_no_pipeline_and_says_how_to_get_one(tmp_path, base_model_dir):
    from huggingface_hub import ModelCard

    save_checkpoint(trained_model(base_model_dir), tmp_path / "ckpt", state=STATE)
    card = ModelCard.load(tmp_path / "ckpt" / "README.md")
    # pipeline() on these files would answer from a fresh random head: the card must not offer it.
    assert "pipeline_tag" not in card.data.to_dict()
    assert "slca-peft export <this repo or directory> exported/" in card.text and "export_model(model, " in card.text


def test_the_export_carries_a_pipeline_card_with_results_and_provenance(tmp_path, base_model_dir, hub):
    from huggingface_hub import ModelCard

    from slca_peft.commands.cli import main as cli_main

    model = trained_model(base_model_dir)
    model.class_ids = [4, 0, 3, 1, 2]
    model.label_names = ["ant", "bee", "cat", "dog", "eel"]  # by class id, whatever the learning order
    save_checkpoint(model, tmp_path / "run" / "task_1", state=STATE)
    loaded, _, state, _ = load_checkpoint(tmp_path / "run" / "task_1")
    loaded.slca_config.base_model_name_or_path = "google/vit-tiny-test"  # as if loaded by Hub id
    export_model(loaded, tmp_path / "exported", card={"state": state})
    card = ModelCard.load(tmp_path / "exported" / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-classification" and data["library_name"] == "transformers"
    assert data["base_model"] == "google/vit-tiny-test"
    assert data["label_names"] == ["ant", "bee", "cat", "dog", "eel"]  # by class id
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["Last-Acc"] == pytest.approx(64.0)
    # Where it came from, by the checkpoint's folder name: no path of this machine in a card meant for the Hub.
    assert "`task_1 (a local checkpoint)`" in card.text and "after task 2 of 2" in card.text
    assert str(tmp_path) not in card.text
    assert "- 4: eel" in card.text
    # One command uploads it, the card pointing at the repo; a checkpoint's files are not needed.
    cli_main(["push", str(tmp_path / "exported"), "me/slca-exported"])
    (upload,) = hub.uploads
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(upload["files"])
    assert upload["message"] == "Upload exported SLCA++ model"
    assert 'pipeline("image-classification", model="me/slca-exported")' in upload["card"]
    (tmp_path / "exported" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"is not a complete export \(missing \['model.safetensors'\]\)"):
        cli_main(["push", str(tmp_path / "exported"), "me/slca-exported"])


def test_a_checkpoint_pushed_again_keeps_its_results_and_a_model_push_only_those_it_is_given(tmp_path,
                                                                                              base_model_dir, hub):
    from huggingface_hub import ModelCard

    from slca_peft.sharing.hub import push_folder

    save_checkpoint(trained_model(base_model_dir), tmp_path / "ckpt", state=STATE)
    push_folder(tmp_path / "ckpt", "me/again", base_model_id="me/tiny-vit")  # the folder: its task history
    results = {r.metric_name: r.metric_value for r in ModelCard(hub.uploads[-1]["card"]).data.eval_results}
    assert results["Last-Acc"] == pytest.approx(64.0) and set(results) == {"Last-Acc", "Inc-Acc", "Forgetting"}
    loaded = SLCAModel.from_pretrained(tmp_path / "ckpt")  # the model only: no run state travels with it
    assert not hasattr(loaded, "task_history") and not hasattr(loaded, "class_statistics")
    loaded.push_to_hub("me/model", base_model_id="me/tiny-vit")
    assert not ModelCard(hub.uploads[-1]["card"]).data.eval_results
    assert "continual_state.json" not in hub.uploads[-1]["files"]
    loaded.push_to_hub("me/model", base_model_id="me/tiny-vit", state=STATE)  # results given: on the card
    results = {r.metric_name: r.metric_value for r in ModelCard(hub.uploads[-1]["card"]).data.eval_results}
    assert results["Last-Acc"] == pytest.approx(64.0)


def test_loading_keywords_reach_the_checkpoint_download_and_the_base_model(tmp_path, base_model_dir, monkeypatch):
    model = trained_model(base_model_dir)
    model.save_pretrained(tmp_path / "ckpt")
    cache = tmp_path / "elsewhere"  # not the default cache: only cache_dir finds it
    lay_out_hub_cache(cache, "someone/tiny-slca", tmp_path / "ckpt")
    seen = {}
    import slca_peft.models.loading as loading

    real = loading.load_backbone

    def spy(name, revision=None, **kwargs):
        seen.update(kwargs)
        return real(name, revision=revision, **{k: v for k, v in kwargs.items() if k != "token"})

    monkeypatch.setattr("slca_peft.models.model.load_backbone", spy)
    loaded = SLCAModel.from_pretrained("someone/tiny-slca", cache_dir=str(cache), local_files_only=True,
                                       token="hf_x", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.name_or_path == "someone/tiny-slca"
    assert seen["cache_dir"] == str(cache) and seen["local_files_only"] and seen["token"] == "hf_x"
    loaded, *_ = load_checkpoint("someone/tiny-slca", cache_dir=str(cache), local_files_only=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="neither a local checkpoint directory nor a Hub repo"):
        SLCAModel.from_pretrained("someone/tiny-slca", cache_dir=str(tmp_path / "empty"), local_files_only=True)
    with pytest.raises(ValueError, match="SLCAModel.from_pretrained: device_map is not supported: .*model.to"):
        SLCAModel.from_pretrained(tmp_path / "ckpt", device_map="auto")
    with pytest.raises(TypeError, match=r"SLCAModel.from_pretrained: unknown keyword\(s\) \['cache'\]"):
        SLCAModel.from_pretrained(tmp_path / "ckpt", cache="x")


def test_the_card_names_every_hub_dataset_the_task_history_learned_from():
    from slca_peft.sharing.card import build_model_card

    settings = {"base_model_name_or_path": "google/vit-base-patch16-224-in21k", "task_sizes": [2, 2, 2]}
    state = {"accuracy_matrix": [[90.0], [80.0, 70.0], [70.0, 60.0, 50.0]], "seen_accuracy": [90.0, 75.0, 60.0],
             "task_test_sizes": [4, 4, 4], "tasks_learned": 3, "task_sizes": [2, 2, 2], "dataset": "me/birds",
             "task_data": ["uoft-cs/cifar100", "image folders /data/a/train, /data/a/test", "me/birds"]}
    data = build_model_card(settings, state).data.to_dict()
    assert data["datasets"] == ["uoft-cs/cifar100", "me/birds"]  # continued on folders, then on another dataset
    assert data["model-index"][0]["results"][0]["dataset"]["name"] == "me/birds"  # results are the run's own
    folders_only = {**state, "dataset": None, "task_data": ["image folders /data/a/train, /data/a/test", "digits"]}
    assert "datasets" not in build_model_card(settings, folders_only).data.to_dict()
