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

The pass reads a dataset `CHECK_WINDOW` images at a time and keeps about 300 bytes per image (a
16-byte key of the path with the file's stamp and SHA-256, and the SHA-256 of what decoded, merged
into a sorted array), not per-file Python objects. `use_decoded_record` (the recipe's
`--image_check_record`) keeps what decoded across runs, keyed by content: a later run hashes every
image again and decodes only bytes the record does not list.

Image files are opened as regular files only (`open_regular`: a FIFO among the images is refused,
never waited on); a symbolic link that leads nowhere and a class folder that cannot be read are
errors naming them and the fix, never a class silently missing images.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.class_names import names_at
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

#: Images decoded per window of the thread pool: memory for futures and results stays bounded however
#: many images a dataset holds.
CHECK_WINDOW = 4096
#: (size, mtime_ns, ctime_ns, inode), packed ahead of the sha256 in `_DIGESTS`.
_STAMP = struct.Struct("<qqqQ")


class DigestSet:
    """A set of 32-byte SHA-256 digests at about 32 bytes each: the newest in a small Python set, merged
    into one sorted numpy array (looked up by binary search) every `MERGE_EVERY` additions."""

    MERGE_EVERY = 1 << 16

    def __init__(self, digests: np.ndarray | None = None):
        self._sorted = np.unique(np.asarray(digests, dtype="S32")) if digests is not None else np.empty(0, "S32")
        self._recent: set[bytes] = set()

    def __contains__(self, digest: bytes) -> bool:
        if digest in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, np.bytes_(digest)))
        # numpy gives an `S32` item back without its trailing zero bytes (storage keeps them).
        return i < len(self._sorted) and self._sorted[i] == digest.rstrip(b"\0")

    def __len__(self) -> int:
        self._merge()
        return len(self._sorted)

    def add(self, digest: bytes) -> None:
        self._recent.add(digest)
        if len(self._recent) >= self.MERGE_EVERY:
            self._merge()

    def update(self, digests: np.ndarray) -> None:
        self._merge()
        self._sorted = np.union1d(self._sorted, np.asarray(digests, dtype="S32"))

    def array(self) -> np.ndarray:
        """Every digest, sorted (`S32`; trailing zero bytes are kept in storage)."""
        self._merge()
        return self._sorted

    def clear(self) -> None:
        self._sorted, self._recent = np.empty(0, "S32"), set()

    def _merge(self) -> None:
        if self._recent:
            self._sorted = np.union1d(self._sorted, np.array(list(self._recent), dtype="S32"))
            self._recent = set()


# 16-byte BLAKE2b of a path -> its (size, mtime_ns, ctime_ns, inode) packed, then the sha256 of the bytes the
# decode pass last read from it: what `content_digest` gives the fingerprint (the stamp only says when a file
# must be read again, never that it need not be decoded). About 200 bytes an image, not a tuple of Python ints.
_DIGESTS: dict[bytes, bytes] = {}
# The sha256 of every content (file or embedded bytes) that decoded in full in this process (and those a
# `decoded record` lists, `use_decoded_record`): checking the same bytes again (each class-order seed of a
# `--seeds` run, a later run with the record) hashes them but decodes nothing.
_DECODED = DigestSet()
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


