"""A continual checkpoint: the model files (`slca_peft.models.saving`) plus the learner's run state
beside them, as a Trainer keeps trainer_state.json beside its model.

Run state: `classifier_unaligned.safetensors` (heads before alignment: the next task learns from them),
`class_statistics.safetensors` (per-class Gaussians) and `continual_state.json` (the task history), written
and read by `slca_peft.method.learner_state` (an `SLCATrainer` output_dir holds the same files).
`save_checkpoint` writes model and run state atomically (the directory is complete or absent);
`load_checkpoint` rebuilds all of it; `verify_checkpoint` refuses files slca-peft did not write.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..artifacts.atomic import atomic_directory
from ..method.learner_state import load_learner_state, save_learner_state, write_checkpoint_files
from ..method.statistics import ClassStatistics
from ..models.loading import hub_kwargs, loading_kwargs
from ..models.model import SLCAModel
from ..models.saving import read_model_config, resolve_checkpoint
from ..models.verification import verify_files

__all__ = ["Checkpoint", "load_checkpoint", "load_learner_state", "save_checkpoint", "save_learner_state",
           "verify_checkpoint"]


class Checkpoint(NamedTuple):
    """A continual checkpoint in memory: the model and the learner's run state beside it."""

    model: SLCAModel
    statistics: ClassStatistics | None
    task_history: dict[str, Any] | None
    unaligned_head: dict[str, torch.Tensor] | None


def save_checkpoint(
    model: SLCAModel,
    directory: str | Path,
    *,
    statistics: ClassStatistics | None = None,
    state: dict[str, Any] | None = None,
    unaligned_head: dict[str, torch.Tensor] | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Write everything needed to continue or serve `model`, atomically: the directory is either
    complete or absent (`write_checkpoint_files`)."""
    with atomic_directory(directory) as tmp:
        write_checkpoint_files(model, tmp, statistics=statistics, state=state, unaligned_head=unaligned_head,
                               card=card)
    return Path(directory)


def verify_checkpoint(
    path: str | Path,
    expected_base: str | Sequence[str | None] | None = None,
    *,
    accept_changed_files: bool = False,
) -> list[str]:
    """Refuse a checkpoint whose files are not the ones slca-peft wrote, or whose base model's weights
    were replaced, naming each difference; returns the differences (empty when it is intact).

    Compares every file against the checkpoint's manifest (size and SHA-256: adapter, heads,
    statistics, `continual_state.json` with its accuracies, ...) and the base model the checkpoint
    would load (resolved as `read_model_config` does, `expected_base` included) against the digests
    recorded when it was written (`slca_peft.models.verification`). `accept_changed_files=True` (the recipe's
    `--accept_changed_files`) logs the differences instead of raising.
    """
    return verify_files(path, lambda: read_model_config(path, expected_base=expected_base)[0].base_model_name_or_path,
                        accept_changed_files=accept_changed_files)


def load_checkpoint(
    path_or_repo_id: str | Path,
    revision: str | None = None,
    expected_base: str | Sequence[str | None] | None = None,
    **kwargs: Any,
) -> Checkpoint:
    """Rebuild model, statistics, task history and unaligned head from a checkpoint (directory or Hub
    repo) that `save_checkpoint` wrote: what `ContinualLearner.from_checkpoint` / `from_pretrained`
    continue from (the model alone loads with `SLCAModel.from_pretrained`).

    `expected_base` (a Hub id or path, or several names of the same weights, e.g. a local copy and
    its Hub id) refuses a checkpoint that was trained on another backbone. `kwargs`: the loading
    keywords of `SLCAModel.from_pretrained` (`token`, `cache_dir`, `local_files_only`,
    `force_download`, `dtype`).
    """
    loading = loading_kwargs("load_checkpoint", **kwargs)
    root = resolve_checkpoint(path_or_repo_id, revision, **hub_kwargs(loading))
    model = SLCAModel.from_pretrained(root, base_model_name_or_path=expected_base, **loading)
    statistics, state, unaligned = load_learner_state(root, model)
    if state and state.get("label_names") and not model.label_names:
        model.label_names = state["label_names"]
    model.name_or_path = str(path_or_repo_id)
    return Checkpoint(model, statistics, state, unaligned)
