"""`SLCAConfig`: the SLCA++ knobs on top of `TrainingArguments`.

Defaults reproduce the paper's CIFAR-100 / ImageNet-21K setting (see docs/method.md).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from types import MappingProxyType

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from ..models.config import (
    BOUNDS,
    LORA_LAYOUTS,
    METHOD_DEFAULTS,
    METHODS,
    RELEASED_DEFAULTS,
    SLCAModelConfig,
    resolve_released_code,
)
from ..utils.errors import UserError, check_choice
from ..utils.hardware import check_hardware, resolve_precision

logger = logging.getLogger(__name__)
_model_default = SLCAModelConfig.default  # the model settings' defaults are SLCAModelConfig's

#: `lr_scheduler_type` of the method's schedule: cosine per epoch down to a floor (docs/method.md). Every
#: transformers scheduler name keeps its transformers meaning (`cosine`: per-step cosine to 0).
SLCA_COSINE = "slca_cosine"

# Parse-time range checks: (field, lower bound, lower bound allowed, upper bound); the model settings'
# bounds are `SLCAModelConfig`'s. A bad value fails here rather than after a task has trained.
_BIG = 1 << 20
_MAX_SEED = (1 << 32) - 1
_RANGES = (
    *((name, low, True, high) for name, (low, high) in BOUNDS.items()),
    ("init_cls", 1, True, 1e7), ("increment", 1, True, 1e7),
    ("ca_epochs", 0, True, 1e5), ("ca_samples_per_class", 1, True, 1e7), ("ca_samples_per_epoch", 1, True, 1e12),
    ("ca_batch_size", 1, True, _BIG),
    ("ca_covariance_rank", 1, True, 1e5), ("ca_temperature", 0, False, 1e4), ("ca_ridge", 0, True, 1e6),
    ("ca_lr", 0, True, 1e3), ("backbone_lr_scale", 0, True, 1e3), ("first_task_lora_lr_scale", 0, True, 1e3),
    ("sce_alpha", 0, True, 1e3), ("sce_beta", 0, True, 1e3),
    ("momentum", 0, True, 1), ("lr_floor_decay", 0, True, 1), ("fc_scale_mu", 0, True, 1),
    ("learning_rate", 0, True, 1e3), ("weight_decay", 0, True, 1e3), ("num_train_epochs", 0, False, 1e6),
    ("per_device_train_batch_size", 1, True, _BIG), ("per_device_eval_batch_size", 1, True, _BIG),
    ("max_grad_norm", 0, True, math.inf), ("global_batch_size", 1, True, _BIG),
    # numpy's seeds (set_seed, the class order's RandomState) are 0 to 2**32 - 1; -1 would fail after loading.
    ("seed", 0, True, _MAX_SEED), ("class_order_seed", 0, True, _MAX_SEED), ("data_seed", 0, True, _MAX_SEED),
)


@dataclass
class SLCAConfig(TrainingArguments):
    """Training arguments for slow learning with classifier alignment.

    Everything `TrainingArguments` offers still applies (logging, `report_to`, `use_cpu`, precision);
    the fields below add the method. `learning_rate` is the head's rate; every other group is a
    multiple of it.
    """

    method: str = field(
        default="slca++",
        metadata={
            "help": "slca++ (Hybrid-SL: LoRA+norms+biases+cls token, SCE, CA), slca (full fine-tuning, "
            "backbone lr x0.01, CE, CA with mean decay), sl (slca++ without CA), seq_ft (all at the "
            "head's lr, CE, no CA)."
        },
    )
    backbone_lr_scale: float | None = field(
        default=None,
        metadata={"help": "Backbone lr = learning_rate x this (LoRA's too after the first task). Default per method: "
                  "0.1 for slca++/sl, 0.01 for slca, 1.0 for seq_ft."},
    )
    first_task_lora_lr_scale: float = field(
        default=0.5, metadata={"help": "LoRA lr = learning_rate x this on the first task only (slca++/sl)."}
    )
    lora_rank: int = field(default=_model_default("lora_rank"), metadata={"help": "LoRA rank r."})
    lora_scale: float = field(
        default=_model_default("lora_scale"), metadata={"help": "LoRA scaling: the update is lora_scale * B A."})
    released_code: bool = field(
        default=False,
        metadata={"help": "Reproduce the authors' released code (which produced the published numbers): LoRA on "
                  "q/k/v only as one fused-qkv adapter, the final LayerNorm re-initialised and trained. Sets the "
                  "defaults of lora_target_modules, lora_layout and reset_final_norm; a value given explicitly "
                  "wins (with a warning)."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names that get LoRA. Default: q_proj k_proj v_proj fc1 fc2 (transformers v5 "
                  "ViT family); q_proj k_proj v_proj with released_code. On a backbone with a fused qkv linear "
                  "(timm) the q/k/v names mean that linear (see docs/method.md#backbones)."},
    )
    lora_layout: str | None = field(
        default=None,
        metadata={"help": "per_projection (one LoRA per target linear) or fused_qkv (one rank-r LoRA on the "
                  "concatenated q/k/v weight: a shared A and a B of 3d rows). Default: per_projection; "
                  "fused_qkv with released_code."},
    )
    reset_final_norm: bool | None = field(
        default=None,
        metadata={"help": "Replace the backbone's final LayerNorm by a fresh trained one (gamma 1, beta 0, eps "
                  "final_norm_eps). Default: false; true with released_code."},
    )
    final_norm_eps: float = field(
        default=_model_default("final_norm_eps"),
        metadata={"help": "eps of the fresh final LayerNorm (torch's default, as the released code)."},
    )
    lora_svd_init: bool = field(
        default=_model_default("lora_svd_init"),
        metadata={"help": "Initialise LoRA A with the top-r right singular vectors of W."},
    )
    sce_alpha: float = field(default=1.0, metadata={"help": "Symmetric CE: weight of cross-entropy."})
    sce_beta: float = field(default=0.1, metadata={"help": "Symmetric CE: weight of reverse cross-entropy."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (representation learning and CA)."})
    lr_floor_decay: float = field(
        default=0.1,
        metadata={"help": "Cosine floor = learning_rate x backbone_lr_scale x this "
                  "(lrate_decay**len(milestones) in the released code's models/slca_pp.py)."},
    )
    ca_epochs: int = field(default=5, metadata={"help": "Classifier-alignment epochs (0 disables CA)."})
    ca_samples_per_class: int = field(default=256, metadata={"help": "Gaussian samples per class per CA epoch."})
    ca_samples_per_epoch: int | None = field(
        default=None,
        metadata={"help": "Cap on the Gaussian samples of a CA epoch: with C seen classes each class gets "
                  "min(ca_samples_per_class, ca_samples_per_epoch // C) (at least 1), so an epoch costs about "
                  "ca_samples_per_epoch x C instead of ca_samples_per_class x C^2 for very large C. None (the "
                  "default, the method's setting): no cap."},
    )
    ca_batch_size: int = field(default=256, metadata={"help": "CA batch size."})
    ca_lr: float | None = field(
        default=None,
        metadata={"help": "CA learning rate (cosine to 0 over ca_epochs). Default: learning_rate, as the released "
                  "code couples them."},
    )
    ca_temperature: float = field(
        default=0.1, metadata={"help": "Logit-normalisation temperature tau (0.05 for Cars-196)."}
    )
    ca_ridge: float = field(default=1e-4, metadata={"help": "Ridge added to every class covariance."})
    ca_covariance_form: str = field(
        default="exact",
        metadata={"help": "How class covariances are stored: exact (low-rank factor + ridge when a class has "
                  "fewer samples than dimensions, else Cholesky), full, low_rank (with ca_covariance_rank), "
                  "diagonal. See docs/benchmarks.md for the accuracy cost of the approximate forms."},
    )
    ca_covariance_rank: int | None = field(
        default=None, metadata={"help": "Rank kept by ca_covariance_form=low_rank."}
    )
    fc_scale_mu: float = field(
        default=0.02, metadata={"help": "SLCA++ feature/head scale step mu_s (0 disables the scaling)."}
    )
    class_order_seed: int = field(
        default=1993, metadata={"help": "Seed of the class order (numpy.random.permutation)."}
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "If set, per_device_train_batch_size x processes x gradient_accumulation_steps must "
                  "equal it (128 in the paper); checked at start so the paper's batch survives any launch."},
    )
    init_cls: int = field(default=10, metadata={"help": "Classes in the first task."})
    increment: int = field(default=10, metadata={"help": "Classes in each later task (last takes the rest)."})

    # Paper defaults for inherited arguments.
    learning_rate: float = field(default=0.01, metadata={"help": "Head learning rate (SGD)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay (0 for ImageNet-R, Cars)."})
    num_train_epochs: float = field(default=20.0, metadata={"help": "Epochs per task."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Eval batch size per device."})
    lr_scheduler_type: str = field(
        default=SLCA_COSINE,
        metadata={"help": f"{SLCA_COSINE} = the method's epoch-wise cosine down to the floor (docs/method.md); any "
                  "transformers schedule keeps its meaning (cosine: per-step cosine to 0, linear, constant, ...)."},
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping (off, as in the released code's "
                                                                "models/slca_pp.py)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: images are transformed lazily with `with_transform`."}
    )
    bf16: str = field(  # type: ignore[assignment]  # a bool or "auto", resolved to a bool in __post_init__
        default=False,
        metadata={"help": "bfloat16 autocast: true, false, or auto (bf16 where the device computes it natively: a "
                  "CUDA GPU of compute capability >= 8.0, a CPU with AVX512-BF16 or AMX; the recipe's default). "
                  "Resolved to true/false when the config is built; `precision_choice` says why.",
                  "nargs": "?", "const": "true"},
    )
    hub_base_model_id: str | None = field(
        default=None,
        metadata={"help": "With --push_to_hub: the Hub id of the base model, recorded in every pushed checkpoint "
                  "when the backbone was loaded from a local copy (a local path would load nowhere else)."},
    )
    optim: str = field(
        default="sgd",
        metadata={"help": "sgd (the method's: momentum, weight decay) or another plain torch optimizer of "
                  "TrainingArguments (adamw_torch, ...), each with the slow-learner rate groups. Optimizers that "
                  "need more than parameter groups (galore, apollo, lomo, layer-wise, bitsandbytes 8-bit/4-bit, "
                  "paged, torchao, grokadamw) are refused."},
    )
    save_strategy: str = field(
        default="no",
        metadata={"help": "Trainer checkpoints (checkpoint-N) off: the continual loop checkpoints per task (the "
                  "recipe refuses another value). SLCATrainer alone honours epoch/steps, with resumable states."},
    )
    resume_without_optimizer_state: bool = field(
        default=False,
        metadata={"help": "SLCATrainer's resume_from_checkpoint from a checkpoint-N without optimizer and scheduler "
                  "states (save_only_model=True): go on with a fresh optimizer and schedule, knowing the run will "
                  "differ from an uninterrupted one. Without it such a checkpoint is refused, naming the file."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run already in --output_dir (its task_* checkpoints, metrics and fingerprint); "
                  "without it, starting into a directory that holds another run is refused."},
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "Data-loading processes. Default: min(4, CPU cores) when training on CUDA (PIL decoding "
                  "in one process cannot feed a GPU), 0 on the CPU. More than the cores falls back to the cores."},
    )
    dataloader_persistent_workers: bool | None = field(
        default=None, metadata={"help": "Keep loader workers alive between epochs. Default: on when there are workers."}
    )

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        if self.backbone_lr_scale is None:
            self.backbone_lr_scale = METHOD_DEFAULTS[self.method]["backbone_lr_scale"]
        for name, low, inclusive, high in _RANGES:
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value) or value < low or (not inclusive and value == low) or value > high:
                bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high:.10g}" if high != math.inf else "")
                raise UserError(f"--{name} {value} is out of range: it must be {bound}.")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m for m in self.lora_target_modules.replace(",", " ").split() if m]
        self._resolve_released_code()
        if self.learning_rate == 0 and self.ca_lr is None and self.align:
            raise UserError("learning_rate=0 leaves classifier alignment at ca_lr = learning_rate = 0; "
                             "set --ca_lr (e.g. 0.01) for alignment alone on frozen features, or --ca_epochs 0.")
        try:
            self.bf16, self.use_cpu, choice = resolve_precision(self.bf16, fp16=self.fp16, use_cpu=self.use_cpu)
        except ValueError as err:
            raise UserError(f"--{err}") from None
        #: What `bf16="auto"` resolved to and why (None when bf16 was given as true or false): the recipe logs it.
        self.precision_choice = choice
        check_hardware(self)  # precision the machine lacks, loader defaults for the device
        method_schedule = self.method_schedule
        if method_schedule:
            self.lr_scheduler_type = SchedulerType.CONSTANT  # a name TrainingArguments validates; restored below
        super().__post_init__()
        if method_schedule:
            self.lr_scheduler_type = SLCA_COSINE
        if self.global_batch_size is not None:
            per_step = self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps
            if per_step != self.global_batch_size:
                raise UserError(
                    f"per_device_train_batch_size {self.per_device_train_batch_size} x {self.world_size} "
                    f"process(es) x gradient_accumulation_steps {self.gradient_accumulation_steps} = {per_step}, "
                    f"not global_batch_size {self.global_batch_size}; set per_device_train_batch_size to "
                    f"{self.global_batch_size} / ({self.world_size} x gradient_accumulation_steps)."
                )

    def _resolve_released_code(self) -> None:
        knobs = resolve_released_code({name: getattr(self, name) for name in RELEASED_DEFAULTS}, self.released_code)
        for name, value in knobs.items():
            setattr(self, name, value)
        check_choice("lora_layout", self.lora_layout, LORA_LAYOUTS)

    @property
    def method_schedule(self) -> bool:
        """Whether training follows the method's epoch-wise cosine (`lr_scheduler_type="slca_cosine"`)."""
        return str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) == SLCA_COSINE

    @property
    def use_lora(self) -> bool:
        """Hybrid-SL (LoRA + norms + biases + class token) versus full fine-tuning."""
        return METHOD_DEFAULTS[self.method]["use_lora"]

    @property
    def use_sce(self) -> bool:
        return METHOD_DEFAULTS[self.method]["use_sce"]

    @property
    def align(self) -> bool:
        """Whether classifier alignment runs after each task."""
        return METHOD_DEFAULTS[self.method]["align"] and self.ca_epochs > 0

    @property
    def slca_plus_plus_scaling(self) -> bool:
        """SLCA++ scales sampled features and old heads; SLCA decays class means instead."""
        return self.method in ("slca++", "sl")


