"""Weak spots, each answered in one line that names the fix, before any training: values a re-signed
checkpoint carries, a task history of the wrong types, a continuation stopped or resumed without its
source, one-class new data, a callback module that exits, an output directory on the base model, a
dangling image link, an unreadable class folder, a decode cache fooled by unchanged file stamps, paths that
are a FIFO, a device or the wrong kind of entry, negative seeds, both model flags, a PEFT rank of 0, links
where a run writes, a task history listing a class twice; and, pinned, what a re-signed checkpoint can do."""

from __future__ import annotations

import io
import json
import mmap
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import recipe_argv, stats_for, trained_model, write_image_folder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from slca_peft.artifacts import manifest
from slca_peft.commands.arguments import DataArguments, ModelArguments
from slca_peft.commands.recipe import continuation_fingerprint, continuation_of
from slca_peft.continual import load_checkpoint, save_checkpoint
from slca_peft.continual.callbacks import load_callback
from slca_peft.continual.run_dir import check_output_arguments, claim_run_directory
from slca_peft.data import checks as data_checks
from slca_peft.data.checks import check_images, list_class_folder
from slca_peft.data.continuation import ContinuedStream
from slca_peft.data.tasks import TaskSequence
from slca_peft.utils.errors import UserError

STATE = {"accuracy_matrix": [[80.0], [70.0, 60.0]], "seen_accuracy": [80.0, 65.0], "method": "slca++",
         "tasks_learned": 2, "task_sizes": [2, 3], "seed": 1993}


def checkpoint(model, path):
    return save_checkpoint(model, path, statistics=stats_for(model), state=STATE,
                           unaligned_head=model.classifier.snapshot())


# ------------------------------------------------------------------------------------------- bounds at load
def resign_statistics(ck, edit):
    """Edit a checkpoint's statistics tensors and record the result in its manifest (a re-signed checkpoint)."""
    path = ck / "class_statistics.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)
    manifest.record(ck, ["class_statistics.safetensors"])


@pytest.mark.parametrize("field, value, message", [
    ("ridge", 1e300, r"ridge 1e\+300 \(allowed: 0 to 1e\+06"),
    ("counts", 0, r"counts value 0"),
    ("classes", 999999, r"statistics of class \[999999\]"),
])
def test_values_a_resigned_checkpoint_carries_are_bounded_at_load(tmp_path, base_model_dir, field, value, message):
    model = trained_model(base_model_dir)
    ck = checkpoint(model, tmp_path / "ck")

    def edit(tensors):
        tensors[field] = torch.full_like(tensors[field], value) if field == "ridge" else tensors[field].clone()
        if field != "ridge":
            tensors[field][0] = value

    resign_statistics(ck, edit)
    assert manifest.owned_files(ck)  # the manifest matches: verification alone would let it through
    with pytest.raises(ValueError, match=message) as err:
        load_checkpoint(ck)
    assert "\n" not in str(err.value)


def test_class_ids_that_leave_no_room_for_new_classes_are_refused_before_training(tmp_path):
    previous = {"task_sizes": [2], "label_names": ["a", "b"], "class_ids": [0, (1 << 20) - 1], "tasks_learned": 1,
                "accuracy_matrix": [[90.0]]}
    new = TaskSequence(*_one_class_dataset(tmp_path), init_cls=1, increment=1, min_classes=1)
    with pytest.raises(ValueError, match=r"largest class id is 1048575,.*refused before any training"):
        ContinuedStream(previous, new)


# ------------------------------------------------------------------------------------------- continuations
def _state(segment_extra):
    return {"task_sizes": [2, 1], "label_names": ["a", "b", "c"], "class_ids": [0, 1, 2], "tasks_learned": 2,
            "accuracy_matrix": [[90.0], [80.0, 70.0]], "seen_accuracy": [90.0, 76.7],
            "segments": [{"first_task": 0, "tasks": 1, "data": "a"},
                         {"first_task": 1, "tasks": 1, "data": "b", **segment_extra}]}


