"""`ClassStatistics`: per-class Gaussian feature statistics for classifier alignment.

Features are streamed in batches and accumulated as float64 counts, sums and outer-product sums.
Those three are additive, so shards on several processes reduce exactly with one all-reduce and no
feature matrix is ever gathered.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

STATISTICS_FILE = "class_statistics.safetensors"


class ClassStatistics:
    """Mean and covariance (unbiased, float64, plus a ridge) of every class seen so far.

    Old classes are never recomputed: their data is gone once their task ends, so updating one
    raises instead of silently mixing new-task features into an old Gaussian.
    """

    def __init__(self, feature_dim: int, ridge: float = 1e-4):
        self.feature_dim = feature_dim
        self.ridge = ridge
        self.means: dict[int, torch.Tensor] = {}
        self.covariances: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.task_of_class: dict[int, int] = {}
        self._pending: dict[int, list[torch.Tensor]] = {}  # class -> [count, sum, outer-sum]
        self._cholesky: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ accumulate
    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of features of the task being learned."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be [batch, {self.feature_dim}], got {tuple(features.shape)}.")
        feats = features.detach().to(torch.float64)
        if not torch.isfinite(feats).all():
            bad = sorted({int(c) for c in labels[~torch.isfinite(feats).all(dim=1)].tolist()})
            raise ValueError(f"non-finite features for class(es) {bad}; check the inputs and the backbone.")
        labels = labels.detach().to(feats.device)
        for cls in torch.unique(labels).tolist():
            cls = int(cls)
            if cls in self.means:
                raise ValueError(
                    f"class {cls} already has statistics from task {self.task_of_class[cls]}; statistics of "
                    "old classes are never recomputed. Feed only the current task's classes."
                )
            x = feats[labels == cls]
            acc = self._pending.get(cls)
            if acc is None:
                acc = [
                    torch.zeros((), dtype=torch.float64, device=feats.device),
                    torch.zeros(self.feature_dim, dtype=torch.float64, device=feats.device),
                    torch.zeros(self.feature_dim, self.feature_dim, dtype=torch.float64, device=feats.device),
                ]
                self._pending[cls] = acc
            acc[0] += x.shape[0]
            acc[1] += x.sum(dim=0)
            acc[2] += x.T @ x

    def pending_classes(self) -> list[int]:
        return sorted(self._pending)

    @torch.no_grad()
    def finalize(
        self,
        task_id: int,
        classes: list[int] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[int]:
        """Turn the accumulated sums into means and covariances for `task_id`'s classes.

        `classes` lists every class of the task so that all processes reduce the same tensors even
        when a shard saw no sample of some class; `reduce` sums a tensor across processes.
        """
        classes = sorted(classes if classes is not None else self._pending)
        if not classes:
            return []
        d = self.feature_dim
        device = next(iter(self._pending.values()))[0].device if self._pending else torch.device("cpu")
        counts = torch.zeros(len(classes), dtype=torch.float64, device=device)
        sums = torch.zeros(len(classes), d, dtype=torch.float64, device=device)
        outer = torch.zeros(len(classes), d, d, dtype=torch.float64, device=device)
        for i, cls in enumerate(classes):
            if cls in self._pending:
                counts[i], sums[i], outer[i] = self._pending[cls]
        if reduce is not None:
            counts, sums, outer = reduce(counts), reduce(sums), reduce(outer)
        eye = torch.eye(d, dtype=torch.float64, device=device)
        for i, cls in enumerate(classes):
            n = int(round(counts[i].item()))
            if n == 0:
                raise ValueError(
                    f"class {cls} of task {task_id} has no training sample; every class of a task needs "
                    "at least one image to get alignment statistics."
                )
            mean = sums[i] / n
            if n == 1:
                warnings.warn(
                    f"class {cls} has a single training image: its covariance is undefined, so only the "
                    f"ridge {self.ridge}*I is used. Add images of this class for a meaningful Gaussian.",
                    stacklevel=2,
                )
                cov = torch.zeros(d, d, dtype=torch.float64, device=device)
            else:
                cov = (outer[i] - n * torch.outer(mean, mean)) / (n - 1)
                cov = 0.5 * (cov + cov.T)
            self.means[cls] = mean.cpu()
            self.covariances[cls] = (cov + self.ridge * eye).cpu()
            self.counts[cls] = n
            self.task_of_class[cls] = task_id
            self._pending.pop(cls, None)
        return classes

    # ------------------------------------------------------------------ access
    @property
    def classes(self) -> list[int]:
        return sorted(self.means)

    def cholesky(self, cls: int) -> torch.Tensor:
        """Lower Cholesky factor of a class covariance, computed once (statistics never change).

        A covariance that is not numerically positive definite gets a growing ridge, with a warning.
        """
        factor = self._cholesky.get(cls)
        if factor is None:
            cov = self.covariances[cls]
            factor, info = torch.linalg.cholesky_ex(cov)
            extra = self.ridge
            while info.item() != 0:
                warnings.warn(
                    f"covariance of class {cls} is not positive definite; adding ridge {extra:g}*I.",
                    stacklevel=2,
                )
                factor, info = torch.linalg.cholesky_ex(cov + extra * torch.eye(len(cov), dtype=cov.dtype))
                extra *= 10
            self._cholesky[cls] = factor
        return factor

    # ------------------------------------------------------------------ files
    def state_dict(self) -> dict[str, torch.Tensor]:
        classes = self.classes
        d = self.feature_dim
        return {
            "classes": torch.tensor(classes, dtype=torch.int64),
            "tasks": torch.tensor([self.task_of_class[c] for c in classes], dtype=torch.int64),
            "counts": torch.tensor([self.counts[c] for c in classes], dtype=torch.int64),
            "means": torch.stack([self.means[c] for c in classes]) if classes else torch.zeros(0, d),
            "covariances": (
                torch.stack([self.covariances[c] for c in classes]) if classes else torch.zeros(0, d, d)
            ),
            "ridge": torch.tensor(self.ridge, dtype=torch.float64),
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / STATISTICS_FILE
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path, feature_dim: int | None = None) -> ClassStatistics:
        path = Path(directory) / STATISTICS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the checkpoint has no class statistics.")
        state = load_file(str(path))
        expected = {"classes", "tasks", "counts", "means", "covariances", "ridge"}
        if set(state) != expected:
            raise ValueError(f"{path} holds tensors {sorted(state)}, expected {sorted(expected)}.")
        means, covs = state["means"], state["covariances"]
        num, dim = means.shape
        if feature_dim is not None and dim != feature_dim:
            raise ValueError(f"{path} has {dim}-d statistics but the model's feature is {feature_dim}-d.")
        if covs.shape != (num, dim, dim) or any(state[k].shape != (num,) for k in ("classes", "tasks", "counts")):
            raise ValueError(f"{path} has inconsistent tensor shapes; the file is damaged.")
        stats = cls(dim, ridge=float(state["ridge"]))
        for i, c in enumerate(state["classes"].tolist()):
            stats.means[c] = means[i].to(torch.float64)
            stats.covariances[c] = covs[i].to(torch.float64)
            stats.counts[c] = int(state["counts"][i])
            stats.task_of_class[c] = int(state["tasks"][i])
        return stats
