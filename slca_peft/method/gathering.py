"""One statistics pass over a task's images: the learner's `StatisticsStep` and `SLCATrainer` share it.

Each process reads its exact share of the images (every `world`-th sample: no sampler padding, so the
float64 sums reduced across processes count every sample once), features come from the frozen model
(`inference_context`: no grad, eval mode, adapters merged, the run's precision), and `finalize` sums the
shares across processes, so every process ends with the same, exact statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from torch.utils.data import Subset

from ..models.inference import inference_context
from ..models.model import SLCAModel
from ..utils.errors import UserError
from .statistics import ClassStatistics

__all__ = ["add_class_statistics", "process_share", "sum_over_processes"]


def process_share(dataset: Any) -> Any:
    """This process's exact share of a map-style dataset (a `datasets.Dataset` keeps its transform)."""
    state = PartialState()
    if state.num_processes == 1:
        return dataset
    if not hasattr(dataset, "__len__"):
        raise UserError("class statistics over several processes need a dataset with a length (map-style), so each "
                         "image is counted once; give a datasets.Dataset or a torch map-style Dataset.")
    indices = range(state.process_index, len(dataset), state.num_processes)
    return dataset.select(indices) if hasattr(dataset, "select") else Subset(dataset, list(indices))


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    return reduce(tensor, reduction="sum") if PartialState().num_processes > 1 else tensor


def add_class_statistics(statistics: ClassStatistics, model: SLCAModel, args: Any, batches: Iterable[dict],
                         task_id: int, keys: list[int], key_of: Callable[[Any], Any] = lambda labels: labels,
                         ) -> ClassStatistics:
    """Add the Gaussians of `keys` (task `task_id`'s classes) from `batches` of this process's share
    (`pixel_values`, `labels`; `key_of` maps labels to statistics keys), then finalize across processes.

    A problem with the data seen by one process only (a label outside the task) is raised on every process:
    the others would otherwise wait for it in the sum forever."""
    device = args.device
    problem: UserError | None = None
    with inference_context(model, args) as frozen:
        try:
            for batch in batches:
                feats = frozen.features(batch["pixel_values"].to(device))
                statistics.update(feats, key_of(batch["labels"].to(device)))
        except UserError as err:
            problem = err
    failed = int(sum_over_processes(torch.tensor([float(problem is not None)], device=device)).item())
    if problem is not None:
        raise problem
    if failed:
        raise UserError(f"the class statistics could not be gathered: {failed} other process(es) found a problem "
                        "in their share of the data (their log says which); fix the data and gather them again.")
    statistics.finalize(task_id, keys, reduce=sum_over_processes)
    return statistics
