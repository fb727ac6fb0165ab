"""Every file and folder name of a run directory, a checkpoint and an export, defined once.

A checkpoint folder (`task_<t>/` of a run, `SLCAModel.save_pretrained`'s folder, a Hub repo):

  slca_config.json                  `SLCAModelConfig`: settings, class names, the referenced base model
  adapter_config.json,
  adapter_model.safetensors         PEFT adapter (LoRA or the user's method, plus trained norms/biases)
  backbone.safetensors,
  backbone_config.json              the whole backbone, for full fine-tuning
  classifier.safetensors            aligned heads + scales
  config.json                       transformers' config, model type slca_peft: the Auto classes and pipeline()
  preprocessor_config.json          the image processor of the run's evaluation transform (pipeline() uses it)
  README.md                         model card
  classifier_unaligned.safetensors  heads before alignment (the next task aligns from them)
  class_statistics.safetensors      per-class Gaussians
  continual_state.json              task history: class order, task sizes, names, accuracy matrix
  .slca-manifest.json               what slca-peft wrote there (size + SHA-256 of each file)

An `SLCATrainer` output_dir is such a checkpoint (plus `preprocessor_config.json` and `training_args.json`)
with transformers.Trainer's own files beside it: `checkpoint-N/`, `trainer_state.json`, `*_results.json`,
`runs/` (`is_trainer_output_file`).

A run directory: `task_1/` ... `task_T/`, `metrics.json`, `results.md`, the two plots,
`run_fingerprint.json`, `.slca-run.lock`; a `--seeds` run holds `seed_<s>/` run directories and
`seeds.json`. `tests/artifacts/test_layout.py` checks that each name is spelled in this module only.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The version of the layout every folder slca-peft writes (checkpoint, run directory, export): recorded in
#: each folder's manifest, in `slca_config.json` and in `continual_state.json`, checked when any is read.
#: Version 2 records class names in class-id order; what an older version wrote is converted on read in
#: one place, `slca_peft.artifacts.upgrade`.
FORMAT_VERSION = 2
CONFIG_FILE = "slca_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's, which also names the base model
ADAPTER_FILE = "adapter_model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_CONFIG_FILE = "backbone_config.json"
CLASSIFIER_FILE = "classifier.safetensors"
CARD_FILE = "README.md"
UNALIGNED_FILE = "classifier_unaligned.safetensors"
STATISTICS_FILE = "class_statistics.safetensors"
STATE_FILE = "continual_state.json"
METRICS_FILE = "metrics.json"  # a run directory's accuracy matrix and timings
FINGERPRINT_FILE = "run_fingerprint.json"  # a run directory's settings and data digests
LOCK_FILE = ".slca-run.lock"  # a run directory's advisory lock (`slca_peft.artifacts.lock`)
#: Marks a hidden sibling folder (`.NAME.tmp-*`, `.NAME.old-*`) as one slca-peft made while writing NAME, so
#: a later write may sweep it; a folder without it (a user's, named alike) is never removed nor renamed.
PARTIAL_FILE = ".slca-partial"
#: Infixes of the hidden folders an atomic write goes through (`temporary_name`).
TEMP_MARK, OLD_MARK = ".tmp-", ".old-"
#: A run directory holds one checkpoint folder per learned task, named by `task_dir_name`.
TASK_DIR_PREFIX = "task_"
#: Suffixes of pickle-based weight files, which are never loaded (unpickling can run code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MANIFEST_FILE = ".slca-manifest.json"  # what slca-peft wrote into a folder (`slca_peft.artifacts.manifest`)
RESULTS_FILE = "results.md"  # a run directory's report
CURVE_PLOT = "accuracy_curve.png"
MATRIX_PLOT = "accuracy_matrix.png"
PLOT_FILES = (CURVE_PLOT, MATRIX_PLOT)
SEEDS_FILE = "seeds.json"  # a `--seeds` run's summary over its seed runs
SEED_DIR_PREFIX = "seed_"
TRAINING_ARGS_FILE = "training_args.json"  # SLCATrainer's arguments (JSON, never a pickle)
EXPORT_CONFIG_FILE = "config.json"  # an export's (and any transformers model folder's) config
#: transformers' config.json in a model folder, of model type slca_peft: the Auto classes load the trained
#: model (`slca_peft.models.auto`)
AUTO_CONFIG_FILE = EXPORT_CONFIG_FILE
EXPORT_WEIGHTS_FILE = "model.safetensors"
EXPORT_INDEX_FILE = "model.safetensors.index.json"
PROCESSOR_FILE = "preprocessor_config.json"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers.Trainer's, in its output_dir and each checkpoint-N
#: What `Trainer.save_metrics` writes into its output_dir beside the model: `<split>_results.json` and this.
ALL_RESULTS_FILE = "all_results.json"
RESULTS_SUFFIX = "_results.json"


def is_trainer_output_file(name: str) -> bool:
    """A file a `transformers.Trainer` (or `SLCATrainer`) keeps in its output_dir beside the model that no
    slca-peft loader reads: its state, its metrics and the run's arguments. An SLCATrainer output_dir is a
    continual checkpoint with these beside it, so checking or hashing the checkpoint leaves them out."""
    return name in (TRAINER_STATE_FILE, ALL_RESULTS_FILE, TRAINING_ARGS_FILE) or name.endswith(RESULTS_SUFFIX)


def task_dir_name(task_id: int) -> str:
    """The checkpoint folder of task `task_id` (0-based, as the code counts) in a run directory, numbered as the
    logs count tasks, from 1: `task_1` holds the first task ("task 1/5"), `task_5` the fifth."""
    return f"{TASK_DIR_PREFIX}{task_id + 1}"


def task_index(name: str) -> int | None:
    """The task id (0-based) a checkpoint folder name stands for, or None for any other name."""
    suffix = name.removeprefix(TASK_DIR_PREFIX)
    if not (name.startswith(TASK_DIR_PREFIX) and suffix.isdigit() and suffix.isascii()) or int(suffix) < 1:
        return None
    return int(suffix) - 1


def temporary_name(target: str, mark: str, tag: str | int) -> str:
    """The hidden sibling an atomic write of `target` goes through: `mark` is `TEMP_MARK` (the copy being
    written) or `OLD_MARK` (the replaced copy, between the two renames of a replacement)."""
    return f".{target}{mark}{tag}"


def temporary_target(name: str) -> str | None:
    """The name whose atomic write left the hidden folder `name` (`temporary_name`), or None."""
    for mark in (TEMP_MARK, OLD_MARK):
        target, found, _ = name[1:].rpartition(mark)
        if name.startswith(".") and found and target:
            return target
    return None


def is_task_leftover(name: str, mark: str | None = None) -> bool:
    """Whether `name` is what an interrupted write of a task checkpoint leaves (`.task_<t>.tmp-*` or
    `.task_<t>.old-*`; only those of `mark`, `TEMP_MARK` or `OLD_MARK`, when given)."""
    target = temporary_target(name)
    if target is None or task_index(target) is None:
        return False
    return mark is None or name.startswith(f".{target}{mark}")


def checkpoint_dirs(output_dir: str | Path) -> dict[int, Path]:
    """{task id: folder} of the complete task checkpoints (those with a task history) in a run directory."""
    found = {}
    root = Path(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            index = task_index(path.name)
            if index is not None and path.is_dir() and not path.is_symlink() and (path / STATE_FILE).is_file():
                found[index] = path
    return dict(sorted(found.items()))



def seed_dir_name(seed: int) -> str:
    """The run directory of one seed inside a `--seeds` run."""
    return f"{SEED_DIR_PREFIX}{seed}"


def seed_index(name: str) -> int | None:
    """The seed a seed run's folder name stands for (`seed_<int>`), or None for any other name."""
    suffix = name.removeprefix(SEED_DIR_PREFIX)
    digits = suffix[1:] if suffix.startswith("-") else suffix
    if not name.startswith(SEED_DIR_PREFIX) or not digits.isdigit() or not digits.isascii():
        return None
    return int(suffix)


