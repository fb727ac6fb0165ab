"""The learner's run state beside a model's files: the one writer and the one reader of a continual
checkpoint's own files, for `ContinualLearner`'s task checkpoints and `SLCATrainer`'s output_dir alike.

Run state: `classifier_unaligned.safetensors` (heads before alignment: the next task learns from them),
`class_statistics.safetensors` (per-class Gaussians) and `continual_state.json` (the task history).
`write_checkpoint_files` fills a new, empty folder (`slca_peft.continual.checkpoint.save_checkpoint` puts
it in place as a whole); `save_checkpoint_into` writes the same files into a folder that holds other
files too (a Trainer's output_dir, which cannot be swapped as a whole): each file whole, through a
rename, the manifest last. `load_learner_state` reads the run state back, checked against the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..artifacts import manifest
from ..artifacts.atomic import follow_umask, json_text
from ..artifacts.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    BACKBONE_CONFIG_FILE,
    BACKBONE_FILE,
    FORMAT_VERSION,
    STATE_FILE,
    STATISTICS_FILE,
    UNALIGNED_FILE,
)
from ..artifacts.task_history import read_state, validate_state
from ..models.saving import detached, read_safetensors, write_model_files
from ..models.verification import base_model_record
from ..utils.errors import UserError
from .statistics import ClassStatistics

if TYPE_CHECKING:
    from ..models.model import SLCAModel

__all__ = ["load_learner_state", "save_checkpoint_into", "save_learner_state", "write_checkpoint_files"]

#: The run state's files, written beside the model files (absent from a model folder).
LEARNER_STATE_FILES = (UNALIGNED_FILE, STATISTICS_FILE, STATE_FILE)


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


def _write_files(model: SLCAModel, folder: Path, statistics: ClassStatistics | None, state: dict[str, Any] | None,
                 unaligned_head: dict[str, torch.Tensor] | None, card: dict[str, Any] | None) -> None:
    if state and state.get("label_names") and not model.label_names:
        model.label_names = state["label_names"]
    write_model_files(model, folder, state, card, continuable=statistics is not None and state is not None)
    save_learner_state(folder, statistics=statistics, state=state, unaligned_head=unaligned_head)


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
    _write_files(model, folder, statistics, state, unaligned_head, card)
    manifest.record_tree(folder, base_model_record(model, kind="checkpoint"))


def save_checkpoint_into(
    model: SLCAModel,
    directory: str | Path,
    *,
    statistics: ClassStatistics | None = None,
    state: dict[str, Any] | None = None,
    unaligned_head: dict[str, torch.Tensor] | None = None,
    card: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
    unlisted: tuple[str, ...] = (),
) -> list[str]:
    """The files of `write_checkpoint_files` (the model files alone without `statistics` and `state`) into
    `directory`, whose other files stay (a Trainer's output_dir: its checkpoint-N folders, state, metrics),
    through `manifest.write_in_place`: the other kind of backbone file and run-state files this save has none
    of are removed, the manifest comes last. `extra(folder)` writes more files to list with them; those named
    in `unlisted` are put in place but left out of the manifest (neither checked nor uploaded). Returns the
    names written."""

    def write(folder: Path) -> None:
        _write_files(model, folder, statistics, state, unaligned_head, card)
        if extra is not None:
            extra(folder)

    other_backbone = (BACKBONE_FILE, BACKBONE_CONFIG_FILE) if model.slca_config.use_lora else (ADAPTER_FILE,
                                                                                               ADAPTER_CONFIG_FILE)
    kind = "checkpoint" if statistics is not None and state is not None else "model"
    return manifest.write_in_place(directory, write, replaces=(*other_backbone, *LEARNER_STATE_FILES),
                                   unlisted=unlisted, extra=base_model_record(model, kind=kind))


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