#: TrainingArguments fields that SLCATrainer or `slca-peft train` refuses (or does not use), with why: their
#: `--help` says so instead of transformers' text. The refusals themselves are `slca_peft.method.trainer.
#: check_honoured` (the trainer) and `slca_peft.commands.arguments.TRAINER_FLAG_RULES` (the recipe).
NOT_HONOURED: dict[str, str] = {
    "label_smoothing_factor": "Refused unless 0: the task loss has no label smoothing (slca++/sl use symmetric "
                              "cross-entropy: sce_alpha, sce_beta).",
    "lr_scheduler_kwargs": f"Refused with lr_scheduler_type {SLCA_COSINE}, whose floor is learning_rate x "
                           "backbone_lr_scale x lr_floor_decay (set lr_floor_decay); passed to any other "
                           "transformers schedule.",
    "eval_strategy": "slca-peft train refuses any value but no: the continual loop evaluates every seen task after "
                     "each task (metrics.json). SLCATrainer honours it (no, steps, epoch).",
    "load_best_model_at_end": "slca-peft train refuses it: there is no best model across tasks. SLCATrainer honours "
                              "it (with eval_strategy and metric_for_best_model).",
    "resume_from_checkpoint": "slca-peft train refuses it: use --resume_from (a task_<t> checkpoint, a run "
                              "directory, a Hub repo id or auto). SLCATrainer: pass it to train(), as transformers' "
                              "example scripts do.",
}


