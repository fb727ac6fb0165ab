"""Continual-learning metrics, shipped as a local `evaluate` module.

The metric lives in ``continual_accuracy/continual_accuracy.py`` so it loads with ``evaluate.load`` from a
folder path, with no Hugging Face Hub access. Everything in the library that summarises an accuracy
matrix goes through that module, so there is a single implementation of the formulas; the matrix is
printed (the run's log, the model card) by `format_accuracy_table` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import evaluate

__all__ = [
    "CONTINUAL_ACCURACY_PATH", "MISSING", "coverage_note", "format_accuracy", "format_accuracy_table",
    "load_continual_accuracy", "summarize_accuracy_matrix",
]

#: Folder of the local ``continual_accuracy`` evaluate module; pass it to ``evaluate.load``.
CONTINUAL_ACCURACY_PATH: str = str(Path(__file__).resolve().parent / "continual_accuracy")


def load_continual_accuracy(**kwargs) -> evaluate.EvaluationModule:
    """Load the continual-accuracy metric from the package (works offline, ``HF_HUB_OFFLINE=1``).

    ``kwargs`` go to ``evaluate.load`` (e.g. ``keep_in_memory=True``, ``experiment_id=...``).
    """
    return evaluate.load(CONTINUAL_ACCURACY_PATH, **kwargs)


def summarize_accuracy_matrix(
    matrix: Sequence[Sequence[float | None]],
    task_test_sizes: Sequence[int] | None = None,
) -> dict:
    """Summarise a lower-triangular accuracy matrix (percent) with the continual-accuracy metric.

    ``matrix[t][j]`` is the accuracy on task ``j`` after learning task ``t``; row ``t`` has ``t + 1``
    entries. ``task_test_sizes`` weights the micro average over seen classes; ``None`` weights every
    task equally, which is exact for the usual equal-sized class-incremental splits with balanced
    test sets. An entry may be None (a task whose test data was not at hand): every summary is then
    over the measured entries, and ``missing_entries`` / ``forgetting_tasks`` say what was covered
    (`coverage_note` words it). Returns the metric's dict (``accuracy_per_step``, ``last_accuracy``,
    ``average_incremental_accuracy``, ``average_forgetting``, ``backward_transfer``, ``missing_entries``,
    ``forgetting_tasks``).
    """
    rows = [[None if v is None else float(v) for v in row] for row in matrix]
    sizes = [1] * len(rows) if task_test_sizes is None else [int(n) for n in task_test_sizes]
    # keep_in_memory avoids cache files and lock contention between concurrent callers.
    metric = load_continual_accuracy(keep_in_memory=True)
    return metric.compute(accuracy_row=rows, task_test_size=sizes)


def coverage_note(summary: dict) -> str:
    """"" when every entry was measured, else a sentence saying what the summaries are computed over."""
    missing = summary.get("missing_entries", 0)
    if not missing:
        return ""
    return (f"{missing} entr{'y' if missing == 1 else 'ies'} of the accuracy matrix had no test data (—); "
            "Last-Acc, Inc-Acc and forgetting are computed over the measured entries only.")


#: How a missing entry (no test data) prints.
MISSING = "—"


def format_accuracy(value: float | None, width: int = 0) -> str:
    """One accuracy entry with one decimal, right-aligned to `width`; a missing one (None) as `MISSING`."""
    return f"{MISSING:>{width}}" if value is None else f"{value:>{width}.1f}"


def format_accuracy_table(matrix: Sequence[Sequence[float | None]], seen: Sequence[float | None], *,
                          markdown: bool = False) -> str:
    """The accuracy matrix as a table: rows after task t, columns task j, last column all seen classes
    (over the measured tasks). A task without test data shows as `MISSING`.

    Plain text for the log, or a Markdown table (``markdown=True``) for model cards.
    """
    n = len(matrix)
    if markdown:
        header = "| after task | " + " | ".join(f"T{j + 1}" for j in range(n)) + " | all seen |"
        lines = [header, "|---" * (n + 2) + "|"]
        lines += [
            f"| {t + 1} | " + " | ".join(map(format_accuracy, row)) + " |" * (n - len(row))
            + f" | {format_accuracy(seen[t])} |"
            for t, row in enumerate(matrix)
        ]
        return "\n".join(lines)
    lines = ["after \\ on " + " ".join(f"T{j + 1:<5d}" for j in range(n)) + "  all seen"]
    for t, row in enumerate(matrix):
        cells = " ".join(format_accuracy(a, 6) for a in row) + "       " * (n - len(row))
        lines.append(f"task {t + 1:<6d}" + cells + f"  {format_accuracy(seen[t], 8)}")
    return "\n".join(lines)
