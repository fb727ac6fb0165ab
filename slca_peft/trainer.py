"""`SLCATrainer`: a `Trainer` that learns one task slowly.

It overrides three hooks and leaves the loop alone: the optimizer (slow-learner rate per parameter
group), the scheduler (epoch-wise cosine to the slow learner's floor) and the loss (current task's logits
only). Anything a `Trainer` accepts still works: datasets, collators, callbacks, `report_to`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from .config import SLCAConfig
from .losses import _symmetric_cross_entropy
from .model import BACKBONE, HEAD, LORA, SLCAModel


def epoch_cosine_lambda(base_lr: float, floor: float, steps_per_epoch: int, epochs: int):
    """LR multiplier of `CosineAnnealingLR(T_max=epochs, eta_min=floor)` stepped once per epoch,
    as the reference does, expressed per optimizer step for the Trainer's scheduler."""

    def factor(step: int) -> float:
        if base_lr == 0:
            return 0.0
        epoch = min(step // max(1, steps_per_epoch), epochs)
        lr = floor + (base_lr - floor) * (1 + math.cos(math.pi * epoch / max(1, epochs))) / 2
        return lr / base_lr

    return factor


class SLCATrainer(Trainer):
    """Trains the current task of an `SLCAModel` with slow-learner rates.

    The current task is the classifier's newest head; labels are global class indices and must
    belong to it while training.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self, model: SLCAModel | None = None, args: SLCAConfig | None = None, task_id: int | None = None, **kwargs: Any
    ):
        if model is not None and not isinstance(model, SLCAModel):
            raise TypeError(
                f"SLCATrainer trains an SLCAModel, got {type(model).__name__}; wrap your backbone with "
                "SLCAModel.from_backbone(...)."
            )
        if args is None:
            args = SLCAConfig(output_dir="slca_output")
        if not isinstance(args, SLCAConfig):
            raise TypeError(
                f"SLCATrainer needs SLCAConfig (a TrainingArguments subclass), got {type(args).__name__}; "
                "build one with SLCAConfig(output_dir=..., <your TrainingArguments fields>)."
            )
        if model is not None and model.classifier.num_tasks == 0:
            raise ValueError("the model has no task head; call model.grow(num_classes) before training.")
        self._task_id = task_id
        super().__init__(model=model, args=args, **kwargs)

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
        lora = lr * args.first_task_lora_lr_scale if self.task_id == 0 else backbone
        return {HEAD: lr, LORA: lora, BACKBONE: backbone}

    # ------------------------------------------------------------------ hooks
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            slca_model = self.accelerator.unwrap_model(opt_model)
            rates = self.group_learning_rates()
            groups: dict[str, list[torch.nn.Parameter]] = {HEAD: [], LORA: [], BACKBONE: []}
            for name, param in slca_model.named_parameters():
                if param.requires_grad:
                    groups[slca_model.parameter_role(name)].append(param)
            param_groups = [
                {"params": params, "lr": rates[role], "name": role} for role, params in groups.items() if params
            ]
            self.optimizer = torch.optim.SGD(
                param_groups, lr=self.args.learning_rate, momentum=self.args.momentum,
                weight_decay=self.args.weight_decay,
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler_type = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        if self.lr_scheduler is None and scheduler_type == "cosine":
            optimizer = optimizer or self.optimizer
            args: SLCAConfig = self.args
            if args.max_steps > 0:
                epochs, steps_per_epoch = num_training_steps, 1
            else:
                epochs = max(1, math.ceil(args.num_train_epochs))
                steps_per_epoch = max(1, math.ceil(num_training_steps / epochs))
            floor = args.learning_rate * args.backbone_lr_scale * args.lr_floor_decay
            lambdas = [
                epoch_cosine_lambda(group["lr"], floor, steps_per_epoch, epochs) for group in optimizer.param_groups
            ]
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Loss on the current task's logits only (targets shifted by the known classes)."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(pixel_values=inputs["pixel_values"])
        known, total = self.known_classes, self.slca_model.classifier.num_classes
        if bool(((labels < known) | (labels >= total)).any()):  # one device sync per step
            raise ValueError(
                f"task {self.task_id} owns classes [{known}, {total}) but the batch has labels in "
                f"[{int(labels.min())}, {int(labels.max())}]; train each task on its own classes "
                "(TaskSequence remaps labels for you)."
            )
        logits = outputs.logits[:, known:]
        targets = labels - known
        args: SLCAConfig = self.args
        if args.use_sce:
            loss = _symmetric_cross_entropy(logits, targets, args.sce_alpha, args.sce_beta)
        else:
            loss = F.cross_entropy(logits.float(), targets)
        outputs.loss = loss
        return (loss, outputs) if return_outputs else loss
