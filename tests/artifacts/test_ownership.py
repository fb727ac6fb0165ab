"""What slca-peft writes, uploads and resumes is its own: permissions follow the umask, uploads send
only the manifest's regular files, exports never replace what is not an export, reports never write
through a symlink, edited checkpoints and swapped base weights are refused, callback mistakes are one line."""

import json
import os
import shutil
import sys

import pytest
import torch
from conftest import stats_for, trained_model
from safetensors.torch import load_file, save_file

from slca_peft import SLCAModel, export_model, verify_checkpoint
from slca_peft.artifacts.layout import MANIFEST_FILE
from slca_peft.artifacts.manifest import atomic_write_bytes
from slca_peft.commands.cli import main as cli_main
from slca_peft.continual import save_checkpoint
from slca_peft.continual.callbacks import CallbackHandler, ContinualCallback, load_callback
from slca_peft.sharing.hub import push_folder
from slca_peft.sharing.report import write_report
from slca_peft.utils.errors import UserError

STATE = {"accuracy_matrix": [[80.0], [70.0, 60.0]], "seen_accuracy": [80.0, 65.0], "method": "slca++",
         "tasks_learned": 2, "task_sizes": [2, 3], "seed": 1993}


def checkpoint(model, path):
    return save_checkpoint(model, path, statistics=stats_for(model), state=STATE,
                           unaligned_head=model.classifier.snapshot())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_written_file_follows_the_umask_safetensors_included(tmp_path, base_model_dir, umask):
    model = trained_model(base_model_dir)
    old = os.umask(umask)
    try:
        checkpoint(model, tmp_path / "ck")
        model.save_pretrained(tmp_path / "model")
        export_model(model, tmp_path / "export")
        atomic_write_bytes(tmp_path, "notes.json", b"{}")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".safetensors", ".json", ".md"}
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != 0o666 & ~umask}
    assert wrong == {}
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~umask


def test_push_never_uploads_a_symlink_target_or_an_unlisted_file(tmp_path, base_model_dir, hub):
    model = trained_model(base_model_dir)
    ck = checkpoint(model, tmp_path / "ck")
    token = tmp_path / "token"
    token.write_text("hf_secret")
    (ck / "token.json").symlink_to(token)
    (ck / "notes.txt").write_text("private notes")
    push_folder(ck, "me/ck", base_model_id="me/base")
    files = hub.uploads[-1]["files"]
    assert "token.json" not in files and "notes.txt" not in files and "adapter_model.safetensors" in files
    assert "hf_secret" not in json.dumps(hub.uploads[-1]["json"])
    # A folder without a manifest uploads nothing: which of its files slca-peft wrote is unknown.
    (ck / MANIFEST_FILE).unlink()
    uploads = len(hub.uploads)
    with pytest.raises(UserError, match=r"has no \.slca-manifest\.json.*slca-peft export"):
        push_folder(ck, "me/ck", base_model_id="me/base")
    assert len(hub.uploads) == uploads and token.read_text() == "hf_secret"


def test_export_refuses_targets_it_does_not_own(tmp_path, base_model_dir):
    model = trained_model(base_model_dir)
    run = tmp_path / "run"
    ck = checkpoint(model, run / "task_2")
    (run / "run_fingerprint.json").write_text("{}")
    before = sorted(p.name for p in ck.iterdir())
    # `export ck ck`, `export run/task_2 run`, a folder inside the run: refused before anything is read.
    for target in (ck, run, run / "exports"):
        with pytest.raises(UserError, match="a checkpoint|a run directory"):
            cli_main(["export", str(ck), str(target)])
    assert sorted(p.name for p in ck.iterdir()) == before and not (run / "exports").exists()
    # A user's folder is never replaced.
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match=r"is not empty \(thesis.tex\) and holds no previous export"):
        export_model(model, user)
    assert (user / "thesis.tex").read_text() == "years of work"
    # A previous export: refused without overwrite; with it, its files alone are replaced.
    out = tmp_path / "export"
    export_model(model, out)
    (out / "my_readme.md").write_text("mine")
    with pytest.raises(UserError, match="holds a previous export; pass --overwrite"):
        export_model(model, out)
    with torch.no_grad():
        model.classifier.heads[0].bias.add_(1.0)
    export_model(model, out, overwrite=True)
    assert (out / "my_readme.md").read_text() == "mine" and (out / "config.json").is_file()
    weights = load_file(out / "model.safetensors")
    assert torch.allclose(weights["classifier.bias"][:2], model.classifier.heads[0].bias.detach())


