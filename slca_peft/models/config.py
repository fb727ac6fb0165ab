"""`SLCAModelConfig`: the one place that lists what an `SLCAModel` is made of.

It is what `slca_config.json` holds. `from_dict` checks every field's type and range before
anything is built, so a crafted file (a LoRA rank of fifty million, a task of two billion classes)
is refused with an error instead of allocating the memory it asks for.
"""

from __future__ import annotations

import logging
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from ..utils.errors import check_choice, read_json
from ..utils.files import STATE_FILE
from .peft_limits import MAX_RANK, check_int, check_peft_fields

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1

#: LoRA targets of the paper's setting (transformers v5 ViT family names).
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
LORA_LAYOUTS = ("per_projection", "fused_qkv")

# Bounds far above any real model, far below what would exhaust memory (files and statistics alike).
MAX_LORA_RANK = MAX_RANK
MAX_FEATURE_DIM = 1 << 16
MAX_CLASSES = 1 << 20
MAX_TASKS = 10_000
MAX_NAMES = 1024
MAX_NAME_LENGTH = 1024
#: (low, high), both allowed, of the bounded numeric settings: checked on every file and, for those a
#: training run chooses, when `SLCAConfig` is parsed.
BOUNDS = {"lora_rank": (1, MAX_LORA_RANK), "lora_scale": (0.0, 1e4), "final_norm_eps": (0.0, 1.0)}


def _fail(name: str, problem: str) -> ValueError:
    return ValueError(f"{name} {problem}")


def check_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, f"must be a finite number, got {value!r}.")
    if not low <= value <= high:
        raise _fail(name, f"must be in [{low}, {high}], got {value}.")
    return float(value)


