"""One run per directory while it runs: an advisory lock on `.slca-run.lock` (`fcntl.flock`, opened with
`O_NOFOLLOW`, a regular file only, the holder's pid written in it), so a second run into the same
directory is refused, naming the holder, while the first one is alive."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..utils.errors import UserError
from .layout import LOCK_FILE

__all__ = ["LOCK_FILE", "run_lock"]


def _open_lock(root: Path) -> tuple[int, bool]:
    """The lock file's descriptor (never through a symlink; a regular file only) and whether it was created."""
    path = root / LOCK_FILE
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    created = False
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        try:
            fd, created = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; slca-peft's lock file is never a link (it would write "
                            "through it): remove it and start again.") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file; slca-peft's lock file is one: remove it and start again.")
    return fd, created


@contextlib.contextmanager
def run_lock(root: Path, *, on_error_remove: list[bool] | None = None) -> Iterator[bool]:
    """Hold `root`'s lock; yields whether the lock file was created. When `on_error_remove` holds
    True at an exception, the lock file is removed before the lock is released."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock
        yield False
        return
    fd, created = _open_lock(root)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"another run (pid {holder}) is using {root}; wait for it to finish or choose another "
                "--output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield created
        except BaseException:
            if on_error_remove and on_error_remove[0]:
                with contextlib.suppress(OSError):
                    os.unlink(root / LOCK_FILE)
            raise
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