def _run_with_state(root, state, fingerprint=None):
    (root / "task_1").mkdir(parents=True)
    (root / "task_1" / "continual_state.json").write_text(json.dumps(state))
    if fingerprint is not None:
        (root / "run_fingerprint.json").write_text(json.dumps(fingerprint))
    return root


@pytest.mark.parametrize("value", [["list"], 7, {"path": "x"}])
def test_a_task_history_field_of_the_wrong_type_is_refused_before_use(tmp_path, value):
    out = _run_with_state(tmp_path / "run", _state({"continued_from": value}))
    with pytest.raises(ValueError, match=r"segments\[1\]\.continued_from must be a string.*damaged") as err:
        continuation_of(ModelArguments(resume_from=str(out / "task_1")))
    assert "\n" not in str(err.value)  # one line, not a TypeError traceback


def test_a_continuation_resumes_without_its_source_checkpoint(tmp_path):
    source = tmp_path / "phase1" / "task_1"
    out = _run_with_state(tmp_path / "run", _state({"continued_from": str(source)}),
                          fingerprint={"continue_from": str(source), "continue_sha256": "ab" * 32})
    extra = continuation_fingerprint(ModelArguments(resume_from=str(out / "task_1")), DataArguments(), str(out))
    assert extra["continue_from"] == str(source) and extra["continue_sha256"] == "ab" * 32
    # Starting a continuation (not resuming one) still needs the checkpoint it goes on from.
    with pytest.raises(UserError, match="which is needed"):
        continuation_fingerprint(ModelArguments(continue_from=str(source)), DataArguments(), str(tmp_path / "new"))


def test_a_continuation_stopped_before_its_first_new_task_says_to_rerun_the_original_command(tmp_path):
    out = tmp_path / "next"
    out.mkdir()
    recorded = {"method": "slca++", "continue_from": "runs/a/task_1", "continue_sha256": "ab" * 32}
    (out / "run_fingerprint.json").write_text(json.dumps(recorded))
    manifest.record(out, ["run_fingerprint.json"])
    with pytest.raises(UserError, match=r"--continue_from runs/a/task_1 run that was stopped before it finished a "
                                        r"new task.*rerun the original command"):
        with claim_run_directory(out, {"method": "slca++"}, resume=True):
            pass
    with claim_run_directory(out, recorded):  # the original command: starts over in the same directory
        pass


def _one_class_dataset(tmp_path):
    from slca_peft.data.formats import load_split_image_folders

    train = write_image_folder(tmp_path / "one" / "train", 1, 4)
    test = write_image_folder(tmp_path / "one" / "test", 1, 2, seed=3)
    data = load_split_image_folders(train, test, min_classes=1)
    return data["train"], data["test"]


def test_one_class_of_new_data_continues_a_checkpoint(tmp_path):
    train, test = write_image_folder(tmp_path / "t", 1, 3), write_image_folder(tmp_path / "v", 1, 2, seed=3)
    with pytest.raises(ValueError, match=r"1 class sub-folder.*one is enough for new data that continues"):
        TaskSequence.from_image_folders(train, test, init_cls=1, increment=1)
    new = TaskSequence.from_image_folders(train, test, init_cls=1, increment=1, min_classes=1)
    previous = {"task_sizes": [2], "label_names": ["a", "b"], "class_ids": [0, 1], "tasks_learned": 1,
                "accuracy_matrix": [[90.0]]}
    stream = ContinuedStream(previous, new)
    assert stream.task_sizes == [2, 1] and stream.label_names == ["a", "b", "class_00"] and stream.class_ids[2] == 2
    assert len(stream[1].train) == 3


# ------------------------------------------------------------------------------------------- arguments and data
def test_a_callback_module_that_exits_at_import_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"importing 'exits_at_import' called sys.exit\(0\).*if __name__"):
        load_callback("exits_at_import:Callback")
    sys.modules.pop("exits_at_import", None)


