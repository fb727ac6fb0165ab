"""Class names by class id, the one order every public attribute and file of slca-peft uses.

`label_names[k]` names class id k (the dataset's label id, `config.id2label`'s key), whatever order the
classes were learned in; position p of the continual head is class id `class_ids[p]`. A list may cover
more ids than the model has learned (a dataset's whole class list) or fewer (an id past its end, or a
hole, is named `class_<k>`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def placeholder_name(class_id: int) -> str:
    """The name of a class id no name is known for."""
    return f"class_{class_id}"


def name_of(label_names: Sequence[str] | None, class_id: int) -> str:
    """The name of class id `class_id` in `label_names` (class-id order), or its placeholder."""
    names = label_names or []
    return names[class_id] if 0 <= class_id < len(names) else placeholder_name(class_id)


def names_by_id(named: Mapping[int, str]) -> list[str]:
    """A class-id-ordered list over ids 0..max of `named` ({class id: name}); a hole takes `class_<k>`."""
    return [named.get(k, placeholder_name(k)) for k in range(max(named, default=-1) + 1)]


def names_at(label_names: Sequence[str] | None, class_ids: Sequence[int]) -> list[str]:
    """The names of `class_ids` in their order: position order, given a head's position -> class id."""
    return [name_of(label_names, int(i)) for i in class_ids]
