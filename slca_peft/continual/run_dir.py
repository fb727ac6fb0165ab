"""A run directory belongs to one run, and a run touches only what it wrote.

When a run starts it writes `run_fingerprint.json` into its output directory: the method, every
hyperparameter that changes results, the base model's identity and a content hash of its weight
files, the PEFT config's content, the class order and a fingerprint of the data's content (each
image's bytes, hashed by the decode pass that checks it). `claim_run_directory`, entered once every
check that can fail before training has passed, then

- refuses to start into a directory that holds another run, unless `overwrite`, which removes that
  run's artefacts only (`slca_peft.continual.overwrite`: checkpoints, metrics, plots, results, seed
  runs, fingerprint, manifest, each checked against what the run wrote before anything is deleted;
  never a symlink's target, never a user's file beside them) and refuses a directory that holds files
  but no run;
- refuses to resume when the fingerprint differs, naming the fields (and the classes whose data changed);
- holds the run's lock (`slca_peft.artifacts.lock`: `fcntl.flock` on `.slca-run.lock`, the holder's
  pid written in it) so a second run into the same directory is refused while the first one is alive;
- restores a task folder whose replacement was interrupted between its two renames;
- leaves nothing behind when the run fails before finishing a task: the fingerprint, manifest and
  lock it wrote are removed (and the directory, when it created it), so the corrected command runs.
  A fingerprint left by a start killed before its first task is replaced by the next fresh start.

The files a run wrote are listed in `.slca-manifest.json` (`slca_peft.artifacts.manifest`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..artifacts import manifest
from ..artifacts.atomic import json_text, recover_replaced
from ..artifacts.layout import (
    CONFIG_FILE,
    FINGERPRINT_FILE,
    METRICS_FILE,
    OLD_MARK,
    PLOT_FILES,
    RESULTS_FILE,
    SEEDS_FILE,
    STATE_FILE,
    checkpoint_dirs,
    is_task_leftover,
    seed_index,
    task_index,
    temporary_name,
    temporary_target,
)
from ..artifacts.lock import run_lock
from ..utils.errors import UserError
from .fingerprint import describe_mismatch, differing_fields, read_fingerprint
from .overwrite import (  # noqa: F401  (RUN_FILES, BASE_MODEL_DIR, remove_previous_run: importable from here, as before)
    BASE_MODEL_DIR,
    RUN_FILES,
    holds_run,
    is_real_dir,
    list_entries,
    remove_previous_run,
)

logger = logging.getLogger(__name__)


def check_writable(output_dir: str | Path) -> None:
    """Refuse an output directory (or its nearest existing parent) this process cannot write."""
    path = Path(output_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise UserError(f"--output_dir {output_dir}: {path} is not a directory; choose another --output_dir.")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {output_dir}: {path} is not writable; fix its permissions or choose "
                        "another --output_dir.")


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def _within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_arguments(output_dir: str | Path, *, overwrite: bool = False, resume_from: str | None = None,
                           data: Iterable[str | Path | None] = (), image_folders: Iterable[str | Path | None] = (),
                           model: str | Path | None = None) -> None:
    """Refuse an output directory a run must not write into, before anything is read.

    `--overwrite_output_dir` with `--resume_from` (it would delete what the resume continues); the
    filesystem root; a directory that is or holds the training data (`data`: e.g. `--data_dir`), or
    also lies inside an image folder (`image_folders`: `--train_dir`, `--test_dir`, where it would
    become a class); the base `model`'s own folder; with `overwrite`, a directory whose run artefacts hold
    the `model` in use.
    """
    if overwrite and resume_from:
        raise UserError(f"--overwrite_output_dir deletes the run that --resume_from {resume_from} would continue; "
                        "drop one of them.")
    out = _real(output_dir)
    if os.path.dirname(out) == out:
        raise UserError(f"--output_dir {output_dir} is the filesystem root; choose a directory of its own.")
    folders = [(f, False) for f in data] + [(f, True) for f in image_folders]
    for folder, inside_too in folders:
        if folder is None or not os.path.exists(folder):
            continue
        real = _real(folder)
        if _within(real, out) or inside_too and _within(out, real):
            raise UserError(f"--output_dir {output_dir} overlaps the training data {folder}; a run's files would "
                            "mix with its images: choose an --output_dir outside the data.")
    if model is not None and os.path.isdir(model) and _real(model) == out:
        raise UserError(f"--output_dir {output_dir} is the base model's folder ({model}); the run's checkpoints would "
                        "mix with the model's files: choose another --output_dir.")
    if overwrite and model is not None and os.path.exists(model):
        real = _real(model)
        if _within(out, real):
            raise UserError(f"--output_dir {output_dir} lies in the model in use ({model}); choose another "
                            "--output_dir.")
        if _within(real, out):
            top = Path(os.path.relpath(real, out)).parts[0]
            if top in RUN_FILES or top == BASE_MODEL_DIR or task_index(top) is not None or seed_index(top) is not None:
                raise UserError(f"--overwrite_output_dir would delete {Path(output_dir) / top}, which holds the model "
                                f"in use ({model}); move the model or choose another --output_dir.")


# ---------------------------------------------------------------------------------------------- directory
def _finished_a_task(root: Path) -> bool:
    """Whether the run in `root` completed anything worth keeping (a checkpoint, metrics, a seed run)."""
    for entry in list_entries(root):
        name = entry.name
        if task_index(name) is not None or is_task_leftover(name, OLD_MARK) or seed_index(name) is not None:
            return True
        if name in (METRICS_FILE, SEEDS_FILE):
            return True
    return False


def _run_artefacts(root: Path) -> list[Path]:
    """What a start would collide with: checkpoints, seed runs and the files a run writes."""
    found = []
    for entry in list_entries(root):
        name = entry.name
        if name in RUN_FILES and name != manifest.MANIFEST_FILE or (
                is_real_dir(entry) and (task_index(name) is not None or is_task_leftover(name)
                                    or seed_index(name) is not None and holds_run(Path(entry.path)))):
            found.append(Path(entry.path))
    return found


def refuse_links_where_a_run_writes(root: str | Path) -> None:
    """Refuse, before any training, a symbolic link at a name the run will write or remove: its results
    (`metrics.json`, `results.md`, the plots) and its task folders (a new checkpoint's name, or an older one
    `--save_total_limit` removes). slca-peft never writes through or deletes via a link, so without this the
    refusal would come only once a task had trained."""
    for entry in list_entries(Path(root)):
        if entry.is_symlink() and (entry.name in (METRICS_FILE, RESULTS_FILE, *PLOT_FILES)
                                   or task_index(entry.name) is not None):
            raise UserError(f"{entry.path} is a symbolic link (to {os.readlink(entry.path)!r}), where the run writes "
                            "its own files; slca-peft never writes or deletes through a link: remove the link (its "
                            "target stays) or choose another --output_dir.")


def recover_interrupted_replacements(root: str | Path) -> None:
    """A kill between the two renames of a checkpoint replacement leaves `.task_N.old-*` and no
    `task_N`: put the old folder back; when `task_N` exists, the leftover is removed."""
    for old in sorted(Path(root).glob(temporary_name("*", OLD_MARK, "*"))):
        target = temporary_target(old.name)
        if old.is_symlink() or target is None:
            continue
        recover_replaced(old.parent / target)


def _undo_start(root: Path, *, created_dir: bool) -> None:
    """A run that failed before finishing a task: remove the fingerprint and manifest it wrote (and,
    in a directory it created, the backbone it saved), so the corrected command starts cleanly."""
    (root / FINGERPRINT_FILE).unlink(missing_ok=True)
    entries = manifest.read_manifest(root) or {}
    entries.pop(FINGERPRINT_FILE, None)
    if entries:
        manifest.write_manifest(root, entries.values())
    else:
        (root / manifest.MANIFEST_FILE).unlink(missing_ok=True)
    if created_dir:
        base = root / BASE_MODEL_DIR
        if base.is_dir() and not base.is_symlink():
            shutil.rmtree(base)
        for entry in list_entries(root):
            if is_task_leftover(entry.name) and is_real_dir(entry):
                shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def claim_run_directory(
    output_dir: str | Path,
    fingerprint: Mapping[str, Any],
    *,
    overwrite: bool = False,
    resume: bool = False,
    main_process: bool = True,
) -> Iterator[Path]:
    """Hold `output_dir` for one run while the block runs (see the module docstring).

    Enter it once every check that can fail before training has passed: a failure inside the block
    before any task finished removes what the claim wrote. `resume`: the run continues the one
    already in the directory (`--resume_from`), so its fingerprint must match. Only the main process
    claims; the others yield at once.
    """
    root = Path(output_dir)
    if not main_process:
        yield root
        return
    check_output_arguments(root, overwrite=overwrite, resume_from=str(root) if resume else None)
    check_writable(root)
    created_dir = not os.path.lexists(root)
    root.mkdir(parents=True, exist_ok=True)
    if root.is_symlink() and not root.is_dir():
        raise UserError(f"--output_dir {root} is a broken symbolic link; choose another --output_dir.")
    undo = [False]
    try:
        with run_lock(root, on_error_remove=undo) as created_lock:
            undo[0] = created_lock  # a refusal below leaves no lock file it created
            recover_interrupted_replacements(root)
            old = read_fingerprint(root)
            artefacts = [p for p in _run_artefacts(root) if p.name != FINGERPRINT_FILE]
            if not overwrite:  # an overwrite refuses them itself, before deleting anything
                refuse_links_where_a_run_writes(root)
            if overwrite:
                remove_previous_run(root)
                old = None
            elif resume:
                if old is not None and old.get("continue_from") and not fingerprint.get("continue_from") \
                        and latest_checkpoint(root) is None:
                    raise UserError(f"cannot resume: {root} holds a --continue_from {old['continue_from']} run that "
                                    "was stopped before it finished a new task, so it has no checkpoint to resume; "
                                    "rerun the original command (--continue_from, without --resume_from).")
                if old is not None and differing_fields(old, fingerprint):
                    raise UserError(f"cannot resume: {root} holds a run with other settings: "
                                    f"{describe_mismatch(old, fingerprint)}; resume with the same settings, or start "
                                    "over with --overwrite_output_dir.")
                if old is None and artefacts:
                    logger.warning("%s has no %s (an older run); resuming without checking its settings.",
                                   root, FINGERPRINT_FILE)
            elif old is not None and differing_fields(old, fingerprint):
                if _finished_a_task(root):
                    raise UserError(
                        f"{root} holds another run ({describe_mismatch(old, fingerprint)} differ); choose another "
                        "--output_dir, or pass --overwrite_output_dir to replace it."
                    )
                logger.warning("%s holds the settings of a run that finished no task; replacing them.", root)
                old = None
            elif artefacts:
                names = ", ".join(p.name for p in artefacts[:4])
                if holds_run(root):
                    how = "--resume_from auto in place of --continue_from (with the same new data flags)" \
                        if fingerprint.get("continue_from") else "--resume_from auto"
                    raise UserError(
                        f"{root} already holds a run ({names}); continue it with {how}, choose another "
                        "--output_dir, or pass --overwrite_output_dir to replace it."
                    )
                raise UserError(f"{root} holds files a run writes ({names}) but no slca-peft run; move them or choose "
                                "another --output_dir.")
            wrote = old is None
            if wrote:
                manifest.atomic_write_bytes(root, FINGERPRINT_FILE, json_text(dict(fingerprint)).encode())
                manifest.record(root, [FINGERPRINT_FILE])
            undo[0] = False
            try:
                yield root
            except BaseException:
                if wrote and not _finished_a_task(root):
                    _undo_start(root, created_dir=created_dir)
                    undo[0] = created_lock
                raise
    except BaseException:
        if undo[0] and created_dir:
            with contextlib.suppress(OSError):
                root.rmdir()  # empty again: the failed start left nothing
        raise


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete task checkpoint in a run's output directory (for `auto`)."""
    found = checkpoint_dirs(output_dir)
    return found[max(found)] if found else None