def test_an_output_directory_that_is_the_base_model_folder_is_refused(tmp_path, base_model_dir):
    copy = shutil.copytree(base_model_dir, tmp_path / "vit")
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(UserError, match=r"is the base model's folder .* choose another --output_dir"):
        check_output_arguments(copy, model=str(copy))
    check_output_arguments(copy / "runs" / "a", model=str(copy))  # a folder of its own inside is fine
    assert sorted(p.name for p in copy.iterdir()) == before


def test_a_dangling_image_link_and_an_unreadable_class_folder_are_named(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs", 2, 2)
    (root / "class_00" / "9.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(UserError, match=r"9.png is a symbolic link to .*gone.png.*restore its target or remove"):
        list_class_folder(root, ["class_00", "class_01"])
    (root / "class_00" / "9.png").unlink()
    locked = root / "class_01"
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads a chmod 000 folder: make the listing fail as it does for everyone else
        real = os.scandir
        monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission "
                            "denied", str(p))) if str(p) == str(locked) else real(p))
    try:
        with pytest.raises(UserError, match=r"class_01 cannot be read \(Permission denied\).*chmod -R u\+rX"):
            list_class_folder(root, ["class_00", "class_01"])
    finally:
        locked.chmod(0o755)


def test_the_decode_cache_is_keyed_by_content_not_by_file_stamps(tmp_path):
    """A write through a shared writable memory map leaves size, mtime, ctime and inode as they were once
    the page is dirty: each seed's check must still see, decode and fingerprint the bytes there now."""
    data_checks.forget_content_digests()
    path = tmp_path / "a.png"
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mapped:
        mapped[-1:] = mapped[-1:]  # the first write through the map: the page is now dirty
        check_images([str(path)])  # seed 1: decoded, its digest recorded
        first = data_checks.content_digest(path)
        stamp = os.stat(path)
        mapped[len(mapped) // 2 : len(mapped) // 2 + 8] = b"\0" * 8  # seed 2's data: corrupted in place
        mapped.flush()
        if (os.stat(path).st_mtime_ns, os.stat(path).st_ctime_ns) != (stamp.st_mtime_ns, stamp.st_ctime_ns):
            pass  # the kernel moved a stamp this time; the check below must hold either way
        with pytest.raises(UserError, match=r"unreadable image .*a.png"):
            check_images([str(path)])
        assert data_checks.content_digest(path) != first  # the fingerprint records the bytes there now


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Set A (class_00..03) and set B (class_04, class_05) as separate image folders."""
    root = tmp_path_factory.mktemp("sets")
    full = {split: write_image_folder(root / "full" / split, 6, per_class=n, seed=s)
            for split, n, s in (("train", 8, 1), ("test", 3, 2))}
    names = {"a": [f"class_{k:02d}" for k in range(4)], "b": ["class_04", "class_05"]}
    sets = {}
    for key in names:
        sets[key] = tuple(root / key / split for split in ("train", "test"))
        for split, target in zip(("train", "test"), sets[key], strict=True):
            for name in names[key]:
                shutil.copytree(full[split] / name, target / name)
    return sets


@pytest.mark.slow
def test_the_recipe_resumes_a_continuation_whose_source_is_gone_and_continues_with_one_class(
        recipe, folders, make_learner, base_model_dir, tmp_path):
    phase1 = make_learner(TaskSequence.from_image_folders(*folders["a"], init_cls=2, increment=2),
                          tmp_path / "phase1", num_train_epochs=2, ca_samples_per_class=32, ca_epochs=2)
    phase1.run()
    source = shutil.copytree(tmp_path / "phase1" / "task_2", tmp_path / "source")
    out = tmp_path / "next"
    args = recipe_argv(None, folders["b"], out, "--continue_from", str(source), init_cls=1, increment=1)
    recipe.main(args)
    metrics = json.loads((out / "metrics.json").read_text())
    partial = shutil.copytree(out, tmp_path / "partial")
    shutil.rmtree(partial / "task_4")
    (partial / "metrics.json").unlink()
    shutil.rmtree(source)  # its own last checkpoint holds all the continuation needs
    resumed = [str(partial) if a == str(out) else a for a in args]
    i = resumed.index("--continue_from")
    del resumed[i : i + 2]
    recipe.main(resumed + ["--resume_from", "auto"])
    assert json.loads((partial / "metrics.json").read_text())["accuracy_matrix"] == metrics["accuracy_matrix"]
    # New data of one class continues a checkpoint (a task of one class is supported).
    one = {split: shutil.copytree(folders["b"][k] / "class_04", tmp_path / "one" / split / "class_04")
           for k, split in enumerate(("train", "test"))}
    single = tmp_path / "single"
    recipe.main(recipe_argv(None, (one["train"].parent, one["test"].parent), single, "--continue_from",
                            str(tmp_path / "phase1" / "task_2"), init_cls=1, increment=1))
    assert json.loads((single / "metrics.json").read_text())["task_sizes"] == [2, 2, 1]


# ------------------------------------------------------------------------------ paths of the wrong kind
@pytest.fixture
def odd_paths(tmp_path):
    """A FIFO, a device, a folder and a regular file: none of them "no such file"."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    return {"fifo": (fifo, "a FIFO"), "device": ("/dev/zero", "a device"),
            "folder": (tmp_path / "folder", "a directory"), "file": (tmp_path / "file.txt", "a regular file")}


