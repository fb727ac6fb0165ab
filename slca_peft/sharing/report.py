"""Figures and a results table from a finished run; never part of training.

    slca-peft report OUTPUT_DIR            # or: python recipes/report.py OUTPUT_DIR

reads `OUTPUT_DIR/metrics.json` (one run) or `OUTPUT_DIR/seeds.json` with `seed_<s>/metrics.json`
(`train_seq.py --seeds ...`) and writes:

- `accuracy_matrix.png`: heatmap of `A[t][j]`, accuracy on task j's test classes after task t, with
  a last column "all seen": accuracy over all classes seen after task t (for several seeds: the
  element-wise mean, tasks by position in each seed's class order);
- `accuracy_curve.png`: accuracy over all seen classes against the number of classes seen, after
  each task (one line per class-order seed, plus their mean);
- `results.md`: Last-Acc and Inc-Acc per run, with its training seed (`--seed`) and class-order seed,
  and for several seeds their mean ± std, as the paper reports them; for one run also "Where the
  time went": seconds (and images/s) of each phase of each task.

A multi-seed directory also gets a report of its own in every `seed_<s>/`. The figures are drawn by
`slca_peft.sharing.figures`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..artifacts.atomic import atomic_write_bytes
from ..artifacts.layout import (
    CURVE_PLOT,
    FINGERPRINT_FILE,
    MATRIX_PLOT,
    METRICS_FILE,
    RESULTS_FILE,
    SEED_DIR_PREFIX,
    SEEDS_FILE,
    STATE_FILE,
    checkpoint_dirs,
    seed_dir_name,
    seed_dirs,
)
from ..artifacts.manifest import safe_path
from ..utils.errors import MissingFileError, UserError
from ..utils.reading import read_json, require_path
from ..utils.timing import is_timing_record, phases_of
from .figures import FIGURE_SIZE, plot_accuracy_curve, plot_accuracy_matrix


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def results_table(rows: dict[str, dict[str, float]], *, title: str,
                  seeds: Mapping[str, tuple[int | None, int | None]] | None = None) -> str:
    """Markdown: one row per run (Last-Acc, Inc-Acc) and, for several runs, mean ± std. `seeds` maps
    a row's label to its (training seed, class-order seed); an unknown one shows as "–"."""
    def cell(value: int | None) -> str:
        return "–" if value is None else str(value)

    lines = [f"# {title}", "", "| training seed (`--seed`) | class-order seed | Last-Acc (%) | Inc-Acc (%) |",
             "| ---: | ---: | ---: | ---: |"]
    for label, run in rows.items():
        training, order = (seeds or {}).get(label, (None, None))
        lines.append(f"| {cell(training)} | {cell(order)} | {run['last_accuracy']:.2f} | "
                     f"{run['average_incremental_accuracy']:.2f} |")
    note = ("Last-Acc: accuracy over all classes after the last task. Inc-Acc: mean over tasks of the "
            "accuracy over the classes seen so far.")
    if len(rows) > 1:
        cells = []
        for key in ("last_accuracy", "average_incremental_accuracy"):
            mean, std = mean_std([run[key] for run in rows.values()])
            cells.append(f"{mean:.2f} ± {std:.2f}")
        lines.append(f"| mean ± std | | {cells[0]} | {cells[1]} |")
        note += f" std: sample standard deviation over the {len(rows)} runs."
    lines += ["", note, ""]
    return "\n".join(lines)


def timing_table(timings: dict[str, Any] | None) -> str:
    """Markdown: seconds of each phase per task and in total, with images/s and each phase's share
    of the run (empty without timings: a metrics.json from before they were recorded)."""
    if not timings or not timings.get("per_task"):
        return ""
    total = timings["total"]
    phases = phases_of(total)

    def cell(record: dict[str, float], phase: str, share: bool = False) -> str:
        if f"{phase}_seconds" not in record:
            return ""
        seconds = record[f"{phase}_seconds"]
        text = f"{seconds:.2f}"
        if f"{phase}_images_per_second" in record:
            text += f" ({record[f'{phase}_images_per_second']:.1f} img/s)"
        if share and record["total_seconds"]:
            text += f", {100 * seconds / record['total_seconds']:.0f}%"
        return text

    lines = ["", "## Where the time went", "", "| task | total (s) | " + " | ".join(f"{p} (s)" for p in phases) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in phases) + " |"]
    for record in timings["per_task"]:
        lines.append(f"| {record['task']} | {record['total_seconds']:.2f} | "
                     + " | ".join(cell(record, p) for p in phases) + " |")
    lines.append(f"| all | {total['total_seconds']:.2f} | " + " | ".join(cell(total, p, True) for p in phases) + " |")
    lines += ["", "images/s: training counts every epoch's images, statistics the task's training images, evaluation "
              "the test images of every task seen. A blank cell was not timed (a task learned before a resume from "
              "a checkpoint without timings; a checkpoint's own write, for the task a run resumed or continued "
              "after).", ""]
    return "\n".join(lines)


