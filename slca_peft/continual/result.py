"""`ContinualResult`: what a continual run measured, task by task, and the one way to read it back
from a task history (`continual_state.json`, or the learned part of it a `ContinuedStream` keeps)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..metrics import summarize_accuracy_matrix
from ..utils.timing import checked_timings


@dataclass
class ContinualResult:
    """Accuracies in percent. `accuracy_matrix[t][j]`: task j's test classes after task t."""

    accuracy_matrix: list[list[float]] = field(default_factory=list)
    seen_accuracy: list[float] = field(default_factory=list)
    task_test_sizes: list[int] = field(default_factory=list)
    #: Per task: seconds and images of each phase (`slca_peft.utils.timing`); `{}` for a task not timed.
    timings: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return summarize_accuracy_matrix(self.accuracy_matrix, self.task_test_sizes)

    def new_timing(self, task_id: int) -> dict[str, float]:
        """Task `task_id`'s timing record, empty, in place of any a failed try left (tasks before it
        without a record, in a result built by hand, get `{}`)."""
        del self.timings[task_id:]
        self.timings.extend({} for _ in range(task_id - len(self.timings)))
        self.timings.append({})
        return self.timings[-1]

    @classmethod
    def from_history(cls, history: Mapping[str, Any], source: str) -> ContinualResult:
        """The result a task history records, to go on from. Timings are one record per learned task;
        missing or damaged ones are one error naming `source`."""
        matrix = history["accuracy_matrix"]
        return cls(accuracy_matrix=matrix, seen_accuracy=history["seen_accuracy"],
                   task_test_sizes=history["task_test_sizes"],
                   timings=checked_timings(history.get("timings"), len(matrix), source))
