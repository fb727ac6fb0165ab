"""Where a run's time goes: seconds per phase of each task, and images per second where a phase
streams images, so a user sees which knob to turn (batch sizes, `--bf16`, `ca_epochs`, ...).

`ContinualLearner.learn_task` times the training and the `CallbackHandler` times every after-task
step that names a `phase`; both write into `learner.result.timings[t]`, which checkpoints keep
(a resumed run reports its earlier tasks too). Each task's record holds `<phase>_seconds` and, for
training, statistics and evaluation, `<phase>_images` (training: epochs x training images;
statistics: the images the statistics pass reads, `task.statistics_data`; evaluation: test images
of every seen task), and `other_seconds`: the rest of the task's wall time (`finish_timing`), so
the phases of a task add up to its wall time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .errors import UserError

#: The phases of a task, in the order they run (the built-in steps' `phase` names after training).
PHASES = ("training", "statistics", "alignment", "evaluation", "checkpoint")
#: The rest of a task's wall time: growing the classifier, building the task's trainer, the steps and
#: callbacks without a `phase` (push, report, trackers, yours). Recorded once the task's steps have run,
#: so metrics.json and results.md have it and a checkpoint has it from the next task's on.
OTHER_PHASE = "other"


def clock() -> float:
    """`time.perf_counter`, after the GPU finished what was queued (CUDA runs asynchronously)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")


def is_timing_record(value: Any) -> bool:
    """Whether `value` is a timing record as files hold it: names -> non-negative, finite numbers."""
    return isinstance(value, dict) and all(isinstance(k, str) and _number(v) for k, v in value.items())


def checked_timings(value: Any, tasks: int, source: str) -> list[dict[str, float]]:
    """The `timings` of a task history, one record per learned task; missing or damaged ones are one
    error naming `source`."""
    if not isinstance(value, list) or len(value) != tasks or not all(map(is_timing_record, value)):
        raise UserError(f"{source}: timings must be a list of {tasks} objects of non-negative numbers; "
                         "the file is damaged or was not written by slca-peft.")
    return [dict(task) for task in value]


def phases_of(record: dict[str, float]) -> list[str]:
    """The phases `record` timed: the built-in ones in run order, then a callback's own `phase` names,
    then `other`."""
    timed = [k.removesuffix("_seconds") for k in record if k.endswith("_seconds") and k != "total_seconds"]
    own = [p for p in timed if p not in PHASES and p != OTHER_PHASE]
    return [p for p in PHASES if p in timed] + own + ([OTHER_PHASE] if OTHER_PHASE in timed else [])


def finish_timing(record: dict[str, float], wall_seconds: float) -> None:
    """Time what the phases of a task's `record` left of its `wall_seconds` as `other_seconds`, so the
    phases add up to the task's wall time and a long stream's overhead shows where it grows."""
    timed = sum(v for k, v in record.items() if k.endswith("_seconds") and k != f"{OTHER_PHASE}_seconds")
    record[f"{OTHER_PHASE}_seconds"] = max(0.0, wall_seconds - timed)


def with_rates(record: dict[str, float]) -> dict[str, float]:
    """`record`, phase by phase, with `<phase>_images_per_second`, then `total_seconds`."""
    out: dict[str, float] = {}
    for phase in PHASES:
        seconds, images = record.get(f"{phase}_seconds"), record.get(f"{phase}_images")
        if seconds is None:
            continue
        out[f"{phase}_seconds"] = seconds
        if images is not None:
            out[f"{phase}_images"] = images
            if seconds > 0:
                out[f"{phase}_images_per_second"] = images / seconds
    for phase in phases_of(record):  # a callback's own phases
        out.setdefault(f"{phase}_seconds", record[f"{phase}_seconds"])
    out["total_seconds"] = sum(v for k, v in out.items() if k.endswith("_seconds"))
    return out


def timing_summary(timings: Sequence[dict[str, float]]) -> dict[str, Any]:
    """What metrics.json's `timings` holds: `per_task` (1-based `task`, seconds, images, images/s and
    `total_seconds` of each task) and `total` (the same summed over the tasks timed)."""
    per_task = [{"task": t + 1, **with_rates(record)} for t, record in enumerate(timings) if record]
    total: dict[str, float] = {}
    for record in timings:
        for key, value in record.items():
            total[key] = total.get(key, 0) + value
    return {"per_task": per_task, "total": with_rates(total) if total else {}}


def timing_line(record: dict[str, float]) -> str:
    """`12.3 s | training 10.1 s (47 images/s) | statistics ...` for one task's log line."""
    record = with_rates(record)
    parts = [f"{record['total_seconds']:.1f} s"]
    for phase in phases_of(record):
        rate = record.get(f"{phase}_images_per_second")
        parts.append(f"{phase} {record[f'{phase}_seconds']:.1f} s" + (f" ({rate:.0f} images/s)" if rate else ""))
    return " | ".join(parts)
