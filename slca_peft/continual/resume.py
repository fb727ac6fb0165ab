"""Every check made before a run goes on from what an earlier run left: one function per check, each
refusal one line naming the fix.

The recipe asks, before `slca_peft.continual.run_dir.claim_run_directory` claims the output directory,
whether the run already finished there (`finished_run`: same fingerprint, nothing to repeat) and,
for a local checkpoint to resume, whether its run had the same settings (`check_checkpoint_matches`)
and kept the unaligned heads (`check_unaligned_heads`). `ContinualLearner.from_checkpoint` and
`from_pretrained` then check what they loaded: a task history and statistics (`check_run_state`), the
same stream (`check_same_stream`, resuming only), the same method and backbone settings
(`check_same_model`) and, going on with new classes, heads and statistics for every learned class
(`check_learned_tasks`). Before each task the loop checks the model has the heads of the tasks before
it (`check_heads_before`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts.layout import (
    CLASSIFIER_FILE,
    FINGERPRINT_FILE,
    METRICS_FILE,
    STATE_FILE,
    UNALIGNED_FILE,
    task_dir_name,
)
from ..models.backbones import lora_targets_for
from ..utils.errors import UserError
from ..utils.reading import read_json
from .fingerprint import describe_mismatch, differing_fields, read_fingerprint

if TYPE_CHECKING:
    from ..data.continuation import ContinuedStream
    from ..data.tasks import TaskStream
    from ..method.config import SLCAConfig
    from ..method.statistics import ClassStatistics
    from ..models.model import SLCAModel

#: What a refusal of a checkpoint that is not a learner's asks for instead.
_WRITTEN_BY_THE_LOOP = ("give a task_<t> checkpoint written by ContinualLearner (or the recipe), or the "
                        "output_dir of a finished SLCATrainer run")


# ---------------------------------------------------------------------- the run directory (before any loading)
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


def check_unaligned_heads(checkpoint: str | Path, *, align: bool) -> None:
    """Refuse a local checkpoint the loop cannot continue exactly: with alignment on, it must hold
    the unaligned heads (the next task trains from them, not from the aligned ones)."""
    path = Path(checkpoint) / CLASSIFIER_FILE
    if align and path.is_file() and not (path.parent / UNALIGNED_FILE).is_file():
        raise UserError(
            f"{path} has no unaligned heads, so a resumed run would continue from the aligned ones and give "
            "other results; resume from a checkpoint written by the training loop, or start over."
        )


# ---------------------------------------------------------------------- what a checkpoint loaded
def check_run_state(checkpoint: str | Path, statistics: ClassStatistics | None, state: dict[str, Any] | None) -> None:
    """Refuse a checkpoint without the task history or class statistics the loop goes on from."""
    if state is None or statistics is None:
        raise UserError(f"{checkpoint} has no task history or class statistics, so it cannot be resumed or "
                        f"continued; {_WRITTEN_BY_THE_LOOP}.")


def check_same_stream(checkpoint: str | Path, state: Mapping[str, Any], tasks: TaskStream) -> None:
    """Refuse resuming a stream other than the checkpoint's: class order, split, label names, domains."""
    current = tasks.describe()
    for key in ("class_order", "task_sizes", "label_names", "incremental", "domains"):
        if state.get(key) != current.get(key):
            raise UserError(
                f"{checkpoint}: {key} differs from this run's ({state.get(key)} vs {current.get(key)}); resume "
                "with the same dataset, class_order_seed, init_cls and increment (or the same domains)."
            )


def check_same_model(checkpoint: str | Path, model: SLCAModel, state: Mapping[str, Any], args: SLCAConfig) -> None:
    """Refuse, naming the difference, a checkpoint trained with another method or backbone setting."""
    if state.get("method") != args.method:
        raise UserError(f"{checkpoint} was trained with method {state.get('method')!r}, not {args.method!r}; "
                        f"go on with --method {state.get('method')}.")
    trained_with, asked = model.slca_config, model.slca_config.fields_from(args)
    for key in ("lora_layout", "reset_final_norm") + (("lora_target_modules",) if trained_with.use_lora else ()):
        wanted, trained = asked[key], getattr(trained_with, key)
        if key == "lora_target_modules":  # as this backbone names them (timm: q/k/v mean its fused qkv)
            wanted = lora_targets_for(model.base_backbone, wanted)
        if trained != wanted:
            raise UserError(
                f"{checkpoint} was trained with {key}={trained!r}, this run asks for "
                f"{wanted!r}; resume with the same setting (released_code and its knobs)."
            )


def check_heads_before(model: SLCAModel, tasks: TaskStream, task_id: int) -> None:
    """Refuse learning task `task_id` with a model whose classifier lacks (or has more than) the heads
    of the tasks before it: a model from another checkpoint than the one resumed."""
    heads = model.classifier.num_tasks
    expected = sum(1 for j in range(task_id) if tasks[j].head_size > 0)
    if heads != expected:
        raise UserError(
            f"the classifier has {heads} heads but task {task_id + 1} needs {expected} before it; resume from the "
            f"checkpoint of task {task_id} ({task_dir_name(task_id - 1)}) with its model."
        )


def check_learned_tasks(checkpoint: str | Path, model: SLCAModel, statistics: ClassStatistics,
                        tasks: ContinuedStream) -> None:
    """Refuse going on with new classes from a checkpoint whose heads or statistics do not cover the
    tasks its history records as learned."""
    learned = tasks.previous
    if model.classifier.task_sizes != learned["task_sizes"]:
        raise UserError(f"{checkpoint}: the classifier's heads {model.classifier.task_sizes} do not match the task "
                        f"history's {learned['task_sizes']}; the checkpoint is damaged, {_WRITTEN_BY_THE_LOOP}.")
    missing = [c for c in range(tasks.num_old_classes) if c not in statistics.means]
    if missing:
        raise UserError(f"{checkpoint} lacks the class statistics of classes {missing[:5]}, so it cannot go on; "
                        f"{_WRITTEN_BY_THE_LOOP}.")
