"""Files of an earlier format version: the one place a format change branches.

Every reader of a versioned file (`.slca-manifest.json`, `slca_config.json`, `continual_state.json`)
checks its version with `check_version` and converts what changed here:

- version 1 recorded `label_names` in position (learning) order: entry p named the class at position p
  of the continual head, class id `class_ids[p]` (`class_order[p]` in a task history; the identity
  where neither is recorded). Version 2 records them in class-id order (`label_names[k]` names class
  id k), as `config.id2label` and the model's outputs are. `upgrade_config` and `upgrade_state`
  reorder them on read; the rest of both files is unchanged.

`continual_state.json` records its version since version 2: a task history without one is version 1.
"""

from __future__ import annotations

from typing import Any

from ..utils.errors import UserError
from .class_names import names_by_id
from .layout import FORMAT_VERSION
from .values import MAX_CLASSES

#: The format versions this release reads (an older one is converted on read).
READABLE_VERSIONS = (1, FORMAT_VERSION)


def check_version(version: Any, where: str) -> int:
    """`version` if this release reads it, else a one-line refusal naming `where`."""
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UserError(f"{where} has format_version {version!r}; this slca-peft reads format_version "
                        f"{', '.join(map(str, READABLE_VERSIONS))}: use the slca-peft release that wrote it.")
    return version


def _by_class_id(names: list[str], class_ids: list[int] | None, where: str) -> list[str]:
    """Version-1 position-ordered `names` in class-id order (positions without a recorded id are dropped)."""
    if class_ids is None:
        return list(names)
    if any(int(i) >= MAX_CLASSES for i in class_ids[: len(names)]):
        raise UserError(f"{where} (format_version 1) names a class id of {MAX_CLASSES} or more; it is damaged or "
                        "was not written by slca-peft.")
    return names_by_id({int(i): name for i, name in zip(class_ids, names, strict=False)})


def upgrade_label_names(label_names: list[str] | None, class_ids: list[int] | None, version: int,
                        where: str) -> list[str] | None:
    """`slca_config.json`'s `label_names` of file version `version` in class-id order, from its validated
    `label_names` and `class_ids` (ids bounded, so the list is too)."""
    if version == 1 and label_names is not None:
        return _by_class_id(label_names, class_ids, where)
    return label_names


def upgrade_state(state: dict[str, Any], where: str) -> dict[str, Any]:
    """A validated task history (`continual_state.json`) as this release reads it, recording this release's
    version."""
    version = check_version(state.get("format_version", 1), where)
    state = {**state, "format_version": FORMAT_VERSION}
    if version == 1 and isinstance(state.get("label_names"), list):
        ids = state.get("class_ids") or state.get("class_order")
        state["label_names"] = _by_class_id(state["label_names"], list(ids) if isinstance(ids, list) else None, where)
    return state
