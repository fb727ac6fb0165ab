"""Symmetric cross-entropy, the Slow Learner's loss in SLCA++."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0, beta: float = 0.1, *, check_labels: bool = True
) -> torch.Tensor:
    """`alpha * CE + beta * RCE`, averaged over the batch.

    The reverse term caps log 0 at log 1e-4 and clamps the softmax at 1e-7, which bounds the
    penalty of confident wrong predictions (the robustness SLCA++ relies on). `check_labels=False`
    skips the label range check (a device sync) for callers that have validated the labels (the
    trainer's hot path).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}.")
    num_classes = logits.shape[1]
    if check_labels and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for these logits, got range "
            f"[{int(labels.min())}, {int(labels.max())}]; shift them to the current task's classes."
        )
    ce = F.cross_entropy(logits.float(), labels)
    probs = torch.softmax(logits.float(), dim=1).clamp(min=1e-7, max=1.0)
    one_hot = F.one_hot(labels, num_classes).float().clamp(min=1e-4, max=1.0)
    rce = -(probs * torch.log(one_hot)).sum(dim=1).mean()
    return alpha * ce + beta * rce
