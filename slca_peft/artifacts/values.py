"""Checks of the values a file can carry (types, ranges, lengths), run before anything uses them: a
crafted checkpoint cannot ask for a huge allocation or smuggle a wrong type (docs/reliability.md)."""

from __future__ import annotations

import math
from typing import Any

from ..utils.errors import UserError

MAX_FEATURE_DIM = 1 << 16
MAX_CLASSES = 1 << 20
MAX_TASKS = 10_000
MAX_NAMES = 1024
MAX_NAME_LENGTH = 1024


def check_int(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    """An int (not a bool, not a float such as 2e9) in [low, high]; `why` says where `high` comes from.
    The integer check of every file field (`slca_peft.models.config`), PEFT sizes included."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r}.")
    if not low <= value <= high:
        raise UserError(f"{name} must be in [{low}, {high}]{why}, got {value}.")
    return value


def fail(name: str, problem: str) -> UserError:
    return UserError(f"{name} {problem}")


def check_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(name, f"must be a finite number, got {value!r}.")
    if not low <= value <= high:
        raise fail(name, f"must be in [{low}, {high}], got {value}.")
    return float(value)


def check_str(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH * 4:
        raise fail(name, f"must be a string (at most {MAX_NAME_LENGTH * 4} characters), got {type(value).__name__}.")
    return value


def check_list(name: str, value: Any, max_len: int) -> list:
    if not isinstance(value, (list, tuple)):
        raise fail(name, f"must be a list, got {type(value).__name__}.")
    if len(value) > max_len:
        raise fail(name, f"has {len(value)} entries, more than the {max_len} allowed.")
    return list(value)


def check_int_list(name: str, value: Any, low: int, high: int, max_len: int) -> list[int]:
    return [check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(check_list(name, value, max_len))]


def check_str_list(name: str, value: Any, max_len: int) -> list[str]:
    items = check_list(name, value, max_len)
    for i, v in enumerate(items):
        if not isinstance(v, str) or len(v) > MAX_NAME_LENGTH:
            raise fail(f"{name}[{i}]", f"must be a string of at most {MAX_NAME_LENGTH} characters.")
    return items


def check_class_ids(name: str, value: Any) -> list[int]:
    """Class ids: unique integers in [0, MAX_CLASSES)."""
    ids = check_int_list(name, value, 0, MAX_CLASSES - 1, MAX_CLASSES)
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise fail(name, f"repeats the class id(s) {repeated}; every output needs its own class id.")
    return ids
