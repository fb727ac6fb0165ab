"""A listed file, reached and read without following a symlink: the checks behind every deletion,
verification and upload of what a manifest lists (`slca_peft.artifacts.manifest`).

`open_listed` opens a path inside a directory component by component, each folder opened with
`O_NOFOLLOW` relative to the one before (so nothing can redirect the read between a check and the
open); `check_listed` compares the file with its record (size, SHA-256); `copy_verified` copies it
while hashing the bytes copied, so an upload sends exactly what was checked.

It imports nothing from slca_peft but the leaves `errors` and `files`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from ..utils.errors import UserError
from ..utils.reading import open_regular
from .digests import HASH_BLOCK_BYTES, hash_stream


@dataclass(frozen=True)
class ManifestEntry:
    """One file the library wrote: POSIX path relative to the directory, size in bytes, SHA-256."""

    path: str
    size: int
    sha256: str


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@contextlib.contextmanager
def parent_fd(root: Path, rel: str) -> Iterator[int | None]:
    """A descriptor of the folder holding `rel` inside `root`, every component below `root` opened
    without following a symlink (so nothing can redirect what is read or deleted there); None when a
    component is missing or not a folder. A symlinked component is refused."""
    fd = os.open(root, _DIR_FLAGS)  # the root itself may be a link: the user chose it
    try:
        current = root
        for part in PurePosixPath(rel).parts[:-1]:
            current = current / part
            try:
                info = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                info = None
            if info is not None and stat.S_ISLNK(info.st_mode):
                raise UserError(f"{current} is a symbolic link to a directory, which slca-peft never writes, so it "
                                f"will not touch {rel} through it; remove the link.")
            if info is None or not stat.S_ISDIR(info.st_mode):
                os.close(fd)
                fd = -1
                yield None
                return
            child = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)


@contextlib.contextmanager
def open_listed(root: str | Path, rel: str) -> Iterator[tuple[str, IO[bytes] | None]]:
    """(`"regular"`, the open file) for a listed path that is a regular file reached without any
    symlink, else (`"missing"` | `"a symbolic link"` | `"not a regular file"`, None); a FIFO is never
    waited on. A symlinked sub-directory on the way is refused (`UserError`)."""
    root = Path(root)
    name = PurePosixPath(rel).name
    with parent_fd(root, rel) as parent:
        if parent is None:
            yield "missing", None
            return
        flags = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            yield "missing", None
            return
        except OSError as err:
            if err.errno == errno.ELOOP:
                yield "a symbolic link", None
                return
            if err.errno in (errno.ENXIO, errno.EISDIR):
                yield "not a regular file", None
                return
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            yield "not a regular file", None
            return
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as fh:
            yield "regular", fh


def check_listed(root: str | Path, entry: ManifestEntry) -> str | None:
    """None when `entry` is still the file slca-peft wrote (a regular file reached without a symlink,
    of the recorded size and SHA-256), `"missing"` when it is gone, else why it is not ours any more.
    A symlinked sub-directory on the way is refused (`UserError`)."""
    with open_listed(root, entry.path) as (state, fh):
        if fh is None:
            return state
        if os.fstat(fh.fileno()).st_size != entry.size:
            return "its content changed since slca-peft wrote it"
        digest = hashlib.sha256()
        size = hash_stream(fh, digest)
    if (size, digest.hexdigest()) != (entry.size, entry.sha256):
        return "its content changed since slca-peft wrote it"
    return None


def copy_verified(root: str | Path, entry: ManifestEntry, target: str | Path, *, may_change: bool = False) -> None:
    """Copy the listed file `entry` of `root` to `target`, hashing the bytes copied: refused
    (`UserError`, `target` removed) unless it is a regular file reached without a symlink, with one
    link (a hard link may be another file's name, e.g. a token's), of the recorded size and SHA-256
    (`may_change`: any content, for a file the user may edit, such as the model card)."""
    root, target = Path(root), Path(target)
    fix = "an upload sends only the files slca-peft wrote, unchanged: write the folder again"
    with contextlib.ExitStack() as stack:
        state, fh = stack.enter_context(open_listed(root, entry.path))
        if fh is None and is_hub_blob_link(root, entry.path):  # a Hub download: the cache's link to its blob
            state, fh = "regular", stack.enter_context(open_regular(root / entry.path, fix=fix))
        if fh is None:
            raise UserError(f"{root / entry.path} is {state}, not the file slca-peft wrote there; {fix}.")
        links = os.fstat(fh.fileno()).st_nlink
        if links > 1:
            raise UserError(f"{root / entry.path} has {links} hard links, so it may be another file's content "
                            f"(slca-peft writes files with one link); {fix}, or copy it with cp.")
        digest = hashlib.sha256()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            size = 0
            for block in iter(lambda: fh.read(HASH_BLOCK_BYTES), b""):
                digest.update(block)
                out.write(block)
                size += len(block)
    if not may_change and (size, digest.hexdigest()) != (entry.size, entry.sha256):
        target.unlink()
        raise UserError(f"{root / entry.path} changed since slca-peft wrote it (sha256 {entry.sha256[:12]} -> "
                        f"{digest.hexdigest()[:12]}); {fix}.")


def is_hub_blob_link(root: str | Path, rel: str) -> bool:
    """Whether `root` is a Hugging Face cache snapshot (`models--org--name/snapshots/<commit>`) and `rel` a
    top-level link into that repo's own `blobs/` folder: how the cache stores every downloaded file, so the
    one kind of link a check of a downloaded checkpoint follows."""
    root = Path(root)
    repo = root.parent.parent
    if root.parent.name != "snapshots" or not repo.name.startswith("models--") or "/" in rel:
        return False
    return os.path.islink(root / rel) and \
        os.path.dirname(os.path.realpath(root / rel)) == os.path.realpath(repo / "blobs")
