"""Covariance storage and batched Gaussian sampling behind `ClassStatistics`.

Packed triangular factors, the blocked lower-triangle layout of the outer-product sums, the
factorisation of each covariance into its stored form (pivoted Cholesky for low-rank factors, PPCA
truncation, a Cholesky whose ridge grows until it succeeds), and the `SamplingPlan` that stacks
every class's factor once and draws all classes in a few batched matrix products. Everything here
takes tensors (per-class dicts of means and factors), not `ClassStatistics`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# How one class is stored: the packed lower Cholesky factor of its covariance, or a d x r factor
# plus a diagonal (ridge, residual or per-dimension variance).
KIND_CHOLESKY, KIND_FACTOR = 0, 1

# Work sizes (elements): one sampling step, and the factors of one chunk of classes.
_SAMPLE_STEP_ELEMENTS = 1 << 23
_PLAN_CHUNK_ELEMENTS = 1 << 25
_TRIANGULAR_BLOCKS = 8  # column blocks of a triangular factor product
_TRIANGULAR_MIN_DIM = 256  # below this one dense product is faster than the blocks


def _tril_indices(d: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return _cached_tril_indices(d, str(device))


@functools.lru_cache(maxsize=8)
def _cached_tril_indices(d: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):
        rows, cols = torch.tril_indices(d, d, device=device)
    return rows, cols


def packed_size(d: int) -> int:
    """Entries of a packed lower triangle of a d x d matrix."""
    return d * (d + 1) // 2


def factor_rank(factor: torch.Tensor, d: int) -> int:
    """Rank of a stored factor: d for a packed Cholesky factor, its column count for a d x r factor."""
    return d if factor.ndim == 1 else factor.shape[1]


def unpack_tril(packed: torch.Tensor, d: int) -> torch.Tensor:
    """[..., d(d+1)/2] row-major lower triangles -> [..., d, d] lower-triangular matrices."""
    rows, cols = _tril_indices(d, packed.device)
    out = packed.new_zeros(*packed.shape[:-1], d, d)
    out[..., rows, cols] = packed
    return out


class BlockLayout:
    """The lower block triangle of a d x d matrix in s x s blocks (the last block zero-padded).

    Outer-product sums are accumulated in it: each update is one batched in-place product per class
    (``blocks += X[:, I]^T X[:, J]`` for every block pair I >= J), with no d x d temporary and about
    half the memory of the dense matrix.
    """

    def __init__(self, d: int, block: int = 128):
        self.d = d
        self.s = min(block, d)
        self.b = -(-d // self.s)
        pairs = [(i, j) for i in range(self.b) for j in range(i + 1)]
        self.bi = torch.tensor([i for i, _ in pairs])
        self.bj = torch.tensor([j for _, j in pairs])
        self.numel = len(pairs) * self.s * self.s

    def accumulate(self, blocks: torch.Tensor, x: torch.Tensor) -> None:
        """blocks [num_pairs, s, s] += the lower block triangle of x^T x."""
        m = x.shape[0]
        width = self.b * self.s
        if width != self.d:
            x = torch.nn.functional.pad(x, (0, width - self.d))
        xb = x.view(m, self.b, self.s)
        left = xb[:, self.bi.to(x.device), :].permute(1, 2, 0)  # [pairs, s, m]
        right = xb[:, self.bj.to(x.device), :].transpose(0, 1)  # [pairs, m, s]
        blocks.baddbmm_(left, right)

    def to_dense(self, flat: torch.Tensor) -> torch.Tensor:
        """[k, numel] block triangles -> [k, d, d] symmetric matrices."""
        k, s = flat.shape[0], self.s
        blocks = flat.view(k, -1, s, s)
        out = flat.new_zeros(k, self.b * s, self.b * s)
        for t, (i, j) in enumerate(zip(self.bi.tolist(), self.bj.tolist(), strict=True)):
            out[:, i * s : (i + 1) * s, j * s : (j + 1) * s] = blocks[:, t]
            if i != j:
                out[:, j * s : (j + 1) * s, i * s : (i + 1) * s] = blocks[:, t].transpose(1, 2)
        return out[:, : self.d, : self.d]


def pivoted_cholesky(
    matrix: torch.Tensor, max_rank: torch.Tensor, tol: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched pivoted Cholesky of positive semi-definite [k, d, d] matrices.

    Returns F [k, d, R] (R = max(max_rank), columns past a matrix's rank are zero) and the ranks,
    with ``matrix ~= F F^T``: each step takes the largest remaining diagonal entry as pivot and
    stops at `max_rank` or when no remaining diagonal entry exceeds `tol`. Costs O(d r^2) per
    matrix instead of the O(d^3) of an eigendecomposition.
    """
    k, d, _ = matrix.shape
    steps = int(max_rank.max()) if k else 0
    factor_t = matrix.new_zeros(k, steps, d)  # F transposed: each step fills one contiguous row
    residual = matrix.diagonal(dim1=1, dim2=2).clone()
    rows = torch.arange(k, device=matrix.device)
    active = torch.ones(k, dtype=torch.bool, device=matrix.device)
    ranks = torch.zeros(k, dtype=torch.int64, device=matrix.device)
    for i in range(steps):
        value, pivot = residual.max(dim=1)
        active &= (value > tol) & (max_rank > i)
        if not bool(active.any()):
            break
        col = matrix[rows, pivot, :]  # symmetric: the pivot row is the pivot column
        if i:
            col = col - torch.bmm(factor_t[rows, :i, pivot].unsqueeze(1), factor_t[:, :i, :]).squeeze(1)
        col = col / value.clamp_min(torch.finfo(matrix.dtype).tiny).sqrt()[:, None]
        col = torch.where(active[:, None], col, torch.zeros_like(col))
        factor_t[:, i, :] = col
        residual -= col.square()
        residual[rows[active], pivot[active]] = 0.0
        ranks += active
    factor = factor_t.transpose(1, 2)
    return factor, ranks


