"""A run directory belongs to one run.

When a run starts it writes `run_fingerprint.json` into its output directory: the method, every
hyperparameter that changes results, the base model's identity and a content hash of its weight
files, the class order and a fingerprint of the data. `claim_run_directory` then

- refuses to start into a directory that holds another run (unless `overwrite`, which removes that
  run's checkpoints, metrics and fingerprint first, and nothing else);
- refuses to resume when the fingerprint differs, listing the fields that differ;
- holds an advisory lock (`fcntl.flock` on `.slca-run.lock`, the holder's pid written in it) so a
  second run into the same directory is refused while the first one is alive;
- restores a task folder whose replacement was interrupted between its two renames.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import UserError

FINGERPRINT_FILE = "run_fingerprint.json"
LOCK_FILE = ".slca-run.lock"
#: What a run writes into its output directory; `overwrite` removes exactly these.
RUN_ARTEFACTS = ("task_*", ".task_*", "metrics.json", "base_model", FINGERPRINT_FILE, "accuracy_matrix.png",
                 "accuracy_curve.png", "results.md")
#: TrainingArguments fields that change results (the SLCAConfig fields all do, except `_NOT_RESULTS`).
_TRAINING_FIELDS = ("learning_rate", "weight_decay", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
                    "max_grad_norm", "seed", "optim", "label_smoothing_factor", "bf16", "fp16")
_NOT_RESULTS = {"hub_base_model_id", "save_strategy", "remove_unused_columns", "global_batch_size",
                "per_device_eval_batch_size", "overwrite_output_dir", "dataloader_num_workers",
                "dataloader_persistent_workers"}
_WEIGHT_SUFFIXES = (".safetensors", ".json")

logger = logging.getLogger(__name__)


def check_writable(output_dir: str | Path) -> None:
    """Refuse an output directory (or its nearest existing parent) this process cannot write."""
    path = Path(output_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise UserError(f"--output_dir {output_dir}: {path} is not a directory; choose another --output_dir.")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {output_dir}: {path} is not writable; fix its permissions or choose "
                        "another --output_dir.")


# ---------------------------------------------------------------------------------------------- fingerprint
def _sha256_files(root: Path) -> str | None:
    """Content hash of a local model folder's weights and configs (None for a Hub id)."""
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def data_fingerprint(tasks: Any) -> str:
    """Hash of every task's images (file path and size, or encoded bytes) and labels, in stream order."""
    from datasets import Image

    digest = hashlib.sha256(json.dumps(tasks.describe(), sort_keys=True, default=str).encode())
    image_column, label_column = tasks.image_column, tasks.label_column
    for task in tasks:
        for split in (task.train, task.test):
            digest.update(f"split {len(split)}".encode())
            ds = split
            if isinstance(ds.features.get(image_column), Image):
                ds = ds.cast_column(image_column, Image(decode=False))
            for batch in ds.iter(batch_size=1000):
                digest.update(json.dumps(batch[label_column]).encode())
                for image in batch[image_column]:
                    if isinstance(image, dict) and image.get("path") and not image.get("bytes"):
                        path = Path(image["path"])  # class folder and file name: the data may move
                        size = path.stat().st_size if path.is_file() else -1
                        digest.update(f"{'/'.join(path.parts[-2:])}:{size}".encode())
                    elif isinstance(image, dict) and image.get("bytes"):
                        digest.update(hashlib.sha256(image["bytes"]).digest())
                    else:
                        digest.update(repr(image).encode())
    return digest.hexdigest()


