"""`SLCAModelConfig`: the one place that lists what an `SLCAModel` is made of.

It is what `slca_config.json` holds. `from_dict` checks every field's type and range before
anything is built, so a crafted file (a LoRA rank of fifty million, a task of two billion classes)
is refused with an error instead of allocating the memory it asks for.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from ..artifacts.layout import CONFIG_FILE, FORMAT_VERSION
from ..artifacts.upgrade import check_version, upgrade_label_names
from ..artifacts.values import (
    MAX_CLASSES,
    MAX_FEATURE_DIM,
    MAX_NAMES,
    MAX_TASKS,
    check_class_ids,
    check_float,
    check_int,
    check_int_list,
    check_str,
    check_str_list,
    fail,
)
from ..utils.errors import UserError, check_choice
from .peft_limits import MAX_RANK, check_peft_fields

logger = logging.getLogger(__name__)

#: LoRA targets of the paper's setting (transformers v5 ViT family names).
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
LORA_LAYOUTS = ("per_projection", "fused_qkv")

# Bounds far above any real model, far below what would exhaust memory (files and statistics alike).
MAX_LORA_RANK = MAX_RANK
#: (low, high), both allowed, of the bounded numeric settings: checked on every file and, for those a
#: training run chooses, when `SLCAConfig` is parsed.
BOUNDS = {"lora_rank": (1, MAX_LORA_RANK), "lora_scale": (0.0, 1e4), "final_norm_eps": (0.0, 1.0)}


def fit_class_ids(ids: list[int] | None, num_classes: int) -> list[int] | None:
    """`ids` for a head of `num_classes` outputs: outputs added since take the next free ids
    (max + 1, ...); a class never changes id. None (files written before class ids) stays None."""
    if ids is None:
        return None
    ids = list(ids[:num_classes])
    start = max(ids, default=-1) + 1
    return ids + list(range(start, start + num_classes - len(ids)))


@dataclass
class SLCAModelConfig:
    """Settings that rebuild an `SLCAModel` around its referenced base model.

    `base_model_name_or_path` is a Hub id or an absolute path (never relative, so the files load from
    any working directory). `label_names` are the class names in class-id order, when known
    (`label_names[k]` names class id k, as `config.id2label` and the model's outputs order them; a
    dataset's whole class list, classes not learned yet included, is fine); `class_ids` the class id of
    each output position (the dataset's label id, see `stream_class_ids`), None for files written before
    class ids existed (read as the identity).
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
    #: Class id k -> its name (class-id order, not the learning order).
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
            raise fail("lora_layout", f"must be 'per_projection' or 'fused_qkv', got {self.lora_layout!r}.")
        check_float("final_norm_eps", self.final_norm_eps, *BOUNDS["final_norm_eps"])
        for name in ("use_lora", "lora_svd_init", "reset_final_norm"):
            if not isinstance(getattr(self, name), bool):
                raise fail(name, f"must be true or false, got {getattr(self, name)!r}.")
        check_int("lora_rank", self.lora_rank, *BOUNDS["lora_rank"])
        check_float("lora_scale", self.lora_scale, *BOUNDS["lora_scale"])
        self.lora_target_modules = check_str_list("lora_target_modules", self.lora_target_modules, MAX_NAMES)
        self.task_sizes = check_int_list("task_sizes", self.task_sizes, 1, MAX_CLASSES, MAX_TASKS)
        if sum(self.task_sizes) > MAX_CLASSES:
            raise fail("task_sizes", f"add up to {sum(self.task_sizes)} classes, more than {MAX_CLASSES}.")
        if self.feature_dim is not None:
            check_int("feature_dim", self.feature_dim, 1, MAX_FEATURE_DIM)
        if self.feature_source not in (None, "cls", "pooler"):
            raise fail("feature_source", f"must be 'cls' or 'pooler', got {self.feature_source!r}.")
        if self.label_names is not None:
            self.label_names = check_str_list("label_names", self.label_names, MAX_CLASSES)
        if self.class_ids is not None:
            self.class_ids = check_class_ids("class_ids", self.class_ids)
            if self.task_sizes and len(self.class_ids) != self.num_classes:
                raise fail("class_ids", f"has {len(self.class_ids)} entries for {self.num_classes} classes "
                            f"(task_sizes {self.task_sizes}); give one class id per output.")
        if self.peft_config is not None:
            if not isinstance(self.peft_config, dict) or not isinstance(self.peft_config.get("peft_type"), str):
                raise fail("peft_config", "must be a PEFT config's fields (a JSON object with a 'peft_type').")
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
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_FILE) -> SLCAModelConfig:
        """Validated config from a JSON mapping; unknown keys and bad values are refused, naming the file."""
        if not isinstance(data, dict):
            raise UserError(f"{source} must hold a JSON object, got {type(data).__name__}.")
        data = dict(data)
        version = check_version(data.pop("format_version", FORMAT_VERSION), source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{source} has unknown field(s) {unknown}; it was written by another slca-peft version.")
        required = {"use_lora", "lora_rank", "lora_scale", "lora_target_modules", "task_sizes", "feature_dim"}
        missing = sorted(required - set(data))
        if missing:
            raise UserError(f"{source} lacks the field(s) {missing}.")
        try:
            config = cls(**data)
            if version != FORMAT_VERSION:  # validated first: the ids bound the names' list
                config.label_names = upgrade_label_names(config.label_names, config.class_ids, version, source)
                config.validate()
            return config
        except ValueError as err:
            raise UserError(f"{source}: {err}") from None


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