def _note_not_honoured(config_class: type, notes: dict[str, str]) -> None:
    """Give `config_class` its own copy of each inherited field with `notes`' help, so that `--help`
    (HfArgumentParser reads `metadata["help"]`) says what is refused; `TrainingArguments`' fields stay as
    they are."""
    fields = config_class.__dataclass_fields__
    for name, note in notes.items():
        own = copy.copy(fields[name])
        own.metadata = MappingProxyType({**own.metadata, "help": note})
        fields[name] = own


_note_not_honoured(SLCAConfig, NOT_HONOURED)


def as_slca_config(args: TrainingArguments | None) -> SLCAConfig:
    """An `SLCAConfig` from a plain `TrainingArguments` (its values kept, the method's fields at their
    defaults), as TRL's trainers convert theirs; every entry point that takes an `SLCAConfig` calls it."""
    if args is None:
        return SLCAConfig(output_dir="slca_output")
    if isinstance(args, SLCAConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"expected SLCAConfig or TrainingArguments, got {type(args).__name__}; build one with "
            "SLCAConfig(output_dir=..., <your TrainingArguments fields>)."
        )
    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict masks it
    values.pop("push_to_hub_token", None)
    config = SLCAConfig(**values)
    logger.info("converted %s to SLCAConfig (its values kept; method %s with its defaults).",
                type(args).__name__, config.method)
    return config