def _load_local_data(path):
    from slca_peft.data.benchmarks import _load_local

    return _load_local("cifar100", Path(path))


def _continued_old_test_data(path):
    from slca_peft.data.continuation import load_test_folder

    return load_test_folder(path)


def _resolved_checkpoint(path):
    from slca_peft.models.saving import resolve_checkpoint

    return resolve_checkpoint(path)


def _backbone(path):
    from slca_peft.models.loading import check_backbone_source

    return check_backbone_source(path)


def _model_config(path):
    from slca_peft.models.loading import check_model_config

    return check_model_config(path)


def _converted(path):
    from slca_peft.models.convert import load_timm_state_dict

    return load_timm_state_dict(path)


def _report(path):
    from slca_peft.sharing.report import write_report

    return write_report(path)


@pytest.mark.parametrize("reader, flag, kinds", [
    ("verify_image_folder", "image folder", ("fifo", "device", "file")),  # --train/test_dir
    (_load_local_data, "--data_dir", ("fifo", "device", "file")),
    (_continued_old_test_data, "--old_test_dir", ("fifo", "device", "file")),
    (_resolved_checkpoint, "checkpoint directory", ("fifo", "device")),  # --resume_from/--continue_from, export...
    (_backbone, "the backbone", ("fifo", "device", "file", "folder")),
    (_model_config, "--model_config", ("fifo", "device", "folder")),
    (_converted, "slca-peft convert:", ("fifo", "device", "folder")),
    (_report, "slca-peft report:", ("fifo", "device", "file")),  # was a NotADirectoryError traceback
])
def test_a_fifo_a_device_or_a_path_of_the_wrong_kind_is_named_for_what_it_is(odd_paths, reader, flag, kinds):
    if reader == "verify_image_folder":
        from slca_peft.data.tasks import verify_image_folder as reader
    for kind in kinds:
        path, words = odd_paths[kind]
        if kind == "folder" and reader is _backbone:
            words = "a folder without config.json"
        with pytest.raises(UserError) as err:
            reader(path)
        message = str(err.value)
        assert f"{flag} {path} is {words}" in message and "does not exist" not in message, message
        assert "\n" not in message and "; " in message  # one line, with the fix after the problem


