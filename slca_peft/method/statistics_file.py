"""The class statistics file (`class_statistics.safetensors`), read and checked before it is trusted.

One float64/int64 tensor per field over the classes (`TENSORS`: classes, tasks, counts, means, the
ridge, each factor's kind and rank, the factors concatenated, the diagonal noise), with the
covariance form and rank in the safetensors metadata. The header's shapes and sizes are checked
before any tensor is read, so a crafted file cannot allocate memory; `ClassStatistics.load` builds
the statistics from what `read_statistics_file` returns.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..artifacts.safetensors_header import check_tensors, read_header
from ..artifacts.values import MAX_CLASSES, MAX_FEATURE_DIM, MAX_TASKS
from ..utils.errors import MissingFileError, UserError
from .covariance import KIND_CHOLESKY, KIND_FACTOR, packed_size

#: The tensors of a version-2 statistics file.
FORMAT_VERSION = "2"
TENSORS = {"classes", "tasks", "counts", "means", "ridge", "kinds", "ranks", "factors", "noise"}
_INTEGER_TENSORS = {"classes", "tasks", "counts", "kinds", "ranks"}
_INTEGER_CODES = {"I64", "I32"}
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
#: Bounds on the values a statistics file carries, checked at load (before any training uses them): the
#: ridge as `--ca_ridge` allows it, a class's sample count exact in float64.
MAX_RIDGE = 1e6
MAX_COUNT = 1 << 53


def file_metadata(covariance_form: str, covariance_rank: int | None) -> dict[str, str]:
    """The string metadata a statistics file records beside its tensors."""
    return {"format": "slca-peft class statistics", "version": FORMAT_VERSION, "covariance_form": covariance_form,
            "covariance_rank": "" if covariance_rank is None else str(covariance_rank)}


def _check_header(path: Path, feature_dim: int | None) -> None:
    """Refuse a statistics file whose header is inconsistent or declares more than its shapes allow,
    reading only the header (a crafted file must not allocate memory)."""
    header, _ = read_header(path)
    check_tensors(path, header, {k: _INTEGER_CODES if k in _INTEGER_TENSORS else _FLOAT_CODES for k in TENSORS},
                  max_bytes=1 << 62)
    shape = header["means"]["shape"]
    if len(shape) != 2 or shape[0] > MAX_CLASSES or not 0 < shape[1] <= MAX_FEATURE_DIM:
        raise UserError(f"{path} declares means of shape {shape}; the file is damaged.")
    num, dim = shape
    if feature_dim is not None and dim != feature_dim:
        raise UserError(f"{path} has {dim}-d statistics but the model's feature is {feature_dim}-d.")
    expected = {"classes": [num], "tasks": [num], "counts": [num], "kinds": [num], "ranks": [num],
                "noise": [num, dim]}
    bad = [k for k, v in expected.items() if header[k]["shape"] != v]
    factors = header["factors"]["shape"]
    if bad or len(factors) != 1 or factors[0] > num * max(packed_size(dim), dim * dim) \
            or header["ridge"]["shape"] not in ([], [1]):
        raise UserError(f"{path} has inconsistent tensor shapes ({bad or ['factors/ridge']}); the file is damaged.")


def read_statistics_file(path: Path, feature_dim: int | None, *, forms: tuple[str, ...],
                         ) -> tuple[dict[str, torch.Tensor], str, str, list[int]]:
    """The tensors of a statistics file, checked (header first, then dtypes, finiteness, shapes, factor
    kinds and sizes), with its covariance form (one of `forms`), its recorded rank (`""` for none) and
    each class's number of factor entries. Any inconsistency is a ValueError naming the file."""
    if not path.is_file():
        raise MissingFileError(f"{path} is missing; the checkpoint has no class statistics.")
    _check_header(path, feature_dim)  # shapes, dtypes and sizes, before any tensor is read
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise UserError(f"{path} is not a valid safetensors file ({err}); it may be truncated.") from err
    for key, tensor in state.items():
        if tensor.is_floating_point() == (key in _INTEGER_TENSORS):
            raise UserError(f"{path}: tensor {key} has unexpected dtype {tensor.dtype}; the file is damaged.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: tensor {key} has non-finite values; the file is damaged.")
    if set(state) != TENSORS:
        raise UserError(f"{path} holds tensors {sorted(state)}, expected {sorted(TENSORS)}.")
    means = state["means"]
    if means.ndim != 2:
        raise UserError(f"{path} has means of shape {tuple(means.shape)}; the file is damaged.")
    num, dim = means.shape
    if feature_dim is not None and dim != feature_dim:
        raise UserError(f"{path} has {dim}-d statistics but the model's feature is {feature_dim}-d.")
    form = metadata.get("covariance_form", "exact")
    rank = metadata.get("covariance_rank", "")
    if form not in forms or (rank and not rank.isdigit()):
        raise UserError(f"{path} records covariance_form={form!r}, covariance_rank={rank!r}; not supported.")
    kinds, ranks = state["kinds"], state["ranks"]
    if (
        any(state[k].shape != (num,) for k in _INTEGER_TENSORS)
        or state["noise"].shape != (num, dim)
        or state["factors"].ndim != 1
        or state["ridge"].numel() != 1
    ):
        raise UserError(f"{path} has inconsistent tensor shapes; the file is damaged.")
    if not bool(((kinds == KIND_CHOLESKY) & (ranks == dim) | (kinds == KIND_FACTOR) & (ranks >= 0)
                 & (ranks <= dim)).all()):
        raise UserError(f"{path} has invalid factor kinds or ranks; the file is damaged.")
    sizes = torch.where(kinds == KIND_CHOLESKY, packed_size(dim), ranks * dim).tolist()
    if sum(sizes) != state["factors"].numel():
        raise UserError(
            f"{path} has {state['factors'].numel()} factor entries, its ranks need {sum(sizes)}; "
            "the file is damaged."
        )
    if len(set(state["classes"].tolist())) != num:
        raise UserError(f"{path} lists a class twice; the file is damaged.")
    _check_values(path, state)
    return state, form, rank, sizes


def _check_values(path: Path, state: dict[str, torch.Tensor]) -> None:
    """The values a run would train with, bounded now rather than failing (or overflowing) after a task
    trained: the ridge, class positions, task ids and sample counts."""
    ridge = float(state["ridge"].reshape(-1)[0])
    problems = []
    if not 0.0 <= ridge <= MAX_RIDGE:
        problems.append(f"ridge {ridge:g} (allowed: 0 to {MAX_RIDGE:g}, as --ca_ridge)")
    for key, low, high in (("classes", 0, MAX_CLASSES - 1), ("tasks", 0, MAX_TASKS - 1), ("counts", 1, MAX_COUNT)):
        values = state[key]
        if values.numel() and not bool(((values >= low) & (values <= high)).all()):
            bad = values[(values < low) | (values > high)][0].item()
            problems.append(f"{key} value {bad} (allowed: {low} to {high})")
    if problems:
        raise UserError(f"{path} holds {'; '.join(problems)}; the file is damaged or was not written by slca-peft.")