def check_str(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH * 4:
        raise _fail(name, f"must be a string (at most {MAX_NAME_LENGTH * 4} characters), got {type(value).__name__}.")
    return value


def check_list(name: str, value: Any, max_len: int) -> list:
    if not isinstance(value, (list, tuple)):
        raise _fail(name, f"must be a list, got {type(value).__name__}.")
    if len(value) > max_len:
        raise _fail(name, f"has {len(value)} entries, more than the {max_len} allowed.")
    return list(value)


def check_int_list(name: str, value: Any, low: int, high: int, max_len: int) -> list[int]:
    return [check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(check_list(name, value, max_len))]


def check_str_list(name: str, value: Any, max_len: int) -> list[str]:
    items = check_list(name, value, max_len)
    for i, v in enumerate(items):
        if not isinstance(v, str) or len(v) > MAX_NAME_LENGTH:
            raise _fail(f"{name}[{i}]", f"must be a string of at most {MAX_NAME_LENGTH} characters.")
    return items


def check_class_ids(name: str, value: Any) -> list[int]:
    """Class ids: unique integers in [0, MAX_CLASSES)."""
    ids = check_int_list(name, value, 0, MAX_CLASSES - 1, MAX_CLASSES)
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise _fail(name, f"repeats the class id(s) {repeated}; every output needs its own class id.")
    return ids


def fit_class_ids(ids: list[int] | None, num_classes: int) -> list[int] | None:
    """`ids` for a head of `num_classes` outputs: outputs added since take the next free ids
    (max + 1, ...); a class never changes id. None (files written before class ids) stays None."""
    if ids is None:
        return None
    ids = list(ids[:num_classes])
    start = max(ids, default=-1) + 1
    return ids + list(range(start, start + num_classes - len(ids)))


def names_by_class_id(label_names: list[str] | None, class_ids: list[int]) -> dict[int, str]:
    """Output k -> the name of class id k, for every id up to the largest (`label_names` in position
    order, `class_ids` position -> id): a learned class's name (`class_<id>` when none is known), and
    `class_<k>` for an id no output has yet (a class not learned yet, mid-stream)."""
    names = label_names or []
    known = {i: names[p] if p < len(names) else f"class_{i}" for p, i in enumerate(class_ids)}
    return {k: known.get(k, f"class_{k}") for k in range(max(class_ids, default=-1) + 1)}


@dataclass
class SLCAModelConfig:
    """Settings that rebuild an `SLCAModel` around its referenced base model.

    `base_model_name_or_path` is a Hub id or an absolute path (never relative, so the files load from
    any working directory). `label_names` are the class names in position (output) order, when known;
    `class_ids` the class id of each output position (the dataset's label id, see `stream_class_ids`),
    None for files written before class ids existed (read as the identity).
    """

    base_model_name_or_path: str | None = None
    revision: str | None = None
    use_lora: bool = True
    lora_rank: int = 4
    lora_scale: float = 0.8
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lora_svd_init: bool = True
    lora_layout: str = "per_projection"
    reset_final_norm: bool = False
    final_norm_eps: float = 1e-5
    task_sizes: list[int] = field(default_factory=list)
    feature_dim: int | None = None
    feature_source: str | None = None
    label_names: list[str] | None = None
    #: Position -> class id: output p of the model is the class the dataset labels `class_ids[p]`.
    class_ids: list[int] | None = None
    #: A user's PEFT config as `PeftConfig.to_dict()` (JSON), or None for the built-in LoRA.
    peft_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse any field of the wrong type or out of range, naming it."""
        check_str("base_model_name_or_path", self.base_model_name_or_path, optional=True)
        check_str("revision", self.revision, optional=True)
        if self.lora_layout not in LORA_LAYOUTS:
            raise _fail("lora_layout", f"must be 'per_projection' or 'fused_qkv', got {self.lora_layout!r}.")
        check_float("final_norm_eps", self.final_norm_eps, *BOUNDS["final_norm_eps"])
        for name in ("use_lora", "lora_svd_init", "reset_final_norm"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, f"must be true or false, got {getattr(self, name)!r}.")
        check_int("lora_rank", self.lora_rank, *BOUNDS["lora_rank"])
        check_float("lora_scale", self.lora_scale, *BOUNDS["lora_scale"])
        self.lora_target_modules = check_str_list("lora_target_modules", self.lora_target_modules, MAX_NAMES)
        self.task_sizes = check_int_list("task_sizes", self.task_sizes, 1, MAX_CLASSES, MAX_TASKS)
        if sum(self.task_sizes) > MAX_CLASSES:
            raise _fail("task_sizes", f"add up to {sum(self.task_sizes)} classes, more than {MAX_CLASSES}.")
        if self.feature_dim is not None:
            check_int("feature_dim", self.feature_dim, 1, MAX_FEATURE_DIM)
        if self.feature_source not in (None, "cls", "pooler"):
            raise _fail("feature_source", f"must be 'cls' or 'pooler', got {self.feature_source!r}.")
        if self.label_names is not None:
            self.label_names = check_str_list("label_names", self.label_names, MAX_CLASSES)
        if self.class_ids is not None:
            self.class_ids = check_class_ids("class_ids", self.class_ids)
            if self.task_sizes and len(self.class_ids) != self.num_classes:
                raise _fail("class_ids", f"has {len(self.class_ids)} entries for {self.num_classes} classes "
                            f"(task_sizes {self.task_sizes}); give one class id per output.")
        if self.peft_config is not None:
            if not isinstance(self.peft_config, dict) or not isinstance(self.peft_config.get("peft_type"), str):
                raise _fail("peft_config", "must be a PEFT config's fields (a JSON object with a 'peft_type').")
            check_peft_fields(self.peft_config)  # sizes, NaN, regexes: before PEFT builds anything

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field `name` (a fresh copy for lists), for configs that expose the same setting."""
        spec = next(f for f in fields(cls) if f.name == name)
        return spec.default_factory() if spec.default is MISSING else spec.default

    @classmethod
    def fields_from(cls, args: Any) -> dict[str, Any]:
        """The model settings a training config chooses: every field of this class that the config's own
        class defines (`SLCAConfig`: the LoRA knobs, `use_lora` from its method). `TrainingArguments`'
        fields are not model settings, even where a name matches (its `label_names` are input keys)."""
        own: set[str] = set()
        for klass in type(args).__mro__:
            if klass is TrainingArguments:
                break
            own.update(vars(klass))
        return {f.name: getattr(args, f.name) for f in fields(cls) if f.name in own}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "slca_config.json") -> SLCAModelConfig:
        """Validated config from a JSON mapping; unknown keys and bad values are refused, naming the file."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: format_version {version!r} is not {FORMAT_VERSION}; upgrade slca-peft.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source} has unknown field(s) {unknown}; it was written by another slca-peft version.")
        required = {"use_lora", "lora_rank", "lora_scale", "lora_target_modules", "task_sizes", "feature_dim"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{source} lacks the field(s) {missing}.")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def validate_state(state: Any, source: str = "continual_state.json") -> dict[str, Any]:
    """Check the task history's fields (types, ranges, lengths) before anything uses them."""
    if not isinstance(state, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(state).__name__}.")
    try:
        for key in ("class_order", "task_test_sizes"):
            if key in state:
                check_int_list(key, state[key], 0, MAX_CLASSES * 100, MAX_CLASSES)
        if "task_sizes" in state:
            check_int_list("task_sizes", state["task_sizes"], 1, MAX_CLASSES, MAX_TASKS)
        if "tasks_learned" in state:
            check_int("tasks_learned", state["tasks_learned"], 0, MAX_TASKS)
        for key in ("training_seed", "seed"):
            if state.get(key) is not None:
                check_int(key, state[key], -(2**63), 2**64)
        if state.get("label_names") is not None:
            check_str_list("label_names", state["label_names"], MAX_CLASSES)
        if state.get("class_ids") is not None:
            check_class_ids("class_ids", state["class_ids"])
        if state.get("domains") is not None:
            check_str_list("domains", state["domains"], MAX_TASKS)
        if "method" in state:
            check_str("method", state["method"])
        matrix = check_list("accuracy_matrix", state.get("accuracy_matrix", []), MAX_TASKS)
        for t, row in enumerate(matrix):
            for j, value in enumerate(check_list(f"accuracy_matrix[{t}]", row, MAX_TASKS)):
                if value is not None:  # None: the task had no test data when this row was measured
                    check_float(f"accuracy_matrix[{t}][{j}]", value, 0.0, 100.0)
        for t, value in enumerate(check_list("task_data", state.get("task_data") or [], MAX_TASKS)):
            check_str(f"task_data[{t}]", value, optional=True)
        for i, segment in enumerate(check_list("segments", state.get("segments") or [], MAX_TASKS)):
            if not isinstance(segment, dict) or len(segment) > 32:
                raise _fail(f"segments[{i}]", "must be a JSON object of a few fields.")
            for key in ("first_task", "tasks"):
                check_int(f"segments[{i}].{key}", segment.get(key), 0, MAX_TASKS)
            for key in ("data", "continued_from", "continued_revision"):
                check_str(f"segments[{i}].{key}", segment.get(key), optional=True)
            bounds = (("seed", -(2**63), 2**64), ("init_cls", 0, MAX_CLASSES), ("increment", 0, MAX_CLASSES))
            for key, low, high in bounds:
                if segment.get(key) is not None:
                    check_int(f"segments[{i}].{key}", segment[key], low, high)
            if segment.get("merged_classes") is not None:
                check_str_list(f"segments[{i}].merged_classes", segment["merged_classes"], MAX_CLASSES)
        for t, value in enumerate(check_list("seen_accuracy", state.get("seen_accuracy", []), MAX_TASKS)):
            check_float(f"seen_accuracy[{t}]", value, 0.0, 100.0)
    except ValueError as err:
        raise ValueError(f"{source}: {err} The file is damaged or was not written by slca-peft.") from None
    return state


