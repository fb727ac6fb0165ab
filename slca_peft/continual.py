"""`ContinualLearner`: the task loop of SLCA.

The loop itself is thin: for each task it grows the classifier, trains with `SLCATrainer` and hands
the task to the after-task steps (statistics -> alignment -> evaluation -> checkpoint -> push ->
report, see `slca_peft.callbacks`), then restores the unaligned heads for the next task. Add your
own steps with `callbacks=[...]`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import reduce
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import TrainerCallback, set_seed

from .alignment import AlignmentSettings, ClassifierAligner
from .callbacks import ContinualCallback, default_steps
from .config import SLCAConfig, as_slca_config
from .inference import inference_context
from .metrics import summarize_accuracy_matrix
from .model import SLCAModel
from .statistics import ClassStatistics
from .tasks import Task, TaskStream
from .tracking import ContinualTracker
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
    """Runs a task stream (`TaskSequence`, `DomainSequence`, or any `TaskStream`) through an
    `SLCAModel` with the method `args.method` selects.

    `callbacks` takes `ContinualCallback`s (after-task hooks, run after the built-in steps in the
    order given) and `transformers.TrainerCallback`s (handed to every task's trainer); one object
    may be both.
    """

    def __init__(
        self,
        model: SLCAModel,
        args: SLCAConfig,
        tasks: TaskStream,
        *,
        train_transform=None,
        eval_transform=None,
        callbacks: Sequence[ContinualCallback | TrainerCallback] | None = None,
        statistics: ClassStatistics | None = None,
        result: ContinualResult | None = None,
        unaligned_head: dict[str, torch.Tensor] | None = None,
    ):
        args = as_slca_config(args)  # a plain TrainingArguments is converted, as SLCATrainer does
        self.model, self.args, self.tasks = model, args, tasks
        self.set_transforms(train_transform, eval_transform)
        callbacks = list(callbacks or [])
        unknown = [c for c in callbacks if not isinstance(c, (ContinualCallback, TrainerCallback))]
        if unknown:
            raise TypeError(
                f"callbacks must be ContinualCallback or TrainerCallback instances, got {type(unknown[0]).__name__}; "
                "subclass slca_peft.callbacks.ContinualCallback for after-task steps."
            )
        self.trainer_callbacks = [c for c in callbacks if isinstance(c, TrainerCallback)]
        self.steps: list[ContinualCallback] = default_steps()
        self.user_callbacks = [c for c in callbacks if isinstance(c, ContinualCallback)]
        self.statistics = statistics or ClassStatistics(
            model.feature_dim,
            ridge=args.ca_ridge,
            covariance_form=args.ca_covariance_form,
            covariance_rank=args.ca_covariance_rank,
        )
        self.result = result or ContinualResult()
        self.aligner = ClassifierAligner(AlignmentSettings.from_config(args), seed=args.seed)
        #: The current task's heads before alignment (representation learning continues from them).
        self.unaligned_head = unaligned_head
        self.trainer: SLCATrainer | None = None
        self._accelerator: Accelerator | None = None
        #: Extra facts a checkpoint's task history records (the recipe sets the dataset's Hub id,
        #: which the model card lists).
        self.run_metadata: dict[str, Any] = {}
        #: `report_to` trackers, one run for the whole stream (the task trainers report through it).
        self.tracker = ContinualTracker(args.report_to)
        # The loop pushes whole continual checkpoints, one commit per task, and owns the trackers;
        # the Trainer's own pushes (adapter files only, mid-task) and trackers are switched off.
        self._trainer_args = copy.copy(args)
        self._trainer_args.report_to = "none"
        if args.push_to_hub:
            self._check_pushable()
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
        tasks: TaskStream,
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
        trained_with, asked = model.slca_config, model.slca_config.fields_from(args)
        for key in ("lora_layout", "reset_final_norm") + (("lora_target_modules",) if trained_with.use_lora else ()):
            wanted, trained = asked[key], getattr(trained_with, key)
            if key == "lora_target_modules":  # as this backbone names them (timm: q/k/v mean its fused qkv)
                from .backbones import lora_targets_for

                wanted = lora_targets_for(model.base_backbone, wanted)
            if trained != wanted:
                raise ValueError(
                    f"{checkpoint} was trained with {key}={trained!r}, this run asks for "
                    f"{wanted!r}; resume with the same setting (released_code and its knobs)."
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
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def is_main_process(self) -> bool:
        return PartialState().is_main_process

    @property
    def show_progress(self) -> bool:
        """Progress bars on the main process unless `disable_tqdm`."""
        return not self.args.disable_tqdm and self.is_main_process

    @property
    def accelerator(self) -> Accelerator:
        """The current task trainer's accelerator (one of its own before any training)."""
        if self.trainer is not None:
            return self.trainer.accelerator
        if self._accelerator is None:
            self._accelerator = Accelerator(cpu=self.args.use_cpu)
        return self._accelerator

    def call_event(self, event: str, *args: Any) -> None:
        """Run a hook on the built-in steps, then on the user's callbacks (an error names the callback)."""
        for step in self.steps:
            getattr(step, event)(self, *args)
        for callback in self.user_callbacks:
            try:
                getattr(callback, event)(self, *args)
            except Exception as err:
                raise RuntimeError(
                    f"continual callback {type(callback).__name__}.{event} failed: {type(err).__name__}: {err}"
                ) from err

    def run(self) -> ContinualResult:
        """Learn every task not yet learned and return the accuracies."""
        if self.train_transform is None or self.eval_transform is None:
            raise ValueError("set the train and eval transforms (set_transforms) before run().")
        start = len(self.result.accuracy_matrix)
        if self.unaligned_head is not None:
            self.model.classifier.restore(self.unaligned_head)
        self.call_event("on_run_begin")
        for t in range(start, len(self.tasks)):
            self.learn_task(self.tasks[t])
        self.call_event("on_run_end", self.result)
        return self.result

    def learn_task(self, task: Task) -> list[float]:
        """Grow, train, run the after-task steps, restore the unaligned heads; returns the accuracy row."""
        t = task.task_id
        heads = self.model.classifier.num_tasks
        expected = sum(1 for j in range(t) if self.tasks[j].head_size > 0)
        if heads != expected:
            raise RuntimeError(
                f"the classifier has {heads} heads but task {t + 1} needs {expected} before it; resume from the "
                f"checkpoint of task {t} (task_{t - 1}) with its model."
            )
        # Everything a task does is a function of (seed, task id, model state), so a run resumed from a
        # checkpoint repeats an uninterrupted one exactly.
        set_seed(self.args.seed + t)
        if task.head_size > 0:
            self.model.grow(task.head_size)
        self.call_event("on_task_begin", task)
        self.trainer = SLCATrainer(
            model=self.model,
            args=self._trainer_args,
            train_dataset=task.train.with_transform(self.train_transform),
            data_collator=collate_fn,
            callbacks=[*self.trainer_callbacks, self.tracker],
            task_id=t,
        )
        self.trainer.train()
        self.unaligned_head = self.model.classifier.snapshot()
        self.call_event("on_task_end", task)
        self.model.classifier.restore(self.unaligned_head)
        return self.result.accuracy_matrix[-1] if len(self.result.accuracy_matrix) > t else []

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
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    @staticmethod
    def _reduce(tensor: torch.Tensor) -> torch.Tensor:
        return reduce(tensor, reduction="sum") if PartialState().num_processes > 1 else tensor

    def compute_statistics(self, task: Task) -> None:
        """One batched pass over the task's training images with eval transforms, adapters merged
        and in the run's precision; float64 sums are reduced across processes so every process
        holds the same, exact statistics."""
        device = self.args.device
        batches = tqdm(self._shard_loader(task.train), desc=f"class statistics of task {task.task_id + 1}",
                       unit="batch", leave=False, disable=not self.show_progress)
        with inference_context(self.model, self.args) as model:
            for batch in batches:
                feats = model.features(batch["pixel_values"].to(device))
                self.statistics.update(feats, task.statistics_keys(batch["labels"].to(device)))
        self.statistics.finalize(task.task_id, [task.statistics_keys(c) for c in task.classes], reduce=self._reduce)

    def evaluate(self, task_id: int) -> tuple[list[float], float, list[int]]:
        """Accuracy on each seen task's test data and over all of it (micro), predicting among all
        classes seen so far. Batches go through Accelerate (`gather_for_metrics`), so every test
        sample is counted once whatever the number of processes."""
        with inference_context(self.model, self.args):
            correct, total = self._count_correct(task_id)
        if (total == 0).any():
            empty = [int(j) + 1 for j in np.nonzero(total == 0)[0]]
            raise ValueError(f"task(s) {empty} have no test images; every task needs test data to be scored.")
        row = (100.0 * correct / total).tolist()
        return row, float(100.0 * correct.sum() / total.sum()), total.astype(int).tolist()

    def _count_correct(self, task_id: int) -> tuple[np.ndarray, np.ndarray]:
        model, accelerator = self.model, self.accelerator
        correct = np.zeros(task_id + 1)
        total = np.zeros(task_id + 1)
        for j in range(task_id + 1):
            loader = accelerator.prepare_data_loader(DataLoader(
                self.tasks[j].test.with_transform(self.eval_transform),
                batch_size=self.args.per_device_eval_batch_size,
                collate_fn=collate_fn,
                num_workers=self.args.dataloader_num_workers,
            ))
            hits = torch.zeros((), dtype=torch.long, device=accelerator.device)
            for batch in tqdm(loader, desc=f"evaluating on task {j + 1}", unit="batch", leave=False,
                              disable=not self.show_progress):
                preds = model(pixel_values=batch["pixel_values"].to(accelerator.device)).logits.argmax(dim=1)
                preds, labels = accelerator.gather_for_metrics((preds, batch["labels"].to(accelerator.device)))
                hits += (preds == labels).sum()
                total[j] += labels.numel()
            correct[j] = hits.item()
        return correct, total

    def continual_metrics(self) -> dict[str, float]:
        """The metrics after the newest task: accuracy on all seen classes, on each seen task, and
        the stream summaries so far (Last-Acc, Inc-Acc, forgetting, BWT)."""
        summary = self.result.summary()
        t = len(self.result.accuracy_matrix) - 1
        metrics = {"seen_accuracy": self.result.seen_accuracy[-1], "task": t + 1}
        row = self.result.accuracy_matrix[-1]
        metrics.update({f"accuracy_{self.tasks[j].display_name}": a for j, a in enumerate(row)})
        for key in ("last_accuracy", "average_incremental_accuracy", "average_forgetting", "backward_transfer"):
            metrics[key] = float(summary[key])
        return metrics

    def metrics(self) -> dict[str, Any]:
        """What metrics.json holds."""
        summary = self.result.summary()
        return {
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
            **self.run_metadata,
        }

    def save(self, directory: Path, unaligned: dict[str, torch.Tensor]) -> None:
        """The main process writes; the others wait so nobody reads a checkpoint being written."""
        if self.trainer is None or self.trainer.is_world_process_zero():
            from .checkpoint import save_checkpoint

            save_checkpoint(self.model, directory, statistics=self.statistics, state=self.state(),
                            unaligned_head=unaligned)
        if self.trainer is not None:
            self.trainer.accelerator.wait_for_everyone()

    @property
    def hub_repo_id(self) -> str:
        return self.args.hub_model_id or self.output_dir.absolute().name

    def _check_pushable(self) -> None:
        """Fail before any training if the pushed checkpoints could not be loaded elsewhere."""
        from .hub import local_base_problem

        base = self.model.settings()["base_model_name_or_path"]
        problem = local_base_problem(base, self.model.slca_config.use_lora, self.args.hub_base_model_id)
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


def format_accuracy_table(matrix: list[list[float]], seen: list[float]) -> str:
    """The accuracy matrix as a text table (rows: after task t; columns: task j; last: all seen)."""
    n = len(matrix)
    header = "after \\ on " + " ".join(f"T{j + 1:<5d}" for j in range(n)) + "  all seen"
    lines = [header]
    for t, row in enumerate(matrix):
        cells = " ".join(f"{a:6.1f}" for a in row) + "       " * (n - len(row))
        lines.append(f"task {t + 1:<6d}" + cells + f"  {seen[t]:8.1f}")
    return "\n".join(lines)
