"""`ReportStep`: what a run tells the user: a line per task, the continual metrics for the trackers,
and metrics.json, the plots and results.md at the end (`write_plots`, also used for `--seeds` runs).

The trackers are the `TrackerStep`'s (`learner.tracker`); without that step the report goes to the
log and the files only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts.atomic import atomic_write_text, json_text
from ..artifacts.layout import MATRIX_PLOT, METRICS_FILE
from ..artifacts.manifest import safe_path
from ..metrics import coverage_note, format_accuracy, format_accuracy_table
from ..utils.timing import timing_line, timing_summary, with_rates
from .callbacks import ContinualCallback

if TYPE_CHECKING:
    from .learner import ContinualLearner

logger = logging.getLogger(__name__)


class ReportStep(ContinualCallback):
    """Logs each task's result once, sends the continual metrics to the trackers, and writes
    metrics.json, the plots and results.md at the end of the run (main process only). It holds
    nothing open: the trackers are the `TrackerStep`'s, which closes them."""

    def on_evaluate(self, learner, task, metrics):
        if not learner.is_main_process:
            return
        row = learner.result.accuracy_matrix[-1]
        logger.info("task %d/%d | seen classes %5.1f%% | per task: %s", task.task_id + 1, len(learner.tasks),
                    metrics["seen_accuracy"], " ".join(format_accuracy(a, 5) for a in row))
        if learner.tracker is not None:
            learner.tracker.log({f"eval_{key}": value for key, value in metrics.items()})

    def on_task_end(self, learner, task):
        """One line saying where the task's time went, and the same figures to the trackers (`time/...`)."""
        if not learner.is_main_process or len(learner.result.timings) <= task.task_id:
            return
        record = with_rates(learner.result.timings[task.task_id])
        logger.info("task %d/%d took %s", task.task_id + 1, len(learner.tasks), timing_line(record))
        if learner.tracker is not None:
            learner.tracker.log_scalars({f"time/{key}": value for key, value in record.items()
                                         if key.endswith(("_seconds", "_per_second"))})

    def on_run_end(self, learner, result):
        if learner.is_main_process and result.accuracy_matrix:
            path = safe_path(learner.output_dir, METRICS_FILE)  # a symlink there is refused, never written through
            atomic_write_text(path, json_text(self.metrics(learner), sort_keys=False))
            self._report(learner)

    @staticmethod
    def metrics(learner: ContinualLearner) -> dict[str, Any]:
        """What metrics.json holds."""
        result = learner.result
        summary = result.summary()
        return {
            "accuracy_matrix": result.accuracy_matrix,
            "last_accuracy": summary["last_accuracy"],
            "average_incremental_accuracy": summary["average_incremental_accuracy"],
            "average_forgetting": summary["average_forgetting"],
            "backward_transfer": summary["backward_transfer"],
            "seen_accuracy": result.seen_accuracy,
            "missing_entries": summary["missing_entries"],
            "class_order": learner.tasks.order,
            "task_sizes": learner.tasks.task_sizes,
            "method": learner.args.method,
            "timings": timing_summary(result.timings),
        }

    @staticmethod
    def _report(learner: ContinualLearner) -> None:
        summary = learner.result.summary()
        logger.info(
            "accuracy (%%) on each task's test classes after learning each task:\n%s\nLast-Acc %.2f  Inc-Acc %.2f  "
            "forgetting %.2f  BWT %.2f  (%s)%s",
            format_accuracy_table(learner.result.accuracy_matrix, learner.result.seen_accuracy),
            summary["last_accuracy"], summary["average_incremental_accuracy"], summary["average_forgetting"],
            summary["backward_transfer"], learner.output_dir / METRICS_FILE,
            f"\n{coverage_note(summary)}" if summary["missing_entries"] else "",
        )
        if write_plots(learner.output_dir) and learner.tracker is not None:
            learner.tracker.log_image("eval/accuracy_matrix", learner.output_dir / MATRIX_PLOT)


def write_plots(output_dir: Path) -> list[Path]:
    """The heatmap, accuracy curve and results.md of a finished run (or `--seeds` run) when
    matplotlib is installed; otherwise a note on how to make them later."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("plots skipped: install matplotlib (pip install 'slca-peft[plot]') and run "
                    "`slca-peft report %s`", output_dir)
        return []
    from ..sharing.report import write_report

    written = write_report(output_dir)
    logger.info("report: %s", ", ".join(str(path) for path in written))
    return written
