"""Bounds on a PEFT config read from a file, checked before PEFT builds (and allocates) anything.

A PEFT config is data: `slca_config.json`'s `peft_config` or a `--peft_config FILE.json`. Its size
fields decide how much memory the adapter takes (a `rank_pattern` of 10^6, a VBLoRA bank of 10^9
vectors), its patterns are regular expressions PEFT runs on every module name, and JSON allows `NaN`.
`check_peft_fields` refuses, naming the field, what no backbone could use (non-finite numbers,
non-integer sizes, regexes that can backtrack without bound, huge lists); `check_peft_sizes` bounds
every size field by the shapes of the backbone it is applied to.

Regexes: Python's `re` backtracks, so `(.*)*x` takes exponential time and `.*.*.*.*.*x` a high
power of the name's length. A pattern is accepted only if no repeat holds another repeat or an
alternation, it has no back-reference, and it has at most a few repeats of more than one item
(PEFT adds its own `.*` around some patterns, counted here): matching is then polynomial of low
degree in the module name's length, milliseconds for any backbone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from ..artifacts.values import check_int
from ..utils.errors import UserError

try:  # Python >= 3.11
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

MAX_PATTERN_LENGTH = 1024
MAX_LIST_LENGTH = 1024
#: Largest rank, dimension and element count a file may name before the backbone is known
#: (`MAX_RANK` is `slca_peft.models.config.MAX_LORA_RANK`, the bound on `lora_rank`).
MAX_RANK = 4096
MAX_SIZE = 1 << 16
MAX_ELEMENTS = 1 << 32
#: Largest magnitude of a scale (`lora_alpha`, `alpha_pattern` values, ...): finite, far above any use.
MAX_SCALE = 1e6
#: Repeats of more than one item allowed in a pattern, and repeats of any kind (`?` included).
MAX_WIDE_REPEATS = 3
MAX_REPEATS = 8
#: Counts of sub-adapters (Poly's skills and tasks, BOFT's butterfly factor, X-LoRA's depth): small by design.
MAX_COUNT = 64

#: Size fields bounded by the largest rank a backbone weight has (`min(out, in)`).
RANK_FIELDS = ("r", "init_r", "target_r", "hybrid_r", "mini_r", "subspace_rank", "effective_rank", "topk", "u")
#: Size fields bounded by the largest dimension of a backbone weight (`max(out, in)`).
DIM_FIELDS = ("oft_block_size", "boft_block_size", "boft_block_num", "block_size", "group_size", "vector_length",
              "decompose_factor", "theta_d_length", "stride_A", "num_B", "gralora_k", "num_subspaces", "n_splits",
              "asa_target_subspaces")
#: Size fields bounded by the largest number of elements of a backbone weight.
NUMEL_FIELDS = ("n_frequency",)
COUNT_FIELDS = ("n_skills", "n_tasks", "boft_n_butterfly_factor", "num_cayley_neumann_terms", "xlora_depth",
                "psoft_svd_lowrank_niter", "loftq_bits", "loftq_iter")
#: Per-module overrides: {pattern: value}, the value bounded like the named field.
PATTERN_FIELDS = {"rank_pattern": "r", "block_size_pattern": "block_size", "n_frequency_pattern": "n_frequency",
                  "alpha_pattern": "alpha", "lambda_pattern": "alpha", "target_svd_config": "r"}
SCALE_FIELDS = ("lora_alpha", "alpha", "scaling", "delora_lambda", "psoft_alpha", "randlora_alpha", "shadow_alpha",
                "init_scale", "d_initial", "softmax_temperature", "global_scaling_weight")
#: Fields PEFT puts inside a regex, and how many wide repeats (`.*`, `\d+`) it adds around them.
REGEX_FIELDS = {"target_modules": 0, "exclude_modules": 0, "layers_pattern": 2, "modules_to_save": 2}
PATTERN_KEY_WRAP = 1  # PEFT matches a *_pattern key as `(.*\.)?(key)$`


class _Counts:
    def __init__(self) -> None:
        self.repeats = 0
        self.wide = 0


def _walk(items: Iterable[Any], in_repeat: bool, counts: _Counts) -> str | None:
    """The first construct that makes matching blow up, or None."""
    for op, av in items:
        if op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT,
                  getattr(sre_constants, "POSSESSIVE_REPEAT", sre_constants.MAX_REPEAT)):
            low, high, body = av
            if in_repeat:
                return "a repeat inside a repeat (e.g. (.*)* or (a?){9})"
            counts.repeats += 1
            counts.wide += high > 1
            problem = _walk(body, high > 1, counts)
        elif op is sre_constants.SUBPATTERN:
            problem = _walk(av[-1], in_repeat, counts)
        elif op is sre_constants.BRANCH:
            if in_repeat:
                return "an alternation inside a repeat (e.g. (a|ab)*)"
            problem = next(filter(None, (_walk(branch, in_repeat, counts) for branch in av[1])), None)
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            problem = _walk(av[1], in_repeat, counts)
        elif op is getattr(sre_constants, "ATOMIC_GROUP", None):
            problem = _walk(av, in_repeat, counts)
        elif op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
            return "a back-reference"
        else:
            continue
        if problem:
            return problem
    return None


def check_pattern(name: str, pattern: Any, added_repeats: int = 0) -> str:
    """A module-name regex whose matching time is bounded (see the module docstring), else `ValueError`."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_LENGTH:
        raise UserError(f"{name} must be a string of at most {MAX_PATTERN_LENGTH} characters.")
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise UserError(f"{name} {pattern!r} is not a valid regular expression ({err}).") from None
    counts = _Counts()
    problem = _walk(parsed, False, counts)
    if problem is None and counts.wide + added_repeats > MAX_WIDE_REPEATS:
        problem = f"more than {MAX_WIDE_REPEATS - added_repeats} repeats such as .* or \\d+"
    if problem is None and counts.repeats > MAX_REPEATS:
        problem = f"more than {MAX_REPEATS} repeats"
    if problem:
        raise UserError(f"{name} {pattern!r} has {problem}, which can make regex matching take hours; list the "
                         "module names instead (e.g. [\"q_proj\", \"v_proj\"]) or use a pattern like "
                         "'.*\\.(q_proj|v_proj)'.")
    return pattern


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}.")