def test_path_kind_never_opens_what_it_describes(tmp_path):
    from slca_peft.utils.errors import MissingFileError
    from slca_peft.utils.reading import path_kind, require_path

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # stat only: a FIFO without a writer would block an open
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    assert path_kind(fifo) == "a FIFO" and path_kind("/dev/zero") == "a device"
    assert path_kind(tmp_path / "missing") is None
    assert "which does not exist" in path_kind(tmp_path / "dangling")
    with pytest.raises(MissingFileError, match=r"--x .*missing does not exist; fix it\.$"):
        require_path(tmp_path / "missing", folder=False, what="--x", fix="fix it")
    require_path(tmp_path, folder=True, what="--x", fix="fix it")


def test_a_model_config_without_model_type_is_refused_before_the_data_is_read(tmp_path, recipe):
    config = tmp_path / "m.json"
    config.write_text(json.dumps({"hidden_size": 32}))
    missing = tmp_path / "no_such_images"  # the refusal comes first: no data is read
    argv = ["--model_config", str(config), "--train_dir", str(missing), "--test_dir", str(missing),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match=r"--model_config .*m\.json has no \"model_type\""):
        recipe.main(argv)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- arguments refused when parsed
@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], r"--seed -1 is out of range: it must be >= 0 and <= 4294967295"),
    (["--class_order_seed", "-1"], r"--class_order_seed -1 is out of range"),
    (["--seed", str(1 << 32)], r"--seed 4294967296 is out of range"),
    (["--seeds", "1993", "-1"], r"--seeds 1993 -1: each class-order seed must be 0 to 4294967295"),
    (["--model_name_or_path", "BASE"], r"--model_name_or_path .* and --model_config .* both name the model; give "
                                       r"one of them"),
])
def test_negative_seeds_and_both_model_flags_are_refused_when_parsed(tmp_path, recipe, tiny_image_folders,
                                                                     base_model_dir, flags, message):
    config = tmp_path / "m.json"
    config.write_text(json.dumps({"model_type": "vit"}))
    flags = [str(base_model_dir) if f == "BASE" else f for f in flags]
    argv = ["--model_config", str(config), "--train_dir", str(tiny_image_folders[0]), "--test_dir",
            str(tiny_image_folders[1]), "--output_dir", str(tmp_path / "out"), *flags]
    with pytest.raises(UserError, match=message):
        recipe.parse_args(argv)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ links where a run writes: refused at the start
@pytest.mark.parametrize("name, folder", [("metrics.json", False), ("results.md", False),
                                          ("accuracy_curve.png", False), ("task_1", True)])
def test_a_link_where_the_run_writes_is_refused_when_the_run_starts(tmp_path, name, folder):
    """A resumed run writes its results again, and `--save_total_limit` removes older task folders: a link at one
    of those names is refused when the directory is claimed, before any training, not after a task trained."""
    out = tmp_path / "run"
    out.mkdir()
    recorded = {"method": "slca++"}
    (out / "run_fingerprint.json").write_text(json.dumps(recorded))
    manifest.record(out, ["run_fingerprint.json"])
    target = tmp_path / "elsewhere"
    target.mkdir() if folder else target.write_text("a user's file")
    os.symlink(target, out / name)
    with pytest.raises(UserError, match=rf"{name} is a symbolic link .*remove the link \(its target stays\)") as err:
        with claim_run_directory(out, recorded, resume=True):
            pytest.fail("the claim let a run start")
    assert "\n" not in str(err.value) and target.exists() and (out / name).is_symlink()


@pytest.mark.parametrize("fields, name", [({"r": 0}, r"peft_config\.r"),
                                          ({"r": 2, "rank_pattern": {"query": 0}}, r"peft_config\.rank_pattern")])
@pytest.mark.parametrize("peft_type", ["LORA", "LOHA", "LOKR"])
def test_a_rank_of_0_in_a_peft_config_is_refused_naming_the_field(tmp_path, peft_type, fields, name):
    """PEFT accepts `r: 0` in the config and fails only when it builds the layers, after the data was checked."""
    from slca_peft.models.adapters import load_peft_config

    path = tmp_path / "peft.json"
    path.write_text(json.dumps({"peft_type": peft_type, "target_modules": ["query"], **fields}))
    with pytest.raises(UserError, match=rf"{path.name}: {name}.* must be in \[1, 4096\], got 0"):
        load_peft_config(str(path))


