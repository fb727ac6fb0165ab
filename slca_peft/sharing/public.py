"""What may leave this machine: how uploaded files (model cards, the task history of an upload) name
data sources, checkpoints and base models, never by a path of this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifacts.class_names import name_of

#: How a task history records image folders as a task's data (`slca_peft.commands.recipe.data_source`).
IMAGE_FOLDERS = "image folders "

def public_name(value: str | None, kind: str = "data") -> str | None:
    """How an uploaded file names a data source or a checkpoint: a Hub id (or a bundled dataset's name)
    as is; a local path only by its folder name (`kind="checkpoint"`: "NAME (a local checkpoint)"), and
    recorded image folders ("image folders /a/train, /a/test") by theirs: nothing uploaded names a path
    of this machine."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith(IMAGE_FOLDERS):
        return IMAGE_FOLDERS + ", ".join(Path(part).name or part for part in value[len(IMAGE_FOLDERS):].split(", "))
    if not is_local_name(value):
        return value
    name = Path(value).expanduser().name or value
    return f"{name} (a local checkpoint)" if kind == "checkpoint" else name


def public_state(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """A task history as it may leave this machine: the data of every task and segment, the run's
    dataset and each checkpoint continued from by `public_name` (the rest as recorded)."""
    if not state:
        return state
    public = dict(state)
    if "task_data" in public:
        public["task_data"] = [public_name(d) for d in public["task_data"] or []]
    if "dataset" in public:
        public["dataset"] = public_name(public["dataset"])
    if public.get("segments"):
        public["segments"] = [
            {**segment, "data": public_name(segment.get("data")),
             **({"continued_from": public_name(segment["continued_from"], "checkpoint")}
                if segment.get("continued_from") else {})}
            if isinstance(segment, dict) else segment
            for segment in public["segments"]
        ]
    return public


def base_display(base: str | None) -> str:
    """The base model as a card's text names it: its Hub id, or its folder name for a local copy."""
    if base is None:
        return "(not recorded)"
    return f"{Path(str(base)).name} (a local copy)" if is_local_name(str(base)) else str(base)


def is_local_name(name: str) -> bool:
    """A base model name only this machine can resolve (a directory, not a Hub id)."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or Path(name).exists()


def names_by_class_id(label_names: list[str] | None, class_ids: list[int]) -> dict[int, str]:
    """Output k -> the name of class id k, for every id up to the largest of `class_ids` (`label_names` in
    class-id order): its name, or `class_<k>` where `label_names` names none (an id past its end)."""
    return {k: name_of(label_names, k) for k in range(max(class_ids, default=-1) + 1)}
