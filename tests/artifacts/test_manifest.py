"""Check, then act: every deletion is planned in full and compared with what the library wrote (size and
sha256) before anything is deleted; an export is replaced by a swap (old or new after a kill, never
half); checks and uploads never read through a symlinked sub-folder or a hard link."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal

import pytest
import torch
from conftest import stats_for, trained_model

from slca_peft import export_model, verify_checkpoint
from slca_peft.artifacts import manifest
from slca_peft.artifacts.lock import LOCK_FILE
from slca_peft.continual import save_checkpoint
from slca_peft.continual.run_dir import claim_run_directory, remove_previous_run
from slca_peft.export import classifier as export_module
from slca_peft.sharing.hub import push_folder
from slca_peft.utils.errors import UserError

STATE = {"accuracy_matrix": [[80.0], [70.0, 60.0]], "seen_accuracy": [80.0, 65.0], "method": "slca++",
         "tasks_learned": 2, "task_sizes": [2, 3], "seed": 1993}


def checkpoint(model, path):
    return save_checkpoint(model, path, statistics=stats_for(model), state=STATE,
                           unaligned_head=model.classifier.snapshot())


def listing(root):
    """Every path under `root` with its content (files) or link target, so 'nothing was lost' is checkable."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else path.read_bytes() if path.is_file() else "/"
    return found


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_listed(root, rel, data: bytes, *, recorded: bytes | None = None):
    """A file and a manifest entry for it; `recorded` gives the entry other bytes' size and sha256."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    entries = manifest.read_manifest(root) or {}
    shown = data if recorded is None else recorded
    entries[rel] = manifest.ManifestEntry(rel, len(shown), sha(shown))
    manifest.write_manifest(root, entries.values(), manifest.read_manifest_extra(root))


def fake_run(root):
    """A finished run: fingerprint (listed), metrics, two checkpoints each with a manifest."""
    root.mkdir(parents=True)
    write_listed(root, "run_fingerprint.json", json.dumps({"method": "slca++"}).encode())
    (root / "metrics.json").write_text("{}")
    for task in (1, 2):
        ck = root / f"task_{task}"
        write_listed(ck, "continual_state.json", b"{}")
        write_listed(ck, "sub/adapter_model.safetensors", b"weights")
    return root


# ------------------------------------------------------------------------------------------- overwrite
def test_an_overwrite_keeps_a_listed_file_whose_content_is_not_what_was_recorded(tmp_path, caplog):
    run = fake_run(tmp_path / "run")
    # A manifest edited to list the user's notes (with another file's digest): the notes are not ours.
    write_listed(run, "notes.txt", b"my notes", recorded=b"whatever slca-peft wrote")
    with caplog.at_level(logging.WARNING), claim_run_directory(run, {"method": "slca"}, overwrite=True):
        pass
    assert (run / "notes.txt").read_bytes() == b"my notes"
    assert not (run / "task_1").exists() and not (run / "metrics.json").exists()
    assert any("kept" in r.message and "notes.txt" in r.message and "changed" in r.message for r in caplog.records)


def test_a_manifest_is_a_record_not_a_signature(tmp_path):
    """What a manifest does not protect against (docs/reliability.md): a listing with the true digest."""
    run = fake_run(tmp_path / "run")
    write_listed(run, "notes.txt", b"my notes")  # whoever can write the manifest can list any file exactly
    remove_previous_run(run)
    assert not (run / "notes.txt").exists()


@pytest.mark.parametrize("listed", [LOCK_FILE, "task_1/.slca-manifest.json"])
def test_a_manifest_listing_the_lock_or_a_manifest_is_refused_before_anything_is_deleted(tmp_path, listed):
    run = fake_run(tmp_path / "run")
    entries = manifest.read_manifest(run)
    entries[listed] = manifest.ManifestEntry(listed, 0, sha(b""))
    (run / manifest.MANIFEST_FILE).write_text(json.dumps({
        "format": "slca-manifest", "format_version": 1, "files": [vars(e) for e in entries.values()]}))
    before = listing(run)
    with pytest.raises(UserError, match="a file slca-peft never records"):
        with claim_run_directory(run, {"method": "slca"}, overwrite=True):
            pass
    assert {k: v for k, v in listing(run).items() if k != LOCK_FILE} == before
    with pytest.raises(UserError, match="a file slca-peft never records"):
        manifest.remove_owned(run)


@pytest.mark.parametrize("damage", ["bad manifest", "symlinked sub-folder", "user file", "edited file"])
def test_a_problem_in_task_2_is_refused_before_the_fingerprint_metrics_or_task_1_go(tmp_path, damage):
    run = fake_run(tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_bytes(b"weights")  # same bytes: a checksum alone would pass
    ck = run / "task_2"
    if damage == "bad manifest":
        (ck / manifest.MANIFEST_FILE).write_text("{not json")
    elif damage == "symlinked sub-folder":
        shutil.rmtree(ck / "sub")
        (ck / "sub").symlink_to(outside, target_is_directory=True)
    elif damage == "user file":
        (ck / "notes.txt").write_text("mine")  # the new run's task_2 would replace the folder
    else:
        (ck / "continual_state.json").write_text('{"edited": true}')
    before = listing(run)
    with pytest.raises(UserError) as err:
        remove_previous_run(run)
    assert "\n" not in str(err.value)
    assert listing(run) == before  # nothing deleted: fingerprint, metrics and task_1 are all there
    assert (outside / "adapter_model.safetensors").read_bytes() == b"weights"


def test_a_seed_run_with_a_problem_stops_the_whole_overwrite(tmp_path):
    root = tmp_path / "seeds"
    for seed in (1, 2):
        fake_run(root / f"seed_{seed}")
    (root / "seeds.json").write_text("{}")
    (root / "seed_2" / "task_1" / "notes.txt").write_text("mine")
    before = listing(root)
    with pytest.raises(UserError, match=r"seed_2/task_1 holds files slca-peft did not write \(notes.txt\)"):
        remove_previous_run(root)
    assert listing(root) == before  # seed_1, the first in order, was not touched either


def test_remove_owned_deletes_only_unchanged_listed_files(tmp_path, caplog):
    ck = tmp_path / "ck"
    write_listed(ck, "a.safetensors", b"ours")
    write_listed(ck, "b.json", b"{}")
    (ck / "b.json").write_text('{"edited": 1}')
    with caplog.at_level(logging.WARNING):
        removed = manifest.remove_owned(ck)
    assert [p.name for p in removed] == ["a.safetensors"] and (ck / "b.json").read_text() == '{"edited": 1}'
    assert any("kept" in r.message and "b.json" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------- export
def test_export_overwrite_keeps_what_the_previous_export_did_not_write(tmp_path, base_model_dir, caplog):
    model = trained_model(base_model_dir)
    # A user's folder with a fake export manifest that lists their thesis (its digest is not the thesis's).
    user = tmp_path / "mine"
    write_listed(user, "thesis.tex", b"years of work", recorded=b"an export file")
    manifest.write_manifest(user, manifest.read_manifest(user).values(), {"kind": "export"})
    (user / "figures").mkdir()
    (user / "figures" / "plot.pdf").write_bytes(b"%PDF")
    with caplog.at_level(logging.WARNING):
        export_model(model, user, overwrite=True)
    assert (user / "thesis.tex").read_bytes() == b"years of work"
    assert (user / "figures" / "plot.pdf").read_bytes() == b"%PDF"
    assert (user / "config.json").is_file() and any("thesis.tex" in r.message for r in caplog.records)
    assert sorted(manifest.read_manifest(user)) == sorted(p.name for p in user.iterdir() if p.suffix in
                                                          (".json", ".safetensors", ".md") and p.name[0] != ".")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine")]  # no temporary left


def test_export_overwrite_refuses_a_folder_at_a_file_name_before_touching_the_old_export(tmp_path, base_model_dir):
    model = trained_model(base_model_dir)
    out = tmp_path / "export"
    export_model(model, out)
    os.unlink(out / "README.md")
    (out / "README.md").mkdir()  # a folder where the new export writes a file
    (out / "README.md" / "draft.txt").write_text("mine")
    before = listing(out)
    with pytest.raises(UserError, match=r"README.md/draft.txt is not the previous export's .* nothing was changed"):
        export_model(model, out, overwrite=True)
    assert listing(out) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def _export_is_whole(folder) -> str:
    """'old' or 'new' when `folder` is a complete export (each listed file as recorded), else what is wrong."""
    entries = manifest.read_manifest(folder)
    if entries is None or any(manifest.check_listed(folder, e) is not None for e in entries.values()):
        return f"broken: {sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'missing'}"
    bias = json.dumps(sorted(p.name for p in folder.iterdir()))
    return bias


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before the swap", "after the swap"])
def test_a_kill_during_export_overwrite_leaves_the_old_or_the_new_export(tmp_path, base_model_dir, forked, moment):
    model = trained_model(base_model_dir)
    out = tmp_path / "export"
    export_model(model, out)
    (out / "notes.txt").write_text("mine")
    old = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.classifier.heads[0].bias.add_(1.0)

    def killed() -> int:
        real = export_module.swap_directories

        def swap(new, target):
            if moment == "before the swap":
                os.kill(os.getpid(), signal.SIGKILL)
            where = real(new, target)
            os.kill(os.getpid(), signal.SIGKILL)
            return where

        export_module.swap_directories = swap  # the forked child only
        export_model(model, out, overwrite=True)
        return 0

    assert forked(killed) == -signal.SIGKILL
    assert not _export_is_whole(out).startswith("broken"), _export_is_whole(out)
    weights = (out / "model.safetensors").read_bytes()
    assert (weights == old) == (moment == "before the swap")
    assert (out / "notes.txt").read_text() == "mine"
    # The next export cleans up what the kill left and replaces the export whole.
    export_model(model, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]
    assert (out / "notes.txt").read_text() == "mine" and not _export_is_whole(out).startswith("broken")


# ------------------------------------------------------------------------------------------- reads and uploads
def test_verify_checkpoint_never_hashes_through_a_symlinked_sub_folder(tmp_path, base_model_dir):
    model = trained_model(base_model_dir)
    ck = checkpoint(model, tmp_path / "ck")
    write_listed(ck, "extra/notes.json", b"{}")
    manifest.write_manifest(ck, manifest.read_manifest(ck).values(), {"kind": "checkpoint"})
    assert verify_checkpoint(ck) == []
    outside = tmp_path / "outside"
    shutil.move(ck / "extra", outside)
    (ck / "extra").symlink_to(outside, target_is_directory=True)  # the same bytes, reached through a link
    with pytest.raises(UserError, match="extra/notes.json lies under a symbolic link"):
        verify_checkpoint(ck)


def test_push_sends_only_unchanged_single_link_files_of_the_manifest(tmp_path, base_model_dir, hub):
    model = trained_model(base_model_dir)
    ck = checkpoint(model, tmp_path / "ck")
    (ck / ".env").write_text("HF_TOKEN=hf_secret")
    push_folder(ck, "me/ck", base_model_id="me/base")
    assert ".env" not in hub.uploads[-1]["files"] and "continual_state.json" in hub.uploads[-1]["files"]
    # The model card may be edited; any other listed file may not.
    (ck / "README.md").write_text("my card")
    push_folder(ck, "me/ck", base_model_id="me/base")
    state = (ck / "continual_state.json").read_bytes()
    (ck / "continual_state.json").write_bytes(state.replace(b"80.0", b"99.0"))
    uploads = len(hub.uploads)
    with pytest.raises(UserError, match="continual_state.json changed since slca-peft wrote it"):
        push_folder(ck, "me/ck", base_model_id="me/base")
    # A hard link to a token at a listed name, with the manifest re-signed to match: still refused.
    token = tmp_path / "token"
    token.write_text("hf_secret")
    (ck / "continual_state.json").unlink()
    os.link(token, ck / "continual_state.json")
    manifest.record(ck, ["continual_state.json"])
    with pytest.raises(UserError, match="continual_state.json has 2 hard links"):
        push_folder(ck, "me/ck", base_model_id="me/base")
    assert len(hub.uploads) == uploads and token.read_text() == "hf_secret"
    assert "hf_secret" not in json.dumps([u["json"] for u in hub.uploads])


def test_where_names_cannot_be_exchanged_two_renames_and_a_recovery_replace_the_export(tmp_path, base_model_dir,
                                                                                        monkeypatch):
    from slca_peft.artifacts import atomic as files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # a system without renameat2(RENAME_EXCHANGE)
    model = trained_model(base_model_dir)
    out = tmp_path / "export"
    export_model(model, out)
    (out / "notes.txt").write_text("mine")
    export_model(model, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and not _export_is_whole(out).startswith("broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    # A kill between the two renames leaves `.export.old-*` (marked as slca-peft's before the first rename) and no
    # export: the next export puts it back first. A user's folder named alike, unmarked, is neither moved nor deleted.
    (tmp_path / ".export.old-2").mkdir()
    (tmp_path / ".export.old-2" / "mine.txt").write_text("mine")
    files.mark_partial(out)
    os.replace(out, tmp_path / ".export.old-1")
    export_model(model, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.old-2", "export"]
    assert (tmp_path / ".export.old-2" / "mine.txt").read_text() == "mine"


def test_a_hub_download_is_checked_through_the_cache_s_own_links_only(tmp_path, base_model_dir):
    """The Hugging Face cache stores a download as `snapshots/<commit>/<file>` links to `blobs/<sha>`: those
    links are followed (into the repo's own blobs), any other link is not."""
    model = trained_model(base_model_dir)
    ck = checkpoint(model, tmp_path / "ck")
    repo = tmp_path / "hub" / "models--me--ck"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(ck.iterdir()):
        blob = repo / "blobs" / sha(path.read_bytes())
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    assert verify_checkpoint(snapshot) == []
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (snapshot / "continual_state.json").unlink()
    (snapshot / "continual_state.json").symlink_to(outside)
    with pytest.raises(UserError, match="continual_state.json is not a regular file"):
        verify_checkpoint(snapshot)


def test_a_pushed_checkpoint_downloaded_from_the_hub_checks_and_pushes_again(tmp_path, base_model_dir, hub,
                                                                           monkeypatch):
    """What push uploads carries its own manifest: the download (the cache's links to blobs) is verified
    and pushed again."""
    from slca_peft.sharing import hub as hub_module

    captured = {}
    real_record = hub_module._record_upload

    def keep(folder, extra):
        real_record(folder, extra)
        if "folder" not in captured:
            captured["folder"] = shutil.copytree(folder, tmp_path / "uploaded")

    monkeypatch.setattr(hub_module, "_record_upload", keep)
    model = trained_model(base_model_dir)
    push_folder(checkpoint(model, tmp_path / "ck"), "me/ck", base_model_id="me/base")
    repo = tmp_path / "hub" / "models--me--ck"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(captured["folder"].iterdir()):
        blob = repo / "blobs" / sha(path.read_bytes())
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    assert manifest.read_manifest_extra(snapshot) == {"kind": "checkpoint"}
    push_folder(snapshot, "me/ck2")
    assert sorted(hub.uploads[-1]["files"]) == sorted(hub.uploads[0]["files"])


def test_export_sweeps_only_the_sibling_folders_it_marked(tmp_path, base_model_dir):
    """`.NAME.tmp-*` / `.NAME.old-*` beside the target are removed or put back only when slca-peft marked them."""
    model = trained_model(base_model_dir)
    out = tmp_path / "export"
    for name in (".export.tmp-mine", ".export.old-mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.txt").write_text(name)
    export_model(model, out)  # a new target: the old-* folder is not moved into its name, tmp-* not deleted
    export_model(model, out, overwrite=True)  # a replacement sweeps its leftovers: still not the user's
    for name in (".export.tmp-mine", ".export.old-mine"):
        assert (tmp_path / name / "data.txt").read_text() == name
    assert not (out / "data.txt").exists()
    # A leftover slca-peft marked (a killed export) is swept.
    from slca_peft.artifacts.atomic import partial_sibling

    stale = partial_sibling(out)
    (stale / "weights.safetensors").write_bytes(b"partial")
    export_model(model, out, overwrite=True)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.old-mine", ".export.tmp-mine", "export"]


def test_a_second_export_into_the_same_target_is_refused_while_the_first_runs(tmp_path, base_model_dir):
    from slca_peft.export.lock import export_lock

    model = trained_model(base_model_dir)
    out = tmp_path / "export"
    with export_lock(out):  # the first export, between its check and its rename
        with pytest.raises(UserError, match=f"another export into {out} is running \\(pid {os.getpid()}\\)"):
            export_model(model, out)
        with pytest.raises(UserError, match="another export into"):
            export_model(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock goes with its holder
    export_model(model, out)
    with pytest.raises(UserError, match="holds a previous export"):  # the second, once the first ended
        export_model(model, out)


def test_an_overwrite_over_a_users_sub_folder_leaves_no_sibling_behind(tmp_path, base_model_dir):
    model = trained_model(base_model_dir)
    out = tmp_path / "export"
    export_model(model, out)
    (out / "notes" / "deep").mkdir(parents=True)
    (out / "notes" / "deep" / "a.txt").write_text("mine")
    export_model(model, out, overwrite=True)
    assert (out / "notes" / "deep" / "a.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_in_place_save_removes_only_its_own_earlier_files(tmp_path, caplog):
    root = tmp_path / "out"

    def files(*names):
        def write(folder):
            for name in names:
                (folder / name).write_text(f"{name} of this save")
        return write

    manifest.write_in_place(root, files("model.json", "state.json", "stats.bin"))
    (root / "notes.txt").write_text("the user's")  # a file of a name the next save lacks, not slca-peft's
    (root / "stats.bin").write_text("edited by the user")  # slca-peft's once, changed since
    with caplog.at_level(logging.WARNING):
        manifest.write_in_place(root, files("model.json"), replaces=("state.json", "stats.bin", "notes.txt"))
    assert sorted(p.name for p in root.iterdir()) == [".slca-manifest.json", "model.json", "notes.txt", "stats.bin"]
    assert (root / "stats.bin").read_text() == "edited by the user"
    assert sorted(manifest.read_manifest(root)) == ["model.json"]
    kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kept")]
    assert len(kept) == 2 and any("notes.txt" in m for m in kept) and any("stats.bin" in m for m in kept)
