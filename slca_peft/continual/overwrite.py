"""`--overwrite_output_dir`: delete a previous run's files, checked first, then deleted.

A run writes, at the top of its output directory, `RUN_FILES` (metrics, report, plots, seeds summary,
fingerprint, manifest), one checkpoint folder per task (`task_<t>`, written through `.task_<t>.tmp-*`),
a `seed_<s>` run per class-order seed and, for `--model_config`, its random `base_model/`.
`plan_previous_run` looks at all of it, in every seed run too, before anything is deleted:

- a symlink at any of those names, a folder where a run writes a file, a manifest that is invalid or
  lists the lock or a manifest, a listed path under a symlinked sub-folder: refused;
- a checkpoint or `base_model/` folder is deleted by its manifest, each file only with its recorded
  size and SHA-256 (`slca_peft.artifacts.manifest.plan_removal`); one without a manifest is refused.
  Anything else in it (a file put there, a file edited since) would be
  lost when the new run writes that folder again, so it is refused, naming it;
- a file the run directory's manifest lists that changed since is the user's: kept, with a warning
  (refused when it sits at a name the new run writes); a file beside the run (`notes.txt`) is kept.

Only then does `RunRemoval.carry_out` delete, each seed run under its own lock. The lock file stays
(it is held).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import manifest
from ..artifacts.layout import (
    FINGERPRINT_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    PLOT_FILES,
    RESULTS_FILE,
    SEEDS_FILE,
    TEMP_MARK,
    holds_run,
    is_task_leftover,
    seed_index,
    task_index,
)
from ..artifacts.lock import run_lock
from ..utils.errors import UserError
from .fingerprint import read_fingerprint

#: Files a run (or a `--seeds` run, or `slca-peft report`) writes at the top of its output directory.
RUN_FILES = (METRICS_FILE, RESULTS_FILE, *PLOT_FILES, SEEDS_FILE, FINGERPRINT_FILE, MANIFEST_FILE)
#: Directories a run writes: checkpoints (and their temporaries), seed runs, a random backbone.
BASE_MODEL_DIR = "base_model"
logger = logging.getLogger(__name__)


def list_entries(root: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(root) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return []


def is_real_dir(entry: os.DirEntry) -> bool:
    return entry.is_dir(follow_symlinks=False)


def _in_the_way(root: Path, path: Path | str, why: str) -> UserError:
    return UserError(f"--overwrite_output_dir: {path} {why}, and the new run would replace it: move it out of {root} "
                     "(or delete it yourself) and run again; nothing was deleted.")


def _everything_in(folder: Path) -> list[str]:
    """Every file, link and empty folder under `folder` (relative paths), never descending into a link."""
    found = []
    for here, dirs, files in os.walk(folder):
        base = Path(here)
        links = [d for d in dirs if (base / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if d not in links)
        empty = [d for d in dirs if not any((base / d).iterdir())]
        found += [(base / name).relative_to(folder).as_posix() for name in sorted([*files, *links, *empty])]
    return found


def _plan_folder(root: Path, folder: Path) -> manifest.RemovalPlan:
    """A checkpoint or saved backbone the new run may write again, all of it the library's or refused."""
    if not (folder / manifest.MANIFEST_FILE).is_file() and folder.name != BASE_MODEL_DIR:
        raise _in_the_way(root, folder, f"has no {manifest.MANIFEST_FILE}, so slca-peft cannot tell which of its "
                          "files it wrote")
    plan = manifest.plan_removal(folder)
    if plan.kept:
        raise _in_the_way(root, folder / plan.kept[0].split(" (", 1)[0],
                          f"is not the file slca-peft wrote ({plan.kept[0].split(' (', 1)[1].rstrip(')')})")
    ours = set(plan.remove) | {manifest.MANIFEST_FILE}
    others = [rel for rel in _everything_in(folder) if rel not in ours]
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        raise _in_the_way(root, folder, f"holds files slca-peft did not write ({', '.join(others[:3])}{more})")
    return plan


