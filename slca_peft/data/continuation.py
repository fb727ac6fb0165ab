"""Continue learning later: the tasks a checkpoint learned, followed by tasks of new classes.

A benchmark run cuts one dataset into tasks up front; `--resume_from` only finishes that cut. A
`ContinuedStream` instead appends the tasks of a new `TaskSequence` (new data, new classes) to the
history a checkpoint records (`continual_state.json`), with the class-id rule of the library:

- old classes keep their positions, ids and names; the new data's classes take the positions after
  them (the classifier grows, old heads and statistics are kept) and the next free class ids, in the
  new data's own label-id order; `label_names` (class-id order) name the learned classes and the new
  ones, and an id the checkpoint skipped (a class of its data it had not learned) keeps its name
  (`class_<k>` if a learned or new class has that name);
- a new class named like a learned one is refused, unless `merge_existing_classes`: its images then
  add to that class's statistics (exact sums, `ClassStatistics.reopen`) and it gets no second output;
- old tasks' data is gone: they have no training data, and test data only when the user still has it
  (`old_test`), otherwise their accuracy entries are missing (None), not 0.

`ContinualLearner.from_pretrained` wraps a new stream in one; the recipe's `--continue_from` does too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset

from ..artifacts.class_names import name_of, names_at, names_by_id, placeholder_name
from ..artifacts.digests import folder_sha256
from ..artifacts.layout import is_trainer_output_file
from ..artifacts.values import MAX_CLASSES
from ..utils.errors import UserError
from ..utils.reading import require_path
from .tasks import Task, TaskSequence, built_task, stream_position_names, with_labels


def learned_part(state: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a task history that was learned (a checkpoint written mid-stream also lists the
    tasks it had not reached): task sizes, names, ids and data of its first `tasks_learned` tasks."""
    matrix = list(state.get("accuracy_matrix") or [])
    learned = int(state.get("tasks_learned", len(matrix)))
    sizes = list(state.get("task_sizes") or [])[:learned]
    k = sum(sizes)
    names = list(state.get("label_names") or [])  # by class id
    ids = list(state.get("class_ids") or state.get("class_order") or range(k))
    if len(sizes) < learned or len(ids) < k:
        raise UserError(f"the checkpoint's task history records {len(ids)} classes in {len(sizes)} tasks but "
                         f"{learned} tasks learned; it is damaged or was not written by slca-peft.")
    data = list(state.get("task_data") or [state.get("dataset")] * learned)[:learned]
    timings = state.get("timings") or []
    segments = [dict(s) for s in state.get("segments") or [] if s.get("first_task", 0) < learned]
    if segments:
        segments[-1]["tasks"] = min(segments[-1]["tasks"], learned - segments[-1]["first_task"])
    else:
        segments = [{"first_task": 0, "tasks": learned, "seed": state.get("seed"), "init_cls": state.get("init_cls"),
                     "increment": state.get("increment"), "data": state.get("dataset")}]
    # label_names: by class id, up to the largest learned (the next ids go to new classes);
    # position_names: the learned classes' names in learning order.
    return {"tasks_learned": learned, "task_sizes": sizes, "class_ids": list(ids[:k]),
            "label_names": [name_of(names, i) for i in range(max(ids[:k], default=-1) + 1)],
            "position_names": names_at(names, ids[:k]),
            "task_data": data, "segments": segments, "accuracy_matrix": matrix[:learned],
            "seen_accuracy": list(state.get("seen_accuracy") or [])[:learned],
            "task_test_sizes": list(state.get("task_test_sizes") or [])[:learned],
            "timings": timings[:learned] if isinstance(timings, list) else timings}  # damaged: checked_timings says so


