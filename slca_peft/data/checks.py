"""Data checked before the first task trains, so bad data stops a run before any work.

- Every image is decoded once in full (`PIL.Image.load`, not `verify`, which misses truncated
  files), on a thread pool with a progress bar (shown on the recipe's main process unless
  `--disable_tqdm`); each failure is named by path.
- Images whose pixels cannot be converted faithfully to 8 bit (float `F`, 32-bit `I` beyond 16-bit
  range) are refused with their path: they would become constant images.
- Class folders: junk files (`.DS_Store`, `Thumbs.db`, `README.txt`, ...) are skipped with one
  summary warning; an empty class folder is an error; label files that `datasets`' imagefolder
  would use to relabel images (`metadata.csv`, `metadata.jsonl`, ...) are refused.
- Every task has test images (error otherwise); a class without test images is warned about.

The decode pass also hashes each file's bytes (the bytes it decodes: a file up to
`HASH_IN_MEMORY_BYTES` is read once, hashed and decoded from memory), so the run fingerprint sees
image content at no extra read: `content_digest` answers from what the pass recorded and reads
the file only for an image the pass never saw. What decoded in full is remembered for the process
by the SHA-256 of its bytes, never by file stamps (a write through a shared memory map changes
neither size, mtime, ctime nor inode): each pass reads and hashes every file again, which costs
little next to decoding, and skips only the decode of bytes that decoded before. So each seed of a
`--seeds` run checks, and its fingerprint records, the bytes that are there when it starts.

Image files are opened as regular files only (`open_regular`: a FIFO among the images is refused,
never waited on); a symbolic link that leads nowhere and a class folder that cannot be read are
errors naming them and the fix, never a class silently missing images.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.digests import hash_stream
from ..utils.errors import UserError
from ..utils.reading import open_regular

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: Files that `datasets`' imagefolder reads as labels or captions, overriding the folder names.
LABEL_FILES = frozenset({"metadata.csv", "metadata.jsonl", "metadata.parquet"})
#: Integer modes that hold 16-bit values at most once checked (16-bit PNGs open as "I").
_WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
#: Files up to this size are read once into memory, hashed and decoded from there; larger ones are
#: hashed in a streamed pass and decoded from the (then cached) file.
HASH_IN_MEMORY_BYTES = 64 << 20

# path -> ((size, mtime_ns, ctime_ns, inode), sha256 digest) of each file the decode pass last read: what
# `content_digest` gives the fingerprint (the stamp only says when a file must be read again, never that
# it need not be decoded).
_DIGESTS: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}
# The sha256 of every content (file or embedded bytes) that decoded in full in this process: checking the
# same bytes again (each class-order seed of a `--seeds` run) hashes them but decodes nothing.
_DECODED: set[bytes] = set()
_DIGESTS_LOCK = threading.Lock()

logger = logging.getLogger(__name__)


def list_class_folder(root: Path, names: Sequence[str], *, require_all: bool = True) -> tuple[list[str], list[int]]:
    """Image paths and labels under `root/<name>/` for each class name, in label order.

    A class folder without images is an error (`require_all`: also a missing one); label files are
    refused; other non-image files are skipped with one warning for the whole folder.
    """
    label_files = sorted(p for p in _walk_files(root) if p.name in LABEL_FILES)
    if label_files:
        raise UserError(
            f"{label_files[0]} would relabel images (datasets' imagefolder reads it) but slca-peft labels each image "
            "by its class folder; move the file out of the image folder so the labels are unambiguous."
        )
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[Path] = []
    empty: list[str] = []
    for label, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            if require_all:
                empty.append(name)
            continue
        files = sorted(p for p in _walk_files(folder) if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
        skipped += [p for p in files if p not in set(images)]
        if not images:
            empty.append(name)
        paths.extend(str(p) for p in images)
        labels.extend([label] * len(images))
    if empty:
        raise UserError(
            f"class folder(s) {empty[:5]} under {root} hold no image ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "add images or remove the folder."
        )
    if skipped:
        warnings.warn(
            f"{root}: skipped {len(skipped)} file(s) that are not images (e.g. {skipped[0].name}); "
            "only image files are read.",
            UserWarning,
            stacklevel=2,
        )
    return paths, labels


def _walk_files(root: Path) -> list[Path]:
    """Every file under `root` (not descending into folder links, as `rglob`), refusing what would make a class
    silently lose images: a folder that cannot be read (`chmod 000`), a symbolic link to nothing."""
    def refuse(err: OSError) -> None:
        where = err.filename or root
        raise UserError(f"{where} cannot be read ({err.strerror}); its images would be missing from the run: fix "
                        f"its permissions (chmod -R u+rX {where}) or move it out of {root}.")

    found = []
    for folder, dirs, files in os.walk(root, onerror=refuse):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_symlink() and not path.exists():
                raise UserError(f"{path} is a symbolic link to {os.readlink(path)!r}, which does not exist; restore "
                                "its target or remove the link.")
            found.append(path)
    return found


def _faithful(img: Any, where: str) -> None:
    mode = img.mode
    if mode == "F" or mode.startswith(("F;", "I;32")):
        raise UserError(f"{where}: mode {mode!r} (floating point / 32-bit) images cannot be converted to 8 bit "
                        "faithfully; convert it to 8- or 16-bit first.")
    if mode in _WIDE_INT_MODES:
        low, high = img.getextrema()
        if low < 0 or high > 65535:
            raise UserError(f"{where}: 32-bit image with values in [{low}, {high}], beyond 16-bit range, cannot be "
                            "converted to 8 bit faithfully; rescale it to 8 or 16 bit first.")


def _stamp(info: os.stat_result) -> tuple[int, int, int, int]:
    # ctime too: any write, chmod or rename moves it, and no copy tool can set it back.
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino


def _read_and_hash(path: str) -> tuple[Any, bytes]:
    """What PIL should open for `path` (its bytes when small, else the path) and the SHA-256 of the
    bytes read, recorded for `content_digest`. A regular file only (`open_regular`: a FIFO there is
    refused, never waited on)."""
    with open_regular(path, fix="an image must be a regular file: replace or remove it") as fh:
        info = os.fstat(fh.fileno())
        digest = hashlib.sha256()
        if info.st_size <= HASH_IN_MEMORY_BYTES:
            data = fh.read()
            digest.update(data)
            handle: Any = io.BytesIO(data)
        else:
            hash_stream(fh, digest)
            handle = path
    with _DIGESTS_LOCK:
        _DIGESTS[path] = (_stamp(info), digest.digest())
    return handle, digest.digest()


def content_digest(path: str | os.PathLike[str]) -> bytes:
    """SHA-256 of a file's bytes: those the decode pass last read (the pass that checked them), else read now."""
    key = os.fspath(path)
    info = os.stat(key)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
    if known is not None and known[0] == _stamp(info):
        return known[1]
    digest = hashlib.sha256()
    with open_regular(key, fix="an image must be a regular file: replace or remove it") as fh:
        hash_stream(fh, digest)
    return digest.digest()


