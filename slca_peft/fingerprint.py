"""A run's fingerprint: everything that changes its results, compared field by field on resume.

`run_fingerprint.json` holds the method, every hyperparameter that changes results, the base model's
identity and a content hash of its weight files, the `--peft_config` file's content, the class order
and two hashes of the data's content: the whole stream's (`data_sha256`) and one per class
(`data_class_sha256`, so a refusal names the classes whose images changed). Image files are hashed
by the bytes the decode pass read (`data_checks.content_digest`): no extra read of the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import UserError, loads_json, read_own_json
from .files import hash_stream

FINGERPRINT_FILE = "run_fingerprint.json"
#: Fingerprints before version 2 hashed image file names and sizes, not content, had no PEFT config and
#: called the method's schedule `cosine` (now `slca_cosine`).
FINGERPRINT_VERSION = 2
#: TrainingArguments fields that change results (the SLCAConfig fields all do, except `_NOT_RESULTS`).
_TRAINING_FIELDS = ("learning_rate", "weight_decay", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
                    "max_grad_norm", "seed", "optim", "label_smoothing_factor", "bf16", "fp16")
_NOT_RESULTS = {"hub_base_model_id", "save_strategy", "remove_unused_columns", "global_batch_size",
                "per_device_eval_batch_size", "overwrite_output_dir", "dataloader_num_workers",
                "dataloader_persistent_workers"}
_WEIGHT_SUFFIXES = (".safetensors", ".json")
#: Largest fingerprint or PEFT config read.
_MAX_JSON_BYTES = 16 << 20


#: {(real path, inode, size, mtime_ns, ctime_ns): (header sha256, content sha256)} of weight files hashed
#: in this process, so a checkpoint written after every task does not read its base model again.
_FILE_DIGESTS: dict[tuple, tuple[str | None, str]] = {}


def _stat_key(path: Path) -> tuple:
    info = os.stat(path)
    return (os.path.realpath(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _safetensors_header_sha256(path: Path) -> str | None:
    """SHA-256 of a safetensors file's JSON header (tensor names, dtypes, shapes, offsets)."""
    with path.open("rb") as fh:
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
    with path.open("rb") as fh:
        hash_stream(fh, digest, *([running] if running is not None else []))
    header = _safetensors_header_sha256(path) if path.suffix == ".safetensors" else None
    _FILE_DIGESTS[key] = (header, digest.hexdigest())
    return _FILE_DIGESTS[key]


def _weight_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def _sha256_files(root: Path) -> str | None:
    """Content hash of a local model folder's weights and configs (None for a Hub id)."""
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in _weight_files(root):
        digest.update(path.name.encode() + b"\0")
        _hash_file(path, digest)
    return digest.hexdigest()


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


def _data_digests(tasks: Any) -> tuple[str, dict[str, str]]:
    """(hash of the whole stream, {class name: hash of its images}) over every image's content.

    Image files are hashed by content (the digest the decode pass recorded, see
    `data_checks.content_digest`) with their class folder and file name, embedded images by their
    bytes; labels in stream order. Moving the data keeps the hash; changing one byte of an image does not.
    """
    from datasets import Image

    from .data_checks import content_digest

    digest = hashlib.sha256(json.dumps(tasks.describe(), sort_keys=True, default=str).encode())
    names = list(tasks.describe().get("label_names") or [])
    per_class: dict[str, Any] = {}
    image_column, label_column = tasks.image_column, tasks.label_column
    for task in tasks:
        for split_name, split in (("train", task.train), ("test", task.test)):
            digest.update(f"split {len(split)}".encode())
            ds = split
            if isinstance(ds.features.get(image_column), Image):
                ds = ds.cast_column(image_column, Image(decode=False))
            for batch in ds.iter(batch_size=1000):
                labels = batch[label_column]
                digest.update(json.dumps(labels).encode())
                for label, image in zip(labels, batch[image_column], strict=True):
                    if isinstance(image, dict) and image.get("path") and not image.get("bytes"):
                        path = Path(image["path"])  # class folder and file name: the data may move
                        content = content_digest(path) if path.is_file() else b"missing"
                        item = f"{'/'.join(path.parts[-2:])}:".encode() + content
                    elif isinstance(image, dict) and image.get("bytes"):
                        item = hashlib.sha256(image["bytes"]).digest()
                    else:
                        item = repr(image).encode()
                    digest.update(item)
                    key = names[label] if isinstance(label, int) and 0 <= label < len(names) else str(label)
                    per_class.setdefault(key, hashlib.sha256()).update(split_name.encode() + item)
    return digest.hexdigest(), {k: v.hexdigest()[:16] for k, v in per_class.items()}


