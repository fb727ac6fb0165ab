"""`ContinualLearner`: the SLCA task loop.

grow head -> train (SLCATrainer) -> statistics of the new classes -> align -> evaluate all seen
classes -> checkpoint -> restore the unaligned head for the next task.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import reduce
from torch.utils.data import DataLoader
from transformers import TrainerCallback, set_seed

from .alignment import AlignmentSettings, ClassifierAligner
from .checkpoint import atomic_write_text
from .config import SLCAConfig
from .metrics import summarize_accuracy_matrix
from .model import SLCAModel
from .statistics import ClassStatistics
from .tasks import Task, TaskSequence
from .trainer import SLCATrainer
from .transforms import collate_fn, make_batch_transform

logger = logging.getLogger(__name__)


@dataclass
class ContinualResult:
    """Accuracies in percent. `accuracy_matrix[t][j]`: task j's test classes after task t."""

    accuracy_matrix: list[list[float]] = field(default_factory=list)
    seen_accuracy: list[float] = field(default_factory=list)
    task_test_sizes: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return summarize_accuracy_matrix(self.accuracy_matrix, self.task_test_sizes)


class ContinualLearner:
    """Runs a `TaskSequence` through an `SLCAModel` with the method `args.method` selects."""

    def __init__(
        self,
        model: SLCAModel,
        args: SLCAConfig,
        tasks: TaskSequence,
        *,
        train_transform=None,
        eval_transform=None,
        callbacks: list[TrainerCallback] | None = None,
        statistics: ClassStatistics | None = None,
        result: ContinualResult | None = None,
        unaligned_head: dict[str, torch.Tensor] | None = None,
    ):
        self.model, self.args, self.tasks = model, args, tasks
        self.set_transforms(train_transform, eval_transform)
        self.callbacks = callbacks
        self.statistics = statistics or ClassStatistics(
            model.feature_dim,
            ridge=args.ca_ridge,
            covariance_form=args.ca_covariance_form,
            covariance_rank=args.ca_covariance_rank,
        )
        self.result = result or ContinualResult()
        self.aligner = ClassifierAligner(AlignmentSettings.from_config(args), seed=args.seed)
        self._unaligned = unaligned_head
        self.trainer: SLCATrainer | None = None
        # The loop pushes whole continual checkpoints, one commit per task; the Trainer's own pushes
        # (adapter files only, mid-task) are switched off.
        self._trainer_args = args
        if args.push_to_hub:
            self._check_pushable()
            self._trainer_args = copy.copy(args)
            self._trainer_args.push_to_hub = False

    def set_transforms(self, train_transform, eval_transform) -> None:
        """Image -> tensor callables for training and for statistics/evaluation."""
        cols = (self.tasks.image_column, self.tasks.label_column)
        self.train_transform = make_batch_transform(train_transform, *cols) if train_transform else None
        self.eval_transform = make_batch_transform(eval_transform, *cols) if eval_transform else None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        args: SLCAConfig,
        tasks: TaskSequence,
        *,
        revision: str | None = None,
        expected_base: str | Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> ContinualLearner:
        """Continue after the last task a checkpoint (directory or Hub repo) has learned.

        The checkpoint must describe the same stream: class order, split and label names.
        """
        from .checkpoint import load_checkpoint

        model, statistics, state, unaligned = load_checkpoint(checkpoint, revision, expected_base=expected_base)
        if state is None or statistics is None:
            raise ValueError(f"{checkpoint} has no task history or class statistics; it cannot be resumed.")
        current = tasks.describe()
        for key in ("class_order", "task_sizes", "label_names", "incremental", "domains"):
            if state.get(key) != current.get(key):
                raise ValueError(
                    f"{checkpoint}: {key} differs from this run's ({state.get(key)} vs {current.get(key)}); resume "
                    "with the same dataset, class_order_seed, init_cls and increment (or the same domains)."
                )
        if state.get("method") != args.method:
            raise ValueError(f"{checkpoint} was trained with method {state.get('method')!r}, not {args.method!r}.")
        for key in ("lora_layout", "reset_final_norm") + (("lora_target_modules",) if model.use_lora else ()):
            if getattr(model, key) != getattr(args, key):
                raise ValueError(
                    f"{checkpoint} was trained with {key}={getattr(model, key)!r}, this run asks for "
                    f"{getattr(args, key)!r}; resume with the same setting (released_code and its knobs)."
                )
        result = ContinualResult(
            accuracy_matrix=state["accuracy_matrix"],
            seen_accuracy=state["seen_accuracy"],
            task_test_sizes=state["task_test_sizes"],
        )
        return cls(model, args, tasks, statistics=statistics, result=result, unaligned_head=unaligned, **kwargs)

    @staticmethod
    def latest_checkpoint(output_dir: str | Path) -> Path | None:
        """The newest complete `task_<t>` checkpoint in a run's output directory (for `auto`)."""
        candidates = []
        for path in Path(output_dir).glob("task_*"):
            suffix = path.name.removeprefix("task_")
            if path.is_dir() and suffix.isdigit() and (path / "continual_state.json").is_file():
                candidates.append((int(suffix), path))
        return max(candidates)[1] if candidates else None

    @property
    def domain_incremental(self) -> bool:
        """Tasks are domains over the same classes (one head; statistics per domain and class)."""
        return getattr(self.tasks, "domain_incremental", False)

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def run(self) -> ContinualResult:
        """Learn every task not yet learned and return the accuracies."""
        if self.train_transform is None or self.eval_transform is None:
            raise ValueError("set the train and eval transforms (set_transforms) before run().")
        start = len(self.result.accuracy_matrix)
        if self._unaligned is not None:
            self.model.classifier.restore(self._unaligned)
        for task in list(self.tasks)[start:]:
            self.learn_task(task)
        self._write_metrics()
        return self.result

    def learn_task(self, task: Task) -> list[float]:
        t = task.task_id
        heads = self.model.classifier.num_tasks
        if (self.domain_incremental and heads != min(t, 1)) or (not self.domain_incremental and heads != t):
            raise RuntimeError(
                f"the classifier has {heads} heads but task {t} is next; resume from the checkpoint of "
                f"task {t - 1} with its model."
            )
        # Everything a task does is a function of (seed, task id, model state), so a run resumed from a
        # checkpoint repeats an uninterrupted one exactly.
        set_seed(self.args.seed + t)
        if heads == 0 or not self.domain_incremental:
            self.model.grow(len(task.classes))  # domain-incremental: one head for all domains
        self.trainer = SLCATrainer(
            model=self.model,
            args=self._trainer_args,
            train_dataset=task.train.with_transform(self.train_transform),
            data_collator=collate_fn,
            callbacks=self.callbacks,
            task_id=t,
        )
        self.trainer.train()
        self.compute_statistics(task)
        unaligned = self.model.classifier.snapshot()
        if self.args.align and t > 0:
            losses = self.aligner.align(self.model.classifier, self.statistics, t, self.domain_incremental)
            logger.info("task %d: classifier alignment losses %s", t, [round(v, 4) for v in losses])
        row, seen, sizes = self.evaluate(t)
        self.result.accuracy_matrix.append(row)
        self.result.seen_accuracy.append(seen)
        self.result.task_test_sizes = sizes
        self._report(t, row, seen)
        self.save(self.output_dir / f"task_{t}", unaligned)
        if self.args.push_to_hub:
            self.push(self.output_dir / f"task_{t}", f"task {t + 1}/{len(self.tasks)}: seen classes {seen:.2f}%")
        self.model.classifier.restore(unaligned)
        return row

    def _shard_loader(self, dataset) -> DataLoader:
        """This process's exact share (every `world`-th sample): no sampler padding, so sums and
        counts reduced across processes count every sample once."""
        state = PartialState()
        shard = dataset.select(range(state.process_index, len(dataset), state.num_processes))
        return DataLoader(
            shard.with_transform(self.eval_transform),
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=collate_fn,
            num_workers=self.args.dataloader_num_workers,
        )

    @staticmethod
    def _reduce(tensor: torch.Tensor) -> torch.Tensor:
        return reduce(tensor, reduction="sum") if PartialState().num_processes > 1 else tensor

    @torch.inference_mode()
    def compute_statistics(self, task: Task) -> None:
        """One batched pass over the task's training images with eval transforms; float64 sums are
        reduced across processes so every process holds the same, exact statistics."""
        model = self.model
        was_training = model.training
        model.eval()
        device = self.args.device
        # Domain-incremental: each domain keeps its own Gaussian per class, keyed domain * C + class.
        key_offset = task.task_id * self.tasks.num_classes if self.domain_incremental else 0
        for batch in self._shard_loader(task.train):
            feats = model.features(batch["pixel_values"].to(device))
            self.statistics.update(feats, batch["labels"].to(device) + key_offset)
        self.statistics.finalize(task.task_id, [c + key_offset for c in task.classes], reduce=self._reduce)
        model.train(was_training)

    @torch.inference_mode()
    def evaluate(self, task_id: int) -> tuple[list[float], float, list[int]]:
        """Accuracy on each seen task's test data and over all of it (micro), predicting among all
        classes seen so far; every test sample is counted once whatever the number of processes."""
        model = self.model
        model.eval()
        device = self.args.device
        correct = torch.zeros(task_id + 1, dtype=torch.float64, device=device)
        total = torch.zeros(task_id + 1, dtype=torch.float64, device=device)
        for j in range(task_id + 1):
            for batch in self._shard_loader(self.tasks[j].test):
                labels = batch["labels"].to(device)
                preds = model(pixel_values=batch["pixel_values"].to(device)).logits.argmax(dim=1)
                correct[j] += (preds == labels).sum()
                total[j] += labels.numel()
        correct, total = self._reduce(correct).cpu().numpy(), self._reduce(total).cpu().numpy()
        if (total == 0).any():
            empty = np.nonzero(total == 0)[0].tolist()
            raise ValueError(f"task(s) {empty} have no test images; every task needs test data to be scored.")
        row = (100.0 * correct / total).tolist()
        return row, float(100.0 * correct.sum() / total.sum()), total.astype(int).tolist()

    def state(self) -> dict[str, Any]:
        """The task history a checkpoint records."""
        return {
            "method": self.args.method,
            "tasks_learned": len(self.result.accuracy_matrix),
            **self.tasks.describe(),
            "accuracy_matrix": self.result.accuracy_matrix,
            "seen_accuracy": self.result.seen_accuracy,
            "task_test_sizes": self.result.task_test_sizes,
            "training_seed": self.args.seed,
        }

    def save(self, directory: Path, unaligned: dict[str, torch.Tensor]) -> None:
        """The main process writes; the others wait so nobody reads a checkpoint being written."""
        if self.trainer is None or self.trainer.is_world_process_zero():
            self.model.save_pretrained(
                str(directory), statistics=self.statistics, state=self.state(), unaligned_head=unaligned
            )
        if self.trainer is not None:
            self.trainer.accelerator.wait_for_everyone()

    @property
    def hub_repo_id(self) -> str:
        return self.args.hub_model_id or self.output_dir.absolute().name

    def _check_pushable(self) -> None:
        """Fail before any training if the pushed checkpoints could not be loaded elsewhere."""
        from .hub import local_base_problem

        base = self.model.settings()["base_model_name_or_path"]
        problem = local_base_problem(base, self.model.use_lora, self.args.hub_base_model_id)
        if problem:
            raise ValueError(f"push_to_hub is on but {problem}")

    def push(self, directory: Path, message: str) -> None:
        """Upload a task checkpoint as one commit; a Hub failure is logged, not fatal (the local
        checkpoint is complete and can be pushed later)."""
        if not PartialState().is_main_process:
            return
        from .hub import push_to_hub

        try:
            push_to_hub(directory, self.hub_repo_id, private=self.args.hub_private_repo, token=self.args.hub_token,
                        revision=self.args.hub_revision, commit_message=message,
                        base_model_id=self.args.hub_base_model_id)
        except Exception as err:  # noqa: BLE001 - any Hub/network error; training goes on
            options = "".join(
                f" {flag} {value}" for flag, value in (("--base_model_id", self.args.hub_base_model_id),
                                                       ("--revision", self.args.hub_revision)) if value
            ) + (" --private" if self.args.hub_private_repo else "")
            logger.warning(
                "pushing %s to %s failed (%s); the checkpoint is complete on disk. Push it later with: "
                "slca-peft push %s %s%s", directory, self.hub_repo_id, err, directory, self.hub_repo_id, options,
            )
        else:
            logger.info("pushed %s to %s (%s)", directory.name, self.hub_repo_id, message)

    def _report(self, t: int, row: list[float], seen: float) -> None:
        per_task = " ".join(f"{a:5.1f}" for a in row)
        message = f"task {t + 1}/{len(self.tasks)} | seen classes {seen:5.1f}% | per task: {per_task}"
        logger.info(message)
        if self.trainer is not None and self.trainer.is_world_process_zero():
            print(message, flush=True)
            self.trainer.log({"continual/seen_accuracy": seen, "continual/task": t})

    def _write_metrics(self) -> dict[str, Any]:
        summary = self.result.summary()
        metrics = {
            "accuracy_matrix": self.result.accuracy_matrix,
            "last_accuracy": summary["last_accuracy"],
            "average_incremental_accuracy": summary["average_incremental_accuracy"],
            "average_forgetting": summary["average_forgetting"],
            "backward_transfer": summary["backward_transfer"],
            "seen_accuracy": self.result.seen_accuracy,
            "class_order": self.tasks.order,
            "task_sizes": self.tasks.task_sizes,
            "method": self.args.method,
        }
        if self.trainer is None or self.trainer.is_world_process_zero():
            atomic_write_text(self.output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        return metrics


def format_accuracy_table(matrix: list[list[float]], seen: list[float]) -> str:
    """The accuracy matrix as a text table (rows: after task t; columns: task j; last: all seen)."""
    n = len(matrix)
    header = "after \\ on " + " ".join(f"T{j + 1:<5d}" for j in range(n)) + "  all seen"
    lines = [header]
    for t, row in enumerate(matrix):
        cells = " ".join(f"{a:6.1f}" for a in row) + "       " * (n - len(row))
        lines.append(f"task {t + 1:<6d}" + cells + f"  {seen[t]:8.1f}")
    return "\n".join(lines)