def test_swapped_base_weights_under_a_moved_checkpoint_are_refused(tmp_path, base_model_dir):
    base = tmp_path / "base"
    shutil.copytree(base_model_dir, base)
    model = SLCAModel.from_backbone(str(base))
    model.grow(2)
    checkpoint(model, tmp_path / "run" / "task_1")
    moved = tmp_path / "elsewhere" / "task_1"
    moved.parent.mkdir()
    shutil.move(tmp_path / "run" / "task_1", moved)
    assert verify_checkpoint(moved) == []
    weights = load_file(base / "model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"base model .*base: model.safetensors holds other values \(same tensor "
                                        r"layout\).*--accept_changed_files"):
        verify_checkpoint(moved)
    assert verify_checkpoint(moved, accept_changed_files=True) == [
        f"base model {base}: model.safetensors holds other values (same tensor layout)"]


def test_edited_adapter_weights_or_accuracies_are_refused(tmp_path, base_model_dir, caplog):
    model = trained_model(base_model_dir)
    ck = checkpoint(model, tmp_path / "ck")
    adapter, state = (ck / "adapter_model.safetensors").read_bytes(), (ck / "continual_state.json").read_text()
    weights = load_file(ck / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in weights.items()}, ck / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"adapter_model.safetensors was edited"):
        verify_checkpoint(ck)
    (ck / "adapter_model.safetensors").write_bytes(adapter)
    edited = json.loads(state)
    edited["accuracy_matrix"][1][1] = 99.0
    (ck / "continual_state.json").write_text(json.dumps(edited))
    with pytest.raises(UserError, match=r"continual_state.json was edited"):
        verify_checkpoint(ck)
    (ck / "continual_state.json").write_text(state)
    (ck / "README.md").write_text("my notes")  # the card changes no result
    assert verify_checkpoint(ck) == []
    (ck / MANIFEST_FILE).unlink()  # written before digests: loads with one warning
    assert verify_checkpoint(ck) == [] and verify_checkpoint(ck) == []
    assert sum("cannot be checked" in r.message for r in caplog.records) == 1


def metrics(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps({
        "accuracy_matrix": [[90.0], [80.0, 70.0]], "seen_accuracy": [90.0, 75.0], "task_sizes": [2, 2],
        "last_accuracy": 75.0, "average_incremental_accuracy": 82.5, "method": "slca++"}))


