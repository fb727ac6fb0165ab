"""Figures and a results table from a finished run; never part of training.

    slca-peft report OUTPUT_DIR            # or: python recipes/report.py OUTPUT_DIR

reads `OUTPUT_DIR/metrics.json` (one run) or `OUTPUT_DIR/seeds.json` with `seed_<s>/metrics.json`
(`train_seq.py --seeds ...`) and writes:

- `accuracy_matrix.png`: heatmap of `A[t][j]`, accuracy on task j's test classes after task t
  (for several seeds: the element-wise mean, tasks by position in each seed's class order);
- `accuracy_curve.png`: accuracy over all seen classes against the number of classes seen, after
  each task (one line per seed, plus their mean);
- `results.md`: Last-Acc and Inc-Acc per seed and mean ± std, as the paper reports them.

A multi-seed directory also gets a report of its own in every `seed_<s>/`. Matplotlib is an optional
dependency (`pip install slca-peft[plot]`), imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError, read_json

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
    matrix: Sequence[Sequence[float]], path: str | Path, *, title: str | None = None,
    size: tuple[int, int] = FIGURE_SIZE,
) -> Path:
    """Heatmap of a lower-triangular accuracy matrix (percent); cells above the diagonal stay blank, a
    missing entry (None: no test data) shows as a dash."""
    import numpy as np

    n = len(matrix)
    grid = np.full((n, n), np.nan)
    for t, row in enumerate(matrix):
        grid[t, : len(row)] = [np.nan if v is None else v for v in row]
    fig = _figure(size)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=100, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    if n <= 20:
        for t in range(n):
            for j in range(len(matrix[t])):
                value = grid[t, j]
                ax.text(j, t, "—" if np.isnan(value) else f"{value:.1f}", ha="center", va="center",
                        fontsize=8 if n <= 10 else 6, color="black" if value > 60 else "white")
    ticks = list(range(n))
    ax.set_xticks(ticks, [str(j + 1) for j in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
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
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")  # no bbox_inches="tight": the pixel size stays FIGURE_SIZE
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def results_table(rows: dict[str, dict[str, float]], *, title: str) -> str:
    """Markdown: one row per seed (Last-Acc, Inc-Acc) and, for several seeds, mean ± std."""
    lines = [f"# {title}", "", "| seed | Last-Acc (%) | Inc-Acc (%) |", "| --- | ---: | ---: |"]
    for label, run in rows.items():
        lines.append(f"| {label} | {run['last_accuracy']:.2f} | {run['average_incremental_accuracy']:.2f} |")
    if len(rows) > 1:
        cells = []
        for key in ("last_accuracy", "average_incremental_accuracy"):
            mean, std = mean_std([run[key] for run in rows.values()])
            cells.append(f"{mean:.2f} ± {std:.2f}")
        lines.append(f"| mean ± std | {cells[0]} | {cells[1]} |")
    lines += ["", "Last-Acc: accuracy over all classes after the last task. Inc-Acc: mean over tasks of the "
              "accuracy over the classes seen so far. std: sample standard deviation over seeds.", ""]
    return "\n".join(lines)


#: Bounds on what a metrics.json may hold (tasks, classes), far above any real run.
MAX_TASKS = 10_000
MAX_CLASSES = 1 << 20


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found; is {path.parent} the output directory of a finished run?") from None


def _accuracies(name: str, values: Any, missing: bool = False) -> list[float]:
    """`values` checked as accuracies; `missing` allows None (an accuracy-matrix entry without test data)."""
    if not isinstance(values, list) or len(values) > MAX_TASKS:
        raise ValueError(f"{name} must be a list of at most {MAX_TASKS} accuracies")
    for i, value in enumerate(values):
        if missing and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 100.0:
            raise ValueError(f"{name}[{i}] must be an accuracy in [0, 100], got {value!r}")
    return values


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json with every field the report uses checked, else one error naming the file
    and the field (a hand-edited or truncated file must not become a matplotlib traceback)."""
    run = _read_json(path)
    try:
        if not isinstance(run, dict):
            raise ValueError(f"must hold a JSON object, got {type(run).__name__}")
        missing = [k for k in ("accuracy_matrix", "seen_accuracy", "task_sizes", "last_accuracy",
                               "average_incremental_accuracy") if k not in run]
        if missing:
            raise ValueError(f"lacks the field(s) {missing}")
        sizes = run["task_sizes"]
        if not isinstance(sizes, list) or not 0 < len(sizes) <= MAX_TASKS or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_CLASSES for s in sizes):
            raise ValueError(f"task_sizes must be a list of 1 to {MAX_TASKS} positive class counts")
        matrix = run["accuracy_matrix"]
        if not isinstance(matrix, list) or not 0 < len(matrix) <= len(sizes):
            raise ValueError(f"accuracy_matrix must be a list of 1 to {len(sizes)} rows (one per task learned)")
        for t, row in enumerate(matrix):
            _accuracies(f"accuracy_matrix[{t}]", row, missing=True)
            if len(row) != t + 1:
                raise ValueError(f"accuracy_matrix[{t}] must hold {t + 1} accuracies (tasks 1 to {t + 1}), "
                                 f"got {len(row)}")
        if len(_accuracies("seen_accuracy", run["seen_accuracy"])) != len(matrix):
            raise ValueError(f"seen_accuracy must hold one accuracy per row of accuracy_matrix ({len(matrix)})")
        for key in ("last_accuracy", "average_incremental_accuracy"):
            _accuracies(key, [run[key]])
        if not isinstance(run.get("method", ""), str):
            raise ValueError("method must be a string")
    except ValueError as err:
        raise UserError(f"{path}: {err}; the file is damaged or was not written by slca-peft.") from None
    return run


