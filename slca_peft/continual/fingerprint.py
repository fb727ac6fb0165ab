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
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..artifacts.digests import sha256_files
from ..artifacts.layout import FINGERPRINT_FILE
from ..data.tasks import stream_position_names
from ..utils.errors import UserError
from ..utils.reading import loads_json, read_bytes, read_own_json

#: Written into every fingerprint: a fingerprint of another version differs in that field.
FINGERPRINT_VERSION = 2
#: TrainingArguments fields that change results (the SLCAConfig fields all do, except `_NOT_RESULTS`).
_TRAINING_FIELDS = ("learning_rate", "weight_decay", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
                    "max_grad_norm", "seed", "optim", "label_smoothing_factor", "bf16", "fp16")
_NOT_RESULTS = {"hub_base_model_id", "save_strategy", "remove_unused_columns", "global_batch_size",
                "per_device_eval_batch_size", "overwrite_output_dir", "dataloader_num_workers",
                "dataloader_persistent_workers", "resume_without_optimizer_state"}
#: Largest fingerprint or PEFT config read.
_MAX_JSON_BYTES = 16 << 20


def _data_digests(tasks: Any) -> tuple[str, dict[str, str]]:
    """(hash of the whole stream, {class name: hash of its images}) over every image's content.

    Image files are hashed by content (the digest the decode pass recorded, see
    `data_checks.content_digest`) with their class folder and file name, embedded images by their
    bytes; labels in stream order. Moving the data keeps the hash; changing one byte of an image does not.
    """
    from datasets import Image

    from ..data.checks import content_digest

    described = tasks.describe()
    if described.get("label_names"):
        # The names in stream (position) order, as the data's labels are: the digest a run recorded before
        # `label_names` went by class id, so such a run still resumes.
        described = {**described, "label_names": stream_position_names(tasks)}
    names = list(described.get("label_names") or [])
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
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
        raw = read_bytes(path, _MAX_JSON_BYTES, fix="give --peft_config a PEFT config (adapter_config.json)")
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
    from ..method.config import SLCAConfig

    own = {f.name for f in fields(SLCAConfig)} - {f.name for f in fields(SLCAConfig.__mro__[1])}
    names = sorted(own - _NOT_RESULTS) + list(_TRAINING_FIELDS)
    fingerprint: dict[str, Any] = {"fingerprint_version": FINGERPRINT_VERSION, "method": args.method}
    for name in names:
        value = getattr(args, name, None)
        fingerprint[name] = value if isinstance(value, (int, float, str, bool, list, type(None))) else str(value)
    base = Path(base_model) if base_model else None
    fingerprint["base_model"] = str(base_model) if base_model else None  # None: the checkpoint's (a continuation)
    fingerprint["base_model_revision"] = base_revision
    if base is not None and base.is_file():
        fingerprint["base_model_sha256"] = hashlib.sha256(read_bytes(base, _MAX_JSON_BYTES, fix="give --model_config "
                                                                     "a config JSON")).hexdigest()
    else:
        fingerprint["base_model_sha256"] = sha256_files(base) if base is not None else None
    fingerprint["peft_config"] = _peft_config_content(peft_config) if peft_config else None
    if tasks is not None:
        fingerprint["domains"] = tasks.describe().get("domains")
        fingerprint["class_order"] = list(tasks.order)
        fingerprint["task_sizes"] = list(tasks.task_sizes)
        fingerprint["data_sha256"], fingerprint["data_class_sha256"] = _data_digests(tasks)
    fingerprint.update(extra or {})
    return json.loads(json.dumps(fingerprint, default=str))


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def read_fingerprint(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / FINGERPRINT_FILE
    data = read_own_json(path, _MAX_JSON_BYTES, "remove it or use --overwrite_output_dir")
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; remove it or use --overwrite_output_dir.")
    if data is not None and data.get("base_model") == "None":  # older versions wrote a missing base as a string
        data["base_model"] = None
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
