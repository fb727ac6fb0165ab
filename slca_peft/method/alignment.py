"""`ClassifierAligner`: retrain every task head on features sampled from the class Gaussians.

Old data is gone, but its class statistics are not: sampling them lets the heads of all tasks be
calibrated against each other, which undoes the bias toward the newest task.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.head import ContinualClassifier
from ..utils.errors import UserError
from .statistics import ClassStatistics

#: Maps statistics keys (a long tensor) to classifier labels.
KeyLabels = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AlignmentSettings:
    """The CA hyperparameters (see `SLCAConfig` and docs/method.md for their meaning)."""

    epochs: int = 5
    samples_per_class: int = 256
    #: Cap on the samples of an epoch (None: none): each class then gets `samples_per_epoch // C`, at most
    #: `samples_per_class`, so an epoch's cost grows as cap x C rather than samples_per_class x C^2.
    samples_per_epoch: int | None = None
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
            samples_per_epoch=getattr(args, "ca_samples_per_epoch", None),
            batch_size=args.ca_batch_size,
            lr=args.learning_rate if args.ca_lr is None else args.ca_lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            temperature=args.ca_temperature,
            fc_scale_mu=args.fc_scale_mu,
            slca_plus_plus=args.slca_plus_plus_scaling,
        )


def normalized_logits(logits: torch.Tensor, task_offsets: list[int], temperature: float) -> torch.Tensor:
    """Divide logits by the mean over tasks of each task's logit L2 norm, then by tau.

    Per-task norms keep a head with large weights (usually the newest) from dominating the loss.
    All task norms come from one reduction over a [batch, tasks, widest task] view of the logits
    (zero-padded when tasks differ in size, which leaves every norm unchanged).
    """
    sizes = [end - start for start, end in zip(task_offsets[:-1], task_offsets[1:], strict=True)]
    width = max(sizes)
    if all(size == width for size in sizes):
        segments = logits.reshape(len(logits), len(sizes), width)
    else:
        index = _padded_positions(tuple(sizes), logits.device)
        segments = logits.new_zeros(len(logits), len(sizes) * width).index_copy(1, index, logits)
        segments = segments.view(len(logits), len(sizes), width)
    norms = torch.linalg.vector_norm(segments, ord=2, dim=2) + 1e-7
    return logits / norms.mean(dim=1, keepdim=True) / temperature


@functools.lru_cache(maxsize=16)
def _padded_positions(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Column of each logit in the [tasks x widest task] padded layout."""
    width = max(sizes)
    return torch.cat([torch.arange(size) + t * width for t, size in enumerate(sizes)]).to(device)