def _walk_values(name: str, value: Any, depth: int = 0) -> None:
    """Every number finite, every list and string bounded, at any depth."""
    if depth > 8:
        raise UserError(f"{name} is nested deeper than any PEFT config field.")
    if isinstance(value, dict):
        if len(value) > MAX_LIST_LENGTH:
            raise UserError(f"{name} has {len(value)} entries, more than the {MAX_LIST_LENGTH} allowed.")
        for key, item in value.items():
            _walk_values(f"{name}[{key!r}]", item, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        if len(value) > MAX_LIST_LENGTH:
            raise UserError(f"{name} has {len(value)} entries, more than the {MAX_LIST_LENGTH} allowed.")
        for i, item in enumerate(value):
            _walk_values(f"{name}[{i}]", item, depth + 1)
    elif isinstance(value, str) and len(value) > MAX_PATTERN_LENGTH * 4:
        raise UserError(f"{name} is a string of {len(value)} characters, more than {MAX_PATTERN_LENGTH * 4}.")
    else:
        _check_number(name, value)


def _fields(data: dict[str, Any]) -> Iterable[tuple[str, str, Any]]:
    """(field kind, displayed name, value) of every size and scale value, patterns' values included."""
    for key, value in data.items():
        if value is None:
            continue
        if key in PATTERN_FIELDS and isinstance(value, dict):
            for pattern, item in value.items():
                yield PATTERN_FIELDS[key], f"peft_config.{key}[{pattern!r}]", item
        else:
            yield key, f"peft_config.{key}", value


def check_peft_fields(data: dict[str, Any]) -> None:
    """Refuse, naming the field, what no backbone can use: a non-finite number, a size that is not a
    whole number below MAX_RANK / MAX_SIZE / MAX_ELEMENTS, a scale beyond MAX_SCALE, a huge list, a
    regex that can backtrack without bound. Runs on the dict, before PEFT builds a config from it."""
    for key, value in data.items():
        _walk_values(f"peft_config.{key}", value)
    for key, wrap in REGEX_FIELDS.items():
        value = data.get(key)
        if isinstance(value, str) and (key != "target_modules" or value != "all-linear"):
            check_pattern(f"peft_config.{key}", value, wrap)
        elif isinstance(value, (list, tuple, set)) and key in ("layers_pattern", "modules_to_save"):
            for item in value:
                check_pattern(f"peft_config.{key} entry", item, wrap)
    for key in PATTERN_FIELDS:
        if isinstance(data.get(key), dict):
            for pattern in data[key]:
                check_pattern(f"peft_config.{key} key", pattern, PATTERN_KEY_WRAP)
    for kind, name, value in _fields(data):
        if kind == "effective_rank" and isinstance(value, float):  # OSF: a fraction of the weight's rank
            if not 0.0 < value <= 1.0:
                raise UserError(f"{name} as a fraction must be in (0, 1], got {value}.")
        elif kind in RANK_FIELDS or kind in DIM_FIELDS or kind in NUMEL_FIELDS or kind == "num_vectors":
            high = MAX_RANK if kind in RANK_FIELDS else MAX_SIZE if kind in DIM_FIELDS else MAX_ELEMENTS
            # a rank `r` of 0 (or in rank_pattern) is an adapter PEFT refuses only when it builds the layers
            low = -1 if kind == "decompose_factor" else 1 if kind == "r" else 0
            check_int(name, value, low, high)
        elif kind in COUNT_FIELDS:
            check_int(name, value, 0, MAX_COUNT)
        elif kind in SCALE_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > MAX_SCALE:
                raise UserError(f"{name} must be a number in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {value!r}.")


def check_peft_sizes(data: dict[str, Any], shapes: dict[str, int], backbone: str) -> None:
    """Bound every size field by the backbone's weights: `shapes` holds `rank` (largest min(out, in)),
    `dim` (largest max(out, in)), `numel` (largest weight) and `total` (all parameters)."""
    caps = {"rank": (shapes["rank"], f" (the largest rank of a weight of {backbone})"),
            "dim": (shapes["dim"], f" (the largest dimension of a weight of {backbone})"),
            "numel": (shapes["numel"], f" (the size of the largest weight of {backbone})")}
    for kind, name, value in _fields(data):
        if kind == "effective_rank" and isinstance(value, float):
            continue
        cap = "rank" if kind in RANK_FIELDS else "dim" if kind in DIM_FIELDS else "numel" if kind in NUMEL_FIELDS \
            else None
        if cap is not None:
            check_int(name, value, -1 if kind == "decompose_factor" else 0, *caps[cap])
    vectors, length = data.get("num_vectors"), data.get("vector_length")
    if isinstance(vectors, int) and isinstance(length, int) and vectors * length > shapes["total"]:
        raise UserError(f"peft_config.num_vectors x vector_length = {vectors} x {length} makes a vector bank larger "
                         f"than {backbone} itself ({shapes['total']} parameters); lower num_vectors.")
