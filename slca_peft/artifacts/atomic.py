"""Writes that never leave half a file or folder behind: one atomic file write, one atomic directory
write and one directory swap. Every file slca-peft writes goes through here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .layout import OLD_MARK, PARTIAL_FILE, PROCESSOR_FILE, TEMP_MARK, temporary_name

_PARTIAL_TEXT = b"slca-peft partial folder: removed or put back by the next write of its sibling\n"


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, *, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) the permissions the umask allows: writers that make
    private temporaries (mkstemp, mkdtemp, safetensors' `save_file`) leave 0600 / 0700 behind."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def mark_partial(folder: str | Path) -> None:
    """Write the marker that makes `folder` sweepable by a later write (`is_partial`)."""
    fd = os.open(Path(folder) / PARTIAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(_PARTIAL_TEXT)


def unmark_partial(folder: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(folder) / PARTIAL_FILE)


def is_partial(folder: str | Path) -> bool:
    """Whether `folder` is a real folder (not a link) holding the marker slca-peft writes (`mark_partial`),
    read without following a link or blocking on a FIFO."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        fd = os.open(folder / PARTIAL_FILE, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, len(_PARTIAL_TEXT) + 1) == _PARTIAL_TEXT
    finally:
        os.close(fd)


def partial_sibling(target: str | Path) -> Path:
    """A new, marked hidden sibling folder `.NAME.tmp-XXXXXXXX` of `target` (`layout.temporary_name`)."""
    target = Path(target)
    folder = Path(tempfile.mkdtemp(prefix=temporary_name(target.name, TEMP_MARK, ""), dir=target.parent))
    mark_partial(folder)
    return folder


def sweep_partial(target: str | Path) -> None:
    """Remove the `.NAME.tmp-*` folders a killed write of `target` left (only those `is_partial` proves ours)."""
    target = Path(target)
    for stale in target.parent.glob(temporary_name(target.name, TEMP_MARK, "*")):
        if is_partial(stale):
            shutil.rmtree(stale, ignore_errors=True)


def recover_replaced(target: str | Path) -> None:
    """Undo a replacement killed between its two renames: a `.NAME.old-*` that slca-peft marked (`is_partial`)
    goes back to `NAME` when `NAME` is missing, and is removed when `NAME` exists (the replacement
    completed); an unmarked one (a user's folder named alike) is left alone."""
    target = Path(target)
    if is_partial(target):  # a kill just before or after a rename left the marker in the live folder: it is stale
        unmark_partial(target)
    for old in sorted(target.parent.glob(temporary_name(target.name, OLD_MARK, "*"))):
        if not is_partial(old):
            continue
        if not os.path.lexists(target):
            os.replace(old, target)
            unmark_partial(target)
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory and move it to `path` only if the block succeeds, so a
    checkpoint directory is either complete or absent (an older one is replaced at the end). Leftovers
    of a killed write are swept only when marked as slca-peft's (`is_partial`)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced(target)
    sweep_partial(target)  # left by a writer that was killed
    tmp = partial_sibling(target)
    follow_umask(tmp, directory=True)  # mkdtemp makes 0700; the checkpoint follows the umask
    try:
        yield tmp
        settle_files(tmp)
        old = None
        if target.exists():
            old = target.parent / temporary_name(target.name, OLD_MARK, os.getpid())
            mark_partial(target)  # before the rename: a kill after it leaves a folder the next write puts back
            os.replace(target, old)
        os.replace(tmp, target)
        unmark_partial(target)  # marked until here, so a kill before the rename leaves it sweepable
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system or the
    filesystem cannot."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_directories(new: str | Path, target: str | Path) -> Path:
    """Put the folder `new` in place of the folder `target`; returns where the old `target` is now
    (marked as slca-peft's partial folder, so a kill before it is deleted leaves it sweepable).
    Atomic where the system can exchange two names (Linux): after a kill `target` is the old folder or
    the new one, never missing or half of each. Elsewhere two renames, with `.NAME.old-*` between them
    (`recover_replaced` undoes a kill there)."""
    new, target = Path(new), Path(target)
    mark_partial(target)  # both marked: whichever name a kill leaves a folder under, it is sweepable
    try:
        exchanged = _exchange(new, target)
    except BaseException:
        unmark_partial(target)
        raise
    if exchanged:
        unmark_partial(target)
        return new
    old = target.parent / temporary_name(target.name, OLD_MARK, os.getpid())
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        unmark_partial(target)
        raise
    unmark_partial(target)
    return old


def settle_files(folder: str | Path) -> None:
    """Flush every regular file written into `folder` to disk and give it the umask's permissions
    (safetensors files are created 0600 whatever the umask), before the folder is renamed into place."""
    for child in Path(folder).iterdir():
        if child.is_file() and not child.is_symlink():
            follow_umask(child)
            fd = os.open(child, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file through a temporary sibling and a rename, so readers never see half of it; a
    symlink at `path` is replaced, never written through. Permissions follow the umask.

    The one atomic file write of the library (`slca_peft.artifacts.manifest.atomic_write_bytes` checks the
    path's parents against its root, then calls this)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_image_processor(processor: Any, folder: str | Path) -> Path:
    """A transformers image processor's `preprocessor_config.json` in `folder`, written atomically (what its
    `save_pretrained` writes, without a half-written file)."""
    return atomic_write_text(Path(folder) / PROCESSOR_FILE, processor.to_json_string())


def json_text(data: Any, *, sort_keys: bool = True) -> str:
    """The JSON every slca-peft file holds: indented, keys sorted (unless told otherwise), a final newline."""
    return json.dumps(data, indent=2, sort_keys=sort_keys) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    """A JSON file in a folder that is itself being written atomically (no rename of its own)."""
    Path(path).write_text(json_text(data))