def _stamp(info: os.stat_result) -> bytes:
    # ctime too: any write, chmod or rename moves it, and no copy tool can set it back.
    return _STAMP.pack(info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def _path_key(path: str) -> bytes:
    return hashlib.blake2b(os.fsencode(path), digest_size=16).digest()


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
        _DIGESTS[_path_key(path)] = _stamp(info) + digest.digest()
    return handle, digest.digest()


def content_digest(path: str | os.PathLike[str]) -> bytes:
    """SHA-256 of a file's bytes: those the decode pass last read (the pass that checked them), else read now."""
    key = os.fspath(path)
    info = os.stat(key)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(_path_key(key))
    if known is not None and known[: _STAMP.size] == _stamp(info):
        return known[_STAMP.size :]
    digest = hashlib.sha256()
    with open_regular(key, fix="an image must be a regular file: replace or remove it") as fh:
        hash_stream(fh, digest)
    return digest.digest()


def forget_content_digests() -> None:
    """Drop the digests the decode pass recorded, and what it found decodable."""
    with _DIGESTS_LOCK:
        _DIGESTS.clear()
        _DECODED.clear()
        _RECORD["known"] = 0


# --------------------------------------------------------------------------- the decoded record, across runs
#: The metadata a decoded record carries; its digests are trusted only under the same conditions (what
#: decodes is Pillow's decision, and the decompression-bomb limit is part of it).
RECORD_FORMAT = "slca-peft decoded images"
_RECORD: dict[str, Any] = {"path": None, "write": False, "known": 0}


def _record_conditions() -> dict[str, str]:
    import PIL
    from PIL import Image

    return {"format": RECORD_FORMAT, "pillow": PIL.__version__, "max_image_pixels": str(Image.MAX_IMAGE_PIXELS)}


def read_decoded_record(path: str | Path) -> np.ndarray | None:
    """The digests (`S32`) a decoded record lists; None when it was written under other conditions
    (another Pillow, another `MAX_IMAGE_PIXELS`: its images are decoded again). A file that is not a
    record is a `UserError` naming it: it is never read as one, nor replaced."""
    from safetensors.numpy import load_file

    from ..artifacts.safetensors_header import read_header

    path = Path(path)
    fix = "give --image_check_record a file that slca-peft wrote, or a new file name"
    try:
        tensors, metadata = read_header(path)
    except UserError as err:
        raise UserError(f"{path} is not a decoded-images record ({err}); {fix}.") from None
    spec = tensors.get("sha256", {})
    if (metadata.get("format") != RECORD_FORMAT or set(tensors) != {"sha256"} or spec.get("dtype") != "U8"
            or len(spec.get("shape", ())) != 2 or spec["shape"][1] != 32):
        raise UserError(f"{path} is not a decoded-images record written by slca-peft; {fix}.")
    if metadata != _record_conditions():
        logger.info("%s was written with Pillow %s (MAX_IMAGE_PIXELS %s); this run decodes its images again",
                    path, metadata.get("pillow"), metadata.get("max_image_pixels"))
        return None
    return np.ascontiguousarray(load_file(str(path))["sha256"]).view("S32").ravel()


def use_decoded_record(path: str | Path | None, *, write: bool = True) -> int:
    """Keep what decoded in full in a record file, across runs: the SHA-256 of every image content that
    decoded (32 bytes an image, `safetensors`). A later check still reads and hashes every image, as
    the run fingerprint needs, and skips the decode of bytes the record lists: a record cannot vouch
    for a file that changed. `write`: add this process's new digests to it after each check (False on
    all but one process of a distributed run). None stops using one. Returns the digests trusted."""
    if path is None:
        _RECORD.update(path=None, write=False)
        return 0
    path = Path(path)
    digests = read_decoded_record(path) if os.path.lexists(path) else None
    with _DIGESTS_LOCK:
        if digests is not None:
            _DECODED.update(digests)
        _RECORD.update(path=path, write=write, known=len(digests) if digests is not None else 0)
    return 0 if digests is None else len(digests)


def save_decoded_record() -> Path | None:
    """Write the decoded digests to the record in use, when it lacks some (atomically; None otherwise)."""
    from safetensors.numpy import save

    from ..artifacts.atomic import atomic_write_bytes

    path = _RECORD["path"]
    if path is None or not _RECORD["write"]:
        return None
    with _DIGESTS_LOCK:
        digests = _DECODED.array()
        if len(digests) == _RECORD["known"]:
            return None
        _RECORD["known"] = len(digests)
    data = save({"sha256": digests.view(np.uint8).reshape(-1, 32)}, metadata=_record_conditions())
    return atomic_write_bytes(path, data)


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


def check_images(sources: Iterable[Any], *, description: str = "checking images", workers: int | None = None,
                 progress: bool | None = None, total: int | None = None) -> None:
    """Decode every image (a path or encoded bytes) once in full; raise naming every failure.
    `sources` may be a generator (`total`: its length, for the progress bar); it is read `CHECK_WINDOW`
    images at a time, so the pass holds a window's futures, never one per image of the dataset.
    `progress`: a progress bar for 500 images or more (None: unless `slca_peft.utils.logging`
    disabled progress bars, as the recipe does with `--disable_tqdm` and on other processes)."""
    from tqdm.auto import tqdm

    from ..utils.logging import is_progress_bar_enabled

    if total is None and isinstance(sources, Sequence):
        total = len(sources)
    if total == 0:
        return
    if progress is None:
        progress = is_progress_bar_enabled()
    workers = workers or min(8, os.cpu_count() or 1)
    first, failures = None, 0
    items = iter(sources)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=total, desc=description, unit="img", leave=False,
                 disable=not progress or (total is not None and total < 500)) as bar:
        while window := list(itertools.islice(items, CHECK_WINDOW)):
            for problem in pool.map(_decode, window, chunksize=64):
                if problem is not None:
                    first, failures = first or problem, failures + 1
            bar.update(len(window))
    save_decoded_record()
    if first is not None:
        more = f" (and {failures - 1} more file(s))" if failures > 1 else ""
        raise UserError(f"{first}{more}")


def _image_sources(dataset: Any, image_column: str) -> Iterator[Any]:
    """Paths or encoded bytes of a dataset's images, read without decoding them, a batch at a time."""
    from datasets import Image

    if not isinstance(dataset.features.get(image_column), Image):
        return
    raw = dataset.cast_column(image_column, Image(decode=False))
    for batch in raw.iter(batch_size=1000):
        for image in batch[image_column]:
            if image is None:
                continue
            source = image["bytes"] if image.get("bytes") else image.get("path")
            if source is not None:
                yield source


def check_dataset_images(dataset: Any, image_column: str, *, description: str = "checking images",
                         progress: bool | None = None) -> None:
    """`check_images` over a `datasets.Dataset`'s image column (files or embedded bytes), streamed."""
    check_images(_image_sources(dataset, image_column), description=description, progress=progress,
                 total=len(dataset))


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
        # The tasks' data is labelled by position (`stream_position_names`, which imports this module).
        ids = getattr(tasks, "class_ids", None)
        names = getattr(tasks, "position_names", None) or names_at(
            getattr(tasks, "label_names", None), range(tasks.num_classes) if ids is None else ids)
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