def task_checkpoint(path: str, flag: str) -> str:
    """What `--resume_from` / `--continue_from` names, as a task checkpoint: a run directory (one without a
    checkpoint's own files) stands for its last complete task; one with no complete task is refused in one
    line. A task folder, a Hub repo id or `auto` is returned as given."""
    folder = Path(path)
    if path == "auto" or not folder.is_dir() or (folder / STATE_FILE).is_file() or (folder / CONFIG_FILE).is_file():
        return path
    found = latest_checkpoint(folder)
    if found is not None:
        return str(found)
    fix = "RUN/task_N or auto" if flag == "--resume_from" else "RUN/task_N"
    raise UserError(f"{flag} {path}: a directory with no complete task checkpoint (task_N/{STATE_FILE}) and no "
                    f"checkpoint files of its own; give {fix}.")


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """`save_total_limit` for a run directory: the newest `keep` task checkpoints stay (the newest, which a
    resume continues from, always does); older ones are removed, their own files only. None or 0: all stay."""
    if not keep or keep < 1:
        return []
    found = checkpoint_dirs(output_dir)
    removed = [found[t] for t in sorted(found)[:-keep]]
    for path in removed:
        manifest.remove_owned(path)  # the files it lists, unchanged since; any other file stays, with a warning
    if removed:
        logger.info("save_total_limit %d: removed %s", keep, ", ".join(p.name for p in removed))
    return removed
