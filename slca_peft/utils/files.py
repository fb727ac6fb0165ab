"""File names of a checkpoint and the writes that never leave half a file or folder behind.

The leaf every module that touches the disk shares (it imports nothing from slca_peft), so the
layout of a checkpoint is written down once:

  slca_config.json                  `SLCAModelConfig`: settings, class names, the referenced base model
  adapter_config.json,
  adapter_model.safetensors         PEFT adapter (LoRA or the user's method, plus trained norms/biases)
  backbone.safetensors,
  backbone_config.json              the whole backbone, for full fine-tuning
  classifier.safetensors            aligned heads + scales
  README.md                         model card
  classifier_unaligned.safetensors  heads before alignment (the next task aligns from them)
  class_statistics.safetensors      per-class Gaussians
  continual_state.json              task history: class order, task sizes, names, accuracy matrix
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

CONFIG_FILE = "slca_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's, which also names the base model
ADAPTER_FILE = "adapter_model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_CONFIG_FILE = "backbone_config.json"
CLASSIFIER_FILE = "classifier.safetensors"
CARD_FILE = "README.md"
UNALIGNED_FILE = "classifier_unaligned.safetensors"
STATISTICS_FILE = "class_statistics.safetensors"
STATE_FILE = "continual_state.json"
METRICS_FILE = "metrics.json"  # a run directory's accuracy matrix and timings
FINGERPRINT_FILE = "run_fingerprint.json"  # a run directory's settings and data digests
LOCK_FILE = ".slca-run.lock"  # a run directory's advisory lock (`slca_peft.continual.lock`)
#: A run directory holds one checkpoint folder per learned task, named by `task_dir_name`.
TASK_DIR_PREFIX = "task_"
#: Suffixes of pickle-based weight files, which are never loaded (unpickling can run code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Marks a hidden sibling folder (`.NAME.tmp-*`, `.NAME.old-*`) as one slca-peft made while writing NAME, so
#: a later write may sweep it; a folder without it (a user's, named alike) is never removed nor renamed.
PARTIAL_FILE = ".slca-partial"
_PARTIAL_TEXT = b"slca-peft partial folder: removed or put back by the next write of its sibling\n"
#: Block size of the streamed reads that hash a file, so a weight file is never held in memory whole.
HASH_BLOCK_BYTES = 1 << 20


def hash_stream(fh: IO[bytes], *digests: Any) -> int:
    """Feed the rest of `fh` to every hashlib object in `digests` block by block, so each caller that
    needs a digest (the manifest, the fingerprint, the data's content) hashes in one bounded read;
    returns the bytes read."""
    size = 0
    for block in iter(lambda: fh.read(HASH_BLOCK_BYTES), b""):
        for digest in digests:
            digest.update(block)
        size += len(block)
    return size


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


def partial_sibling(target: str | Path, kind: str) -> Path:
    """A new, marked hidden sibling folder `.NAME.<kind>-XXXXXXXX` of `target` (`kind`: tmp)."""
    target = Path(target)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    mark_partial(folder)
    return folder


def sweep_partial(target: str | Path) -> None:
    """Remove the `.NAME.tmp-*` folders a killed write of `target` left (only those `is_partial` proves ours)."""
    target = Path(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if is_partial(stale):
            shutil.rmtree(stale, ignore_errors=True)


def recover_replaced(target: str | Path) -> None:
    """Undo a replacement killed between its two renames: a `.NAME.old-*` that slca-peft marked (`is_partial`)
    goes back to `NAME` when `NAME` is missing, and is removed when `NAME` exists (the replacement
    completed); an unmarked one (a user's folder named alike) is left alone."""
    target = Path(target)
    if is_partial(target):  # a kill just before or after a rename left the marker in the live folder: it is stale
        unmark_partial(target)
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
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
    tmp = partial_sibling(target, "tmp")
    follow_umask(tmp, directory=True)  # mkdtemp makes 0700; the checkpoint follows the umask
    try:
        yield tmp
        settle_files(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
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
    old = target.parent / f".{target.name}.old-{os.getpid()}"
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

    The one atomic file write of the library (`slca_peft.utils.manifest.atomic_write_bytes` checks the
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


def json_text(data: Any, *, sort_keys: bool = True) -> str:
    """The JSON every slca-peft file holds: indented, keys sorted (unless told otherwise), a final newline."""
    return json.dumps(data, indent=2, sort_keys=sort_keys) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    """A JSON file in a folder that is itself being written atomically (no rename of its own)."""
    Path(path).write_text(json_text(data))


def task_dir_name(task_id: int) -> str:
    """The checkpoint folder of task `task_id` (0-based, as the code counts) in a run directory, numbered as the
    logs count tasks, from 1: `task_1` holds the first task ("task 1/5"), `task_5` the fifth."""
    return f"{TASK_DIR_PREFIX}{task_id + 1}"


def task_index(name: str) -> int | None:
    """The task id (0-based) a checkpoint folder name stands for, or None for any other name."""
    suffix = name.removeprefix(TASK_DIR_PREFIX)
    if not (name.startswith(TASK_DIR_PREFIX) and suffix.isdigit() and suffix.isascii()) or int(suffix) < 1:
        return None
    return int(suffix) - 1


def checkpoint_dirs(output_dir: str | Path) -> dict[int, Path]:
    """{task id: folder} of the complete task checkpoints (those with a task history) in a run directory."""
    found = {}
    root = Path(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            index = task_index(path.name)
            if index is not None and path.is_dir() and not path.is_symlink() and (path / STATE_FILE).is_file():
                found[index] = path
    return dict(sorted(found.items()))