def forget_content_digests() -> None:
    """Drop the digests the decode pass recorded, and what it found decodable."""
    with _DIGESTS_LOCK:
        _DIGESTS.clear()
        _DECODED.clear()


def _decode(source: Any) -> str | None:
    """None when the image decodes in full, else the problem in one line. Its bytes are read and hashed
    every time; only the decode of bytes that decoded before is skipped."""
    from PIL import Image

    where = source if isinstance(source, str) else "image bytes"
    handle: Any = None
    try:
        if isinstance(source, str):
            handle, key = _read_and_hash(source)
        else:
            handle, key = io.BytesIO(source), hashlib.sha256(source).digest()
        with _DIGESTS_LOCK:
            if key in _DECODED:
                return None
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as img:
                img.load()
                _faithful(img, where)
    except UserError as err:
        return str(err)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"{where}: decompression bomb ({' '.join(str(err).split())}); remove the file or raise " \
               "PIL.Image.MAX_IMAGE_PIXELS if it is genuine."
    except (OSError, SyntaxError, ValueError) as err:
        text = " ".join(str(err).split())
        if isinstance(handle, io.BytesIO):  # PIL names the in-memory copy; name the file
            text = text.replace(repr(handle), repr(where))
        return f"unreadable image {where} ({text}); remove or replace the file."
    with _DIGESTS_LOCK:
        _DECODED.add(key)
    return None


def check_images(sources: Sequence[Any], *, description: str = "checking images", workers: int | None = None,
                 progress: bool | None = None) -> None:
    """Decode every image (a path or encoded bytes) once in full; raise naming every failure.
    `progress`: a progress bar for 500 images or more (None: unless `slca_peft.utils.logging`
    disabled progress bars, as the recipe does with `--disable_tqdm` and on other processes)."""
    from tqdm.auto import tqdm

    from ..utils.logging import is_progress_bar_enabled

    if not sources:
        return
    if progress is None:
        progress = is_progress_bar_enabled()
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(_decode, sources, chunksize=64), total=len(sources), desc=description,
                            unit="img", disable=not progress or len(sources) < 500, leave=False))
    problems = [r for r in results if r is not None]
    if problems:
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}")


def _image_sources(dataset: Any, image_column: str) -> Iterable[Any]:
    """Paths or encoded bytes of a dataset's images, read without decoding them."""
    from datasets import Image

    if not isinstance(dataset.features.get(image_column), Image):
        return []
    raw = dataset.cast_column(image_column, Image(decode=False))
    sources = []
    for batch in raw.iter(batch_size=1000):
        for image in batch[image_column]:
            if image is None:
                continue
            sources.append(image["bytes"] if image.get("bytes") else image.get("path"))
    return sources


def check_dataset_images(dataset: Any, image_column: str, *, description: str = "checking images",
                         progress: bool | None = None) -> None:
    """`check_images` over a `datasets.Dataset`'s image column (files or embedded bytes)."""
    check_images([s for s in _image_sources(dataset, image_column) if s is not None], description=description,
                 progress=progress)


def check_task_splits(tasks: Any) -> None:
    """Every task needs test images to be scored; a class with none is scored on the others (warning)."""
    empty, untested = [], []
    for task in tasks:
        if len(task.test) == 0:
            empty.append(task.task_id)
            continue
        seen = set(np.unique(np.asarray(task.test[tasks.label_column])).tolist())
        untested += [c for c in task.classes if c not in seen]
    if empty:
        raise UserError(f"task(s) {empty} have no test images, so they cannot be scored; give every class test "
                        "images (or change init_cls/increment).")
    if untested:
        names = getattr(tasks, "label_names", None) or []
        shown = [names[c] if c < len(names) else c for c in untested[:5]]
        warnings.warn(f"class(es) {shown} have no test image; accuracies are over the other classes.",
                      UserWarning, stacklevel=2)


def check_task_data(tasks: Any, *, progress: bool | None = None) -> None:
    """All checks on a task stream before it trains: test coverage, then every image decoded once."""
    check_task_splits(tasks)
    column = tasks.image_column
    for task in tasks:
        for split, data in (("train", task.train), ("test", task.test)):
            check_dataset_images(data, column, description=f"checking task {task.task_id} {split} images",
                                 progress=progress)
