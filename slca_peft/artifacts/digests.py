"""Content digests of a model folder's weight and config files: what a run fingerprint and a checkpoint's
manifest record of a base model, so swapped weights are named. Each file is read once per process."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from ..utils.reading import open_regular

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


_WEIGHT_SUFFIXES = (".safetensors", ".json")


#: {(real path, inode, size, mtime_ns, ctime_ns): (header sha256, content sha256)} of weight files hashed
#: in this process, so a checkpoint written after every task does not read its base model again.
_FILE_DIGESTS: dict[tuple, tuple[str | None, str]] = {}


def _stat_key(path: Path) -> tuple:
    info = os.stat(path)
    return (os.path.realpath(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _safetensors_header_sha256(path: Path) -> str | None:
    """SHA-256 of a safetensors file's JSON header (tensor names, dtypes, shapes, offsets)."""
    with open_regular(path, fix="a model folder holds regular files") as fh:
        head = fh.read(8)
        if len(head) != 8:
            return None
        size = int.from_bytes(head, "little")
        if size > 100 << 20:
            return None
        return hashlib.sha256(fh.read(size)).hexdigest()


def _hash_file(path: Path, running: Any = None) -> tuple[str | None, str]:
    """(header sha256 for safetensors, content sha256) of `path`, read once; `running` (a hashlib
    object) is fed the same bytes, so the fingerprint's folder hash and the per-file digests share a read."""
    key = _stat_key(path)
    if running is None and key in _FILE_DIGESTS:
        return _FILE_DIGESTS[key]
    digest = hashlib.sha256()
    with open_regular(path, fix="a model folder holds regular files") as fh:
        hash_stream(fh, digest, *([running] if running is not None else []))
    header = _safetensors_header_sha256(path) if path.suffix == ".safetensors" else None
    _FILE_DIGESTS[key] = (header, digest.hexdigest())
    return _FILE_DIGESTS[key]


def _weight_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def file_sha256(path: str | Path, *, follow: bool = True, fix: str = "give a regular file") -> tuple[int, str]:
    """(size, SHA-256) of a regular file, read in blocks (`open_regular`; `follow=False`: never through a
    symlink). The one file hash of the library: manifests, verification, data content."""
    with open_regular(path, follow=follow, fix=fix) as fh:
        digest = hashlib.sha256()
        size = hash_stream(fh, digest)
    return size, digest.hexdigest()


def folder_sha256(files: list[Path], *, hash_file: Any = None) -> str:
    """The one folder hash: SHA-256 over each file's name and bytes, in the order given (callers sort).
    `hash_file(path, running)` feeds a file's bytes to `running` (default: a bounded read of it)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        if hash_file is not None:
            hash_file(path, digest)
        else:
            with open_regular(path, fix="a folder slca-peft hashes holds regular files only: remove it") as fh:
                hash_stream(fh, digest)
    return digest.hexdigest()


def sha256_files(root: Path) -> str | None:
    """Content hash of a local model folder's weights and configs (None for a Hub id)."""
    if not root.is_dir():
        return None
    return folder_sha256(_weight_files(root), hash_file=_hash_file)


def model_file_digests(root: str | Path) -> dict[str, dict[str, Any]] | None:
    """{file name: {size, sha256, header_sha256}} of a local model folder's weight and config files
    (None for a Hub id): what a checkpoint records of its base model, so swapped weights are named."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = {}
    for path in _weight_files(root):
        header, content = _hash_file(path)
        found[path.name] = {"size": path.stat().st_size, "sha256": content, "header_sha256": header}
    return found


def describe_model_file_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two `model_file_digests`, one phrase per file."""
    changes = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None:
            changes.append(f"{name} was added")
        elif b is None:
            changes.append(f"{name} is missing")
        elif a.get("sha256") != b.get("sha256"):
            layout = a.get("header_sha256") == b.get("header_sha256")
            changes.append(f"{name} holds other " + ("values (same tensor layout)" if layout and a.get("header_sha256")
                                                     else "content"))
    return changes
