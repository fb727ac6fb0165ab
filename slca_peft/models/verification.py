"""Whether a checkpoint's files are the ones slca-peft wrote, and its base model the one it was trained on.

Writing a checkpoint records, in its manifest (`slca_peft.artifacts.manifest`), the size and SHA-256 of every
file and, for an adapter on a local base model, that model's file digests (`base_model_record`).
`verify_files` compares both against what is on disk now; `slca_peft.continual.checkpoint.verify_checkpoint`
runs it with the base model the checkpoint would load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts import manifest
from ..artifacts.digests import describe_model_file_changes, file_sha256, model_file_digests
from ..artifacts.layout import CARD_FILE, is_trainer_output_file
from ..utils.errors import UserError

if TYPE_CHECKING:
    from .model import SLCAModel

logger = logging.getLogger(__name__)

#: Files whose edits change nothing a run computes (the model card): not compared on resume.
UNCHECKED_FILES = frozenset({CARD_FILE})
_warned_unchecked: set[str] = set()


def base_model_record(model: SLCAModel, *, kind: str) -> dict[str, Any]:
    """The manifest's `kind` and, for an adapter on a local base model, that model's file digests."""
    extra: dict[str, Any] = {"kind": kind}
    base = model.settings()["base_model_name_or_path"]
    if model.slca_config.use_lora and base and Path(base).is_dir():
        extra["base_model"] = {"name": str(base), "files": model_file_digests(base)}
    return extra


def _changed_files(root: Path, entries: dict[str, manifest.ManifestEntry]) -> list[str]:
    """Each listed file missing, replaced or edited, and each safetensors/JSON file added since (a Trainer's
    own files in an SLCATrainer output_dir, which nothing loads, excepted). Every listed file is read
    through folders opened without following a symlink (`manifest.check_listed`): a symlinked sub-folder
    on the way is a difference, never followed."""
    problems = []
    for rel, entry in sorted(entries.items()):
        if rel in UNCHECKED_FILES:
            continue
        try:
            state = manifest.check_listed(root, entry)
        except UserError:
            problems.append(f"{rel} lies under a symbolic link")
            continue
        if state == "a symbolic link" and manifest.is_hub_blob_link(root, rel):  # a Hub download (cache links)
            same = _blob_sha256(root / rel) == (entry.size, entry.sha256)
            state = None if same else "its content changed since slca-peft wrote it"
        if state == "missing":
            problems.append(f"{rel} is missing")
        elif state == "its content changed since slca-peft wrote it":
            problems.append(f"{rel} was edited (sha256 {entry.sha256[:12]} -> {_blob_sha256(root / rel)[1][:12]})")
        elif state is not None:
            problems.append(f"{rel} is not a regular file")
    added = sorted(p.name for p in root.iterdir() if p.suffix in (".safetensors", ".json") and p.name not in entries
                   and p.name != manifest.MANIFEST_FILE and not is_trainer_output_file(p.name))
    return problems + [f"{name} was added" for name in added]


def _blob_sha256(path: Path) -> tuple[int, str]:
    return file_sha256(path, fix="a checkpoint holds regular files")


def verify_files(path: str | Path, resolve_base: Callable[[], str | None], *, accept_changed_files: bool = False,
                 ) -> list[str]:
    """`slca_peft.continual.checkpoint.verify_checkpoint`'s comparison; `resolve_base` names the base model the
    checkpoint would load, asked only when the manifest recorded its digests."""
    root = Path(path)
    entries = manifest.read_manifest(root)
    if entries is None:
        if str(root) not in _warned_unchecked:
            _warned_unchecked.add(str(root))
            logger.warning("%s has no %s (written by an older slca-peft): its files and base model cannot be checked "
                           "for changes.", root, manifest.MANIFEST_FILE)
        return []
    problems = _changed_files(root, entries)
    recorded = manifest.read_manifest_extra(root).get("base_model")
    if isinstance(recorded, dict) and isinstance(recorded.get("files"), dict):
        base = resolve_base()
        current = model_file_digests(base) if base else None
        if current is not None:
            changes = describe_model_file_changes(recorded["files"], current)
            problems += [f"base model {base}: {change}" for change in changes]
    if problems:
        message = (f"{root} is not the checkpoint slca-peft wrote: {'; '.join(problems[:8])}"
                   f"{f' and {len(problems) - 8} more' if len(problems) > 8 else ''}")
        if not accept_changed_files:
            raise UserError(f"{message}. Resume from an unmodified checkpoint on the base model it was trained on, "
                            "or pass --accept_changed_files (accept_changed_files=True) to use it as it is.")
        logger.warning("%s; continuing because changed files were accepted.", message)
    return problems