def factorise(
    cov: torch.Tensor, n: torch.Tensor, names: list[int], *, form: str, ridge: float, rank: int | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stored factor and diagonal of each [d, d] covariance (without ridge) of a block, in the
    `form` `ClassStatistics` documents; `n` are the class counts, `rank` the low-rank truncation."""
    k, d, _ = cov.shape
    ridge_diag = torch.full((d,), ridge, dtype=cov.dtype, device=cov.device)
    if form == "diagonal":
        return [cov.new_zeros(d, 0)] * k, list(cov.diagonal(dim1=1, dim2=2) + ridge_diag)
    max_rank = (n - 1).clamp(min=0, max=d)
    if form == "full":
        low = torch.zeros(k, dtype=torch.bool, device=cov.device)
    elif form == "exact":
        low = max_rank * d < packed_size(d)
    else:
        low = torch.ones(k, dtype=torch.bool, device=cov.device)
    factors: list[torch.Tensor | None] = [None] * k
    noise: list[torch.Tensor | None] = [None] * k
    full_idx = (~low).nonzero().flatten().tolist()
    if full_idx:
        rows, cols = _tril_indices(d, cov.device)
        chol = cholesky_with_ridge(cov[full_idx], ridge, [names[i] for i in full_idx])
        for j, i in enumerate(full_idx):
            factors[i] = chol[j][rows, cols]
            noise[i] = torch.zeros_like(ridge_diag)
    low_idx = low.nonzero().flatten().tolist()
    if low_idx:
        sub = cov[low_idx]
        sub_rank = max_rank[low_idx]
        truncate = rank if form == "low_rank" else None
        # Rounding level of the cancellation in outer - n mu mu^T: below it there is no signal.
        scale = sub.diagonal(dim1=1, dim2=2).amax(dim=1)
        tol = scale * d * torch.finfo(cov.dtype).eps
        if truncate is None:
            f, ranks = pivoted_cholesky(sub, sub_rank, tol)
            for j, i in enumerate(low_idx):
                factors[i] = f[j, :, : int(ranks[j])].clone(memory_format=torch.contiguous_format)
                noise[i] = ridge_diag.clone()
        else:
            for j, i in enumerate(low_idx):
                factors[i], noise[i] = truncated_factor(sub[j], int(sub_rank[j]), truncate, tol[j], ridge_diag)
    return factors, noise


def truncated_factor(
    cov: torch.Tensor, max_rank: int, rank: int, tol: torch.Tensor, ridge: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` principal factor; the dropped variance is spread isotropically (PPCA)."""
    d = cov.shape[0]
    if max_rank < d:
        f, r = pivoted_cholesky(cov[None], torch.tensor([max_rank], device=cov.device), tol.reshape(1))
        f = f[0, :, : int(r[0])]
        if f.shape[1] <= rank:
            return f.clone(memory_format=torch.contiguous_format), ridge.clone()
        u, s, _ = torch.linalg.svd(f, full_matrices=False)
        eigvals, eigvecs = s.square(), u
    else:
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
        if int((eigvals > tol).sum()) <= rank:
            keep = eigvals > tol
            return eigvecs[:, keep] * eigvals[keep].sqrt(), ridge.clone()
    if rank >= d:
        return eigvecs * eigvals.sqrt(), ridge.clone()
    residual = (cov.diagonal().sum() - eigvals[:rank].sum()).clamp_min(0) / (d - rank)
    factor = eigvecs[:, :rank] * (eigvals[:rank] - residual).clamp_min(0).sqrt()
    return factor, ridge + residual


def cholesky_with_ridge(cov: torch.Tensor, ridge: float, names: list[int]) -> torch.Tensor:
    """Lower Cholesky factors of ``cov + ridge * I`` ([k, d, d]); a matrix that is not numerically
    positive definite gets a growing ridge, with a warning naming its class."""
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    factor, info = torch.linalg.cholesky_ex(cov + ridge * eye)
    for j in (info != 0).nonzero().flatten().tolist():
        grown = max(ridge, 1e-12 * float(cov[j].diagonal().abs().max()), 1e-300)
        while True:
            grown *= 10
            warnings.warn(
                f"covariance of class {names[j]} is not positive definite; using ridge {grown:g}*I.",
                stacklevel=3,
            )
            factor[j], bad = torch.linalg.cholesky_ex(cov[j] + grown * eye)
            if int(bad) == 0:
                break
    return factor


@dataclass
class _Chunk:
    """Consecutive classes [start, stop) of the plan sampled together: factors padded to the chunk's
    largest rank [k, d, r] (lower triangular for Cholesky factors, multiplied through their transposed
    view, which BLAS reads without a copy), noise standard deviations [k, 1, d] (None when no class of
    the chunk has a diagonal term)."""

    start: int
    stop: int
    classes: list[int]
    rank: int
    has_noise: bool
    triangular: bool = False  # Cholesky factors: F is lower triangular
    factors: torch.Tensor | None = None
    noise_std: torch.Tensor | None = None


@dataclass
class SamplingPlan:
    """Everything the sampler needs, stacked once per statistics version, device and dtype."""

    key: tuple
    classes: torch.Tensor  # [C] int64: the class of each row of `means` and of `sample`'s output
    tasks: torch.Tensor  # [C] int64, the task of each class
    means: torch.Tensor  # [C, d]
    chunks: list[_Chunk] = field(default_factory=list)
    cached: bool = True
    feature_dim: int = 0
    factors: Mapping[int, torch.Tensor] = field(default_factory=dict)  # read again for chunks over the cache
    noise: Mapping[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        means: Mapping[int, torch.Tensor],
        tasks: Mapping[int, int],
        factors: Mapping[int, torch.Tensor],
        noise: Mapping[int, torch.Tensor],
        *,
        feature_dim: int,
        key: tuple,
        device: torch.device,
        dtype: torch.dtype,
        cache_bytes: int,
    ) -> SamplingPlan:
        """Group the classes (keys of `means`: float64 [d] means, stored factors and [d] diagonals,
        their tasks) into chunks and, when they fit in `cache_bytes`, stack their factors."""
        d = feature_dim
        ranks = {c: factor_rank(f, d) for c, f in factors.items()}
        kinds = {c: KIND_CHOLESKY if f.ndim == 1 else KIND_FACTOR for c, f in factors.items()}
        has_noise = {c: bool((noise[c] != 0).any()) for c in factors}
        # Plan order: classes sorted by (kind, rank), so that runs of the same kind and similar rank
        # share a chunk (padding bounded to about 25% of the chunk's factor) and every chunk is a
        # contiguous block of the output. One batched product per chunk, no per-class loop.
        classes = sorted(means, key=lambda c: (kinds[c], ranks[c], c))
        stacked = torch.stack([means[c] for c in classes]) if classes else torch.zeros(0, d)
        plan = cls(
            key=key,
            classes=torch.tensor(classes, dtype=torch.int64).to(device),
            tasks=torch.tensor([tasks[c] for c in classes], dtype=torch.int64).to(device),
            means=stacked.to(device=device, dtype=dtype),
            feature_dim=d,
            factors=factors,
            noise=noise,
        )
        total = 0
        start = 0
        while start < len(classes):
            first = classes[start]
            low = high = ranks[first]
            stop = start + 1
            while stop < len(classes):
                c = classes[stop]
                lo, hi = min(low, ranks[c]), max(high, ranks[c])
                if (
                    kinds[c] != kinds[first]
                    or hi > 1.25 * lo + 8
                    or (stop - start + 1) * max(hi, 1) * d > _PLAN_CHUNK_ELEMENTS
                ):
                    break
                low, high, stop = lo, hi, stop + 1
            names = classes[start:stop]
            plan.chunks.append(
                _Chunk(start=start, stop=stop, classes=names, rank=high, has_noise=any(has_noise[c] for c in names),
                       triangular=kinds[first] == KIND_CHOLESKY)
            )
            total += len(names) * d * (high + 1) * torch.finfo(dtype).bits // 8
            start = stop
        plan.cached = total <= cache_bytes
        if plan.cached:
            for chunk in plan.chunks:
                chunk.factors, chunk.noise_std = plan._chunk_tensors(chunk, device, dtype)
        return plan

    def _chunk_tensors(
        self, chunk: _Chunk, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = self.feature_dim
        k = len(chunk.classes)
        factors = torch.zeros(k, d, chunk.rank, dtype=dtype)
        noise = torch.zeros(k, 1, d, dtype=dtype) if chunk.has_noise else None
        flat = None
        for i, c in enumerate(chunk.classes):  # once per plan, not per epoch (unless over the cache budget)
            f = self.factors[c]
            if f.ndim == 1:
                if flat is None:  # position of each packed entry in a row-major d x d matrix
                    rows, cols = _tril_indices(d)
                    flat = rows * d + cols
                # One scatter straight into the lower triangle (rows of the packed form stay contiguous).
                factors[i].view(-1).index_copy_(0, flat, f.to(dtype))
            else:
                factors[i, :, : f.shape[1]] = f
            if noise is not None:
                noise[i, 0] = self.noise[c].sqrt()
        return factors.to(device), None if noise is None else noise.to(device)

    @property
    def nbytes(self) -> int:
        total = self.means.numel() * self.means.element_size()
        for chunk in self.chunks:
            for t in (chunk.factors, chunk.noise_std):
                total += 0 if t is None else t.numel() * t.element_size()
        return total

    def sample(
        self, samples_per_class: int, generator: torch.Generator, mean_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[C, n, d] draws of every class, row i of class `classes[i]`:
        ``mean_scale * mu + F z1 + sqrt(noise) * z2`` (`mean_scale` is in the same order).

        A few batched products per chunk of classes; no Python loop over classes.
        """
        means = self.means
        device, dtype = means.device, means.dtype
        if mean_scale is not None:
            means = means * mean_scale.to(device=device, dtype=dtype)[:, None]
        num, dim = means.shape
        n = samples_per_class
        out = torch.empty(num, n, dim, device=device, dtype=dtype)
        for chunk in self.chunks:
            factors, noise_std = chunk.factors, chunk.noise_std
            if factors is None:  # over the cache budget: materialise this chunk for this call only
                factors, noise_std = self._chunk_tensors(chunk, device, dtype)
            step = max(1, _SAMPLE_STEP_ELEMENTS // max(1, n * max(dim, chunk.rank)))
            for lo in range(0, chunk.stop - chunk.start, step):
                hi = min(lo + step, chunk.stop - chunk.start)
                target = out[chunk.start + lo : chunk.start + hi]
                mu = means[chunk.start + lo : chunk.start + hi, None, :]
                if chunk.rank:
                    z = torch.randn(hi - lo, n, chunk.rank, generator=generator, device=device, dtype=dtype)
                    if chunk.triangular and dim >= _TRIANGULAR_MIN_DIM:
                        # z @ L^T with L lower triangular: output columns [a, b) only need L's rows
                        # [a, b) up to column b, which skips about 45 % of the product in 8 column
                        # blocks (same draws).
                        edges = [dim * i // _TRIANGULAR_BLOCKS for i in range(_TRIANGULAR_BLOCKS + 1)]
                        for a, b in zip(edges[:-1], edges[1:], strict=True):
                            target[..., a:b] = torch.baddbmm(mu[..., a:b], z[..., :b], factors[lo:hi, a:b, :b].mT)
                    else:
                        torch.baddbmm(mu, z, factors[lo:hi].mT, out=target)
                    del z
                else:
                    target.copy_(mu.expand(hi - lo, n, dim))
                if noise_std is not None:
                    target.addcmul_(
                        torch.randn(hi - lo, n, dim, generator=generator, device=device, dtype=dtype),
                        noise_std[lo:hi],
                    )
        return out
