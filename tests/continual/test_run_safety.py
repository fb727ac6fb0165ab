"""A run touches only what it wrote: symlinks are never followed out, overwrite removes a previous
run's files only, fingerprints see content, and a failed start leaves nothing behind."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import recipe_argv, write_image_folder
from PIL import Image

from slca_peft.artifacts import manifest
from slca_peft.artifacts.lock import LOCK_FILE
from slca_peft.continual.run_dir import claim_run_directory, remove_previous_run
from slca_peft.utils.errors import UserError


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------------------------- symlinks
def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).symlink_to(outside)
    with pytest.raises(UserError, match=r"\.slca-run\.lock is a symbolic link"):
        with claim_run_directory(run, {"method": "slca++"}):
            pass
    assert outside.read_text() == "keep me\n"
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # no fingerprint was written


def test_safe_writes_never_follow_a_symlink_out_of_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "results.md").write_text("theirs")
    root = tmp_path / "run"
    root.mkdir()
    (root / "results.md").symlink_to(outside / "results.md")
    (root / "seed_1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="results.md is a symbolic link"):
        manifest.open_for_write(root, "results.md")
    with pytest.raises(UserError, match="seed_1 is a symbolic link leading outside"):
        manifest.open_for_write(root, "seed_1/results.md")
    with pytest.raises(UserError, match="leads outside"):
        manifest.safe_path(root, "../outside/results.md")
    # An atomic write replaces the link itself; the file it pointed to keeps its content.
    manifest.atomic_write_bytes(root, "results.md", b"ours")
    assert (root / "results.md").read_text() == "ours" and not (root / "results.md").is_symlink()
    assert (outside / "results.md").read_text() == "theirs" and listing(outside) == ["results.md"]
    with manifest.open_for_write(root, "sub/a.txt") as fh:  # parents inside the root are created
        fh.write(b"x")
    assert (root / "sub" / "a.txt").read_bytes() == b"x"


def test_remove_owned_never_follows_a_symlink_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "weights.safetensors").write_bytes(b"theirs")
    (outside / "token").write_text("secret")
    ck = tmp_path / "task_1"
    (ck / "sub").mkdir(parents=True)
    (ck / "adapter.safetensors").write_bytes(b"ours")
    (ck / "sub" / "a.json").write_text("{}")
    manifest.record(ck, ["adapter.safetensors", "sub/a.json"])
    assert [p.name for p in manifest.owned_files(ck)] == ["adapter.safetensors", "a.json"]
    # A listed file replaced by a link to an outside file, an unlisted file and an unlisted link: none is
    # uploaded (the link's target would leave the machine) and none is deleted.
    (ck / "sub" / "a.json").unlink()
    (ck / "sub" / "a.json").symlink_to(outside / "weights.safetensors")
    (ck / "token").symlink_to(outside / "token")
    (ck / "notes.txt").write_text("mine")
    assert [p.name for p in manifest.owned_files(ck)] == ["adapter.safetensors"]
    removed = manifest.remove_owned(ck)
    assert [p.name for p in removed] == ["adapter.safetensors"]
    assert listing(ck) == ["notes.txt", "sub", "sub/a.json", "token"]
    assert (outside / "weights.safetensors").read_bytes() == b"theirs" and (outside / "token").read_text() == "secret"
    # A listed file under a symlinked sub-directory is refused before anything is deleted.
    ck2 = tmp_path / "task_2"
    (ck2 / "sub").mkdir(parents=True)
    (ck2 / "sub" / "w.safetensors").write_bytes(b"1")
    (ck2 / "keep.json").write_text("{}")
    manifest.record(ck2, ["sub/w.safetensors", "keep.json"])
    shutil.rmtree(ck2 / "sub")
    (ck2 / "sub").symlink_to(outside, target_is_directory=True)
    (outside / "w.safetensors").write_bytes(b"theirs")
    with pytest.raises(UserError, match="sub is a symbolic link to a directory"):
        manifest.remove_owned(ck2)
    assert (ck2 / "keep.json").is_file() and (outside / "w.safetensors").read_bytes() == b"theirs"


def test_a_manifest_is_read_bounded_and_validated(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    (root / "a.bin").write_bytes(b"abc")
    entries = manifest.record(root, ["a.bin"])
    assert entries["a.bin"].size == 3 and len(entries["a.bin"].sha256) == 64
    assert manifest.read_manifest(root) == entries
    bad = {"format": "slca-manifest", "format_version": 1, "files": [{"path": "../x", "size": 1, "sha256": "0" * 64}]}
    (root / manifest.MANIFEST_FILE).write_text(json.dumps(bad))
    with pytest.raises(UserError, match="leads outside"):
        manifest.read_manifest(root)
    (root / manifest.MANIFEST_FILE).write_text("[" * 100000)
    with pytest.raises(UserError, match="nests JSON deeper than Python can parse"):
        manifest.read_manifest(root)


# ------------------------------------------------------------------------------------------- overwrite
def fake_run(root, fingerprint=None):
    """The files a finished run leaves, with a manifest listing its fingerprint."""
    (root / "task_1").mkdir(parents=True)
    (root / "task_1" / "continual_state.json").write_text("{}")
    (root / "task_1" / "adapter_model.safetensors").write_bytes(b"w")
    manifest.record_tree(root / "task_1", {"kind": "checkpoint"})
    (root / ".task_2.tmp-abc").mkdir()
    for name in ("metrics.json", "results.md", "accuracy_matrix.png"):
        (root / name).write_text("x")
    (root / "run_fingerprint.json").write_text(json.dumps(fingerprint or {"method": "slca++"}))
    manifest.record(root, ["run_fingerprint.json"])


def test_overwrite_of_a_directory_without_a_run_is_refused_listing_its_files(tmp_path):
    user = tmp_path / "mine"
    (user / "task_data").mkdir(parents=True)
    (user / "base_model").mkdir()
    for name in ("task_notes.txt", "results.md", "metrics.json"):
        (user / name).write_text("mine")
    before = listing(user)
    with pytest.raises(UserError) as err:
        with claim_run_directory(user, {"method": "slca++"}, overwrite=True):
            pass
    message = str(err.value)
    assert "holds no slca-peft run" in message and "\n" not in message
    for name in ("base_model/", "metrics.json", "results.md", "task_data/", "task_notes.txt"):
        assert name in message
    assert listing(user) == before  # nothing deleted, no lock left behind
    # Without overwrite, a start that would replace the user's metrics.json is refused too.
    with pytest.raises(UserError, match=r"holds files a run writes \(metrics.json, results.md\) but no slca-peft run"):
        with claim_run_directory(user, {"method": "slca++"}):
            pass
    assert listing(user) == before


def test_overwrite_keeps_user_files_beside_a_previous_run(tmp_path):
    run = tmp_path / "run"
    fake_run(run)
    (run / "task_notes.txt").write_text("mine")
    (run / "task_data").mkdir()
    (run / "task_data" / "x.png").write_bytes(b"png")
    (run / "seed_1").mkdir()  # a folder named like a seed run that holds none
    (run / "seed_1" / "mine.txt").write_text("mine")
    with claim_run_directory(run, {"method": "slca", "lr": 1}, overwrite=True):
        assert listing(run) == [".slca-manifest.json", ".slca-run.lock", "run_fingerprint.json", "seed_1",
                                "seed_1/mine.txt", "task_data", "task_data/x.png", "task_notes.txt"]
    assert json.loads((run / "run_fingerprint.json").read_text()) == {"method": "slca", "lr": 1}
    # A symlink at an artefact's name is refused before anything is deleted.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metrics.json").write_text("theirs")
    (run / "metrics.json").symlink_to(outside / "metrics.json")
    with pytest.raises(UserError, match="metrics.json is a symbolic link"):
        remove_previous_run(run)
    assert (run / "run_fingerprint.json").is_file() and (outside / "metrics.json").read_text() == "theirs"


def test_a_seeds_run_is_overwritten_seed_by_seed(tmp_path):
    root = tmp_path / "seeds"
    for seed in (1, 2):
        fake_run(root / f"seed_{seed}")
    (root / "seeds.json").write_text("{}")
    (root / "seed_2" / "mine.txt").write_text("mine")
    remove_previous_run(root)
    assert listing(root) == ["seed_2", "seed_2/mine.txt"]


def test_overwrite_with_resume_the_root_or_the_data_folder_is_refused(recipe, tmp_path, base_model_dir,
                                                                      tiny_image_folders):
    out = tmp_path / "run"
    for extra, message in [
        (["--overwrite_output_dir", "true", "--resume_from", "auto"], "deletes the run that --resume_from auto"),
        (["--output_dir", "/"], "is the filesystem root"),
        (["--output_dir", str(tiny_image_folders[0])], "overlaps the training data"),
        (["--output_dir", str(tiny_image_folders[0].parent)], "overlaps the training data"),
        (["--output_dir", str(tiny_image_folders[1] / "class_00" / "out")], "overlaps the training data"),
    ]:
        with pytest.raises(UserError, match=message):
            recipe.parse_args(recipe_argv(base_model_dir, tiny_image_folders, out, *extra))
    # The model in use lying in a previous run's base_model/ is never deleted by an overwrite.
    fake_run(out)
    shutil.copytree(base_model_dir, out / "base_model")
    with pytest.raises(UserError, match=r"would delete .*base_model, which holds the model in use"):
        recipe.parse_args(recipe_argv(out / "base_model", tiny_image_folders, out, "--overwrite_output_dir", "true"))
    with pytest.raises(UserError, match="--overwrite_output_dir deletes the run"):
        with claim_run_directory(out, {}, overwrite=True, resume=True):
            pass
    assert (out / "task_1" / "continual_state.json").is_file()


# ------------------------------------------------------------------------------------------- content
def test_same_size_image_swaps_and_repaints_change_the_data_fingerprint(tmp_path):
    from slca_peft.continual.fingerprint import data_fingerprint, describe_mismatch
    from slca_peft.data.tasks import TaskSequence

    bmp = tmp_path / "bmp"
    rng = np.random.RandomState(0)
    for split, count in (("train", 3), ("test", 2)):
        for k in range(4):
            (bmp / split / f"c{k}").mkdir(parents=True)
            for i in range(count):
                pixels = np.full((16, 16, 3), 60 * k, np.uint8) + rng.randint(0, 9, (16, 16, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(bmp / split / f"c{k}" / f"{i}.bmp")  # BMPs: one size for all

    def fingerprint():
        from slca_peft.continual.fingerprint import run_fingerprint

        seq = TaskSequence.from_image_folders(bmp / "train", bmp / "test", init_cls=2, increment=2, seed=None)
        args = type("Args", (), {"method": "slca++"})()
        return run_fingerprint(args, base_model=None, tasks=seq), data_fingerprint(seq)

    first, first_hash = fingerprint()
    assert first["data_sha256"] == first_hash
    a, b = bmp / "train" / "c0" / "0.bmp", bmp / "train" / "c1" / "0.bmp"
    assert a.stat().st_size == b.stat().st_size
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)  # two classes' images swapped: names and sizes unchanged
    swapped, _ = fingerprint()
    assert swapped["data_sha256"] != first["data_sha256"]
    assert describe_mismatch(first, swapped) == "data_class_sha256 (c0, c1 differ), data_sha256"
    run = tmp_path / "run"
    with claim_run_directory(run, first):
        (run / "task_1").mkdir()
    with pytest.raises(UserError, match=r"cannot resume: .* data_class_sha256 \(c0, c1 differ\), data_sha256;"):
        with claim_run_directory(run, swapped, resume=True):
            pass
    a.write_bytes(data_a)
    b.write_bytes(data_b)
    assert fingerprint()[0] == first
    noise = bmp / "test" / "c3" / "1.bmp"  # repainted with same-size noise
    size = noise.stat().st_size
    Image.fromarray(rng.randint(0, 255, (16, 16, 3)).astype(np.uint8)).save(noise)
    assert noise.stat().st_size == size
    assert "data_class_sha256 (c3 differ)" in describe_mismatch(first, fingerprint()[0])


def test_the_decode_pass_hashes_the_bytes_it_reads(tmp_path, monkeypatch):
    from slca_peft.data import checks as data_checks

    folder = write_image_folder(tmp_path / "imgs", 1, 3)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    data_checks.forget_content_digests()
    opened = []
    real_open, real_os_open = open, os.open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def counting_os_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr(os, "open", counting_os_open)  # the bounded reader opens with os.open
    data_checks.check_images(paths, workers=1)
    digests = [data_checks.content_digest(p) for p in paths]
    assert sorted(opened) == paths  # one read per image, by the decode; the fingerprint reads nothing more
    import hashlib

    assert digests == [hashlib.sha256(real_open(p, "rb").read()).digest() for p in paths]


def test_the_peft_config_is_part_of_the_fingerprint(tmp_path):
    from slca_peft.continual.fingerprint import describe_mismatch, run_fingerprint

    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["query"]}))
    args = type("Args", (), {"method": "slca++"})()
    first = run_fingerprint(args, base_model=None, peft_config=config)
    config.write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["query"]}, indent=4))
    second = run_fingerprint(args, base_model=None, peft_config=config)
    assert first["peft_config"]["r"] == 4 and describe_mismatch(first, second) == "peft_config (r differ)"


# ------------------------------------------------------------------------------------------- failed start
@pytest.mark.slow
def test_a_failed_start_leaves_nothing_and_the_corrected_command_runs(recipe, tmp_path, base_model_dir,
                                                                      tiny_image_folders, frozen_gc):
    out = tmp_path / "run"
    bad = recipe_argv(base_model_dir, tiny_image_folders, out, "--callbacks", "no_such_module:Step")
    with pytest.raises((UserError, ImportError, ValueError)):
        recipe.main(bad)
    assert not out.exists()  # it created the directory, and removed it again
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises((UserError, ImportError, ValueError)):
        recipe.main(bad)
    assert listing(out) == ["notes.txt"]
    # The corrected command (other settings than the failed one) just runs.
    summary = recipe.main(recipe_argv(base_model_dir, tiny_image_folders, out, "--learning_rate", "0.02"))
    assert "last_accuracy" in summary and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("task_*")) == ["task_1", "task_2"]
    assert json.loads((out / "run_fingerprint.json").read_text())["learning_rate"] == 0.02
    assert "run_fingerprint.json" in manifest.read_manifest(out)


def test_a_fingerprint_of_a_start_killed_before_its_first_task_is_replaced(tmp_path):
    run = tmp_path / "run"
    with claim_run_directory(run, {"method": "slca++", "lr": 1}):
        pass  # as if killed: the fingerprint stays, no task finished
    with claim_run_directory(run, {"method": "slca++", "lr": 2}):
        pass
    assert json.loads((run / "run_fingerprint.json").read_text())["lr"] == 2
    (run / "task_1").mkdir()
    with pytest.raises(UserError, match=r"holds another run \(lr \(2 -> 3\) differ\)"):
        with claim_run_directory(run, {"method": "slca++", "lr": 3}):
            pass
    assert os.listdir(run / "task_1") == []