def seed_dirs(output_dir: str | Path) -> list[Path]:
    """The seed run directories of a `--seeds` run (folders named `seed_<int>`), by seed."""
    root = Path(output_dir)
    paths = root.iterdir() if root.is_dir() else ()
    found = sorted((seed, path) for path in paths if (seed := seed_index(path.name)) is not None and path.is_dir())
    return [path for _, path in found]


def holds_run(root: str | Path) -> bool:
    """A run directory of slca-peft's: a fingerprint, a task checkpoint (`task_<t>/continual_state.json`)
    or a seed run that holds one. Folders reached through a symlink never count."""
    root = Path(root)
    if (root / FINGERPRINT_FILE).is_file():
        return True
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return False
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        if task_index(entry.name) is not None and Path(entry.path, STATE_FILE).is_file():
            return True
        if seed_index(entry.name) is not None and holds_run(entry.path):
            return True
    return False


def folder_kind(folder: str | Path) -> str | None:
    """What slca-peft folder `folder` is: "checkpoint" (model files or a task history), "run directory"
    (a run's files, a task checkpoint, a seed run), "export" (a transformers model folder without
    slca-peft's config), or None for anything else. The one "is this folder ours" check every command
    that writes over, deletes or uploads a folder asks."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if any((folder / name).is_file() for name in (CONFIG_FILE, STATE_FILE)):
        return "checkpoint"
    if any((folder / name).is_file() for name in (LOCK_FILE, METRICS_FILE, SEEDS_FILE)) or holds_run(folder):
        return "run directory"
    if (folder / EXPORT_CONFIG_FILE).is_file():
        return "export"
    return None