def read_state(directory: str | Path) -> dict[str, Any] | None:
    """The task history (`continual_state.json`) beside a checkpoint's files, checked; None without one."""
    path = Path(directory) / STATE_FILE
    return validate_state(read_json(path), str(path)) if path.is_file() else None


# The method table: which methods adapt the backbone with LoRA, and what `released_code` sets. The model
# reads it to build itself, `SLCAConfig` for its training defaults.
METHODS = ("slca++", "slca", "sl", "seq_ft")
ATTENTION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj"]

# What `released_code=True` sets (the authors' released SLCA++ code): LoRA on the attention only, one
# adapter on the fused qkv weight, a fresh trained final LayerNorm. CA at the training rate is the
# default of both settings (`ca_lr` unset).
RELEASED_DEFAULTS = {
    "lora_target_modules": ATTENTION_LORA_TARGETS,
    "lora_layout": "fused_qkv",
    "reset_final_norm": True,
}
_PAPER_DEFAULTS = {name: SLCAModelConfig.default(name) for name in RELEASED_DEFAULTS}

# What each method changes relative to SLCA++ (Hybrid-SL + SCE + CA).
METHOD_DEFAULTS = {
    "slca++": {"backbone_lr_scale": 0.1, "use_lora": True, "use_sce": True, "align": True},
    "sl": {"backbone_lr_scale": 0.1, "use_lora": True, "use_sce": True, "align": False},
    "slca": {"backbone_lr_scale": 0.01, "use_lora": False, "use_sce": False, "align": True},
    "seq_ft": {"backbone_lr_scale": 1.0, "use_lora": False, "use_sce": False, "align": False},
}