def before_last_continuation(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The history a continued run started from (to resume that run on the same new data), or None
    when `state` is not a continuation."""
    segments = state.get("segments") or []
    if len(segments) < 2:
        return None
    first = int(segments[-1]["first_task"])
    truncated = dict(state)
    truncated["tasks_learned"] = first
    truncated["accuracy_matrix"] = list(state.get("accuracy_matrix") or [])[:first]
    return learned_part(truncated)


class ContinuedStream:
    """The learned tasks of `previous` (a checkpoint's `continual_state.json`), then the tasks of `new`.

    Implements the `TaskStream` protocol; `describe()` gives the whole history (old class order, ids
    and names, then the new ones, each task's data source, and how each part was cut: `segments`).

    Args:
        previous: the task history to continue (`load_checkpoint(...)[2]`).
        new: the new data's tasks (its `init_cls`/`increment`/`seed` cut the new classes only).
        merge_existing_classes: add the images of a class named like a learned one to that class
            (its statistics, exactly) instead of refusing it.
        old_test: test images of learned classes, labelled by class name (`ClassLabel` or strings) or by
            class id (integers); each old task is scored on those of its classes, the others are missing.
        source: what the new data is (a Hub dataset id, the image folders), recorded per task; default
            `new.source`.
        continued_from: the checkpoint or Hub repo continued from (and its `continued_revision`),
            recorded in the history.
    """

    def __init__(
        self,
        previous: Mapping[str, Any],
        new: TaskSequence,
        *,
        merge_existing_classes: bool = False,
        old_test: Dataset | None = None,
        source: str | None = None,
        continued_from: str | None = None,
        continued_revision: str | None = None,
    ):
        if previous.get("incremental") == "domain" or previous.get("domains"):
            raise UserError("the checkpoint learned a domain-incremental stream; continuing it with new classes is "
                             "not supported (resume it with --resume_from and the same domains).")
        if not isinstance(new, TaskSequence):
            raise TypeError(f"continue with a TaskSequence of the new data, got {type(new).__name__}.")
        old = learned_part(previous)
        self.previous = old
        self.new = new
        self.image_column, self.label_column = new.image_column, new.label_column
        self.source = source if source is not None else getattr(new, "source", None)
        self.continued_from = continued_from
        t_old, k = old["tasks_learned"], sum(old["task_sizes"])
        old_names, old_ids = old["position_names"], old["class_ids"]
        new_names = stream_position_names(new)  # the new data's positions, as its tasks are labelled
        known = {name: p for p, name in enumerate(old_names)}
        clashes = sorted(name for name in new_names if name in known)
        if clashes and not merge_existing_classes:
            shown = clashes[:10]
            more = f" and {len(clashes) - len(shown)} more" if len(clashes) > len(shown) else ""
            raise UserError(
                f"the new data's {len(clashes)} class(es) {shown}{more} are already learned (class ids "
                f"{[old_ids[known[n]] for n in shown]}); rename them, or add their images to those classes "
                "with merge_existing_classes=True (--merge_existing_classes)."
            )
        # New-stream position -> position in this stream; new classes take the positions after the old ones.
        fresh = [p for p, name in enumerate(new_names) if name not in known]
        position = np.empty(new.num_classes, dtype=np.int64)
        for rank, p in enumerate(fresh):
            position[p] = k + rank
        for p, name in enumerate(new_names):
            if name in known:
                position[p] = known[name]
        # Next free class ids, in the new data's own label-id order.
        new_dataset_ids = [new.order[p] for p in fresh]
        next_id = max(old_ids, default=-1) + 1
        if next_id + len(fresh) > MAX_CLASSES:
            raise UserError(f"the checkpoint's largest class id is {next_id - 1}, so the new data's {len(fresh)} "
                             f"class(es) would take ids beyond the {MAX_CLASSES} slca-peft allows; its task history "
                             "is damaged or crafted (refused before any training).")
        id_of = {d: next_id + i for i, d in enumerate(sorted(new_dataset_ids))}
        #: Position p -> the name of the class learned there (the relabelled data's `ClassLabel` names).
        self.position_names = old_names + [new_names[p] for p in fresh]
        self.class_ids = old_ids + [id_of[d] for d in new_dataset_ids]
        self.order = list(self.class_ids)
        # An id the checkpoint skipped (a class of its data not learned) keeps the name it had, unless a
        # class of this stream took that name since.
        learned_names, skipped = set(self.position_names), set(range(next_id)) - set(old_ids)
        named = {i: old["label_names"][i] for i in skipped if old["label_names"][i] not in learned_names}
        named.update(zip(self.class_ids, self.position_names, strict=True))
        #: Class id k -> its name (class-id order, as the model's outputs).
        self.label_names = names_by_id(named)
        taken = sorted(learned_names & {placeholder_name(i) for i in skipped if i not in named})
        if taken:
            raise UserError(f"the new data names a class {taken[0]!r}, the name slca-peft gives a class id the "
                             "checkpoint skipped; rename that class.")
        if not fresh:  # every class of the new data merges into a learned one: nothing to learn
            shown = clashes[:10]
            more = f" and {len(clashes) - len(shown)} more" if len(clashes) > len(shown) else ""
            raise UserError(f"the new data holds no new class: its {len(clashes)} class(es) {shown}{more} are all "
                             "already learned, so continuing would add no output; give data with at least one class "
                             "the checkpoint has not learned (a folder named after it).")
        new_offsets = new.offsets()
        self._new_tasks: list[tuple[list[int], list[int]]] = []  # (new positions, merged old positions)
        for i in range(len(new)):
            span = range(new_offsets[i], new_offsets[i + 1])
            added = [int(position[p]) for p in span if new_names[p] not in known]
            merged = [int(position[p]) for p in span if new_names[p] in known]
            if not added:
                names = [old_names[c] for c in merged]
                raise UserError(f"task {t_old + i + 1} (new task {i + 1}) only adds images to the learned class(es) "
                                 f"{names}; change init_cls/increment so every new task has a new class.")
            self._new_tasks.append((added, merged))
        self.task_sizes = old["task_sizes"] + [len(added) for added, _ in self._new_tasks]
        self._old_offsets = np.concatenate([[0], np.cumsum(old["task_sizes"])]).astype(int).tolist()
        self.num_old_tasks, self.num_old_classes = t_old, k
        feature = ClassLabel(names=self.position_names)  # the data is labelled by position
        col = new.label_column
        self._train_labels = position[np.asarray(new.train[col], dtype=np.int64)]
        self._test_labels = position[np.asarray(new.test[col], dtype=np.int64)]
        self.train = with_labels(new.train, col, self._train_labels, feature)
        self.test = with_labels(new.test, col, self._test_labels, feature)
        self.old_test, self._old_test_labels = None, None
        if old_test is not None:
            self._old_test_labels = self._old_positions(old_test, col)
            self.old_test = with_labels(old_test, col, self._old_test_labels, feature)
        self.task_data = old["task_data"] + [self.source] * len(new)
        self.segments = old["segments"] + [{
            "first_task": t_old, "tasks": len(new), "seed": new.seed, "init_cls": new.init_cls,
            "increment": new.increment, "data": self.source, "continued_from": continued_from,
            "continued_revision": continued_revision,
            "merged_classes": sorted({old_names[c] for _, merged in self._new_tasks for c in merged}),
        }]

    def _old_positions(self, old_test: Dataset, column: str) -> np.ndarray:
        """Positions of the old test images, matched by class name (or by class id for integer labels)."""
        if column not in old_test.column_names or self.image_column not in old_test.column_names:
            raise UserError(f"the old test data needs columns {self.image_column!r} and {column!r} "
                             f"(it has {old_test.column_names}).")
        feature, raw = old_test.features[column], old_test[column]
        k = self.num_old_classes
        if isinstance(feature, ClassLabel) or all(isinstance(v, str) for v in raw):
            names = [feature.int2str(v) for v in raw] if isinstance(feature, ClassLabel) else raw
            lookup = {name: p for p, name in enumerate(self.position_names[:k])}
            unknown = sorted({n for n in names if n not in lookup})
            if unknown:
                raise UserError(f"the old test data has class(es) {unknown[:5]} the checkpoint has not learned; "
                                 "give test images of learned classes only (new classes' come with the new data).")
            return np.array([lookup[n] for n in names], dtype=np.int64)
        lookup = {cid: p for p, cid in enumerate(self.class_ids[:k])}
        unknown = sorted({int(v) for v in raw if int(v) not in lookup})
        if unknown:
            raise UserError(f"the old test data has class id(s) {unknown[:5]} the checkpoint has not learned.")
        return np.array([lookup[int(v)] for v in raw], dtype=np.int64)

    # ------------------------------------------------------------------ the TaskStream protocol
    @property
    def num_classes(self) -> int:
        return len(self.position_names)

    def __len__(self) -> int:
        return len(self.task_sizes)

    def __getitem__(self, task_id: int) -> Task:
        """Task `task_id`, built on first use and kept (`built_task`)."""
        if not 0 <= task_id < len(self):
            raise IndexError(f"task {task_id} out of range; the stream has {len(self)} tasks.")
        return built_task(self, task_id, self._build)

    def _build(self, task_id: int) -> Task:
        if task_id < self.num_old_tasks:
            lo, hi = self._old_offsets[task_id], self._old_offsets[task_id + 1]
            test = None
            if self.old_test is not None:
                rows = np.nonzero((self._old_test_labels >= lo) & (self._old_test_labels < hi))[0]
                test = self.old_test.select(rows) if len(rows) else None
            return Task(task_id, list(range(lo, hi)), None, test)
        added, merged = self._new_tasks[task_id - self.num_old_tasks]
        classes = added + merged
        lo, hi = added[0], added[-1] + 1
        train_rows = np.nonzero((self._train_labels >= lo) & (self._train_labels < hi))[0]
        test_rows = np.nonzero(np.isin(self._test_labels, classes))[0]
        statistics_train = None
        if merged:
            statistics_train = self.train.select(np.nonzero(np.isin(self._train_labels, classes))[0])
        return Task(task_id, classes, self.train.select(train_rows), self.test.select(test_rows),
                    new_outputs=len(added), merged_classes=merged, statistics_train=statistics_train)

    def __iter__(self) -> Iterator[Task]:
        return (self[t] for t in range(len(self)))

    def statistics_labels(self, keys: torch.Tensor) -> torch.Tensor:
        """Class-incremental statistics are keyed by the label itself."""
        return keys

    def describe(self) -> dict:
        """The whole history a checkpoint records: every class and task, old and new."""
        return {
            "seed": self.new.seed,
            "init_cls": self.new.init_cls,
            "increment": self.new.increment,
            "class_order": self.order,
            "class_ids": self.class_ids,
            "task_sizes": self.task_sizes,
            "label_names": self.label_names,
            "task_data": self.task_data,
            "segments": self.segments,
        }


def checkpoint_digest(directory: str | Path) -> str:
    """Content hash of a checkpoint directory's files (names and bytes): what a continuation's run
    fingerprint records of the checkpoint it started from; a Trainer's own files beside an SLCATrainer
    output_dir's checkpoint (its state and metrics, which `evaluate` rewrites) are not part of it. Each file
    is opened as a regular file only (`open_regular`: a FIFO or device there is refused, never read forever)."""
    root = Path(directory)
    return folder_sha256(sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                                and not is_trainer_output_file(p.name)))


def load_test_folder(directory: str | Path) -> Dataset:
    """An image folder of test images (one sub-folder per class, named as the class), every image
    decoded once first: the old test data `--old_test_dir` names."""
    from .checks import check_dataset_images, list_class_folder
    from .formats import image_dataset

    root = Path(directory)
    require_path(root, folder=True, what="--old_test_dir",
                 fix="give a folder with one sub-folder of test images per learned class")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(f"--old_test_dir {root} has no class sub-folder; put each class's test images in a "
                         "sub-folder named as the class.")
    paths, labels = list_class_folder(root, names)
    dataset = image_dataset(paths, labels, names)
    check_dataset_images(dataset, "image", description=f"checking {root}")
    return dataset