def _timings(path: Path, value: Any) -> dict[str, Any] | None:
    """metrics.json's `timings`, checked (None when absent)."""
    if value is None:
        return None
    per_task = value.get("per_task") if isinstance(value, dict) else None
    if not (isinstance(per_task, list) and len(per_task) <= MAX_TASKS and all(map(is_timing_record, per_task))
            and is_timing_record(value.get("total")) and all("task" in r and "total_seconds" in r for r in per_task)
            and (not per_task or "total_seconds" in value["total"])):
        raise UserError(f"{path}: timings must hold per_task records and a total of non-negative numbers; the file "
                        "is damaged or was not written by slca-peft.")
    return value


#: Bounds on what a metrics.json may hold (tasks, classes), far above any real run.
MAX_TASKS = 10_000
MAX_CLASSES = 1 << 20


def _read_json(path: Path) -> Any:
    """A run's JSON file, read bounded, as a regular file (a FIFO is refused, never waited on) that does
    not lead out of its folder (`read_json`'s `root`)."""
    try:
        return read_json(path, root=path.parent)
    except FileNotFoundError:
        raise MissingFileError(f"{path} not found; is {path.parent} the output directory of a finished run?") from None


def _accuracies(name: str, values: Any, missing: bool = False) -> list[float]:
    """`values` checked as accuracies; `missing` allows None (an accuracy-matrix entry without test data)."""
    if not isinstance(values, list) or len(values) > MAX_TASKS:
        raise UserError(f"{name} must be a list of at most {MAX_TASKS} accuracies")
    for i, value in enumerate(values):
        if missing and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 100.0:
            raise UserError(f"{name}[{i}] must be an accuracy in [0, 100], got {value!r}")
    return values


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json with every field the report uses checked, else one error naming the file
    and the field (a hand-edited or truncated file must not become a matplotlib traceback)."""
    run = _read_json(path)
    try:
        if not isinstance(run, dict):
            raise UserError(f"must hold a JSON object, got {type(run).__name__}")
        missing = [k for k in ("accuracy_matrix", "seen_accuracy", "task_sizes", "last_accuracy",
                               "average_incremental_accuracy") if k not in run]
        if missing:
            raise UserError(f"lacks the field(s) {missing}")
        sizes = run["task_sizes"]
        if not isinstance(sizes, list) or not 0 < len(sizes) <= MAX_TASKS or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_CLASSES for s in sizes):
            raise UserError(f"task_sizes must be a list of 1 to {MAX_TASKS} positive class counts")
        matrix = run["accuracy_matrix"]
        if not isinstance(matrix, list) or not 0 < len(matrix) <= len(sizes):
            raise UserError(f"accuracy_matrix must be a list of 1 to {len(sizes)} rows (one per task learned)")
        for t, row in enumerate(matrix):
            _accuracies(f"accuracy_matrix[{t}]", row, missing=True)
            if len(row) != t + 1:
                raise UserError(f"accuracy_matrix[{t}] must hold {t + 1} accuracies (tasks 1 to {t + 1}), "
                                 f"got {len(row)}")
        if len(_accuracies("seen_accuracy", run["seen_accuracy"], missing=True)) != len(matrix):
            raise UserError(f"seen_accuracy must hold one accuracy per row of accuracy_matrix ({len(matrix)})")
        for key in ("last_accuracy", "average_incremental_accuracy"):
            _accuracies(key, [run[key]])
        if not isinstance(run.get("method", ""), str):
            raise UserError("method must be a string")
    except ValueError as err:
        raise UserError(f"{path}: {err}; the file is damaged or was not written by slca-peft.") from None
    return run


def _seed_dirs(root: Path) -> dict[str, Path]:
    """`seed_<s>` directories holding a metrics.json, from seeds.json if present, else from the folder."""
    if (root / SEEDS_FILE).is_file():
        seeds = _read_json(root / SEEDS_FILE)
        runs = seeds.get("runs") if isinstance(seeds, dict) else None
        if not isinstance(runs, dict) or not all(isinstance(run, dict) for run in runs.values()):
            raise UserError(f"{root / SEEDS_FILE} has no 'runs' mapping; it was not written by slca-peft.")
        dirs = {str(s): root / str(run.get("output_dir", seed_dir_name(int(s)))) for s, run in runs.items()}
        inside = root.resolve()
        for seed, path in dirs.items():
            # The report writes into each seed's folder: one outside the run directory is refused.
            if not path.resolve().is_relative_to(inside) or path.resolve() == inside:
                raise UserError(
                    f"{root / SEEDS_FILE}: seed {seed}'s output_dir {str(runs[seed].get('output_dir', ''))!r} is "
                    f"not a folder inside {root}; the report only writes inside the run directory."
                )
        return dirs
    return {p.name.removeprefix(SEED_DIR_PREFIX): p for p in seed_dirs(root) if (p / METRICS_FILE).is_file()}


def _check_inside(root: Path, folder: Path) -> None:
    """A seed folder the report writes into: inside `root`, reached without a symbolic link (a `seed_1`
    link to another run would make the report overwrite that run's files)."""
    try:
        rel = os.path.relpath(folder, root)
        safe_path(root, rel)
    except (UserError, ValueError) as err:
        raise UserError(f"report: {folder} is not a folder of {root} ({err}); the report only writes inside the run "
                        "directory: remove the link or give the seed run's own directory.") from None


REPORT_FILES = (MATRIX_PLOT, CURVE_PLOT, RESULTS_FILE)


def _targets(root: Path) -> dict[str, Path]:
    """Where the report writes in `root`, each refused when it is a symbolic link (checked before anything
    is written: a link at `results.md` must not make the report overwrite the file it points to)."""
    return {name: safe_path(root, name) for name in REPORT_FILES}


def write_report(output_dir: str | Path, *, size: tuple[int, int] = FIGURE_SIZE) -> list[Path]:
    """Write accuracy_matrix.png, accuracy_curve.png and results.md into `output_dir`; returns the paths."""
    root = Path(output_dir)
    require_path(root, folder=True, what="slca-peft report:", fix="give the output directory of a finished run")
    seed_dirs = _seed_dirs(root)
    targets = _targets(root)
    written: list[Path] = []
    if seed_dirs and not (root / METRICS_FILE).is_file():
        for path in seed_dirs.values():
            _check_inside(root, path)
            _targets(path)
        runs = {seed: read_metrics(path / METRICS_FILE) for seed, path in seed_dirs.items()}
        seeds = {seed: _run_seeds(path, class_order_seed=seed) for seed, path in seed_dirs.items()}
        for path in seed_dirs.values():
            written += write_report(path, size=size)
        first = next(iter(runs.values()))
        method = first.get("method", "")
        n = min(len(run["accuracy_matrix"]) for run in runs.values())
        mean_matrix = [_mean_row([run["accuracy_matrix"][t] for run in runs.values()]) for t in range(n)]
        mean_seen = _mean_row([run["seen_accuracy"][:n] for run in runs.values()])
        curves = {_curve_label(seeds[s]): run["seen_accuracy"] for s, run in runs.items()}
        curves["mean"] = mean_seen
        label = ", ".join(runs)
        written.append(plot_accuracy_matrix(mean_matrix, targets[MATRIX_PLOT], seen=mean_seen, size=size,
                                            title=f"{method} accuracy matrix, mean over class-order seeds {label}"))
        written.append(plot_accuracy_curve(curves, first["task_sizes"], targets[CURVE_PLOT], size=size,
                                           title=f"{method} on {root.name}, class-order seeds {label}"))
        table = results_table(runs, title=f"{method} — {root.name}", seeds=seeds)
    else:
        run = read_metrics(root / METRICS_FILE)
        method = run.get("method", "")
        seeds = {"run": _run_seeds(root)}
        written.append(plot_accuracy_matrix(run["accuracy_matrix"], targets[MATRIX_PLOT],
                                            seen=run["seen_accuracy"], size=size,
                                            title=f"{method} accuracy matrix ({root.name})"))
        written.append(plot_accuracy_curve({_curve_label(seeds["run"]): run["seen_accuracy"]}, run["task_sizes"],
                                           targets[CURVE_PLOT], size=size,
                                           title=f"{method} on {root.name}"))
        table = results_table({"run": run}, title=f"{method} — {root.name}", seeds=seeds)
        table += timing_table(_timings(root / METRICS_FILE, run.get("timings")))
    written.append(atomic_write_bytes(targets[RESULTS_FILE], table.encode("utf-8")))
    return written


def _mean_row(rows: list[list[float | None]]) -> list[float | None]:
    """Entry-wise mean over seeds of the measured entries (None where no seed measured one)."""
    columns = [[v for v in column if v is not None] for column in zip(*rows, strict=True)]
    return [sum(c) / len(c) if c else None for c in columns]


def _curve_label(seeds: tuple[int | None, int | None]) -> str:
    """What a curve shows: its class order (and training seed), not a bare number."""
    training, order = seeds
    parts = ([f"class order seed {order}"] if order is not None else []) + (
        [f"training seed {training}"] if training is not None else [])
    return ", ".join(parts) or "this run"


def _seed(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _run_seeds(run_dir: Path, class_order_seed: str | None = None) -> tuple[int | None, int | None]:
    """(training seed `--seed`, class-order seed) of a run: from its run_fingerprint.json, else its last
    checkpoint's task history, else (for a seed run) its folder's seed; None where unknown. A
    domain-incremental run has no class order."""
    training = order = None
    sources = [run_dir / FINGERPRINT_FILE, *(path / STATE_FILE for path in reversed(checkpoint_dirs(run_dir).values()))]
    for path in sources:
        try:
            data = read_json(path, root=run_dir) if path.is_file() else None
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        domain = bool(data.get("domains")) or data.get("incremental") == "domain"
        if path.name == FINGERPRINT_FILE:
            training, order = _seed(data.get("seed")), None if domain else _seed(data.get("class_order_seed"))
        else:
            training = training if training is not None else _seed(data.get("training_seed"))
            order = order if order is not None or domain else _seed(data.get("seed"))
        if training is not None and (order is not None or domain):
            break
    if order is None and class_order_seed is not None and class_order_seed.lstrip("-").isdigit():
        order = int(class_order_seed)
    return training, order
