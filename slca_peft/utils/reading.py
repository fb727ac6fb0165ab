"""The bounded readers: the one way the library opens a file to read it.

`open_regular` (`read_bytes`, `read_text`, `read_json`, `read_own_json` are built on it): a regular file
only (a FIFO is opened without blocking and refused, so is a device such as `/dev/zero`, a directory or a
socket), at most a given size, optionally never through a symlink (`follow=False`, for the files the
library writes itself) and never out of a given directory (`root`: a symlink inside it leading elsewhere is
refused). A damaged or crafted JSON file (invalid UTF-8, deeply nested, a 10,000-digit number) is a
one-line error naming the file, never a `RecursionError` traceback. `tests/utils/test_reading.py` walks
the package for any other read. Why: docs/reliability.md (the threat model).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import MissingFileError, UserError, one_line

#: Largest JSON file read (configs, states, metrics are kilobytes; a label list of a million classes ~30 MB).
MAX_JSON_BYTES = 64 << 20


def loads_json(raw: str | bytes, source: str) -> Any:
    """Parse JSON text read from `source`; anything unparsable is a `UserError` naming it."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise UserError(f"{source} nests JSON deeper than Python can parse; the file is damaged or crafted.") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, bad UTF-8, an int of > 4300 digits
        raise UserError(f"{source} is not valid JSON ({one_line(err)}); the file is damaged.") from None


def _kind_of_mode(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def path_kind(path: str | Path) -> str | None:
    """What `path` is, in words ("a regular file", "a directory", "a FIFO", "a device", "a socket", "a symbolic
    link to X, which does not exist"), or None when nothing is there. Uses `stat` only, so a FIFO never blocks
    and a device is never read: why a "no such file" message must not stand for any of them."""
    try:
        return _kind_of_mode(os.stat(path).st_mode)
    except FileNotFoundError:
        try:
            return f"a symbolic link to {os.readlink(path)!r}, which does not exist"
        except OSError:
            return None
    except OSError as err:
        return f"unreadable ({err.strerror})"


def require_path(path: str | Path, *, folder: bool, what: str, fix: str) -> None:
    """One line naming `what` (e.g. "--train_dir") and `path` unless `path` is a folder (`folder=True`) or a
    regular file: a missing path is a `MissingFileError`; a FIFO, a device, a file where a folder is meant or a
    folder where a file is meant a `UserError` saying which it is. Both end with `fix`."""
    kind = path_kind(path)
    if kind is None:
        raise MissingFileError(f"{what} {path} does not exist; {fix}.")
    wanted = "a directory" if folder else "a regular file"
    if kind != wanted:
        raise UserError(f"{what} {path} is {kind}, not {'a folder' if folder else 'a regular file'}; {fix}.")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@contextmanager
def open_regular(path: str | Path, max_bytes: int | None = None, *, follow: bool = True,
                 root: str | Path | None = None, fix: str = "give a regular file") -> Iterator[BinaryIO]:
    """A regular file opened for reading (binary, blocking), or a `UserError` naming `path` and ending
    with `fix`: a FIFO (opened without blocking, so it never hangs), a device (`/dev/zero` would read
    forever), a directory or a socket is refused, and so is a file larger than `max_bytes`; with
    `follow=False` a symlink at `path` is refused, with `root` a path that leads out of `root` (through
    a symlink or `..`). A missing file raises `FileNotFoundError` as `open` does."""
    path = Path(path)
    if root is not None and not _inside(os.path.realpath(path), os.path.realpath(root)):
        raise UserError(f"{path} leads outside {root} (through a symbolic link); slca-peft reads a run's or "
                        f"checkpoint's files only inside it: {fix}.")
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno == errno.ELOOP and not follow:
            raise UserError(f"{path} is a symbolic link, which slca-peft never writes; {fix}.") from None
        if err.errno in (errno.ENXIO, errno.EISDIR):  # a socket, or a directory opened for reading
            raise UserError(f"{path} is not a regular file; {fix}.") from None
        raise UserError(f"{path} is unreadable ({err.strerror}); {fix} or fix its permissions.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _kind_of_mode(info.st_mode)
            raise UserError(f"{path} is {kind}, not a regular file, so slca-peft will not read it; {fix}.")
        if max_bytes is not None and info.st_size > max_bytes:
            raise UserError(f"{path} is larger than {max_bytes} bytes, more than slca-peft reads from such a file; "
                            f"{fix}.")
        if root is not None and not _inside(os.path.realpath(path), os.path.realpath(root)):
            raise UserError(f"{path} leads outside {root} (through a symbolic link); {fix}.")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def read_bytes(path: str | Path, max_bytes: int, *, follow: bool = True, root: str | Path | None = None,
               fix: str = "give a regular file") -> bytes:
    """The bytes of a regular file of at most `max_bytes` (`open_regular`'s checks); a file that grows
    past `max_bytes` while it is read is refused too."""
    with open_regular(path, max_bytes, follow=follow, root=root, fix=fix) as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise UserError(f"{path} is larger than {max_bytes} bytes, more than slca-peft reads from such a file; {fix}.")
    return raw


def read_text(path: str | Path, max_bytes: int = MAX_JSON_BYTES, *, follow: bool = True,
              root: str | Path | None = None, fix: str = "give a regular file") -> str:
    """`read_bytes` decoded as UTF-8 (invalid UTF-8 is a `UserError` naming the file)."""
    raw = read_bytes(path, max_bytes, follow=follow, root=root, fix=fix)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({one_line(err)}); {fix}.") from None


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES, *, root: str | Path | None = None) -> Any:
    """The JSON value in `path`, a regular file of at most `max_bytes` (`open_regular`; with `root`, never
    read through a symlink out of `root`)."""
    return loads_json(read_bytes(path, max_bytes, root=root,
                                 fix="the file is damaged or not the one meant"), str(path))


def read_own_json(path: str | Path, max_bytes: int, fix: str) -> Any:
    """The JSON value of a file slca-peft writes itself (a manifest, a fingerprint), or None when there
    is none. Opened without following a symlink (the library never writes one, and reading through it
    would trust another file) or blocking on a FIFO, a regular file of at most `max_bytes` only;
    `fix` (e.g. "remove it") ends every refusal."""
    try:
        raw = read_bytes(path, max_bytes, follow=False, fix=fix)
    except FileNotFoundError:
        return None
    try:
        return loads_json(raw, str(path))
    except UserError as err:
        raise UserError(f"{err} {fix[:1].upper()}{fix[1:]}.") from None
