"""The run a directory or checkpoint already holds: whether it finished, and whether it can be resumed.

Asked before `slca_peft.continual.run_dir.claim_run_directory` claims the output directory: a run that already
finished there with the same fingerprint is not repeated (`finished_run`); a checkpoint is resumed only
when its run had the same settings (`check_checkpoint_matches`) and it holds what the loop continues
from (`check_resumable`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils.errors import UserError, read_json
from ..utils.files import METRICS_FILE, STATE_FILE, task_dir_name
from ..utils.safetensors_header import read_header
from .fingerprint import FINGERPRINT_FILE, describe_mismatch, differing_fields, read_fingerprint


def check_resumable(checkpoint: str | Path, *, align: bool) -> None:
    """Refuse a local checkpoint the loop cannot continue exactly: with alignment on, it must hold
    the unaligned heads (the next task trains from them, not from the aligned ones)."""
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
            f"cannot resume from {checkpoint}: its run had other settings: {describe_mismatch(old, fingerprint)}; "
            "resume with the same settings."
        )


def finished_run(output_dir: str | Path, fingerprint: Mapping[str, Any], num_tasks: int) -> dict[str, Any] | None:
    """metrics.json of the run in `output_dir` when it is this run (same fingerprint) and finished
    (the checkpoint of its last task, the earlier ones being optional under `save_total_limit`, and metrics
    over all `num_tasks` tasks), else None: starting it again has nothing to do."""
    root = Path(output_dir)
    if not (root / FINGERPRINT_FILE).is_file() or not (root / METRICS_FILE).is_file():
        return None
    old = read_fingerprint(root)
    if old is None or differing_fields(old, fingerprint):
        return None
    if not (root / task_dir_name(num_tasks - 1) / STATE_FILE).is_file():
        return None
    try:
        metrics = read_json(root / METRICS_FILE)
    except (OSError, ValueError):
        return None
    matrix = metrics.get("accuracy_matrix") if isinstance(metrics, dict) else None
    return metrics if isinstance(matrix, list) and len(matrix) == num_tasks else None