def test_reports_never_write_through_a_symlink(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim.md"
    metrics(run)
    victim.write_text("precious")
    (run / "results.md").symlink_to(victim)
    with pytest.raises(UserError, match="results.md is a symbolic link"):
        write_report(run)
    assert victim.read_text() == "precious" and not (run / "accuracy_matrix.png").exists()
    # A `seed_1` link to another run must not make the report write into that run.
    seeds, other = tmp_path / "seeds", tmp_path / "other"
    metrics(other)
    metrics(seeds / "seed_2")
    seeds.joinpath("seed_1").symlink_to(other)
    with pytest.raises(UserError, match="the report only writes inside the run directory"):
        write_report(seeds)
    assert sorted(p.name for p in other.iterdir()) == ["metrics.json"]
    assert sorted(p.name for p in (seeds / "seed_2").iterdir()) == ["metrics.json"]


class NeedsArguments(ContinualCallback):
    def __init__(self, threshold):
        self.threshold = threshold


def not_a_class():
    return None


class Quitter(ContinualCallback):
    def on_task_end(self, learner, task):
        sys.exit(0)


def test_callback_mistakes_are_one_line_naming_the_flag(tmp_path, monkeypatch):
    (tmp_path / "broken_callbacks.py").write_text("class Step(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "broken_callbacks:Step": r"broken_callbacks.py:1 has a syntax error",
        "test_ownership:not_a_class": r"is a function, not a callback class",
        "test_ownership:NeedsArguments": r"NeedsArguments\(\) cannot be built without arguments",
        "test_ownership:Missing": r"cannot be imported: module 'test_ownership' has no 'Missing'",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match=rf"^--callbacks '{spec}'.*{message}") as info:
            load_callback(spec)
        assert "\n" not in str(info.value)
    assert isinstance(load_callback("test_ownership:Quitter"), Quitter)
    handler = CallbackHandler([], [Quitter()])
    with pytest.raises(UserError, match=r"called sys.exit\(0\) during continual callback Quitter.on_task_end"):
        handler.call_event("on_task_end", None, None)


def test_a_model_config_run_never_replaces_a_users_base_model_folder(recipe, tmp_path, vit_config):
    config = tmp_path / "vit.json"
    vit_config.to_json_file(config)
    out = tmp_path / "run"
    (out / "base_model").mkdir(parents=True)
    (out / "base_model" / "model.safetensors").write_bytes(b"my own weights")
    model_args, _, args = recipe.parse_args(["--model_config", str(config), "--dataset", "digits", "--output_dir",
                                             str(out), "--use_cpu", "true"])
    with pytest.raises(UserError, match="base_model exists but was not written by slca-peft"):
        recipe.build_model(model_args, args)
    assert (out / "base_model" / "model.safetensors").read_bytes() == b"my own weights"
    shutil.rmtree(out / "base_model")
    recipe.build_model(model_args, args)
    recipe.build_model(model_args, args)  # its own random backbone, with no checkpoint on it, is replaced


@pytest.mark.parametrize("ridge", ["-1", "1e300", "nan"])
def test_ca_ridge_out_of_range_is_refused_when_parsed(recipe, tmp_path, ridge):
    with pytest.raises(ValueError, match=r"--ca_ridge .* is out of range"):
        recipe.parse_args(["--dataset", "digits", "--model_config", str(tmp_path / "c.json"), "--output_dir",
                           str(tmp_path / "out"), "--ca_ridge", ridge])


def test_push_refuses_a_huge_model_card_before_copying_it(tmp_path, base_model_dir, hub):
    """The card is read bounded: a sparse README.md of gigabytes was read whole (MemoryError)."""
    model = trained_model(base_model_dir)
    out = tmp_path / "export"
    export_model(model, out)
    with open(out / "README.md", "r+b") as fh:
        fh.truncate(64 << 20)  # sparse: 64 MiB on paper, nothing on disk (the hostile case is 3 GB)
    uploads = len(hub.uploads)
    with pytest.raises(UserError, match="README.md is larger than 4194304 bytes"):
        push_folder(out, "me/export")
    assert len(hub.uploads) == uploads
    (out / "README.md").unlink()
    os.mkfifo(out / "README.md")
    with pytest.raises(UserError, match="README.md is a FIFO"):
        push_folder(out, "me/export")


def test_damaged_base_weights_are_one_line_naming_the_file(tmp_path, base_model_dir):
    """A base folder whose model.safetensors is zeros (the hostile case: 2 GB of them) gave a SafetensorError
    traceback from transformers' loader."""
    base = tmp_path / "base"
    shutil.copytree(base_model_dir, base)
    weights = base / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(0)
        fh.truncate(1 << 20)  # zeros: an 8-byte header length of 0, then nothing a header can be
    with pytest.raises(UserError, match="model.safetensors: the base model's safetensors weights are damaged"):
        SLCAModel.from_backbone(str(base))


@pytest.mark.parametrize("ranges", [[[0, 50]], [[3, 1]], [[0, "x"]], "all"])
def test_info_on_a_checkpoint_with_layer_replication_out_of_range_is_one_line(tmp_path, base_model_dir, capsys,
                                                                             ranges):
    from peft import LoraConfig

    model = trained_model(base_model_dir)
    ck = checkpoint(model, tmp_path / "ck")
    config = json.loads((ck / "slca_config.json").read_text())
    targets = json.loads((ck / "adapter_config.json").read_text())["target_modules"]
    peft = LoraConfig(r=4, lora_alpha=4, target_modules=targets).to_dict()
    config["peft_config"] = {**peft, "peft_type": "LORA", "layer_replication": ranges}
    (ck / "slca_config.json").write_text(json.dumps(config, default=list))
    from slca_peft.artifacts import manifest

    manifest.record(ck, ["slca_config.json"])  # re-recorded: only the content check is left to catch it
    from slca_peft.utils.errors import run_main

    with pytest.raises(SystemExit) as ended:
        run_main(cli_main, ["info", str(ck)])  # as the console script runs it
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("slca-peft: error:")]
    assert ended.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "slca_config.json: peft_config.layer_replication" in errors[0]
