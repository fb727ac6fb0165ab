"""`SLCATrainer`: a `Trainer` that learns one task slowly.

It overrides a few hooks and leaves the loop alone: the optimizer (slow-learner rate per parameter
group), the scheduler (`slca_cosine`: epoch-wise cosine to the method's floor, after an optional
warm-up; any transformers schedule by its name), the loss (`symmetric_cross_entropy` on the current
task's logits only) and the files (slca-peft model files, arguments as JSON, no pickle).
Anything a `Trainer` accepts still works: datasets, collators, callbacks, `report_to`, and the
checkpoint flags of transformers' example scripts (`save_strategy`/`eval_strategy`,
`load_best_model_at_end` with `metric_for_best_model`, `save_total_limit`, `resume_from_checkpoint`):
a `checkpoint-N` folder holds the model files and the optimizer, scheduler, gradient scaler and random
number generator states as safetensors + JSON (`slca_peft.artifacts.state_files`) where `Trainer` writes
pickles, so a run killed mid-way resumes to the weights an uninterrupted run reaches; a resume checks
them first (`slca_peft.method.checkpoint_states`). A plain
`TrainingArguments` is converted to `SLCAConfig` (`slca_peft.method.config.as_slca_config`); a field the
trainer cannot honour is refused.
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftConfig
from transformers import PreTrainedModel, Trainer
from transformers.image_processing_base import ImageProcessingMixin
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.training_args import ParallelMode

from ..artifacts.atomic import atomic_write_text
from ..artifacts.layout import TRAINING_ARGS_FILE
from ..artifacts.state_files import has_state, save_state
from ..models.adapters import ADAPTER, BACKBONE, HEAD
from ..models.backbones import input_size
from ..models.from_classifier import trainer_model
from ..models.model import SLCAModel
from ..models.saving import load_model_state
from ..utils.errors import UserError
from ..utils.hardware import cpu_bf16_training
from ..utils.logging import progress_bars, shows_progress
from ..utils.timing import clock
from . import checkpoint_states as checks
from .checkpoint_states import OPTIMIZER_STATE, RNG_STATE, SCALER_STATE, SCHEDULER_STATE
from .config import SLCAConfig, as_slca_config
from .learner_state import save_checkpoint_into
from .trainer_checkpoint import TrainerCheckpoint
from .trainer_hub import TrainerHub

logger = logging.getLogger(__name__)
ARGS_FILE = TRAINING_ARGS_FILE
# Optimizers that need more than parameter groups (their own model hooks or per-layer state).
_UNSUPPORTED_OPTIM = ("galore", "apollo", "lomo", "layerwise", "bnb", "8bit", "4bit", "paged", "torchao", "grokadamw")
__all__ = ["SLCATrainer", "as_slca_config", "check_honoured", "epoch_cosine_lambda", "symmetric_cross_entropy",
           "unused_trainable_parameters"]


def symmetric_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0, beta: float = 0.1, *, check_labels: bool = True
) -> torch.Tensor:
    """`alpha * CE + beta * RCE`, averaged over the batch.

    The reverse term caps log 0 at log 1e-4 and clamps the softmax at 1e-7, which bounds the
    penalty of confident wrong predictions (the robustness SLCA++ relies on). `check_labels=False`
    skips the label range check (a device sync) for callers that have validated the labels (the
    trainer's hot path).
    """
    if logits.ndim != 2:
        raise UserError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}.")
    num_classes = logits.shape[1]
    if check_labels and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise UserError(
            f"labels must lie in [0, {num_classes}) for these logits, got range "
            f"[{int(labels.min())}, {int(labels.max())}]; shift them to the current task's classes."
        )
    ce = F.cross_entropy(logits.float(), labels)
    probs = torch.softmax(logits.float(), dim=1).clamp(min=1e-7, max=1.0)
    one_hot = F.one_hot(labels, num_classes).float().clamp(min=1e-4, max=1.0)
    rce = -(probs * torch.log(one_hot)).sum(dim=1).mean()
    return alpha * ce + beta * rce


def check_honoured(args: SLCAConfig) -> None:
    """Refuse, before training, a `TrainingArguments` value this trainer would otherwise ignore."""
    optim = str(getattr(args.optim, "value", args.optim))
    if any(word in optim for word in _UNSUPPORTED_OPTIM):
        raise UserError(
            f"optim={optim!r} is not supported: its optimizer needs more than the slow-learner parameter groups. "
            "Use optim='sgd' (the method's), or a plain torch optimizer such as 'adamw_torch'."
        )
    if args.method_schedule and args.lr_scheduler_kwargs:
        raise UserError(
            f"lr_scheduler_kwargs={args.lr_scheduler_kwargs!r} is not used by the slca_cosine schedule (its floor is "
            "learning_rate x backbone_lr_scale x lr_floor_decay); set lr_floor_decay, or another lr_scheduler_type."
        )
    if args.label_smoothing_factor:
        raise UserError(
            f"label_smoothing_factor={args.label_smoothing_factor} is not applied by the task loss; "
            "drop it (method slca++/sl use symmetric cross-entropy, see sce_alpha/sce_beta)."
        )


def _sgd_implementation(param_groups: list[dict]) -> dict[str, bool]:
    """Fused SGD where PyTorch has it for these tensors (CUDA), else the multi-tensor (foreach) one."""
    params = [p for group in param_groups for p in group["params"]]
    if params and all(p.is_cuda for p in params):
        return {"fused": True}
    return {"foreach": True}


def unused_trainable_parameters(model: SLCAModel) -> list[str]:
    """Trainable parameters that one forward/backward pass leaves without a gradient (e.g. a mask token
    under full fine-tuning): DDP must search for unused parameters only when there are some. The pass
    runs in eval mode (no dropout, so no random numbers drawn) on one blank image; gradients are restored."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {name: p.grad for name, p in params.items()}
    was_training = model.training
    try:
        for p in params.values():
            p.grad = None
        model.eval()
        size, channels = input_size(model.config), getattr(model.config, "num_channels", 3)
        pixels = torch.zeros(1, channels, size, size, device=model.device, dtype=model.dtype)
        with torch.enable_grad():
            model(pixel_values=pixels, positions=True).logits.float().sum().backward()
        return [name for name, p in params.items() if p.grad is None]
    finally:
        for name, p in params.items():
            p.grad = saved[name]
        model.train(was_training)


def ddp_find_unused(model: SLCAModel, args: SLCAConfig) -> bool | None:
    """`find_unused_parameters` for DDP: the user's value; else, in a distributed run without activation
    checkpointing, whether any trainable parameter goes unused (the Trainer would say True for any model
    that is not a `PreTrainedModel`, and DDP then warns on every run); None leaves the Trainer's choice."""
    if args.ddp_find_unused_parameters is not None:
        return args.ddp_find_unused_parameters
    if args.parallel_mode != ParallelMode.DISTRIBUTED or args.gradient_checkpointing:
        return None
    unused = unused_trainable_parameters(model)
    if unused:
        logger.info("DDP looks for unused parameters: %s receive no gradient.", ", ".join(unused[:5]))
    return bool(unused)


def epoch_cosine_lambda(base_lr: float, floor: float, steps_per_epoch: int, epochs: int, warmup_steps: int = 0):
    """LR multiplier of `CosineAnnealingLR(T_max=epochs, eta_min=floor)` stepped once per epoch, as
    the released code's `models/slca_pp.py` does, expressed per optimizer step for the Trainer's
    scheduler; with `warmup_steps`, a linear ramp from 0 first (as transformers' warm-up schedules)."""

    def factor(step: int) -> float:
        if base_lr == 0:
            return 0.0
        if step < warmup_steps:
            return step / warmup_steps
        epoch = min(step // max(1, steps_per_epoch), epochs)
        lr = floor + (base_lr - floor) * (1 + math.cos(math.pi * epoch / max(1, epochs))) / 2
        return lr / base_lr

    return factor


#: The private `Trainer` methods SLCATrainer overrides, each with why no public hook serves. Everything else
#: it changes goes through public hooks (`create_optimizer`, `create_scheduler`, `compute_loss`,
#: `prediction_step`, `train`, `push_to_hub`, `create_model_card`, `init_hf_repo`). pyproject.toml bounds
#: transformers below its next major version, and tests/method/test_trainer_seam.py fails when one of
#: these is no longer a method of `Trainer`.
PRIVATE_TRAINER_OVERRIDES = {
    "_save": "save_model's file writer: slca-peft model files + arguments as JSON instead of a pickled "
             "training_args.bin, and the continual checkpoint's run state into output_dir once training ended "
             "(save_model itself also dispatches to DeepSpeed/FSDP)",
    "_save_optimizer_and_scheduler": "Trainer writes optimizer/scheduler states with torch.save (pickle); "
                                     "here safetensors + JSON",
    "_save_scaler": "the grad scaler's state, as safetensors + JSON instead of a pickle",
    "_save_rng_state": "the generator states, as safetensors + JSON instead of a pickle",
    "_save_checkpoint": "records the states Trainer just wrote in checkpoint-N's manifest, before any on_save "
                        "callback sees the folder (the resume checks only trust listed files)",
    "_load_from_checkpoint": "resume_from_checkpoint reads slca-peft model files (Trainer looks for "
                             "model.safetensors / pytorch_model.bin)",
    "_load_best_model": "load_best_model_at_end reads slca-peft model files",
    "_load_optimizer_and_scheduler": "reads the safetensors + JSON states, checked before torch sees them",
    "_load_scaler": "reads the safetensors + JSON grad-scaler state",
    "_load_rng_state": "reads the safetensors + JSON generator states",
    "_push_from_checkpoint": "push_to_hub=True uploads at each save through the library's one Hub door "
                             "(slca_peft.sharing.hub.push_folder) instead of Trainer's upload of output_dir",
}


class SLCATrainer(TrainerHub, TrainerCheckpoint, Trainer):
    """Trains the current task of an `SLCAModel` with slow-learner rates.

    The current task is the classifier's newest head; the data's labels are the stream's positions
    (`TaskSequence` gives them) and must belong to it while training. `evaluate` / `predict` report in
    class ids, as the model answers; `push_to_hub` / `create_model_card` go the library's way
    (`slca_peft.method.trainer_hub`). When training ends, the task's class statistics are gathered and
    `save_model()` makes output_dir a continual checkpoint that `slca-peft train --continue_from` goes on
    from (`slca_peft.method.trainer_checkpoint`).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, model: SLCAModel | PreTrainedModel | None = None, args: SLCAConfig | None = None,
                 task_id: int | None = None, *, peft_config: PeftConfig | None = None, statistics_dataset: Any = None,
                 gather_statistics: bool = True, **kwargs: Any):
        """`model`: an `SLCAModel`, or a transformers image classifier whose backbone gets `args`' adapters (or
        `peft_config`'s, as trl's trainers take one) and whose `id2label` the classes (`models.from_classifier`).
        `statistics_dataset`: the images (and transform) the class statistics are gathered on when training
        ends; default the training rows with `eval_dataset`'s transform where it can be borrowed, else
        `train_dataset` (`slca_peft.method.trainer_checkpoint`). `gather_statistics=False`: none are gathered
        (`ContinualLearner`, whose StatisticsStep gathers them, turns it off)."""
        self.statistics_dataset, self.gather_statistics = statistics_dataset, gather_statistics
        #: Refusals then name what a plain `TrainingArguments` parser accepts (no SLCAConfig-only flags).
        self._plain_training_arguments = args is not None and not isinstance(args, SLCAConfig)
        args = as_slca_config(args)
        check_honoured(args)
        model = trainer_model(model, args, peft_config)
        if model is not None and model.classifier.num_tasks == 0:
            raise UserError("the model has no task head; call model.grow(num_classes) before training.")
        self._task_id = task_id
        find_unused = ddp_find_unused(model, args) if model is not None else None
        user_value, args.ddp_find_unused_parameters = args.ddp_find_unused_parameters, find_unused
        try:
            super().__init__(model=model, args=args, **kwargs)  # reads it once, to build the DDP wrapper
        finally:
            args.ddp_find_unused_parameters = user_value

    # ------------------------------------------------------------------ task bookkeeping
    @property
    def slca_model(self) -> SLCAModel:
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    @property
    def task_id(self) -> int:
        """The task being learned: the newest head unless given (domain-incremental runs share one head)."""
        return self._task_id if self._task_id is not None else self.slca_model.classifier.num_tasks - 1

    @property
    def known_classes(self) -> int:
        return self.slca_model.classifier.task_offsets()[-2]

    def group_learning_rates(self) -> dict[str, float]:
        """Learning rate of each parameter role for the current task (Slow Learner, docs/method.md)."""
        args: SLCAConfig = self.args
        lr = args.learning_rate
        backbone = lr * args.backbone_lr_scale
        adapter = lr * args.first_task_lora_lr_scale if self.task_id == 0 else backbone
        return {HEAD: lr, ADAPTER: adapter, BACKBONE: backbone}

    # ------------------------------------------------------------------ hooks
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            slca_model = self.accelerator.unwrap_model(opt_model)
            rates = self.group_learning_rates()
            optim = str(getattr(self.args.optim, "value", self.args.optim))
            # The method's SGD decays every parameter, as the released code; other optimizers follow the
            # Trainer's exemptions (no decay on biases and LayerNorm weights).
            decayed = None if optim == "sgd" else set(self.get_decay_parameter_names(slca_model))
            groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
            for name, param in slca_model.named_parameters():
                if param.requires_grad:
                    key = (slca_model.parameter_role(name), decayed is None or name in decayed)
                    groups.setdefault(key, []).append(param)
            param_groups = [
                {"params": groups[role, decay], "lr": rates[role], "name": role,
                 "weight_decay": self.args.weight_decay if decay else 0.0}
                for role in (HEAD, ADAPTER, BACKBONE) for decay in (True, False) if groups.get((role, decay))
            ]
            if optim == "sgd":
                self.optimizer = torch.optim.SGD(
                    param_groups, lr=self.args.learning_rate, momentum=self.args.momentum,
                    weight_decay=self.args.weight_decay, **_sgd_implementation(param_groups),
                )
            else:
                # Any other plain torch optimizer, built the Trainer's way, with the same groups.
                optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, slca_model)
                kwargs = {k: v for k, v in kwargs.items() if k not in ("params", "model", "optimizer_dict")}
                self.optimizer = optimizer_cls(param_groups, **kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None and self.args.method_schedule:
            optimizer = optimizer or self.optimizer
            args: SLCAConfig = self.args
            if args.max_steps > 0:
                epochs, steps_per_epoch = num_training_steps, 1
            else:
                epochs = max(1, math.ceil(args.num_train_epochs))
                steps_per_epoch = max(1, math.ceil(num_training_steps / epochs))
            floor = args.learning_rate * args.backbone_lr_scale * args.lr_floor_decay
            warmup = args.get_warmup_steps(num_training_steps)
            lambdas = [
                epoch_cosine_lambda(group["lr"], floor, steps_per_epoch, epochs, warmup)
                for group in optimizer.param_groups
            ]
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: the loss on the current task's logits only (the heads' position order, targets
        shifted by the known classes). Evaluation: the model's own loss, its labels class ids by then
        (`prediction_step`)."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(pixel_values=inputs["pixel_values"], positions=True)
        known, total = self.known_classes, self.slca_model.classifier.num_classes
        if bool(((labels < known) | (labels >= total)).any()):  # one device sync per step
            raise UserError(
                f"task {self.task_id} owns classes [{known}, {total}) but the batch has labels in "
                f"[{int(labels.min())}, {int(labels.max())}]; train each task on its own classes "
                "(TaskSequence remaps labels for you)."
            )
        logits = outputs.logits[:, known:]
        targets = labels - known
        args: SLCAConfig = self.args
        if args.use_sce:
            loss = symmetric_cross_entropy(logits, targets, args.sce_alpha, args.sce_beta, check_labels=False)
        else:
            loss = F.cross_entropy(logits.float(), targets)
        outputs.loss = loss
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`evaluate` / `predict` report in class ids, as `SLCAModel.forward` and an export do: the logits
        are the model's (output k = class id k) and the data's labels (the stream's positions, as
        training takes them) come back as class ids, so `compute_metrics` compares `argmax` with
        `label_ids` and names either through `model.config.id2label`."""
        labels = inputs.get("labels")
        if labels is not None:
            inputs = {**inputs, "labels": self.class_id_labels(labels)}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def class_id_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The class id of each label (a position of the stream, as its data carries it)."""
        model = self.slca_model
        if labels.numel() and int(labels.max()) >= model.classifier.num_classes:
            raise UserError(f"label {int(labels.max())} is beyond the {model.classifier.num_classes} classes seen "
                             "so far; grow the classifier for the task before evaluating on it.")
        return torch.as_tensor(model.class_ids, device=labels.device)[labels]

    # ------------------------------------------------------------------ checkpoints (no pickle)
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; `resume_from_checkpoint` (a `checkpoint-N` folder, or True for the newest in
        `output_dir`) continues from the model files and training states there, once they are checked."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # None: Trainer's error
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):  # checked before Trainer or torch reads it
            checks.check_checkpoint_folder(os.fspath(resume_from_checkpoint), self._rng_name(),
                                           self.args.resume_without_optimizer_state)
        self.class_statistics = None
        started = clock()
        # eager attention on CPU bf16; `disable_tqdm` also silences transformers', datasets' and the Hub's bars
        with cpu_bf16_training(self.model, self.args), progress_bars(shows_progress(self.args)):
            output = super().train(resume_from_checkpoint, *args, **kwargs)
            self._end_training(clock() - started)
        return output

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """`Trainer._save_checkpoint`, then the states are listed in the checkpoint's manifest."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            checks.record_states(folder, ARGS_FILE, self.args.world_size)

    def _refuse_sharded(self, what: str) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise UserError(f"{what} under DeepSpeed or FSDP is not supported: their checkpoints are pickles; set "
                             "save_only_model=True and resume_from_checkpoint=None.")

    def _rng_name(self) -> str:
        return RNG_STATE if self.args.world_size <= 1 else f"{RNG_STATE}_{self.args.process_index}"

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The optimizer and scheduler states as safetensors + JSON (`Trainer` writes pickles)."""
        self._refuse_sharded("saving optimizer state")
        if self.args.should_save:
            save_state(self.optimizer.state_dict(), output_dir, OPTIMIZER_STATE)
            save_state(self.lr_scheduler.state_dict(), output_dir, SCHEDULER_STATE)

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state(scaler.state_dict(), output_dir, SCALER_STATE)

    def _save_rng_state(self, output_dir: str) -> None:
        """Python's, numpy's, torch's and CUDA's generator states, one file pair per process."""
        states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                                  "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        os.makedirs(output_dir, exist_ok=True)  # another process may get here before the main one saved
        save_state(states, output_dir, self._rng_name())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """The model files of a `checkpoint-N` folder, loaded into the model in place."""
        self._refuse_sharded("resume_from_checkpoint")
        target = self.slca_model if model is None else self.accelerator.unwrap_model(model)
        logger.info("Loading model from %s.", resume_from_checkpoint)
        load_model_state(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: the best checkpoint's model files, loaded in place."""
        best = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        load_model_state(self.slca_model, best)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and has_state(checkpoint, OPTIMIZER_STATE):  # else resume_without_optimizer_state
            state, schedule = checks.checked_optimizer_states(checkpoint, self.optimizer, self.lr_scheduler,
                                                               self.slca_model)
            self.optimizer.load_state_dict(state)
            self.lr_scheduler.load_state_dict(schedule)
        elif checkpoint is not None:
            logger.warning("%s holds no optimizer state; as resume_without_optimizer_state asks, training goes on "
                           "with a fresh optimizer and schedule, unlike an uninterrupted run.", checkpoint)

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and has_state(checkpoint, SCALER_STATE):
            scaler.load_state_dict(checks.checked_scaler_state(checkpoint, scaler.state_dict()))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and not has_state(checkpoint, self._rng_name()):
            logger.info("%s holds no random number generator state for this process; the resumed run may differ "
                        "from an uninterrupted one.", checkpoint)
        elif checkpoint is not None:
            checks.restore_rng_states(checkpoint, self._rng_name())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The model files, the processor's and the arguments as JSON (no training_args.bin pickle); once
        training ended, the continual checkpoint's run state too (`continual_files`). Each
        file is written whole and the manifest last (`save_checkpoint_into`): output_dir also holds the
        Trainer's own files, so it is never swapped as a whole. The main process writes."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        image_processor = isinstance(self.processing_class, ImageProcessingMixin)
        if image_processor:  # written with the model files and listed in their manifest, so every push carries it
            self.slca_model.image_processor = self.processing_class
        processor = None if image_processor else self.processing_class
        arguments = self.args.to_json_string()

        def beside(folder: Path) -> None:
            if processor is not None:
                processor.save_pretrained(folder)
            atomic_write_text(folder / ARGS_FILE, arguments)

        save_checkpoint_into(self.slca_model, output_dir, extra=beside, unlisted=(ARGS_FILE,),
                             **self.continual_files())
