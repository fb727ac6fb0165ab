"""`TaskSequence`: split a labelled image dataset into class-incremental tasks.

The class order follows the authors' released code exactly (`utils/data_manager.py`:
`np.random.seed(seed); np.random.permutation(n)`) so that a seed here gives the same tasks as the
published runs. Labels are remapped to positions in that order, which makes task t own the
contiguous range `[offset_t, offset_t + size_t)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict

from ..artifacts.class_names import names_at
from ..artifacts.layout import task_dir_name
from ..utils.errors import UserError
from ..utils.reading import require_path


def class_order(num_classes: int, seed: int | None) -> list[int]:
    """The class permutation of the released `utils/data_manager.py`; `seed=None` keeps the natural order."""
    if seed is None:
        return list(range(num_classes))
    # Same stream as the released code's `np.random.seed(seed); np.random.permutation(n)`, without
    # reseeding numpy's global generator under the user's feet.
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def split_sizes(num_classes: int, init_cls: int | None, increment: int | None) -> list[int]:
    """Classes per task: `init_cls`, then `increment` each, the last task taking the remainder; every class
    in one task when `init_cls` is None."""
    if init_cls is None:
        return [num_classes]
    increment = num_classes if increment is None else increment
    if init_cls > num_classes:
        raise UserError(
            f"init_cls={init_cls} is larger than the {num_classes} classes of the dataset; lower init_cls."
        )
    if init_cls < 1 or increment < 1:
        raise UserError(f"init_cls and increment must be >= 1, got {init_cls} and {increment}.")
    sizes = [init_cls]
    remaining = num_classes - init_cls
    while remaining > 0:
        sizes.append(min(increment, remaining))
        remaining -= sizes[-1]
    return sizes


@dataclass
class Task:
    """One step of a stream: the labels its data carries, the outputs it adds and its data.

    This is the whole contract between a stream and the continual loop: the loop grows the
    classifier by `head_size`, keys class statistics with `statistics_keys`, and never asks which
    kind of stream it runs.
    """

    task_id: int
    classes: list[int]
    #: None for a task learned before this stream continued (its data is gone).
    train: Dataset | None
    #: None when the task's test data is not at hand (scored as missing, not as 0).
    test: Dataset | None
    #: Outputs this task adds to the classifier; None means one per class of the task, 0 shares the
    #: existing head (a new domain over the same classes).
    new_outputs: int | None = None
    #: Added to a label to key its class statistics (a Gaussian per domain and class, say).
    statistics_offset: int = 0
    name: str | None = None
    #: Classes learned before whose statistics this task's data adds to (no new output for them).
    merged_classes: list[int] = field(default_factory=list)
    #: The data class statistics are computed on, when it differs from `train` (it also holds the
    #: images of `merged_classes`, which representation learning, on this task's outputs only, skips).
    statistics_train: Dataset | None = None

    @property
    def statistics_data(self) -> Dataset | None:
        return self.statistics_train if self.statistics_train is not None else self.train

    @property
    def offset(self) -> int:
        return self.classes[0]

    @property
    def head_size(self) -> int:
        return len(self.classes) if self.new_outputs is None else self.new_outputs

    @property
    def display_name(self) -> str:
        return self.name or task_dir_name(self.task_id)

    def statistics_keys(self, labels):
        """Statistics key of each label (a tensor or an int)."""
        return labels + self.statistics_offset


@runtime_checkable
class TaskStream(Protocol):
    """What `ContinualLearner` needs of a stream (`TaskSequence`, `DomainSequence` or your own).

    `statistics_labels` maps statistics keys back to classifier labels, so alignment trains the
    right output from every stored Gaussian. A stream may also have `class_ids` (position -> the
    dataset's label id, what exports and `id2label` key classes by); without it the positions are the
    ids (`stream_class_ids`), so streams written before keep working. `label_names` are in class-id order
    (`label_names[k]` names class id k, as the model's); the tasks' data is labelled by position, and
    `stream_position_names` gives the names in that order.
    """

    image_column: str
    label_column: str
    #: Class id k -> its name (class-id order, the dataset's).
    label_names: list[str]
    order: list[int]
    task_sizes: list[int]

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, task_id: int) -> Task: ...

    def __iter__(self) -> Iterator[Task]: ...

    def statistics_labels(self, keys: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...


class TaskSequence:
    """Class-incremental tasks over a train/test pair of `datasets.Dataset`s.

    Each dataset needs an image column and an integer (or `ClassLabel`) or string label column. The classes,
    in `seed`'s order, are split into tasks of `init_cls`, then `increment` classes (`split_sizes`);
    `init_cls=None` puts every class in one task.

    Two orders, each named: `label_names` are the dataset's class names in class-id order (its
    `features["label"].names`; what the model's outputs, `id2label` and every file use), `order` (=
    `class_ids`) the class id learned at each position. The relabelled `train`/`test` (and each task's
    data) carry positions, what the continual head trains on: their `ClassLabel` names are
    `position_names` (`position_names[p] == label_names[order[p]]`).
    """

    #: What the data is (a Hub dataset id, image folders): each task's history records it.
    source: str | None = None

    def __init__(
        self,
        train: Dataset,
        test: Dataset,
        *,
        init_cls: int | None,
        increment: int | None,
        seed: int | None = 1993,
        image_column: str = "image",
        label_column: str = "label",
        min_classes: int = 2,
    ):
        for name, ds in (("train", train), ("test", test)):
            for column in (image_column, label_column):
                if column not in ds.column_names:
                    raise UserError(
                        f"the {name} split has no column {column!r} (columns: {ds.column_names}); "
                        "set image_column/label_column."
                    )
        self.image_column, self.label_column = image_column, label_column
        names, train_ids, test_ids = label_ids(train, test, label_column)
        num_classes = len(names)
        if num_classes < min_classes:
            raise UserError(f"the training data has {num_classes} class(es); continual learning needs at least "
                             f"{min_classes}" + (" (new data that continues a checkpoint may have one: "
                                                 "TaskSequence(..., min_classes=1), as --continue_from uses)."
                                                 if min_classes > 1 else "."))
        missing = sorted(set(range(num_classes)) - set(np.unique(train_ids).tolist()))
        if missing:
            raise UserError(f"class(es) {[names[i] for i in missing]} have no training image.")
        self.seed = seed
        self.order = class_order(num_classes, seed)
        position = np.empty(num_classes, dtype=np.int64)
        position[self.order] = np.arange(num_classes)
        #: Class id k -> its name: the dataset's names, in its label-id order.
        self.label_names = list(names)
        #: Position p -> the name of the class learned there (the relabelled data's `ClassLabel` names).
        self.position_names = [names[c] for c in self.order]
        self.task_sizes = split_sizes(num_classes, init_cls, increment)
        # As recorded in each task history: the sizes used (None, every class in one task, as that one size).
        self.init_cls = self.task_sizes[0]
        self.increment = increment if init_cls is not None and increment is not None else self.task_sizes[0]
        self._train_labels = position[train_ids]
        self._test_labels = position[test_ids]
        tested = np.bincount(self._test_labels, minlength=num_classes)
        untested = [t for t in range(len(self.task_sizes)) if not tested[self.classes_of(t)].any()]
        if untested:
            raise UserError(f"task(s) {untested} have no test images, so they cannot be scored; give every class "
                             "test images (or change init_cls/increment).")
        feature = ClassLabel(names=self.position_names)
        self.train = with_labels(train, label_column, self._train_labels, feature)
        self.test = with_labels(test, label_column, self._test_labels, feature)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dataset_dict(
        cls, data: DatasetDict, *, train_split: str = "train", test_split: str = "test", **kwargs
    ) -> TaskSequence:
        for split in (train_split, test_split):
            if split not in data:
                raise UserError(f"the dataset has no {split!r} split (splits: {list(data)}).")
        return cls(data[train_split], data[test_split], **kwargs)

    @classmethod
    def from_image_folders(cls, train_dir: str | Path, test_dir: str | Path, **kwargs) -> TaskSequence:
        """One sub-folder per class in each directory (any folder name is a class name). Every image is
        decoded once first, so a bad file fails, named, before training (see `slca_peft.data.checks`)."""
        from .checks import check_dataset_images
        from .formats import load_split_image_folders

        minimum = kwargs.get("min_classes", 2)
        for directory in (train_dir, test_dir):
            verify_image_folder(directory, decode=False, min_classes=minimum)
        data = load_split_image_folders(train_dir, test_dir, min_classes=minimum)
        for split in ("train", "test"):
            check_dataset_images(data[split], "image", description=f"checking {split} images")
        return cls(data["train"], data["test"], **kwargs)

    # ------------------------------------------------------------------ access
    @property
    def num_classes(self) -> int:
        return len(self.position_names)

    @property
    def class_ids(self) -> list[int]:
        """Position -> the dataset's label id (ClassLabel id, sorted-name index of folders and string
        labels, integer labels as they are): position p holds label `order[p]`."""
        return list(self.order)

    def __len__(self) -> int:
        return len(self.task_sizes)

    def offsets(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.task_sizes)]).tolist()

    def classes_of(self, task_id: int) -> list[int]:
        offsets = self.offsets()
        return list(range(offsets[task_id], offsets[task_id + 1]))

    def task_of_class(self, cls: int) -> int:
        return int(np.searchsorted(self.offsets(), cls, side="right") - 1)

    def __getitem__(self, task_id: int) -> Task:
        """Task `task_id`, built on first use and kept: the loop asks for every seen task after each task
        (evaluation, checks), so a rebuild per ask would make a long stream's overhead grow with t."""
        if not 0 <= task_id < len(self):
            raise IndexError(f"task {task_id} out of range; the sequence has {len(self)} tasks.")
        return built_task(self, task_id, self._build)

    def _build(self, task_id: int) -> Task:
        classes = self.classes_of(task_id)
        lo, hi = classes[0], classes[-1] + 1
        train_idx = self._rows("_train_labels", lo, hi)
        test_idx = self._rows("_test_labels", lo, hi)
        return Task(task_id, classes, self.train.select(train_idx), self.test.select(test_idx))

    def _rows(self, labels: str, lo: int, hi: int) -> np.ndarray:
        """Rows whose label is in `[lo, hi)`, ascending (as `np.nonzero` of the mask gives them), from one
        stable sort of the labels made on first use instead of a scan of every label per task."""
        cache = self.__dict__.setdefault("_sorted_rows", {})
        if labels not in cache:
            values = getattr(self, labels)
            rows = np.argsort(values, kind="stable")
            cache[labels] = (rows, values[rows])
        rows, sorted_labels = cache[labels]
        start, stop = np.searchsorted(sorted_labels, [lo, hi], side="left")
        return np.sort(rows[start:stop])

    def __iter__(self) -> Iterator[Task]:
        return (self[t] for t in range(len(self)))

    def statistics_labels(self, keys: torch.Tensor) -> torch.Tensor:
        """Class-incremental statistics are keyed by the label itself."""
        return keys

    def seen_test(self, task_id: int) -> Dataset:
        """Test data of every class seen up to and including `task_id`."""
        hi = self.offsets()[task_id + 1]
        return self.test.select(np.nonzero(self._test_labels < hi)[0])

    def describe(self) -> dict:
        """What a checkpoint records to rebuild the same stream."""
        return {
            "seed": self.seed,
            "init_cls": self.init_cls,
            "increment": self.increment,
            "class_order": self.order,
            "task_sizes": self.task_sizes,
            "label_names": self.label_names,
        }