def _seed_dirs(root: Path) -> dict[str, Path]:
    """`seed_<s>` directories holding a metrics.json, from seeds.json if present, else from the folder."""
    if (root / "seeds.json").is_file():
        seeds = _read_json(root / "seeds.json")
        runs = seeds.get("runs") if isinstance(seeds, dict) else None
        if not isinstance(runs, dict) or not all(isinstance(run, dict) for run in runs.values()):
            raise ValueError(f"{root / 'seeds.json'} has no 'runs' mapping; it was not written by slca-peft.")
        dirs = {str(s): root / str(run.get("output_dir", f"seed_{s}")) for s, run in runs.items()}
        inside = root.resolve()
        for seed, path in dirs.items():
            # The report writes into each seed's folder: one outside the run directory is refused.
            if not path.resolve().is_relative_to(inside) or path.resolve() == inside:
                raise ValueError(
                    f"{root / 'seeds.json'}: seed {seed}'s output_dir {str(runs[seed].get('output_dir', ''))!r} is "
                    f"not a folder inside {root}; the report only writes inside the run directory."
                )
        return dirs
    found = sorted((p for p in root.glob("seed_*") if (p / "metrics.json").is_file()),
                   key=lambda p: (len(p.name), p.name))
    return {p.name.removeprefix("seed_"): p for p in found}


def write_report(output_dir: str | Path, *, size: tuple[int, int] = FIGURE_SIZE) -> list[Path]:
    """Write accuracy_matrix.png, accuracy_curve.png and results.md into `output_dir`; returns the paths."""
    import numpy as np

    root = Path(output_dir)
    seed_dirs = _seed_dirs(root)
    written: list[Path] = []
    if seed_dirs and not (root / "metrics.json").is_file():
        runs = {seed: read_metrics(path / "metrics.json") for seed, path in seed_dirs.items()}
        for path in seed_dirs.values():
            written += write_report(path, size=size)
        first = next(iter(runs.values()))
        method = first.get("method", "")
        n = min(len(run["accuracy_matrix"]) for run in runs.values())
        mean_matrix = [_mean_row([run["accuracy_matrix"][t] for run in runs.values()]) for t in range(n)]
        curves = {f"seed {s}": run["seen_accuracy"] for s, run in runs.items()}
        curves["mean"] = np.mean([run["seen_accuracy"][:n] for run in runs.values()], axis=0).tolist()
        label = ", ".join(runs)
        written.append(plot_accuracy_matrix(mean_matrix, root / "accuracy_matrix.png", size=size,
                                            title=f"{method} accuracy matrix, mean over seeds {label}"))
        written.append(plot_accuracy_curve(curves, first["task_sizes"], root / "accuracy_curve.png", size=size,
                                           title=f"{method} on {root.name}, seeds {label}"))
        table = results_table(runs, title=f"{method} — {root.name}")
    else:
        run = read_metrics(root / "metrics.json")
        method = run.get("method", "")
        seed = _class_order_seed(root)
        label = str(seed) if seed is not None else "run"
        written.append(plot_accuracy_matrix(run["accuracy_matrix"], root / "accuracy_matrix.png", size=size,
                                            title=f"{method} accuracy matrix ({root.name})"))
        written.append(plot_accuracy_curve({label: run["seen_accuracy"]}, run["task_sizes"],
                                           root / "accuracy_curve.png", size=size,
                                           title=f"{method} on {root.name}"))
        table = results_table({label: run}, title=f"{method} — {root.name}")
    results = root / "results.md"
    results.write_text(table)
    written.append(results)
    return written


def _mean_row(rows: list[list[float | None]]) -> list[float | None]:
    """Entry-wise mean over seeds of the measured entries (None where no seed measured one)."""
    columns = [[v for v in column if v is not None] for column in zip(*rows, strict=True)]
    return [sum(c) / len(c) if c else None for c in columns]


def _class_order_seed(run_dir: Path) -> int | None:
    """The class-order seed a run recorded in its last checkpoint, if it has one."""
    states = sorted(run_dir.glob("task_*/continual_state.json"))
    for path in reversed(states):
        try:
            state = read_json(path)
        except (OSError, ValueError):
            continue
        seed = state.get("seed") if isinstance(state, dict) else None
        if isinstance(seed, int) and not isinstance(seed, bool):
            return seed
    return None