@dataclass
class RunRemoval:
    """What deleting a previous run in `root` will do, decided before anything is deleted."""

    root: Path
    files: list[Path] = field(default_factory=list)  # run files by name: regular, never links
    temporaries: list[Path] = field(default_factory=list)  # `.task_<t>.tmp-*` folders of a killed write
    folders: list[manifest.RemovalPlan] = field(default_factory=list)  # checkpoints, base_model/
    listed: manifest.RemovalPlan | None = None  # the run directory's own manifest
    seeds: list[RunRemoval] = field(default_factory=list)

    def names(self) -> list[str]:
        found = [p.name for p in self.files] + [p.root.name for p in self.folders] + [s.root.name for s in self.seeds]
        return sorted(set(found) | set(p.name for p in self.temporaries))

    def carry_out(self) -> None:
        """Delete what the plan found (each seed run first, under its own lock)."""
        for seed in self.seeds:
            with run_lock(seed.root):
                seed.carry_out()
            (seed.root / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                seed.root.rmdir()
        for plan in self.folders:
            manifest.carry_out(plan)
            with contextlib.suppress(OSError):
                plan.root.rmdir()
        for temporary in self.temporaries:
            shutil.rmtree(temporary)
        for path in self.files:
            path.unlink(missing_ok=True)
        if self.listed is not None:
            self.listed.say_kept("--overwrite_output_dir: ")
            manifest.carry_out(self.listed)  # its unchanged files, then the manifest itself
        (self.root / manifest.MANIFEST_FILE).unlink(missing_ok=True)


def plan_previous_run(root: str | Path) -> RunRemoval | None:
    """Check everything a deletion of the previous run in `root` would touch (see the module docstring);
    None when the directory is empty. A directory with files but no run is refused, listing them."""
    root = Path(root)
    present = [e for e in list_entries(root) if e.name not in (LOCK_FILE, manifest.MANIFEST_FILE)]
    if not present:
        return None
    if not holds_run(root):
        names = [e.name + ("/" if is_real_dir(e) else "") for e in present]
        more = f" and {len(names) - 6} more" if len(names) > 6 else ""
        raise UserError(f"--overwrite_output_dir: {root} holds no slca-peft run but has files "
                        f"({', '.join(names[:6])}{more}); it only replaces a previous run: choose an empty or "
                        "new --output_dir.")
    old = read_fingerprint(root) if (root / FINGERPRINT_FILE).is_file() else None
    plan = RunRemoval(root, listed=manifest.plan_removal(root))
    listed = set(plan.listed.remove) | {item.split(" (", 1)[0] for item in plan.listed.kept}
    for item in plan.listed.kept:
        rel = item.split(" (", 1)[0]
        if rel in RUN_FILES or "/" in rel:
            raise _in_the_way(root, root / rel, f"is not the file slca-peft wrote ({item.split(' (', 1)[1][:-1]})")
    for entry in present:
        name, path = entry.name, Path(entry.path)
        seed = seed_index(name) is not None and (entry.is_symlink() or holds_run(path))
        task = task_index(name) is not None or is_task_leftover(name)
        used = str((old or {}).get("base_model", ""))  # a random backbone the run saved, unless the run's model
        base = name == BASE_MODEL_DIR and old is not None and os.path.realpath(used) != os.path.realpath(path) \
            and os.path.isfile(used)
        if not (name in RUN_FILES or seed or task or base):
            continue
        if entry.is_symlink():
            raise UserError(f"--overwrite_output_dir: {path} is a symbolic link, which slca-peft never writes; remove "
                            "it yourself or choose another --output_dir.")
        if seed:
            with run_lock(path) as created:  # a run alive in the seed folder is refused, naming its pid
                try:
                    plan.seeds.append(plan_previous_run(path) or RunRemoval(path))
                finally:
                    if created:  # planning leaves no lock file behind
                        (path / LOCK_FILE).unlink(missing_ok=True)
        elif is_task_leftover(name, TEMP_MARK):
            plan.temporaries.append(path)
        elif task or base:
            if is_real_dir(entry):
                plan.folders.append(_plan_folder(root, path))
        elif is_real_dir(entry) or not entry.is_file(follow_symlinks=False):
            raise _in_the_way(root, path, "is not a regular file where slca-peft writes one")
        elif name not in listed:
            plan.files.append(path)
    return plan


def remove_previous_run(root: str | Path) -> list[Path]:
    """Delete the previous run in `root` (`plan_previous_run`, then `RunRemoval.carry_out`): nothing is
    deleted unless all of it may be. Returns the top-level names that went."""
    plan = plan_previous_run(root)
    if plan is None:
        return []
    plan.carry_out()
    names = plan.names()
    logger.info("--overwrite_output_dir: removed the previous run in %s (%s)", root,
                ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""))
    return [Path(root) / name for name in names]
