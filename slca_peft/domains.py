"""`DomainSequence`: domain-incremental tasks, the same classes seen in one new domain per task.

SLCA++ evaluates this setting on DomainNet's six domains: one head over all classes, statistics
kept per domain and class, classifier alignment over every domain's Gaussians, and the accuracy
matrix read per domain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from datasets import ClassLabel, Dataset

from .tasks import Task, _label_ids, _with_labels


class DomainSequence:
    """Tasks = domains; every domain has the same classes, in the same label order.

    `domains` is a list of (train, test) `datasets.Dataset` pairs with an image column and a label
    column (integers, `ClassLabel`s or strings); class names are matched across domains.
    """

    domain_incremental = True

    def __init__(
        self,
        domains: Sequence[tuple[Dataset, Dataset]],
        *,
        domain_names: Sequence[str] | None = None,
        image_column: str = "image",
        label_column: str = "label",
    ):
        if len(domains) < 2:
            raise ValueError(f"a domain-incremental sequence needs at least 2 domains, got {len(domains)}.")
        names = list(domain_names) if domain_names else [f"domain_{i}" for i in range(len(domains))]
        if len(names) != len(domains):
            raise ValueError(f"{len(names)} domain names for {len(domains)} domains.")
        self.image_column, self.label_column = image_column, label_column
        self.domain_names = names
        self.label_names: list[str] | None = None
        self._domains: list[tuple[Dataset, Dataset]] = []
        for name, (train, test) in zip(names, domains, strict=True):
            for split, ds in (("train", train), ("test", test)):
                if image_column not in ds.column_names or label_column not in ds.column_names:
                    raise ValueError(f"domain {name!r} {split} split lacks {image_column!r}/{label_column!r}.")
            labels, train_ids, test_ids = _label_ids(train, test, label_column)
            if self.label_names is None:
                self.label_names = labels
            elif labels != self.label_names:
                raise ValueError(
                    f"domain {name!r} has classes {labels[:5]}... but the first domain has "
                    f"{self.label_names[:5]}...; every domain must share the same class names."
                )
            feature = ClassLabel(names=labels)
            self._domains.append(
                (
                    _with_labels(train, label_column, train_ids, feature),
                    _with_labels(test, label_column, test_ids, feature),
                )
            )
        self.order = list(range(self.num_classes))
        self.task_sizes = [self.num_classes] * len(self._domains)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self._domains)

    def __getitem__(self, task_id: int) -> Task:
        if not 0 <= task_id < len(self):
            raise IndexError(f"task {task_id} out of range; the sequence has {len(self)} domains.")
        train, test = self._domains[task_id]
        return Task(task_id, list(range(self.num_classes)), train, test)

    def __iter__(self) -> Iterator[Task]:
        return (self[t] for t in range(len(self)))

    def describe(self) -> dict:
        """What a checkpoint records to rebuild the same stream."""
        return {
            "incremental": "domain",
            "domains": self.domain_names,
            "class_order": self.order,
            "task_sizes": self.task_sizes,
            "label_names": self.label_names,
            "seed": None,
        }
