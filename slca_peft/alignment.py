"""`ClassifierAligner`: retrain every task head on features sampled from the class Gaussians.

Old data is gone, but its class statistics are not: sampling them lets the heads of all tasks be
calibrated against each other, which undoes the bias toward the newest task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .head import ContinualClassifier
from .statistics import ClassStatistics


@dataclass
class AlignmentSettings:
    """The CA hyperparameters of the spec (see `SLCAConfig` for their meaning)."""

    epochs: int = 5
    samples_per_class: int = 256
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 0.1
    fc_scale_mu: float = 0.02
    slca_plus_plus: bool = True

    @classmethod
    def from_config(cls, args) -> AlignmentSettings:
        return cls(
            epochs=args.ca_epochs,
            samples_per_class=args.ca_samples_per_class,
            batch_size=args.ca_batch_size,
            lr=args.ca_lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            temperature=args.ca_temperature,
            fc_scale_mu=args.fc_scale_mu,
            slca_plus_plus=args.slca_plus_plus_scaling,
        )


def normalized_logits(logits: torch.Tensor, task_offsets: list[int], temperature: float) -> torch.Tensor:
    """Divide logits by the mean over tasks of each task's logit L2 norm, then by tau.

    Per-task norms keep a head with large weights (usually the newest) from dominating the loss.
    """
    norms = torch.stack(
        [
            logits[:, start:end].norm(p=2, dim=1) + 1e-7
            for start, end in zip(task_offsets[:-1], task_offsets[1:], strict=True)
        ],
        dim=1,
    )
    return logits / norms.mean(dim=1, keepdim=True) / temperature


class ClassifierAligner:
    """Classifier alignment after task `task_id`, following SLCA / SLCA++."""

    def __init__(self, settings: AlignmentSettings | None = None, seed: int = 0):
        self.settings = settings or AlignmentSettings()
        self.seed = seed

    def sample(
        self, stats: ClassStatistics, task_id: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `samples_per_class` features of every seen class, scaled as the method requires.

        All classes are sampled in one batched product with their cached Cholesky factors.
        """
        s = self.settings
        classes = stats.classes
        n = s.samples_per_class
        means = torch.stack([stats.means[c] for c in classes]).to(torch.float32)
        factors = torch.stack([stats.cholesky(c) for c in classes]).to(torch.float32)
        task_gap = torch.tensor([task_id - stats.task_of_class[c] for c in classes], dtype=torch.float32)
        if not s.slca_plus_plus:
            # SLCA: older classes' means shrink toward the origin.
            decay = 0.9 + 0.1 * (task_id - task_gap + 1) / (task_id + 1)
            means = means * decay[:, None]
        noise = torch.randn(len(classes), n, stats.feature_dim, generator=generator)
        feats = means[:, None, :] + torch.bmm(noise, factors.transpose(1, 2))
        if s.slca_plus_plus and s.fc_scale_mu:
            jitter = torch.rand(len(classes), n, generator=generator)
            step = s.fc_scale_mu + 0.02 * (jitter - 0.5)
            feats = feats / (1.0 + step * task_gap[:, None])[..., None]
        labels = torch.tensor(classes, dtype=torch.int64).repeat_interleave(n)
        return feats.reshape(-1, stats.feature_dim), labels

    def align(self, classifier: ContinualClassifier, stats: ClassStatistics, task_id: int) -> list[float]:
        """Retrain all heads in place; returns the mean loss of each epoch.

        Scales are set to 1 first (they are never trained) and, for SLCA++, old heads get
        `1 + mu_s * (T_old - j)` afterwards.
        """
        s = self.settings
        missing = [c for c in range(classifier.num_classes) if c not in stats.means]
        if missing:
            raise ValueError(
                f"classes {missing} have no statistics; compute them (ClassStatistics.update/finalize) "
                "for every task before aligning."
            )
        device = classifier.heads[0].weight.device
        classifier.scales.fill_(1.0)
        requires_grad = [p.requires_grad for p in classifier.parameters()]
        params = list(classifier.heads.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, s.epochs))
        generator = torch.Generator().manual_seed(self.seed + task_id)
        offsets = classifier.task_offsets()
        losses = []
        try:
            for _ in range(s.epochs):
                feats, labels = self.sample(stats, task_id, generator)
                order = torch.randperm(len(labels), generator=generator)
                feats, labels = feats[order].to(device), labels[order].to(device)
                total, batches = 0.0, 0
                for start in range(0, len(labels), s.batch_size):
                    x, y = feats[start : start + s.batch_size], labels[start : start + s.batch_size]
                    logits = classifier(x.to(classifier.heads[0].weight.dtype))
                    loss = F.cross_entropy(normalized_logits(logits.float(), offsets, s.temperature), y)
                    if not torch.isfinite(loss):
                        bad = [c for c in stats.classes if not torch.isfinite(stats.means[c]).all()]
                        raise RuntimeError(
                            f"classifier alignment loss became {loss.item()} after task {task_id} "
                            f"(classes with non-finite means: {bad or 'none'}); lower ca_lr or check the "
                            "class statistics."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                    batches += 1
                scheduler.step()
                losses.append(total / max(1, batches))
        finally:
            for p, flag in zip(classifier.parameters(), requires_grad, strict=True):
                p.requires_grad_(flag)
        if s.slca_plus_plus and s.fc_scale_mu:
            num_old = classifier.num_tasks - 1
            with torch.no_grad():
                for j in range(num_old):
                    classifier.scales[j] = 1.0 + s.fc_scale_mu * (num_old - j)
        return losses
