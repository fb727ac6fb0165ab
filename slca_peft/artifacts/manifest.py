"""What the library wrote into a directory, so destructive operations touch nothing else.

A run directory, a checkpoint or an export holds `.slca-manifest.json`: a JSON object
`{"format": "slca-manifest", "format_version": 2, "files": [{"path", "size", "sha256"}, ...]}` listing every
regular file the library wrote there, by POSIX path relative to the directory. Deletion
(`plan_removal` then `carry_out`, or `remove_owned`), overwriting and uploading (`copy_verified`) go
through it, checking each file against its record before acting:

- only listed paths are touched, and only while they are regular files with the recorded size and
  SHA-256, reached without a symlink: a file whose content changed since is the user's (kept, and
  said so), a symlink is never followed nor counted as ours, and a listed path under a symlinked
  sub-directory is refused before anything is deleted;
- every path stays inside the directory (no absolute path, no `..`, no NUL), and a manifest that
  lists a manifest or the run lock (`.slca-run.lock`, which a run holds while it overwrites) is refused;
- the manifest itself is read bounded (size, entries, path length) and validated before use.

A manifest is a record of what the library wrote, not a signature: it stops a deletion or upload
from touching what the library did not write (a file put beside, a file edited since, a link), but
anyone who can write the directory can write a manifest that lists their own file with its true
size and SHA-256, and that file is then treated as the library's.

Other top-level fields say what the directory is: `kind` (`"checkpoint"`, `"model"`, `"export"`) and,
for a checkpoint on a local base model, `base_model` (`{"name", "files": {file: {size, sha256,
header_sha256}}}`), which `slca_peft.verify_checkpoint` compares on resume.

`safe_path` and `open_for_write` give the same guarantee to any write: a path whose parent
components lead out of the root through a symlink is refused, and the final component is opened
with `O_NOFOLLOW`, so a symlink planted at a file's name cannot redirect the write.

It imports nothing from slca_peft but `errors`, `files`, `listed` (reading a listed file without symlinks) and
`upgrade` (the format versions it reads).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..utils.errors import UserError
from ..utils.reading import read_json, read_own_json
from . import digests
from .atomic import atomic_write_bytes as write_file_atomically
from .atomic import settle_files
from .layout import FORMAT_VERSION, LOCK_FILE, MANIFEST_FILE, PARTIAL_FILE
from .listed import (  # noqa: F401  (part of this module's API)
    ManifestEntry,
    check_listed,
    copy_verified,
    is_hub_blob_link,
    open_listed,
    parent_fd,
)
from .upgrade import check_version

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "slca-manifest"
#: Bounds on what a manifest may hold before any entry is used.
MAX_MANIFEST_BYTES = 32 << 20
MAX_ENTRIES = 100_000
MAX_PATH_CHARS = 1024


# ---------------------------------------------------------------------------------------------- paths
def _check_relative(rel: str | os.PathLike[str], root: Path) -> PurePosixPath:
    text = os.fspath(rel)
    if not isinstance(text, str) or not text or "\0" in text or len(text) > MAX_PATH_CHARS:
        raise UserError(f"{root}: {text!r} is not a valid relative path; slca-peft only writes inside {root}.")
    posix = PurePosixPath(text.replace(os.sep, "/"))
    if posix.is_absolute() or any(part in ("..", "") for part in posix.parts) or posix.parts[:1] == (".",):
        raise UserError(f"{root}: {text!r} leads outside the directory; slca-peft only writes inside {root}.")
    return posix


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def safe_path(root: str | Path, rel: str | os.PathLike[str], *, final_may_be_link: bool = False) -> Path:
    """`root / rel`, refused when any component leads out of `root` through a symlink or `..`.

    Parent components that are symlinks must resolve inside `root` (the root itself may be a link:
    the user chose it). The final component must not be a symlink unless `final_may_be_link` (for a
    caller that replaces it by a rename, never following it). Components that do not exist yet are fine.
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    posix = _check_relative(rel, root)
    current = root
    for i, part in enumerate(posix.parts):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            break  # nothing further exists: nothing further can be a link
        last = i == len(posix.parts) - 1
        if last and final_may_be_link:
            break
        if stat.S_ISLNK(info.st_mode):
            if last:
                raise UserError(f"{current} is a symbolic link, which slca-peft never writes through; remove it or "
                                "choose another directory.")
            if not _inside(os.path.realpath(current), real_root):
                raise UserError(f"{current} is a symbolic link leading outside {root}; slca-peft only writes inside "
                                "the directory it was given; remove the link or choose another directory.")
        elif not last and not stat.S_ISDIR(info.st_mode):
            raise UserError(f"{current} is not a directory, so {root / posix} cannot be written; remove it.")
    return root / Path(*posix.parts)