@pytest.mark.parametrize("field, value, repeated", [("label_names", ["a", "a", "c"], "class name(s) ['a']"),
                                                     ("class_order", [2, 0, 2], "class(s) [2]")])
def test_a_task_history_that_repeats_a_class_is_refused_naming_the_file(tmp_path, field, value, repeated):
    """A crafted continuation whose history lists a class twice (never written: orders are permutations, names
    unique as datasets' ClassLabel requires) is one line naming continual_state.json, before the stream is built."""
    state = {**_state({}), field: value}
    out = _run_with_state(tmp_path / "run", state)
    with pytest.raises(UserError, match=rf"task_1/continual_state\.json: {field} repeats the {re.escape(repeated)}"):
        continuation_of(ModelArguments(resume_from=str(out / "task_1")))


# ------------------------------------------------------------------ outside the threat model, pinned
def test_a_resigned_checkpoint_is_outside_the_threat_model_but_its_values_stay_bounded(tmp_path, base_model_dir):
    """docs/reliability.md, "Outside the threat model": whoever can write a checkpoint and its manifest can
    fabricate accuracies, rewrite the task history's segments or tamper with the adapter and re-record the
    digests. Such a checkpoint loads (a manifest is a record, not a signature); what it carries stays bounded,
    and the same edits without re-recording are refused."""
    from safetensors.torch import load_file

    from slca_peft.continual import verify_checkpoint

    model = trained_model(base_model_dir)
    ck = checkpoint(model, tmp_path / "ck")
    state = json.loads((ck / "continual_state.json").read_text())
    state["accuracy_matrix"] = [[100.0], [100.0, 100.0]]  # fake-perfect
    state["segments"] = [{"first_task": 0, "tasks": 2, "data": "a data set never used"}]  # unsigned provenance
    (ck / "continual_state.json").write_text(json.dumps(state))
    weights = load_file(ck / "adapter_model.safetensors")
    save_file({k: v + 0.5 for k, v in weights.items()}, ck / "adapter_model.safetensors")  # tampered adapter
    with pytest.raises(UserError, match=r"was edited"):  # not re-recorded: refused, naming the file
        verify_checkpoint(ck)
    manifest.record(ck, ["continual_state.json", "adapter_model.safetensors"])  # re-signed
    assert verify_checkpoint(ck) == []
    _, _, loaded, _ = load_checkpoint(ck)
    assert loaded["accuracy_matrix"] == [[100.0], [100.0, 100.0]] and loaded["segments"][0]["data"].startswith("a d")
    state["accuracy_matrix"] = [[1e9], [100.0, 100.0]]  # bounded even when re-signed
    (ck / "continual_state.json").write_text(json.dumps(state))
    manifest.record(ck, ["continual_state.json"])
    with pytest.raises(UserError, match=r"accuracy_matrix\[0\]\[0\]"):
        load_checkpoint(ck)


def test_a_link_at_a_seeds_run_s_results_is_refused_before_the_first_seed(tmp_path, recipe):
    """A `--seeds` run writes its summary's results.md and plots after every seed trained."""
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(tmp_path / "thesis.md", out / "results.md")
    config = tmp_path / "m.json"
    config.write_text(json.dumps({"model_type": "vit"}))
    missing = tmp_path / "no_such_images"  # the refusal comes first: no data is read
    argv = ["--model_config", str(config), "--train_dir", str(missing), "--test_dir", str(missing),
            "--seeds", "1", "2", "--output_dir", str(out)]
    with pytest.raises(UserError, match=r"results\.md is a symbolic link"):
        recipe.main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["results.md"]