def data_fingerprint(tasks: Any) -> str:
    """Hash of every task's images (content) and labels, in stream order."""
    return _data_digests(tasks)[0]


def _peft_config_content(path: str | Path) -> Any:
    """The `--peft_config` file's content for the fingerprint: its JSON (canonical), else its hash."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise UserError(f"--peft_config {path} is larger than {_MAX_JSON_BYTES} bytes; it is not a PEFT config.")
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"--peft_config {path} is unreadable ({err.strerror}); give an adapter_config.json.") from None
    try:
        return loads_json(raw, f"--peft_config {path}")
    except UserError:  # not JSON: its bytes still identify it
        return {"sha256": hashlib.sha256(raw).hexdigest()}


def run_fingerprint(args: Any, *, base_model: str | None, base_revision: str | None = None,
                    tasks: Any = None, extra: Mapping[str, Any] | None = None,
                    peft_config: str | Path | None = None) -> dict[str, Any]:
    """Everything that changes a run's results, as a flat JSON-able dict (compared field by field).

    `base_model` is a Hub id or a local folder (hashed), or a config JSON for a random backbone (hashed,
    with the seed). `peft_config` is the `--peft_config` file (its content is recorded). `extra` adds
    settings the config does not hold (e.g. the data augmentation).
    """
    from .config import SLCAConfig

    own = {f.name for f in fields(SLCAConfig)} - {f.name for f in fields(SLCAConfig.__mro__[1])}
    names = sorted(own - _NOT_RESULTS) + list(_TRAINING_FIELDS)
    fingerprint: dict[str, Any] = {"fingerprint_version": FINGERPRINT_VERSION, "method": args.method}
    for name in names:
        value = getattr(args, name, None)
        fingerprint[name] = value if isinstance(value, (int, float, str, bool, list, type(None))) else str(value)
    base = Path(base_model) if base_model else None
    fingerprint["base_model"] = str(base_model)
    fingerprint["base_model_revision"] = base_revision
    if base is not None and base.is_file():
        fingerprint["base_model_sha256"] = hashlib.sha256(base.read_bytes()).hexdigest()
    else:
        fingerprint["base_model_sha256"] = _sha256_files(base) if base is not None else None
    fingerprint["peft_config"] = _peft_config_content(peft_config) if peft_config else None
    if tasks is not None:
        fingerprint["domains"] = tasks.describe().get("domains")
        fingerprint["class_order"] = list(tasks.order)
        fingerprint["task_sizes"] = list(tasks.task_sizes)
        fingerprint["data_sha256"], fingerprint["data_class_sha256"] = _data_digests(tasks)
    fingerprint.update(extra or {})
    return json.loads(json.dumps(fingerprint, default=str))


def _comparable(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """An older fingerprint lacks the newer fields and hashed data by name and size: compare the rest."""
    if old.get("fingerprint_version") == new.get("fingerprint_version"):
        return old, new
    skip = {"data_sha256", "fingerprint_version"}
    keys = (set(old) & set(new)) - skip
    return {k: old[k] for k in keys}, {k: new[k] for k in keys}


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    old, new = _comparable(old, new)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def read_fingerprint(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / FINGERPRINT_FILE
    data = read_own_json(path, _MAX_JSON_BYTES, "remove it or use --overwrite_output_dir")
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; remove it or use --overwrite_output_dir.")
    if data is not None and "fingerprint_version" not in data and data.get("lr_scheduler_type") == "cosine":
        data["lr_scheduler_type"] = "slca_cosine"  # version 1 called the method's schedule `cosine`
    return data


def describe_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    diffs = differing_fields(old, new)
    shown = []
    for key in diffs[:8]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):  # name what changed inside (classes, PEFT fields)
            inner = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            more = f" and {len(inner) - 6} more" if len(inner) > 6 else ""
            shown.append(f"{key} ({', '.join(map(str, inner[:6]))}{more} differ)")
            continue
        a, b = json.dumps(a), json.dumps(b)
        shown.append(f"{key} ({a[:40]} -> {b[:40]})" if len(a) + len(b) < 80 else key)
    more = f" and {len(diffs) - 8} more" if len(diffs) > 8 else ""
    return ", ".join(shown) + more