def open_for_write(root: str | Path, rel: str | os.PathLike[str], *, mode: int = 0o666, append: bool = False,
                   binary: bool = True) -> IO[Any]:
    """Open `root / rel` for writing (created with `mode` under the umask), refusing symlinks.

    Parents are created as needed and checked by `safe_path`; the file itself is opened with
    `O_NOFOLLOW`, so a symlink put there between the check and the open still fails. A path that is
    not a regular file (a FIFO, a device) is refused too.
    """
    path = safe_path(root, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    safe_path(root, rel)  # the parents just created (or raced in) are still ours
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NONBLOCK", 0)
    flags |= os.O_APPEND if append else 0
    try:
        fd = os.open(path, flags, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link, which slca-peft never writes through; remove it.") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path} is not a regular file; remove it so slca-peft can write there.")
        if not append:
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"}))
    except BaseException:
        os.close(fd)
        raise


def atomic_write_bytes(root: str | Path, rel: str | os.PathLike[str], data: bytes) -> Path:
    """Write `root / rel` atomically (`files.atomic_write_bytes`: a temporary sibling renamed over it,
    permissions from the umask), refusing a path whose parents lead out of `root` through a symlink;
    a symlink at the name itself is replaced, never followed."""
    path = safe_path(root, rel, final_may_be_link=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    safe_path(root, rel, final_may_be_link=True)  # the parents just created (or raced in) are still ours
    return write_file_atomically(path, data)


# ---------------------------------------------------------------------------------------------- entries
def file_sha256(path: str | Path) -> tuple[int, str]:
    """(size, SHA-256) of a file the library records, never read through a symlink."""
    return digests.file_sha256(path, follow=False, fix="slca-peft only records files it wrote")


def entry_for(root: str | Path, rel: str | os.PathLike[str]) -> ManifestEntry:
    posix = _check_relative(rel, Path(root))
    size, sha = file_sha256(safe_path(root, posix.as_posix()))
    return ManifestEntry(posix.as_posix(), size, sha)


def _parse_entry(item: Any, where: Path) -> ManifestEntry:
    if not isinstance(item, dict) or set(item) != {"path", "size", "sha256"}:
        raise UserError(f"{where}: an entry is not {{path, size, sha256}}; it was not written by slca-peft.")
    path, size, sha = item["path"], item["size"], item["sha256"]
    if not isinstance(path, str) or type(size) is not int or size < 0 or not isinstance(sha, str) \
            or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise UserError(f"{where}: entry {str(path)[:80]!r} has an invalid size or sha256; it was not written by "
                        "slca-peft.")
    return ManifestEntry(_check_relative(path, where.parent).as_posix(), size, sha)


def _read_document(directory: str | Path) -> tuple[dict[str, ManifestEntry], dict[str, Any]] | None:
    """({path: entry}, the other top-level fields) of `directory`'s manifest, or None when there is none."""
    where = Path(directory) / MANIFEST_FILE
    if is_hub_blob_link(directory, MANIFEST_FILE):  # a Hub download: the cache links the file to its blob
        data = read_json(where, MAX_MANIFEST_BYTES)
    else:
        data = read_own_json(where, MAX_MANIFEST_BYTES, "remove it")
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), list):
        raise UserError(f"{where} is not an slca-peft manifest; remove it.")
    check_version(data.get("format_version"), str(where))  # a manifest's fields are the same in every version
    if len(data["files"]) > MAX_ENTRIES:
        raise UserError(f"{where} lists {len(data['files'])} files, more than {MAX_ENTRIES}; remove it.")
    entries: dict[str, ManifestEntry] = {}
    for item in data["files"]:
        entry = _parse_entry(item, where)
        if entry.path in entries:
            raise UserError(f"{where} lists {entry.path!r} twice; remove it.")
        if PurePosixPath(entry.path).name in (MANIFEST_FILE, LOCK_FILE):
            raise UserError(f"{where} lists {entry.path!r}, a file slca-peft never records (a manifest, or the lock a "
                            "run holds); the manifest is damaged or crafted: remove it.")
        entries[entry.path] = entry
    extra = {k: v for k, v in data.items() if k not in ("format", "format_version", "files")}
    return entries, extra