def run_fingerprint(args: Any, *, base_model: str | None, base_revision: str | None = None,
                    tasks: Any = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that changes a run's results, as a flat JSON-able dict (compared field by field).

    `base_model` is a Hub id or a local folder (hashed), or a config JSON for a random backbone (hashed,
    with the seed). `extra` adds settings the config does not hold (e.g. the data augmentation).
    """
    from .config import SLCAConfig

    own = {f.name for f in fields(SLCAConfig)} - {f.name for f in fields(SLCAConfig.__mro__[1])}
    names = sorted(own - _NOT_RESULTS) + list(_TRAINING_FIELDS)
    fingerprint: dict[str, Any] = {"method": args.method}
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
    if tasks is not None:
        fingerprint["domains"] = tasks.describe().get("domains")
        fingerprint["class_order"] = list(tasks.order)
        fingerprint["task_sizes"] = list(tasks.task_sizes)
        fingerprint["data_sha256"] = data_fingerprint(tasks)
    fingerprint.update(extra or {})
    return json.loads(json.dumps(fingerprint, default=str))


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def read_fingerprint(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err}); remove it or use --overwrite_output_dir.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; remove it or use --overwrite_output_dir.")
    return data


def _describe_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    diffs = differing_fields(old, new)
    shown = []
    for key in diffs[:8]:
        a, b = json.dumps(old.get(key)), json.dumps(new.get(key))
        shown.append(f"{key} ({a[:40]} -> {b[:40]})" if len(a) + len(b) < 80 else key)
    more = f" and {len(diffs) - 8} more" if len(diffs) > 8 else ""
    return ", ".join(shown) + more


# ---------------------------------------------------------------------------------------------- directory
def _run_artefacts(root: Path) -> list[Path]:
    found: set[Path] = set()
    for pattern in RUN_ARTEFACTS:
        found.update(root.glob(pattern))
    return sorted(found)


def recover_interrupted_replacements(root: str | Path) -> None:
    """A kill between the two renames of a checkpoint replacement leaves `.task_N.old-*` and no
    `task_N`: put the old folder back; when `task_N` exists, the leftover is removed."""
    from .files import recover_replaced

    for old in sorted(Path(root).glob(".*.old-*")):
        recover_replaced(old.parent / old.name[1:].rsplit(".old-", 1)[0])


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock
        yield
        return
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def claim_run_directory(
    output_dir: str | Path,
    fingerprint: Mapping[str, Any],
    *,
    overwrite: bool = False,
    resume: bool = False,
    main_process: bool = True,
) -> Iterator[Path]:
    """Hold `output_dir` for one run while the block runs (see the module docstring).

    `resume`: the run continues the one already in the directory (`--resume_from`), so its fingerprint
    must match. Only the main process claims; the others yield at once.
    """
    root = Path(output_dir)
    if not main_process:
        yield root
        return
    check_writable(root)
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        recover_interrupted_replacements(root)
        old = read_fingerprint(root)
        artefacts = [p for p in _run_artefacts(root) if p.name != FINGERPRINT_FILE]
        if overwrite:
            for path in _run_artefacts(root):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            old = None
        elif resume:
            if old is not None and differing_fields(old, fingerprint):
                raise UserError(
                    f"cannot resume: {root} holds a run with other settings: {_describe_mismatch(old, fingerprint)}; "
                    "resume with the same settings, or start over with --overwrite_output_dir."
                )
            if old is None and artefacts:
                logger.warning("%s has no %s (an older run); resuming without checking its settings.",
                               root, FINGERPRINT_FILE)
        elif old is not None and differing_fields(old, fingerprint):
            raise UserError(
                f"{root} holds another run ({_describe_mismatch(old, fingerprint)} differ); choose another "
                "--output_dir, or pass --overwrite_output_dir to replace it."
            )
        elif artefacts:
            names = ", ".join(p.name for p in artefacts[:4])
            raise UserError(
                f"{root} already holds a run ({names}); continue it with --resume_from auto, choose another "
                "--output_dir, or pass --overwrite_output_dir to replace it."
            )
        if old is None:
            from .files import atomic_write_text

            atomic_write_text(root / FINGERPRINT_FILE, json.dumps(dict(fingerprint), indent=2, sort_keys=True) + "\n")
        yield root


def check_resumable(checkpoint: str | Path, *, align: bool) -> None:
    """Refuse a local checkpoint the loop cannot continue exactly: with alignment on, it must hold
    the unaligned heads (the next task trains from them, not from the aligned ones)."""
    from .safetensors_header import read_header

    path = Path(checkpoint) / "classifier.safetensors"
    if not align or not path.is_file() or (path.parent / "classifier_unaligned.safetensors").is_file():
        return
    header, _ = read_header(path)  # the header only (older checkpoints kept them under `unaligned.`)
    if not any(k.startswith("unaligned.") for k in header):
        raise UserError(
            f"{path} has no unaligned heads, so a resumed run would continue from the aligned ones and give "
            "other results; resume from a checkpoint written by the training loop, or start over."
        )


def checkpoint_fingerprint(checkpoint: str | Path) -> dict[str, Any] | None:
    """The fingerprint of the run a local `task_<t>` checkpoint belongs to (its parent's), if any."""
    path = Path(checkpoint)
    return read_fingerprint(path.parent) if path.is_dir() else None


def check_checkpoint_matches(checkpoint: str | Path, fingerprint: Mapping[str, Any]) -> None:
    """Refuse resuming from a checkpoint whose run had other settings, naming the fields."""
    old = checkpoint_fingerprint(checkpoint)
    if old is not None and differing_fields(old, fingerprint):
        raise UserError(
            f"cannot resume from {checkpoint}: its run had other settings: {_describe_mismatch(old, fingerprint)}; "
            "resume with the same settings."
        )
