"""`ContinualClassifier`: one linear head per task, with SLCA++'s per-task input scales, and `by_class_id`,
the one mapping from the heads' position order to class-id order."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from ..utils.errors import UserError


def by_class_id(values: torch.Tensor, class_ids: Sequence[int], dim: int = 0, fill: float | None = None
                ) -> torch.Tensor:
    """`values` with entry p along `dim` (output p of the heads) moved to index `class_ids[p]` (the class
    the dataset labels so): the result is `max(class_ids) + 1` wide, and an id below the largest that no
    output has (a class not learned yet, mid-stream) holds `fill` (None: the dtype's lowest value, which
    never wins an argmax and gets no probability). `SLCAModel.forward` applies it to the logits, an export
    to the folded head's rows, so both put class k at output k. The identity ids return `values` itself."""
    ids = tuple(int(i) for i in class_ids)
    if ids == tuple(range(len(ids))):
        return values
    shape = list(values.shape)
    shape[dim] = max(ids) + 1
    value = torch.finfo(values.dtype).min if fill is None else fill
    return values.new_full(shape, value).index_copy(dim, _index(ids, values.device), values)


@functools.lru_cache(maxsize=16)
def _index(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor: a later pass with gradients saves it for backward
        return torch.tensor(ids, dtype=torch.long, device=device)


class ContinualClassifier(nn.Module):
    """Concatenated per-task linear heads.

    Heads are separate so old ones can be frozen while a new task trains, and so alignment can
    scale each task's input independently (SLCA++). Scales are buffers: saved, never trained.
    """

    def __init__(self, feature_dim: int, task_sizes: list[int] | None = None):
        super().__init__()
        self.feature_dim = feature_dim
        self.heads = nn.ModuleList()
        self.register_buffer("scales", torch.ones(0))
        for size in task_sizes or []:
            self.grow(size)

    @property
    def task_sizes(self) -> list[int]:
        return [head.out_features for head in self.heads]

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def grow(self, num_new_classes: int) -> nn.Linear:
        """Add a head for a new task and freeze the old ones (representation learning only updates
        the current task's head)."""
        if num_new_classes < 1:
            raise UserError(f"a task needs at least one class, got {num_new_classes}.")
        for head in self.heads:
            head.requires_grad_(False)
        ref = self.scales if len(self.heads) == 0 else self.heads[0].weight
        head = nn.Linear(self.feature_dim, num_new_classes, device=ref.device, dtype=ref.dtype)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.heads.append(head)
        self.scales = torch.cat([self.scales, torch.ones(1, device=self.scales.device, dtype=self.scales.dtype)])
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.heads:
            raise RuntimeError("the classifier has no heads yet; call grow(num_classes) for the first task.")
        weight, bias = self.fused_weight_and_bias()
        return nn.functional.linear(features, weight.to(features.dtype), bias.to(features.dtype))

    def fused_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All heads as one linear layer, each task's scale folded into its rows
        (``W_t (s_t x) = (s_t W_t) x``): one matmul however many tasks there are."""
        weight = torch.cat([head.weight * self.scales[i] for i, head in enumerate(self.heads)])
        bias = torch.cat([head.bias for head in self.heads])
        return weight, bias

    def task_offsets(self) -> list[int]:
        """Start index of each task's logits (and one past the end)."""
        offsets = [0]
        for size in self.task_sizes:
            offsets.append(offsets[-1] + size)
        return offsets

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A detached copy of heads and scales: SLCA evaluates with aligned heads but keeps
        learning representations from the unaligned ones."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Load a snapshot taken with the same number of heads."""
        expected = set(self.state_dict())
        if set(snapshot) != expected:
            raise UserError(
                f"snapshot keys {sorted(snapshot)} do not match this classifier {sorted(expected)}; "
                "restore a snapshot taken after the same number of grow() calls."
            )
        self.load_state_dict(snapshot)
