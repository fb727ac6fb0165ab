"""`DomainSequence`: domain-incremental tasks, the same classes seen in one new domain per task.

SLCA++ evaluates this setting on DomainNet's six domains: one head over all classes, statistics
kept per domain and class, classifier alignment over every domain's Gaussians, and the accuracy
matrix read per domain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset

from ..utils.errors import MissingFileError, UserError
from ..utils.reading import read_text
from .formats import LIST_FILE_BYTES, image_dataset, load_split_image_folders
from .tasks import Task, label_ids, verify_image_folder, with_labels

#: DomainNet's domains, in the release's (alphabetical) order; pass your own order to `domains`.
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def _domainnet_split(root: Path, list_file: Path) -> Dataset:
    """One `<domain>_<split>.txt` of the DomainNet release: `<domain>/<class>/<file> <label>` per line."""
    paths, labels, names = [], [], {}
    for number, line in enumerate(read_text(list_file, LIST_FILE_BYTES).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or len(Path(parts[0]).parts) < 3:
            raise UserError(f"{list_file}:{number}: expected '<domain>/<class>/<file> <label>', got {line!r}.")
        path, label = root / parts[0], int(parts[1])
        class_name = Path(parts[0]).parts[1]
        if names.setdefault(label, class_name) != class_name:
            raise UserError(f"{list_file}:{number}: label {label} is {names[label]!r} on earlier lines, here "
                             f"{class_name!r}; the list file is inconsistent.")
        if not path.is_file():
            raise MissingFileError(f"{list_file}:{number}: {path} does not exist; is {root} the DomainNet root?")
        paths.append(str(path))
        labels.append(label)
    if not paths:
        raise UserError(f"{list_file} lists no images.")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise UserError(f"{list_file} has no image of label(s) {missing[:5]}; every class needs images.")
    return image_dataset(paths, labels, [names[i] for i in range(len(names))])


def load_domain_folders(root: str | Path, domains: Sequence[str]) -> list[tuple[Dataset, Dataset]]:
    """(train, test) per domain, from either layout under `root`:

    - DomainNet's release: `<domain>/<class>/*` with `<domain>_train.txt` and `<domain>_test.txt`;
    - image folders: `<domain>/train/<class>/*` and `<domain>/test/<class>/*`.
    """
    root = Path(root)
    pairs = []
    for name in domains:
        lists = [root / f"{name}_{split}.txt" for split in ("train", "test")]
        folders = [root / name / split for split in ("train", "test")]
        if all(p.is_file() for p in lists):
            pairs.append(tuple(_domainnet_split(root, p) for p in lists))
        elif all(p.is_dir() for p in folders):
            for folder in folders:
                verify_image_folder(folder)
            data = load_split_image_folders(*folders)
            pairs.append((data["train"], data["test"]))
        else:
            raise MissingFileError(
                f"domain {name!r}: expected {lists[0].name} and {lists[1].name} (DomainNet's release) or "
                f"{name}/train/<class>/ and {name}/test/<class>/ folders under {root}."
            )
    return pairs


class DomainSequence:
    """Tasks = domains; every domain has the same classes, in the same label order.

    `domains` is a list of (train, test) `datasets.Dataset` pairs with an image column and a label
    column (integers, `ClassLabel`s or strings); class names are matched across domains.
    """

    def __init__(
        self,
        domains: Sequence[tuple[Dataset, Dataset]],
        *,
        domain_names: Sequence[str] | None = None,
        image_column: str = "image",
        label_column: str = "label",
    ):
        if len(domains) < 2:
            raise UserError(f"a domain-incremental sequence needs at least 2 domains, got {len(domains)}.")
        names = list(domain_names) if domain_names else [f"domain_{i}" for i in range(len(domains))]
        if len(names) != len(domains):
            raise UserError(f"{len(names)} domain names for {len(domains)} domains.")
        self.image_column, self.label_column = image_column, label_column
        self.domain_names = names
        self.label_names: list[str] | None = None
        self._domains: list[tuple[Dataset, Dataset]] = []
        for name, (train, test) in zip(names, domains, strict=True):
            for split, ds in (("train", train), ("test", test)):
                if image_column not in ds.column_names or label_column not in ds.column_names:
                    raise UserError(f"domain {name!r} {split} split lacks {image_column!r}/{label_column!r}.")
            labels, train_ids, test_ids = label_ids(train, test, label_column)
            if self.label_names is None:
                self.label_names = labels
            elif set(labels) != set(self.label_names):
                extra = sorted(set(labels) - set(self.label_names))
                missing = sorted(set(self.label_names) - set(labels))
                raise UserError(
                    f"domain {name!r} has classes the first domain lacks ({extra[:5]}) or lacks some of its classes "
                    f"({missing[:5]}); every domain must share the same class names."
                )
            elif labels != self.label_names:  # same names, another id order: map ids through the names
                lookup = np.array([self.label_names.index(n) for n in labels], dtype=np.int64)
                train_ids, test_ids = lookup[train_ids], lookup[test_ids]
            feature = ClassLabel(names=self.label_names)  # the ids were mapped to the first domain's
            self._domains.append(
                (
                    with_labels(train, label_column, train_ids, feature),
                    with_labels(test, label_column, test_ids, feature),
                )
            )
        self.order = list(range(self.num_classes))
        self.task_sizes = [self.num_classes] * len(self._domains)

    @classmethod
    def from_folders(cls, root: str | Path, domains: Sequence[str] = DOMAINNET_DOMAINS) -> DomainSequence:
        """One task per domain, in the given order (see `load_domain_folders` for the layouts)."""
        return cls(load_domain_folders(root, domains), domain_names=list(domains))

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def class_ids(self) -> list[int]:
        """One head over the first domain's label ids, in their order: positions are the class ids."""
        return list(range(self.num_classes))

    @property
    def position_names(self) -> list[str]:
        """The names in position order: `label_names`, positions being the class ids here."""
        return list(self.label_names)

    def __len__(self) -> int:
        return len(self._domains)

    def __getitem__(self, task_id: int) -> Task:
        if not 0 <= task_id < len(self):
            raise IndexError(f"task {task_id} out of range; the sequence has {len(self)} domains.")
        train, test = self._domains[task_id]
        # One head over every class, grown by the first domain; each domain keeps its own Gaussian
        # of every class (key domain * C + class).
        return Task(task_id, list(range(self.num_classes)), train, test, new_outputs=None if task_id == 0 else 0,
                    statistics_offset=task_id * self.num_classes, name=self.domain_names[task_id])

    def __iter__(self) -> Iterator[Task]:
        return (self[t] for t in range(len(self)))

    def statistics_labels(self, keys: torch.Tensor) -> torch.Tensor:
        """Every domain's Gaussian of a class trains that class."""
        return keys % self.num_classes

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
