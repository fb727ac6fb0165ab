"""A continual checkpoint: the model files (`slca_peft.models.saving`) plus the learner's run state
beside them, as a Trainer keeps trainer_state.json beside its model.

Run state: `classifier_unaligned.safetensors` (heads before alignment: the next task learns from them),
`class_statistics.safetensors` (per-class Gaussians) and `continual_state.json` (the task history).
`save_checkpoint` writes model and run state atomically (the directory is complete or absent);
`load_checkpoint` rebuilds all of it; `verify_checkpoint` refuses files slca-peft did not write.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file

from ..artifacts import manifest
from ..artifacts.atomic import atomic_directory, follow_umask, json_text
from ..artifacts.layout import FORMAT_VERSION, STATE_FILE, STATISTICS_FILE, UNALIGNED_FILE
from ..artifacts.task_history import read_state, validate_state
from ..method.statistics import ClassStatistics
from ..models.loading import hub_kwargs, loading_kwargs
from ..models.model import SLCAModel
from ..models.saving import (
    detached,
    read_model_config,
    read_safetensors,
    resolve_checkpoint,
    write_model_files,
)
from ..models.verification import base_model_record, verify_files
from ..utils.errors import UserError

__all__ = ["Checkpoint", "load_checkpoint", "load_learner_state", "save_checkpoint", "save_learner_state",
           "verify_checkpoint"]


class Checkpoint(NamedTuple):
    """A continual checkpoint in memory: the model and the learner's run state beside it."""

    model: SLCAModel
    statistics: ClassStatistics | None
    task_history: dict[str, Any] | None
    unaligned_head: dict[str, torch.Tensor] | None


def save_learner_state(
    directory: str | Path,
    *,
    statistics: ClassStatistics | None = None,
    state: dict[str, Any] | None = None,
    unaligned_head: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the continual learner's run state beside the model files: the class statistics (anything
    with `save(directory)`, a `ClassStatistics`), the task history and the heads before alignment."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if unaligned_head is not None:
        manifest.safe_path(directory, UNALIGNED_FILE)
        save_file(detached(unaligned_head), str(directory / UNALIGNED_FILE))
        follow_umask(directory / UNALIGNED_FILE)
    if statistics is not None:
        manifest.safe_path(directory, STATISTICS_FILE)
        statistics.save(directory)
        follow_umask(directory / STATISTICS_FILE)
    if state is not None:
        state = validate_state({**state, "format_version": FORMAT_VERSION})  # a history's names are by class id
        manifest.atomic_write_bytes(directory, STATE_FILE, json_text(state).encode())


def write_checkpoint_files(
    model: SLCAModel,
    folder: Path,
    *,
    statistics: ClassStatistics | None = None,
    state: dict[str, Any] | None = None,
    unaligned_head: dict[str, torch.Tensor] | None = None,
    card: dict[str, Any] | None = None,
) -> None:
    """A continual checkpoint into a new, empty `folder`: the model files, the run state beside them and
    the manifest of all (what `save_checkpoint` writes atomically and `SLCAModel.push_to_hub` uploads)."""
    if state and state.get("label_names") and not model.label_names:
        model.label_names = state["label_names"]
    write_model_files(model, folder, state, card, continuable=statistics is not None and state is not None)
    save_learner_state(folder, statistics=statistics, state=state, unaligned_head=unaligned_head)
    manifest.record_tree(folder, base_model_record(model, kind="checkpoint"))


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


def load_learner_state(
    directory: str | Path, model: SLCAModel
) -> tuple[ClassStatistics | None, dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """The learner's run state `save_learner_state` wrote beside `model`'s files (each part None
    when absent)."""
    root = Path(directory)
    statistics = ClassStatistics.load(root, model.feature_dim) if (root / STATISTICS_FILE).is_file() else None
    if statistics is not None:  # each class a position of this model, each task one it learned
        sizes = model.slca_config.task_sizes
        outside = [c for c in statistics.classes if c >= model.classifier.num_classes]
        late = [t for t in statistics.task_of_class.values() if t >= len(sizes)]
        if outside or late:
            raise UserError(f"{root / STATISTICS_FILE} holds statistics of class {outside[:3]} or task {late[:3]} "
                             f"beyond the model's {model.classifier.num_classes} classes in {len(sizes)} tasks; the "
                             "file is damaged or was not written with this checkpoint.")
    state = read_state(root)
    unaligned = None
    if (root / UNALIGNED_FILE).is_file():
        unaligned = read_safetensors(root / UNALIGNED_FILE, dict(model.classifier.state_dict()))
    return statistics, state, unaligned


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
