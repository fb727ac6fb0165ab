"""What slca-peft keeps on disk: every file and folder name of a run directory and a checkpoint
(`layout`), the atomic writes (`atomic`), manifests and checked deletion (`manifest`), digests, the task
history and the values a file may carry, the run lock and the trainer's state files. Models and
statistics are taken duck-typed; nothing here knows the method. Why each check exists:
docs/reliability.md (the threat model)."""

from .atomic import atomic_directory, atomic_write_bytes, atomic_write_text, swap_directories
from .layout import checkpoint_dirs, seed_dir_name, task_dir_name, task_index
from .manifest import plan_removal, read_manifest, record_tree
from .task_history import read_state, validate_state

__all__ = [
    "atomic_directory", "atomic_write_bytes", "atomic_write_text", "checkpoint_dirs", "plan_removal",
    "read_manifest", "read_state", "record_tree", "seed_dir_name", "swap_directories", "task_dir_name",
    "task_index", "validate_state",
]
