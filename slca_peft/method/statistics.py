"""`ClassStatistics`: per-class Gaussian feature statistics for classifier alignment.

Accumulation: features are streamed in batches and accumulated as float64 counts, sums and
outer-product sums (the outer sums as their lower block triangle). Those three are additive, so
shards on several processes reduce exactly by summation (`finalize(reduce=...)`: one all-reduce for
the counts, then one per block of classes) and no feature matrix is ever gathered.

Storage: `finalize` factorises each class covariance once, into the most compact form the
`covariance_form` allows, and keeps only the factor:

* ``"exact"`` (default): a class with n samples has a scatter matrix of rank r <= min(n - 1, d).
  When r * d is smaller than the d(d+1)/2 entries of a triangular factor (n - 1 < (d + 1) / 2, the
  usual case on CUB-200 and ImageNet-R) it stores a d x r factor F with Sigma = F F^T + ridge * I
  (pivoted Cholesky, exact up to rounding); otherwise the packed lower Cholesky factor L of
  Sigma = L L^T. Either way `covariances[c]` is the same matrix as the plain formula.
* ``"full"``: always the packed Cholesky factor of the full covariance.
* ``"low_rank"``: a factor of rank at most `covariance_rank` (the top principal directions) plus the
  ridge and, when directions are dropped, their mean variance spread isotropically (probabilistic
  PCA: the trace is kept). With ``covariance_rank=None`` the factor is exact (rank up to d).
* ``"diagonal"``: the per-dimension variances only (plus the ridge); correlations are dropped.

Sampling (`sampling_plan(...).sample`) draws every class in a few batched matrix products:
``mu + F z1 + sqrt(noise) * z2``. The file format is `statistics_file`'s.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors.torch import save_file

from ..artifacts.layout import STATISTICS_FILE
from ..utils.errors import UserError, check_choice
from .covariance import (
    KIND_CHOLESKY,
    KIND_FACTOR,
    BlockLayout,
    SamplingPlan,
    cholesky_with_ridge,
    factor_rank,
    factorise,
    unpack_tril,
)
from .statistics_file import file_metadata, read_statistics_file

logger = logging.getLogger(__name__)

COVARIANCE_FORMS = ("exact", "full", "low_rank", "diagonal")
_FINALIZE_BLOCK_ELEMENTS = 1 << 24  # work size (elements): classes per finalize block


class ClassStatistics:
    """Mean and covariance (unbiased, float64, plus a ridge) of every class seen so far.

    Old classes are never recomputed: their data is gone once their task ends, so updating one
    raises instead of silently mixing new-task features into an old Gaussian.

    Args:
        feature_dim: d, the feature size.
        ridge: added to every covariance's diagonal.
        covariance_form: how covariances are stored after `finalize` (module docstring): "exact"
            (default; low-rank factor + ridge or full Cholesky, whichever is smaller), "full",
            "low_rank" (with `covariance_rank`, truncated) or "diagonal".
        covariance_rank: maximum factor rank for ``covariance_form="low_rank"`` (None: exact).
    """

    #: Largest sampling plan (stacked factors on the sampling device) kept between calls.
    sampling_cache_bytes: int = 2 << 30

    def __init__(
        self,
        feature_dim: int,
        ridge: float = 1e-4,
        covariance_form: str = "exact",
        covariance_rank: int | None = None,
    ):
        check_choice("covariance_form", covariance_form, COVARIANCE_FORMS)
        if covariance_rank is not None and covariance_form != "low_rank":
            raise UserError(f"covariance_rank applies to covariance_form='low_rank', not {covariance_form!r}.")
        if covariance_rank is not None and int(covariance_rank) < 1:
            raise UserError(f"covariance_rank must be >= 1, got {covariance_rank}.")
        covariance_rank = None if covariance_rank is None else int(covariance_rank)
        self.feature_dim = feature_dim
        self.ridge = ridge
        self.covariance_form = covariance_form
        self.covariance_rank = covariance_rank
        self.means: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.task_of_class: dict[int, int] = {}
        # class -> float64 factor: packed lower Cholesky [d(d+1)/2] (KIND_CHOLESKY) or [d, r] (KIND_FACTOR)
        self._factors: dict[int, torch.Tensor] = {}
        self._noise: dict[int, torch.Tensor] = {}  # class -> float64 [d] diagonal added to F F^T
        # class -> [count, sum (d), outer-sum lower block triangle], float64, additive across processes
        self._pending: dict[int, torch.Tensor] = {}
        self._reopened: dict[int, int] = {}  # class -> its task, for classes `reopen` made pending again
        self._layout = BlockLayout(feature_dim)
        self._version = 0
        self._plan: SamplingPlan | None = None

    # ------------------------------------------------------------------ accumulate
    @torch.inference_mode()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of features of the task being learned (float64 accumulation)."""
        d = self.feature_dim
        if features.ndim != 2 or features.shape[1] != d:
            raise UserError(f"features must be [batch, {d}], got {tuple(features.shape)}.")
        feats = features.detach().to(torch.float64)
        labels = labels.detach().reshape(-1).to(feats.device)
        if labels.shape[0] != feats.shape[0]:
            raise UserError(f"{feats.shape[0]} features but {labels.shape[0]} labels.")
        finite = torch.isfinite(feats).all(dim=1)
        if not bool(finite.all()):
            bad = sorted({int(c) for c in labels[~finite].tolist()})
            raise UserError(f"non-finite features for class(es) {bad}; check the inputs and the backbone.")
        if labels.numel() == 0:
            return
        sorted_labels, order = torch.sort(labels)
        classes, sizes = torch.unique_consecutive(sorted_labels, return_counts=True)
        classes, sizes = [int(c) for c in classes.tolist()], sizes.tolist()
        for cls in classes:
            if cls in self.means:
                raise UserError(
                    f"class {cls} already has statistics from task {self.task_of_class[cls]}; statistics of "
                    "old classes are never recomputed. Feed only the current task's classes."
                )
        feats = feats.index_select(0, order)
        layout = self._layout
        start = 0
        for cls, size in zip(classes, sizes, strict=True):
            x = feats[start : start + size]
            start += size
            acc = self._pending.get(cls)
            if acc is None:
                acc = torch.zeros(1 + d + layout.numel, dtype=torch.float64, device=feats.device)
                self._pending[cls] = acc
            acc[0] += size
            acc[1 : 1 + d] += x.sum(dim=0)
            layout.accumulate(acc[1 + d :].view(-1, layout.s, layout.s), x)

    @torch.no_grad()
    def finalize(
        self,
        task_id: int,
        classes: list[int] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[int]:
        """Turn the accumulated sums into means and factorised covariances for `task_id`'s classes.

        `classes` lists every class of the task so that all processes reduce the same tensors even
        when a shard saw no sample of some class; `reduce` sums a tensor across processes (called
        once for the counts, then once per block of classes, in the same order on every process).
        """
        classes = sorted(classes if classes is not None else self._pending)
        if not classes:
            return []
        d = self.feature_dim
        width = d + self._layout.numel
        device = next(iter(self._pending.values())).device if self._pending else torch.device("cpu")
        counts = torch.zeros(len(classes), dtype=torch.float64, device=device)
        for i, cls in enumerate(classes):
            if cls in self._pending:
                counts[i] = self._pending[cls][0]
        if reduce is not None:
            counts = reduce(counts)
        counts_list = [int(round(c)) for c in counts.tolist()]
        for cls, n in zip(classes, counts_list, strict=True):
            if n == 0:
                raise UserError(
                    f"class {cls} of task {task_id} has no training sample; every class of a task needs "
                    "at least one image to get alignment statistics."
                )
            if n == 1:
                warnings.warn(
                    f"class {cls} has a single training image: its covariance is undefined, so only the "
                    f"ridge {self.ridge}*I is used. Add images of this class for a meaningful Gaussian.",
                    stacklevel=2,
                )
        block = max(1, _FINALIZE_BLOCK_ELEMENTS // (d * d))
        for lo in range(0, len(classes), block):
            names = classes[lo : lo + block]
            acc = torch.zeros(len(names), width, dtype=torch.float64, device=device)
            for i, cls in enumerate(names):
                if cls in self._pending:
                    acc[i] = self._pending[cls][1:]
            if reduce is not None:
                acc = reduce(acc)
            n = torch.tensor(counts_list[lo : lo + block], dtype=torch.float64, device=device)
            means = acc[:, :d] / n[:, None]
            cov = self._layout.to_dense(acc[:, d:])  # outer sums; in place: outer - n mu mu^T, / (n - 1)
            cov.baddbmm_(-(n[:, None] * means)[:, :, None], means[:, None, :])
            cov.div_((n - 1).clamp_min(1)[:, None, None])
            cov[n < 2] = 0.0  # a single sample has no spread: only the ridge remains
            factors, noise = factorise(cov, n.long(), names, form=self.covariance_form, ridge=self.ridge,
                                       rank=self.covariance_rank)
            for i, cls in enumerate(names):
                self.means[cls] = means[i].cpu().clone()
                self._factors[cls] = factors[i].cpu()
                self._noise[cls] = noise[i].cpu()
                self.counts[cls] = counts_list[lo + i]
                self.task_of_class[cls] = self._reopened.pop(cls, task_id)
                self._pending.pop(cls, None)
            del acc, cov
        self._changed()
        return classes

    @torch.no_grad()
    def reopen(self, classes: list[int], *, sums: bool = True, device: torch.device | str = "cpu") -> None:
        """Accept more samples of finalized classes (a class's images arriving with later data).

        Each class's count, sum and outer-product sum go back to the accumulators, rebuilt from its mean
        and covariance (``n mu`` and ``(n - 1) Sigma + n mu mu^T``, Sigma without the ridge): exact up to
        rounding for the "exact" and "full" forms, the stored approximation for "low_rank" and "diagonal".
        `update` then adds the new samples and `finalize` refactorises the class, keeping its task. Pass
        ``sums=False`` on every process but one, so that a reduction across processes counts the old
        samples once.
        """
        for cls in classes:
            if cls not in self.means:
                raise UserError(f"class {cls} has no statistics to add samples to.")
        d, layout = self.feature_dim, self._layout
        width = layout.b * layout.s
        for cls in classes:
            acc = torch.zeros(1 + d + layout.numel, dtype=torch.float64, device=device)
            if sums:
                n, mean = self.counts[cls], self.means[cls].to(device, torch.float64)
                scatter = (self.covariance(cls).to(device) - self.ridge * torch.eye(d, dtype=torch.float64,
                                                                                   device=device)) * (n - 1)
                outer = torch.zeros(width, width, dtype=torch.float64, device=device)
                outer[:d, :d] = scatter + n * torch.outer(mean, mean)
                blocks = acc[1 + d :].view(-1, layout.s, layout.s)
                for t, (i, j) in enumerate(zip(layout.bi.tolist(), layout.bj.tolist(), strict=True)):
                    blocks[t] = outer[i * layout.s : (i + 1) * layout.s, j * layout.s : (j + 1) * layout.s]
                acc[0] = n
                acc[1 : 1 + d] = n * mean
            self._reopened[cls] = self.task_of_class.pop(cls)
            for store in (self.means, self.counts, self._factors, self._noise):
                store.pop(cls)
            self._pending[cls] = acc
        self._changed()

    def _changed(self) -> None:
        self._version += 1
        self._plan = None

    # ------------------------------------------------------------------ access
    @property
    def classes(self) -> list[int]:
        return sorted(self.means)

    @property
    def covariances(self) -> Mapping[int, torch.Tensor]:
        """class -> float64 [d, d] covariance (ridge included), materialised from its factor on access."""
        return _CovarianceView(self)

    @property
    def ranks(self) -> dict[int, int]:
        """class -> rank of its stored factor (d for a full Cholesky factor, 0 for a diagonal)."""
        return {c: factor_rank(f, self.feature_dim) for c, f in self._factors.items()}

    @property
    def factors(self) -> Mapping[int, torch.Tensor]:
        """class -> stored float64 factor: packed lower Cholesky [d(d+1)/2] or [d, r] (read-only)."""
        return MappingProxyType(self._factors)

    @property
    def noise(self) -> Mapping[int, torch.Tensor]:
        """class -> float64 [d] diagonal added to ``F F^T`` (zero beside a Cholesky factor; read-only)."""
        return MappingProxyType(self._noise)

    def covariance(self, cls: int) -> torch.Tensor:
        """The float64 [d, d] covariance of a class: ``L L^T`` or ``F F^T + diag(noise)``."""
        factor = self._factors[cls]
        if factor.ndim == 1:
            lower = unpack_tril(factor, self.feature_dim)
            return lower @ lower.T
        return factor @ factor.T + torch.diag(self._noise[cls])

    def cholesky(self, cls: int) -> torch.Tensor:
        """Lower Cholesky factor of a class covariance (float64 [d, d])."""
        factor = self._factors[cls]
        if factor.ndim == 1:
            return unpack_tril(factor, self.feature_dim)
        without_ridge = self.covariance(cls) - self.ridge * torch.eye(self.feature_dim, dtype=torch.float64)
        return cholesky_with_ridge(without_ridge[None], self.ridge, [cls])[0]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: finalised statistics, pending accumulators, and the cached sampling plan."""

        def size(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)

        stored = size(self.means.values()) + size(self._factors.values()) + size(self._noise.values())
        plan = self._plan.nbytes if self._plan is not None else 0
        return {"statistics": stored, "pending": size(self._pending.values()), "sampling_plan": plan}

    # ------------------------------------------------------------------ sampling
    def sampling_plan(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> SamplingPlan:
        """Stacked means and factors of all classes on `device`, built once per finalize (cached
        while its factors fit in `sampling_cache_bytes`; larger ones are stacked chunk by chunk at
        every `sample` call instead)."""
        device = torch.device(device)
        key = (self._version, str(device), dtype)
        if self._plan is None or self._plan.key != key:
            self._plan = None  # free the old plan's tensors before stacking the new one
            self._plan = SamplingPlan.build(
                self.means, self.task_of_class, self.factors, self.noise, feature_dim=self.feature_dim, key=key,
                device=device, dtype=dtype, cache_bytes=self.sampling_cache_bytes,
            )
        return self._plan

    def sample(
        self,
        samples_per_class: int,
        generator: torch.Generator,
        mean_scale: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """[C, n, d] samples of every class on the generator's device, in the order of
        ``sampling_plan(generator.device).classes``."""
        return self.sampling_plan(generator.device, dtype).sample(samples_per_class, generator, mean_scale)

    # ------------------------------------------------------------------ files
    def state_dict(self) -> dict[str, torch.Tensor]:
        classes = self.classes
        d = self.feature_dim
        factors = [self._factors[c].reshape(-1) for c in classes]
        ranks = self.ranks
        empty = torch.zeros(0, d, dtype=torch.float64)
        return {
            "classes": torch.tensor(classes, dtype=torch.int64),
            "tasks": torch.tensor([self.task_of_class[c] for c in classes], dtype=torch.int64),
            "counts": torch.tensor([self.counts[c] for c in classes], dtype=torch.int64),
            "means": torch.stack([self.means[c] for c in classes]) if classes else empty,
            "ridge": torch.tensor(self.ridge, dtype=torch.float64),
            "kinds": torch.tensor(
                [KIND_CHOLESKY if self._factors[c].ndim == 1 else KIND_FACTOR for c in classes], dtype=torch.int64
            ),
            "ranks": torch.tensor([ranks[c] for c in classes], dtype=torch.int64),
            "factors": torch.cat(factors) if factors else torch.zeros(0, dtype=torch.float64),
            "noise": torch.stack([self._noise[c] for c in classes]) if classes else empty,
        }

    def metadata(self) -> dict[str, str]:
        return file_metadata(self.covariance_form, self.covariance_rank)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / STATISTICS_FILE
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, directory: str | Path, feature_dim: int | None = None) -> ClassStatistics:
        state, form, rank, sizes = read_statistics_file(Path(directory) / STATISTICS_FILE, feature_dim,
                                                         forms=COVARIANCE_FORMS)
        kinds, means = state["kinds"], state["means"]
        dim = means.shape[1]
        stats = cls(dim, ridge=float(state["ridge"]), covariance_form=form,
                    covariance_rank=int(rank) if rank and form == "low_rank" else None)
        flat = state["factors"].to(torch.float64)
        start = 0
        for i, c in enumerate(state["classes"].tolist()):
            chunk = flat[start : start + sizes[i]]
            start += sizes[i]
            stats._factors[c] = chunk.clone() if int(kinds[i]) == KIND_CHOLESKY else chunk.reshape(dim, -1).clone()
            stats._noise[c] = state["noise"][i].to(torch.float64).clone()
            stats._set_class(c, means[i], int(state["counts"][i]), int(state["tasks"][i]))
        stats._changed()
        return stats

    def _set_class(self, cls: int, mean: torch.Tensor, count: int, task: int) -> None:
        self.means[cls] = mean.to(torch.float64).clone()
        self.counts[cls] = count
        self.task_of_class[cls] = task


class _CovarianceView(Mapping):
    """Read-only mapping class -> float64 [d, d] covariance, materialised from the factor on access."""

    def __init__(self, stats: ClassStatistics):
        self._stats = stats

    def __getitem__(self, cls: int) -> torch.Tensor:
        if cls not in self._stats.factors:
            raise KeyError(cls)
        return self._stats.covariance(cls)

    def __iter__(self) -> Iterator[int]:
        return iter(self._stats.classes)

    def __len__(self) -> int:
        return len(self._stats.factors)

    def __contains__(self, cls: object) -> bool:
        return cls in self._stats.factors
