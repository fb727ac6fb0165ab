"""The after-task steps of the continual loop and the hook protocol they share with yours.

`ContinualLearner.run()` calls, for each task of the stream:

    grow the classifier -> on_task_begin -> train (SLCATrainer) -> on_task_end -> restore unaligned heads

and `on_run_begin` / `on_run_end` around the whole stream. `on_task_end` runs the built-in steps
first, in this order, then the callbacks you pass:

    StatisticsStep -> AlignmentStep -> EvaluationStep (fires on_evaluate) -> CheckpointStep
    -> PushStep -> ReportStep

so a callback of yours sees the aligned heads, the new accuracy row and a checkpoint on disk. Steps
get the learner, which holds everything a task produced: `model`, `args`, `tasks`, `statistics`,
`result`, `trainer` (this task's `SLCATrainer`), `unaligned_head` and `tracker`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import atomic_write_text

if TYPE_CHECKING:
    from .continual import ContinualLearner, ContinualResult
    from .tasks import Task

logger = logging.getLogger(__name__)


class ContinualCallback:
    """Hooks of the continual loop; override the ones you need (every hook is a no-op here).

    Like `transformers.TrainerCallback`, but per task rather than per step. An exception raised
    in a hook stops the run; the error names the callback.
    """

    def on_run_begin(self, learner: ContinualLearner) -> None:
        """Before the first task still to learn (also when resuming)."""

    def on_task_begin(self, learner: ContinualLearner, task: Task) -> None:
        """The classifier has grown for `task`; training has not started."""

    def on_task_end(self, learner: ContinualLearner, task: Task) -> None:
        """`task` is trained; `learner.unaligned_head` holds its heads before alignment."""

    def on_evaluate(self, learner: ContinualLearner, task: Task, metrics: dict[str, float]) -> None:
        """The seen tasks were just scored (`metrics` as `ContinualLearner.continual_metrics`)."""

    def on_run_end(self, learner: ContinualLearner, result: ContinualResult) -> None:
        """Every task is learned."""


class StatisticsStep(ContinualCallback):
    """Per-class Gaussians of the task's training features (kept; old data is gone)."""

    def on_task_end(self, learner, task):
        learner.compute_statistics(task)


class AlignmentStep(ContinualCallback):
    """Retrain every head on features sampled from the class Gaussians (from the second task on)."""

    def on_task_end(self, learner, task):
        if not (learner.args.align and task.task_id > 0):
            return
        losses = learner.aligner.align(
            learner.model.classifier, learner.statistics, task.task_id, learner.tasks.statistics_labels,
            progress=learner.show_progress,
        )
        logger.debug("task %d: classifier alignment losses %s", task.task_id + 1, [round(v, 4) for v in losses])


class EvaluationStep(ContinualCallback):
    """Accuracy on every seen task's test data with the aligned heads; fires `on_evaluate`."""

    def on_task_end(self, learner, task):
        row, seen, sizes = learner.evaluate(task.task_id)
        learner.result.accuracy_matrix.append(row)
        learner.result.seen_accuracy.append(seen)
        learner.result.task_test_sizes = sizes
        learner.call_event("on_evaluate", task, learner.continual_metrics())


class CheckpointStep(ContinualCallback):
    """`OUTPUT_DIR/task_<t>`: model, statistics, unaligned heads and task history."""

    def on_task_end(self, learner, task):
        learner.save(learner.output_dir / f"task_{task.task_id}", learner.unaligned_head)


class PushStep(ContinualCallback):
    """Uploads each task checkpoint as one commit (`--push_to_hub`)."""

    def on_task_end(self, learner, task):
        if learner.args.push_to_hub:
            seen = learner.result.seen_accuracy[-1]
            learner.push(learner.output_dir / f"task_{task.task_id}",
                         f"task {task.task_id + 1}/{len(learner.tasks)}: seen classes {seen:.2f}%")


class ReportStep(ContinualCallback):
    """Logs each task's result once, sends the continual metrics to the trackers, and writes
    metrics.json, the plots and results.md at the end of the run (main process only)."""

    def on_evaluate(self, learner, task, metrics):
        if not learner.is_main_process:
            return
        row = learner.result.accuracy_matrix[-1]
        logger.info("task %d/%d | seen classes %5.1f%% | per task: %s", task.task_id + 1, len(learner.tasks),
                    metrics["seen_accuracy"], " ".join(f"{a:5.1f}" for a in row))
        learner.tracker.log({f"eval_{key}": value for key, value in metrics.items()})

    def on_run_end(self, learner, result):
        if learner.is_main_process and result.accuracy_matrix:
            atomic_write_text(learner.output_dir / "metrics.json", json.dumps(learner.metrics(), indent=2) + "\n")
            self._report(learner)
        learner.tracker.close()

    @staticmethod
    def _report(learner: ContinualLearner) -> None:
        from .continual import format_accuracy_table

        summary = learner.result.summary()
        logger.info(
            "accuracy (%%) on each task's test classes after learning each task:\n%s\nLast-Acc %.2f  Inc-Acc %.2f  "
            "forgetting %.2f  BWT %.2f  (%s)",
            format_accuracy_table(learner.result.accuracy_matrix, learner.result.seen_accuracy),
            summary["last_accuracy"], summary["average_incremental_accuracy"], summary["average_forgetting"],
            summary["backward_transfer"], learner.output_dir / "metrics.json",
        )
        if write_plots(learner.output_dir):
            learner.tracker.log_image("eval/accuracy_matrix", learner.output_dir / "accuracy_matrix.png")


def write_plots(output_dir: Path) -> list[Path]:
    """The heatmap, accuracy curve and results.md of a finished run (or `--seeds` run) when
    matplotlib is installed; otherwise a note on how to make them later."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("plots skipped: install matplotlib (pip install 'slca-peft[plot]') and run "
                    "`slca-peft report %s`", output_dir)
        return []
    from .plotting import write_report

    written = write_report(output_dir)
    logger.info("report: %s", ", ".join(str(path) for path in written))
    return written


def default_steps() -> list[ContinualCallback]:
    """The built-in after-task steps, in the order they run."""
    return [StatisticsStep(), AlignmentStep(), EvaluationStep(), CheckpointStep(), PushStep(), ReportStep()]


def load_callback(spec: str) -> Any:
    """`package.module:ClassName` (or `package.module.ClassName`) -> an instance, built without arguments."""
    import importlib

    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"callback {spec!r}: give it as package.module:ClassName.")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"callback {spec!r} cannot be imported ({err}); check the module path and class name."
        ) from err
    return target() if isinstance(target, type) else target