def read_manifest(directory: str | Path) -> dict[str, ManifestEntry] | None:
    """The manifest of `directory` as {path: entry}, or None when there is none.

    Read bounded and with `O_NOFOLLOW` (a symlinked manifest is refused), validated entry by entry.
    """
    document = _read_document(directory)
    return None if document is None else document[0]


def read_manifest_extra(directory: str | Path) -> dict[str, Any]:
    """The manifest's fields besides its file list (`kind`, a checkpoint's `base_model`); {} without one."""
    document = _read_document(directory)
    return {} if document is None else document[1]


def write_manifest(directory: str | Path, entries: Iterable[ManifestEntry],
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write the manifest of `directory` atomically (sorted by path), with `extra` top-level fields."""
    unique = {e.path: e for e in entries}
    files = [asdict(unique[k]) for k in sorted(unique)]
    document = {**(extra or {}), "format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION,
                "files": files}
    text = json.dumps(document, indent=1, sort_keys=True)
    return atomic_write_bytes(directory, MANIFEST_FILE, (text + "\n").encode())


def record(directory: str | Path, paths: Iterable[str | os.PathLike[str]], extra: Mapping[str, Any] | None = None,
           *, drop: Iterable[str] = ()) -> dict[str, ManifestEntry]:
    """Add (or refresh) the files at `paths` (relative to `directory`) in its manifest and drop the
    paths in `drop` (files the library removed), in one write; `extra` replaces the other top-level
    fields (kept when None). Returns the entries."""
    root = Path(directory)
    entries, kept = _read_document(root) or ({}, {})
    for rel in drop:
        entries.pop(_check_relative(rel, root).as_posix(), None)
    for rel in paths:
        entry = entry_for(root, rel)
        entries[entry.path] = entry
    write_manifest(root, entries.values(), kept if extra is None else extra)
    return entries


def write_in_place(directory: str | Path, write: Callable[[Path], None], *, replaces: Iterable[str] = (),
                   unlisted: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> list[str]:
    """Write a set of files into `directory` whose other files stay (a model folder beside a user's files, a
    Trainer's output_dir): `write(folder)` fills a hidden folder beside them, each file is renamed into place
    (each whole), the names in `replaces` this set lacks are removed where the manifest lists them unchanged
    (files of an earlier set; a user's file of that name is kept, with a warning), and the
    manifest is written last, so a reader checking the files against it never takes a mix of two sets.
    Names in `unlisted` are put in place but left out of the manifest. Returns the names written."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".slca-save-", dir=root))
    try:
        write(tmp)
        settle_files(tmp)  # safetensors files are created 0600: they follow the umask like the JSON
        written = sorted(child.name for child in tmp.iterdir() if child.is_file())
        stale = [name for name in replaces if name not in written]
        listed = read_manifest(root) or {}
        for name in stale:
            path = safe_path(root, name)  # never delete through a symlink
            if not path.exists():
                continue
            if name in listed and entry_for(root, name) == listed[name]:
                path.unlink()
            else:
                logger.warning("kept %s: slca-peft did not write it (or it changed since), and deletes only the files "
                               "it wrote, unchanged; it is not part of the new save.", path)
        for name in written:
            os.replace(tmp / name, safe_path(root, name, final_may_be_link=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    unlisted = set(unlisted)
    record(root, [name for name in written if name not in unlisted], extra, drop=[*stale, *unlisted])
    return written


def record_tree(directory: str | Path, extra: Mapping[str, Any] | None = None) -> dict[str, ManifestEntry]:
    """A fresh manifest of every regular file under `directory` (for a folder the library just wrote
    in full, e.g. a checkpoint's temporary directory), with `extra` top-level fields; symlinks and the marker
    of a partial folder (`files.PARTIAL_FILE`, removed before the folder is put in place) are not listed."""
    root = Path(directory)
    rels = [p.relative_to(root).as_posix() for p in _walk_regular(root)
            if p.name != MANIFEST_FILE and p.relative_to(root).as_posix() != PARTIAL_FILE]
    entries = {e.path: e for e in (entry_for(root, rel) for rel in rels)}
    write_manifest(root, entries.values(), extra)
    return entries


# ---------------------------------------------------------------------------------------------- use
def _walk_regular(root: Path) -> list[Path]:
    """Regular files under `root`, never descending into a symlinked directory."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(folder, d)))
        for name in sorted(files):
            path = Path(folder) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path)
    return found


def owned_files(directory: str | Path) -> list[Path]:
    """The manifest's files that are still the ones slca-peft wrote (`check_listed`); none without a manifest."""
    root = Path(directory)
    entries = read_manifest(root) or {}
    return [root / rel for rel, entry in sorted(entries.items()) if check_listed(root, entry) is None]


@dataclass
class RemovalPlan:
    """What deleting a directory's own files will do, decided before anything is deleted: the listed
    files that are still the library's (`remove`), those kept with the reason (`kept`: edited since,
    replaced by a link or a folder), and whether the manifest goes too."""

    root: Path
    remove: list[str]
    kept: list[str]
    manifest: bool

    def say_kept(self, what: str = "") -> None:
        """Log each kept file once (a file the library did not write, or no longer wrote, is the user's)."""
        for item in self.kept:
            logger.warning("%skept %s: %s; slca-peft deletes only the files it wrote, unchanged.",
                           what, self.root / item.split(" (", 1)[0], item.split(" (", 1)[1].rstrip(")"))


def plan_removal(directory: str | Path) -> RemovalPlan:
    """Check, before anything is deleted, every file `directory`'s manifest lists (`check_listed`):
    refused (`UserError`) when the directory is a symlink, the manifest is invalid or lists the lock or
    a manifest, or a listed path lies under a symlinked sub-directory."""
    root = Path(directory)
    if os.path.islink(root):
        raise UserError(f"{root} is a symbolic link; slca-peft removes files only in a real directory it wrote.")
    entries = read_manifest(root)
    remove, kept = [], []
    for rel, entry in sorted((entries or {}).items()):
        state = check_listed(root, entry)
        if state is None:
            remove.append(rel)
        elif state != "missing":
            kept.append(f"{rel} ({state})")
    return RemovalPlan(root, remove, kept, entries is not None)


def carry_out(plan: RemovalPlan) -> list[Path]:
    """Delete what `plan` found to be the library's, each file unlinked through folders opened without
    following a symlink; then the folders it leaves empty, the manifest, and the directory itself
    when nothing else is left. Returns the files removed."""
    root = plan.root
    removed = []
    for rel in plan.remove:
        with parent_fd(root, rel) as parent:
            if parent is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(PurePosixPath(rel).name, dir_fd=parent)
                    removed.append(root / rel)
    parents = sorted({p.parent for p in removed if p.parent != root}, key=lambda p: len(p.parts), reverse=True)
    for folder in parents:
        while folder != root and _inside(str(folder), str(root)):
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent
    manifest = root / MANIFEST_FILE
    if plan.manifest and manifest.is_file() and not manifest.is_symlink():
        manifest.unlink()
    with contextlib.suppress(OSError):
        root.rmdir()  # files the library did not write stay, and so does their folder
    return removed


def remove_owned(directory: str | Path) -> list[Path]:
    """Delete the manifest's files that are still the library's, the folders they leave empty, and the
    manifest (`plan_removal`, then `carry_out`): an unlisted file, an edited one, a symlink at a listed
    name stay (a warning names each kept listed file); a listed path under a symlinked sub-directory is
    refused before anything is deleted. `directory` itself goes only when it ends up empty."""
    plan = plan_removal(directory)
    plan.say_kept()
    return carry_out(plan)