class ClassifierAligner:
    """Classifier alignment after task `task_id`, following SLCA / SLCA++."""

    def __init__(self, settings: AlignmentSettings | None = None, seed: int = 0):
        self.settings = settings or AlignmentSettings()
        self.seed = seed

    def draws_per_class(self, num_classes: int) -> int:
        """Samples of each class per epoch: `samples_per_class`, capped by `samples_per_epoch` over the classes."""
        s = self.settings
        if s.samples_per_epoch is None:
            return s.samples_per_class
        return max(1, min(s.samples_per_class, s.samples_per_epoch // max(1, num_classes)))

    def sample(
        self, stats: ClassStatistics, task_id: int, generator: torch.Generator, key_labels: KeyLabels | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `draws_per_class` features of every seen class, scaled as the method requires.

        Factors are stacked once per finalize (`ClassStatistics.sampling_plan`, on the generator's
        device); all classes are drawn in a few batched products, with no loop over classes.
        """
        s = self.settings
        plan = stats.sampling_plan(generator.device)
        n = self.draws_per_class(len(plan.classes))
        task_gap = (task_id - plan.tasks).to(plan.means.dtype)
        mean_scale = None
        if not s.slca_plus_plus:
            # SLCA: older classes' means shrink toward the origin.
            mean_scale = 0.9 + 0.1 * (task_id - task_gap + 1) / (task_id + 1)
        feats = plan.sample(n, generator, mean_scale)
        if s.slca_plus_plus and s.fc_scale_mu:
            jitter = torch.rand(len(task_gap), n, generator=generator, device=feats.device, dtype=feats.dtype)
            step = s.fc_scale_mu + 0.02 * (jitter - 0.5)
            feats.div_((1.0 + step * task_gap[:, None])[..., None])
        labels = plan.classes.repeat_interleave(n)
        if key_labels is not None:  # statistics keys that are not labels (a Gaussian per domain and class)
            labels = key_labels(labels)
        return feats.reshape(-1, stats.feature_dim), labels

    def align(
        self,
        classifier: ContinualClassifier,
        stats: ClassStatistics,
        task_id: int,
        key_labels: KeyLabels | None = None,
        progress: bool = False,
    ) -> list[float]:
        """Retrain all heads in place; returns the mean loss of each epoch.

        `key_labels` maps statistics keys to labels when they differ (a stream's
        `statistics_labels`): every Gaussian trains the label of its key. Scales are set to 1 first (they are
        never trained) and, for SLCA++, old heads get
        `1 + mu_s * (T_old - j)` afterwards. Features are sampled on the classifier's device. If the
        loss becomes non-finite the heads are restored as they were and a `RuntimeError` is raised.
        """
        s = self.settings
        keys = torch.tensor(sorted(stats.classes), dtype=torch.long)
        present = set((key_labels(keys) if key_labels is not None else keys).tolist())
        missing = [c for c in range(classifier.num_classes) if c not in present]
        if missing:
            raise UserError(
                f"classes {missing} have no statistics; compute them (ClassStatistics.update/finalize) "
                "for every task before aligning."
            )
        device = classifier.heads[0].weight.device
        dtype = classifier.heads[0].weight.dtype
        scales = classifier.scales.clone()
        classifier.scales.fill_(1.0)
        # With every scale at 1 the heads are one linear layer: train their concatenation (SGD with
        # momentum and weight decay acts per element, so this equals training the heads one by one)
        # with one matmul per step, and write it back into the heads once alignment succeeded.
        weight = torch.cat([head.weight.detach() for head in classifier.heads]).requires_grad_(True)
        bias = torch.cat([head.bias.detach() for head in classifier.heads]).requires_grad_(True)
        optimizer = torch.optim.SGD(
            [weight, bias], lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, foreach=True
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, s.epochs))
        generator = torch.Generator(device=device).manual_seed(self.seed + task_id)
        offsets = classifier.task_offsets()
        losses = []
        try:
            epochs = tqdm(range(s.epochs), desc=f"classifier alignment after task {task_id + 1}", unit="epoch",
                          leave=False, disable=not progress)
            for _ in epochs:
                feats, labels = self.sample(stats, task_id, generator, key_labels)
                order = torch.randperm(len(labels), generator=generator, device=generator.device)
                total = torch.zeros((), device=device)
                batches = 0
                # Batches are gathered through the permutation: no shuffled copy of all samples.
                for start in range(0, len(labels), s.batch_size):
                    index = order[start : start + s.batch_size]
                    x = feats.index_select(0, index).to(device=device, dtype=dtype)
                    y = labels.index_select(0, index).to(device)
                    logits = F.linear(x, weight, bias)
                    loss = F.cross_entropy(normalized_logits(logits.float(), offsets, s.temperature), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.detach()
                    batches += 1
                mean_loss = (total / max(1, batches)).item()  # one device sync per epoch
                if not math.isfinite(mean_loss):
                    bad = [c for c in stats.classes if not torch.isfinite(stats.means[c]).all()]
                    raise UserError(
                        f"classifier alignment loss became {mean_loss} after task {task_id} "
                        f"(classes with non-finite means: {bad or 'none'}); lower ca_lr or check the "
                        "class statistics. The heads were restored to their state before alignment."
                    )
                scheduler.step()
                losses.append(mean_loss)
        except BaseException:
            classifier.scales.copy_(scales)  # the heads themselves were never touched
            raise
        sizes = classifier.task_sizes
        with torch.no_grad():
            for head, w, b in zip(classifier.heads, weight.split(sizes), bias.split(sizes), strict=True):
                head.weight.copy_(w)
                head.bias.copy_(b)
        if s.slca_plus_plus and s.fc_scale_mu:
            num_old = classifier.num_tasks - 1
            with torch.no_grad():
                for j in range(num_old):
                    classifier.scales[j] = 1.0 + s.fc_scale_mu * (num_old - j)
        return losses
