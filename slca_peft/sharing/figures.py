"""The figures of a run's report: the accuracy matrix as a heatmap and the accuracy curve over the task
sequence. Matplotlib is an optional dependency (`pip install slca-peft[plot]`), imported only when a
figure is drawn; each figure is rendered in memory and written atomically."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..artifacts.atomic import atomic_write_bytes

#: How the accuracy-matrix figure marks a partial "all seen" number, and its note.
PARTIAL_MARK = "*"
PARTIAL_NOTE = ("* partial: over the tasks with test data only; — no test data (a task learned before a "
                "continuation whose test data was not at hand)")
#: Figure size in pixels (width, height) at `DPI`.
FIGURE_SIZE = (800, 600)
DPI = 100


def _figure(size: tuple[int, int]):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'slca-peft[plot]' (or matplotlib).") from err
    # A bare Figure (no pyplot): no global state, no GUI backend, safe in scripts and threads.
    return Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)


def plot_accuracy_matrix(
    matrix: Sequence[Sequence[float]], path: str | Path, *, seen: Sequence[float] | None = None,
    title: str | None = None, size: tuple[int, int] = FIGURE_SIZE,
) -> Path:
    """Heatmap of a lower-triangular accuracy matrix (percent); cells above the diagonal stay blank, a
    missing entry (None: no test data) shows as a dash. `seen` (accuracy over all seen classes after
    each task) adds the "all seen" column, the number the run reports, beside the per-task accuracies;
    after a row with a missing entry that number is partial (over the tasks with test data only), marked
    with an asterisk that a note under the figure explains."""
    import numpy as np

    n = len(matrix)
    extra = 1 if seen is not None else 0
    grid = np.full((n, n + extra), np.nan)
    for t, row in enumerate(matrix):
        grid[t, : len(row)] = [np.nan if v is None else v for v in row]
    if seen is not None:
        grid[: len(seen), n] = [np.nan if v is None else v for v in list(seen)[:n]]
    fig = _figure(size)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=100, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    partial = [any(v is None for v in row) for row in matrix]
    if n <= 20:
        for t in range(n):
            for j in [*range(len(matrix[t])), *([n] if extra else [])]:
                value = grid[t, j]
                mark = PARTIAL_MARK if j == n and partial[t] else ""
                ax.text(j, t, "—" if math.isnan(value) else f"{value:.1f}{mark}", ha="center", va="center",
                        fontsize=8 if n <= 10 else 6, color="black" if value > 60 else "white")
    if any(partial):
        fig.text(0.02, 0.02, PARTIAL_NOTE if extra else PARTIAL_NOTE.split("; ", 1)[1], fontsize=8)
    if extra:
        ax.axvline(n - 0.5, color="white", linewidth=3)  # the "all seen" column is not a task
    ax.set_xticks(list(range(n + extra)), [str(j + 1) for j in range(n)] + ["all seen"] * extra)
    ax.set_yticks(list(range(n)), [str(t + 1) for t in range(n)])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    ax.set_title(title or "Accuracy on each task's classes")
    return _save(fig, path)


def plot_accuracy_curve(
    curves: dict[str, Sequence[float]], task_sizes: Sequence[int], path: str | Path, *,
    title: str | None = None, size: tuple[int, int] = FIGURE_SIZE,
) -> Path:
    """Accuracy over all seen classes after each task, against the number of classes seen."""
    seen_classes = [sum(task_sizes[: t + 1]) for t in range(len(task_sizes))]
    fig = _figure(size)
    ax = fig.add_subplot()
    for label, values in curves.items():
        xs = seen_classes[: len(values)]
        style = {"linewidth": 2.5, "color": "black"} if label == "mean" else {"linewidth": 1.2, "alpha": 0.8}
        ax.plot(xs, list(values), marker="o", label=label, **style)
    ax.set_xticks(seen_classes)
    ax.set_xlabel("classes seen")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title or "Accuracy over the task sequence")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Render to memory, then write atomically: a symlink at `path` is replaced, never written through."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")  # no bbox_inches="tight": the pixel size stays FIGURE_SIZE
    return atomic_write_bytes(path, buffer.getvalue())
