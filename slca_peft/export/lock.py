"""One export into a target at a time: `.NAME.export-lock` beside it, an advisory `flock`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..utils.errors import UserError


@contextlib.contextmanager
def export_lock(directory: str | Path) -> Iterator[None]:
    """Hold `.NAME.export-lock` beside the target for the export (an advisory `flock`, released however the
    process ends): a second export into the same target is refused, naming the first one's pid, instead of
    both writing and the last one winning. The lock file is removed by its holder."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.export-lock"
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) \
        | getattr(os, "O_NONBLOCK", 0)
    while True:
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as err:
            raise UserError(f"export: {path} cannot be opened as the export's lock ({err.strerror}); remove it, "
                            "then export again.") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"export: {path} is not a regular file; remove it, then export again.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"export: another export into {target} is running (pid {holder}); wait for it to end, "
                            "or export into another directory.") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