def resolve_released_code(knobs: dict[str, Any], released: bool) -> dict[str, Any]:
    """`knobs` (lora_target_modules, lora_layout, reset_final_norm) with each unset (None) one filled
    from the chosen setting, the released code's or the paper's; an explicit value wins, with a warning
    when it departs from the released setting."""
    defaults = RELEASED_DEFAULTS if released else _PAPER_DEFAULTS
    resolved, overridden = dict(knobs), []
    for name, value in defaults.items():
        current = resolved.get(name)
        if current is None:
            resolved[name] = list(value) if isinstance(value, list) else value
        elif current != value:
            overridden.append(f"{name}={current!r}")
    if released and overridden:
        logger.warning(
            "released_code=True with %s set explicitly: the explicit value wins, so this run is not the "
            "released code's setting.", ", ".join(overridden),
        )
    return resolved


#: SLCAConfig fields that shape the model without being `SLCAModelConfig` fields.
_SHAPING_FIELDS = ("method", "released_code")


def model_settings(args: TrainingArguments | None = None, **overrides: Any) -> dict[str, Any]:
    """The `SLCAModelConfig` fields chosen by `args` (an `SLCAConfig`, or a `TrainingArguments`, converted)
    and by keywords: any `SLCAModelConfig` field and the `SLCAConfig` fields that shape the model
    (`method`, `released_code`, the LoRA knobs). `released_code` fills the knobs not given as keywords,
    as `SLCAConfig` does; a training setting (e.g. `learning_rate`) is refused, naming where it goes."""
    if args is not None and not isinstance(args, TrainingArguments):
        raise TypeError(f"expected SLCAConfig or TrainingArguments, got {type(args).__name__}; build one with "
                        "SLCAConfig(output_dir=..., <your TrainingArguments fields>).")
    # A plain TrainingArguments defines none of these fields: the model defaults, as its SLCAConfig would.
    settings = SLCAModelConfig.fields_from(args) if args is not None else {}
    model_fields = {f.name for f in fields(SLCAModelConfig)}
    training_fields = {f.name for f in fields(type(args) if args is not None else TrainingArguments)}
    for name in overrides:
        if name in model_fields or name in _SHAPING_FIELDS:
            continue
        if name in training_fields:
            raise TypeError(f"{name} is a training setting, not a model one; set it in the SLCAConfig given to "
                            "SLCATrainer or ContinualLearner.")
        raise TypeError(f"unknown model setting {name!r}; model settings are {sorted(model_fields)} and "
                        f"{list(_SHAPING_FIELDS)}.")
    overrides = dict(overrides)
    if "method" in overrides:
        method = overrides.pop("method")
        check_choice("method", method, METHODS)
        settings["use_lora"] = METHOD_DEFAULTS[method]["use_lora"]
    if "released_code" in overrides:
        released = overrides.pop("released_code")
        knobs = resolve_released_code({name: overrides.pop(name, None) for name in RELEASED_DEFAULTS}, released)
        settings.update(knobs)
    settings.update(overrides)
    return settings
