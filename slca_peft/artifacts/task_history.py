"""The task history (`continual_state.json`): class order, task sizes, names (`label_names`, in class-id
order), accuracy matrix, the data each task came from. Written beside a checkpoint's model files, read
and checked here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..utils.errors import UserError
from ..utils.reading import read_json
from .layout import STATE_FILE
from .upgrade import check_version, upgrade_state
from .values import (
    MAX_CLASSES,
    MAX_TASKS,
    check_class_ids,
    check_float,
    check_int,
    check_int_list,
    check_list,
    check_str,
    check_str_list,
    fail,
)


def _refuse_repeats(name: str, items: list[Any], what: str) -> None:
    seen: set[Any] = set()
    repeated = [item for item in items if item in seen or seen.add(item)]
    if repeated:
        raise fail(name, f"repeats the {what}(s) {sorted(set(repeated), key=str)[:5]}; each class appears once.")


def validate_state(state: Any, source: str = STATE_FILE) -> dict[str, Any]:
    """Check the task history's fields (types, ranges, lengths) before anything uses them."""
    if not isinstance(state, dict):
        raise UserError(f"{source} must hold a JSON object, got {type(state).__name__}.")
    if "format_version" in state:
        check_version(state["format_version"], source)
    try:
        for key in ("class_order", "task_test_sizes"):
            if key in state:
                check_int_list(key, state[key], 0, MAX_CLASSES * 100, MAX_CLASSES)
        if "class_order" in state:  # a permutation of the data set's classes, in every stream slca-peft writes
            _refuse_repeats("class_order", state["class_order"], "class")
        if "task_sizes" in state:
            check_int_list("task_sizes", state["task_sizes"], 1, MAX_CLASSES, MAX_TASKS)
        if "tasks_learned" in state:
            check_int("tasks_learned", state["tasks_learned"], 0, MAX_TASKS)
        for key in ("training_seed", "seed"):
            if state.get(key) is not None:
                check_int(key, state[key], -(2**63), 2**64)
        if state.get("label_names") is not None:
            # unique, as datasets' ClassLabel requires: a continuation finds learned classes by name
            names = check_str_list("label_names", state["label_names"], MAX_CLASSES)
            _refuse_repeats("label_names", names, "class name")
        if state.get("class_ids") is not None:
            check_class_ids("class_ids", state["class_ids"])
        if state.get("domains") is not None:
            check_str_list("domains", state["domains"], MAX_TASKS)
        if "method" in state:
            check_str("method", state["method"])
        matrix = check_list("accuracy_matrix", state.get("accuracy_matrix", []), MAX_TASKS)
        for t, row in enumerate(matrix):
            for j, value in enumerate(check_list(f"accuracy_matrix[{t}]", row, MAX_TASKS)):
                if value is not None:  # None: the task had no test data when this row was measured
                    check_float(f"accuracy_matrix[{t}][{j}]", value, 0.0, 100.0)
        for t, value in enumerate(check_list("task_data", state.get("task_data") or [], MAX_TASKS)):
            check_str(f"task_data[{t}]", value, optional=True)
        for i, segment in enumerate(check_list("segments", state.get("segments") or [], MAX_TASKS)):
            if not isinstance(segment, dict) or len(segment) > 32:
                raise fail(f"segments[{i}]", "must be a JSON object of a few fields.")
            for key in ("first_task", "tasks"):
                check_int(f"segments[{i}].{key}", segment.get(key), 0, MAX_TASKS)
            for key in ("data", "test_data", "continued_from", "continued_revision"):
                check_str(f"segments[{i}].{key}", segment.get(key), optional=True)
            bounds = (("seed", -(2**63), 2**64), ("init_cls", 0, MAX_CLASSES), ("increment", 0, MAX_CLASSES))
            for key, low, high in bounds:
                if segment.get(key) is not None:
                    check_int(f"segments[{i}].{key}", segment[key], low, high)
            if segment.get("merged_classes") is not None:
                check_str_list(f"segments[{i}].merged_classes", segment["merged_classes"], MAX_CLASSES)
        for t, value in enumerate(check_list("seen_accuracy", state.get("seen_accuracy", []), MAX_TASKS)):
            if value is not None:  # None: no test data when the row was measured (a trainer run not evaluated)
                check_float(f"seen_accuracy[{t}]", value, 0.0, 100.0)
    except ValueError as err:
        raise UserError(f"{source}: {err} The file is damaged or was not written by slca-peft.") from None
    return state


def read_state(directory: str | Path) -> dict[str, Any] | None:
    """The task history (`continual_state.json`) beside a checkpoint's files, checked, in this release's
    format (an older file's converted, `upgrade_state`); None without one."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    return upgrade_state(validate_state(read_json(path), str(path)), str(path))