def built_task(stream: object, task_id: int, build: Callable[[int], Task]) -> Task:
    """`build(task_id)` the first time `stream` is asked for that task, the same `Task` after: a task's
    data is a view (`Dataset.select`) whose fingerprinting and label scan cost milliseconds to seconds,
    paid once per task instead of once per ask."""
    cache = stream.__dict__.setdefault("_built_tasks", {})
    task = cache.get(task_id)
    if task is None:
        task = cache[task_id] = build(task_id)
    return task


def stream_class_ids(tasks: TaskStream) -> list[int]:
    """The class id of each position of a stream: its `class_ids`, or the identity for a stream that
    has none (a custom stream written before class ids existed)."""
    ids = getattr(tasks, "class_ids", None)
    return [int(i) for i in ids] if ids is not None else list(range(tasks.num_classes))


def stream_position_names(tasks: TaskStream) -> list[str]:
    """The class names of a stream in position order, the order its tasks' data is labelled in: its
    `position_names`, else `label_names` (class-id order) read through `stream_class_ids`."""
    names = getattr(tasks, "position_names", None)
    return list(names) if names is not None else names_at(tasks.label_names, stream_class_ids(tasks))


def label_ids(train: Dataset, test: Dataset, column: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Integer ids and names for both splits, matched by name so folder-built splits agree."""
    feature = train.features[column]
    train_raw, test_raw = train[column], test[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        test_feature = test.features[column]
        if isinstance(test_feature, ClassLabel) and list(test_feature.names) != names:
            unknown = sorted(set(test_feature.names) - set(names))
            if unknown:
                raise UserError(f"test class(es) {unknown} are absent from the training data.")
            lookup = {n: i for i, n in enumerate(names)}
            test_raw = [lookup[test_feature.names[i]] for i in test_raw]
        train_ids, test_ids = np.asarray(train_raw, dtype=np.int64), np.asarray(test_raw, dtype=np.int64)
    elif all(isinstance(v, str) for v in train_raw):
        if len(set(train_raw) | set(test_raw)) and not all(isinstance(v, str) for v in test_raw):
            raise UserError("train labels are strings but test labels are not; use one label type.")
        names = sorted(set(train_raw))
        unknown = sorted(set(test_raw) - set(names))
        if unknown:
            raise UserError(f"test class(es) {unknown} are absent from the training data.")
        lookup = {n: i for i, n in enumerate(names)}
        train_ids = np.array([lookup[v] for v in train_raw], dtype=np.int64)
        test_ids = np.array([lookup[v] for v in test_raw], dtype=np.int64)
    else:
        train_ids, test_ids = np.asarray(train_raw, dtype=np.int64), np.asarray(test_raw, dtype=np.int64)
        if train_ids.size and train_ids.min() < 0:
            raise UserError(f"labels must be >= 0, found {int(train_ids.min())} in the training data.")
        num_classes = int(train_ids.max()) + 1 if train_ids.size else 0
        names = [str(i) for i in range(num_classes)]
    if test_ids.size and (test_ids.min() < 0 or test_ids.max() >= len(names)):
        bad = sorted(set(test_ids[(test_ids < 0) | (test_ids >= len(names))].tolist()))
        raise UserError(f"test label(s) {bad} are absent from the training data ({len(names)} classes).")
    if len(set(names)) != len(names):
        raise UserError("duplicate class names in the label feature; make every class name unique.")
    return names, train_ids, test_ids


def with_labels(ds: Dataset, column: str, labels: np.ndarray, feature: ClassLabel) -> Dataset:
    """`ds` with its label column replaced by the ids `label_ids` matched across splits."""
    ds = ds.remove_columns(column)
    return ds.add_column(column, labels.tolist(), feature=feature)


def verify_image_folder(directory: str | Path, *, decode: bool = True, min_classes: int = 2) -> None:
    """Fail early on a missing folder, fewer than `min_classes` classes (two; one for new data that
    continues a checkpoint), or (`decode`) an image PIL cannot decode in full or convert faithfully,
    naming the file."""
    from .checks import check_images, list_class_folder

    root = Path(directory)
    require_path(root, folder=True, what="image folder",
                 fix="give a folder with one sub-folder of images per class (--train_dir, --test_dir)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < min_classes:
        raise UserError(
            f"image folder {root} has {len(classes)} class sub-folder(s); put each class's images in its "
            f"own sub-folder, with at least {min_classes} classes"
            + (" (one is enough for new data that continues a checkpoint, --continue_from)."
               if min_classes > 1 else ".")
        )
    if decode:
        check_images(list_class_folder(root, classes)[0], description=f"checking {root}")
