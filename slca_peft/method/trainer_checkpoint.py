"""`SLCATrainer`'s output_dir as a continual checkpoint, so `slca-peft train --continue_from OUTPUT_DIR`
goes on from a transformers-script run.

When training ends (after `load_best_model_at_end`), the trainer gathers the class statistics of the
task's classes as the learner's `StatisticsStep` does after a task (`slca_peft.method.gathering`: frozen
model, pooled features, per-class Gaussians, shares summed across processes), and `save_model()` into
output_dir then writes, beside the model files, the statistics, the heads (unaligned = aligned after one
task) and the task history (`continual_state.json`: task sizes, class ids, names, and the evaluation's
accuracy as the one-task accuracy matrix) with `slca_peft.method.learner_state`.

Which images and transform: SLCA computes the statistics on the task's training images with the
evaluation transform (no random crops or flips: the Gaussians describe the features the classifier
sees at test time). A script like transformers' `run_image_classification.py` gives the trainer only
`train_dataset` (training transform) and `eval_dataset` (another split, evaluation transform), so by
default, when both are `datasets.Dataset`s of the same features with a `with_transform` transform, the
statistics use the training rows with `eval_dataset`'s transform; otherwise the train dataset as given
(its training transform, which one log line says). `statistics_dataset=` chooses the images and
transform explicitly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..utils.errors import UserError
from ..utils.logging import shows_progress
from ..utils.timing import clock
from .gathering import add_class_statistics, process_share
from .statistics import ClassStatistics

logger = logging.getLogger(__name__)

__all__ = ["TrainerCheckpoint", "eval_transform_view"]


def eval_transform_view(train: Any, evaluation: Any) -> Any | None:
    """`train`'s rows with `evaluation`'s transform, when both are `datasets.Dataset`s of the same features
    whose transform was set by `with_transform`/`set_transform` (as transformers' example scripts do);
    None otherwise."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of the package
        return None
    if not (isinstance(train, datasets.Dataset) and isinstance(evaluation, datasets.Dataset)):
        return None
    wanted, given = evaluation.format, train.format
    transform = (wanted.get("format_kwargs") or {}).get("transform")
    if wanted.get("type") != "custom" or given.get("type") != "custom" or transform is None:
        return None
    if train.features != evaluation.features:
        return None
    return train.with_transform(transform, columns=wanted.get("columns"),
                                output_all_columns=wanted.get("output_all_columns", False))


def _as_percent(accuracy: float, history: list[dict[str, Any]]) -> float | None:
    """An accuracy as `compute_metrics` reports it in percent: a fraction, unless one of the run's evaluations
    reported more than 1 (then every one is a percentage already: 0.8 is 0.8 %, not 80 %)."""
    percent = any(isinstance(v, (int, float)) and v > 1.0 for v in (e.get("eval_accuracy") for e in history))
    value = accuracy if percent else 100.0 * accuracy
    return value if 0.0 <= value <= 100.0 else None


def _latest_accuracy(entries: list[dict[str, Any]]) -> float | None:
    for entry in reversed(entries):
        value = entry.get("eval_accuracy")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


class TrainerCheckpoint:
    """The continual-checkpoint part of `SLCATrainer` (a mixin before `Trainer` in its bases)."""

    #: Set by `SLCATrainer.__init__`.
    statistics_dataset: Any = None
    gather_statistics: bool = True
    #: The task's class statistics once training ended (None before, or when they are not gathered).
    class_statistics: ClassStatistics | None = None
    _trained_log_length: int | None = None
    _timing: dict[str, float] | None = None

    def _end_training(self, training_seconds: float) -> None:
        """After `Trainer.train` (best model loaded): gather the statistics of the task's classes."""
        self._trained_log_length = len(self.state.log_history)
        self._timing = {"training_seconds": training_seconds}
        if self.gather_statistics:
            started = clock()
            try:
                self.class_statistics = self.gather_class_statistics()
            except UserError as err:  # the trained model is kept: the script goes on to save it
                logger.warning("class statistics could not be gathered (%s); output_dir will hold the model files "
                               "only, which --continue_from cannot go on from. Fix the data, then set "
                               "trainer.class_statistics = trainer.gather_class_statistics(dataset) and "
                               "save_model() again.", err)
            self._timing["statistics_seconds"] = clock() - started

    def statistics_source(self) -> Any | None:
        """The images and transform the statistics are computed on (module docstring), said in one line."""
        if self.statistics_dataset is not None:
            logger.info("class statistics: on statistics_dataset (%s images).", _size(self.statistics_dataset))
            return self.statistics_dataset
        view = eval_transform_view(self.train_dataset, self.eval_dataset)
        if view is not None:
            logger.info("class statistics: on the %s training images with eval_dataset's transform (as SLCA computes "
                        "them); statistics_dataset= chooses other images or another transform.", _size(view))
            return view
        if self.train_dataset is not None:
            logger.info("class statistics: on train_dataset as given, with its training transform if it has one (SLCA "
                        "uses the evaluation transform); pass statistics_dataset= (the training images with the "
                        "evaluation transform) to match the method.")
        return self.train_dataset

    def gather_class_statistics(self, dataset: Any | None = None) -> ClassStatistics | None:
        """The per-class Gaussians of the task's classes over `dataset` (default `statistics_source()`),
        summed across processes (every process must call it); None for a model that learned earlier tasks
        (their statistics are not the trainer's: `ContinualLearner` keeps them) or without data."""
        model, args = self.slca_model, self.args
        if model.classifier.num_tasks != 1 or self.task_id != 0:
            logger.info("class statistics are not gathered: the model holds %d task heads, whose earlier classes' "
                        "statistics the trainer does not have; output_dir holds the model files only "
                        "(ContinualLearner writes continual checkpoints of several tasks).",
                        model.classifier.num_tasks)
            return None
        dataset = dataset if dataset is not None else self.statistics_source()
        if dataset is None:
            return None
        statistics = ClassStatistics(model.feature_dim, ridge=args.ca_ridge, covariance_form=args.ca_covariance_form,
                                     covariance_rank=args.ca_covariance_rank)
        total = model.classifier.num_classes

        def positions(labels: torch.Tensor) -> torch.Tensor:
            if labels.numel() and bool(((labels < 0) | (labels >= total)).any()):
                raise UserError(f"the statistics data has labels in [{int(labels.min())}, {int(labels.max())}] but the "
                                f"task's classes are [0, {total}); give statistics_dataset the task's training images.")
            return labels

        batches = tqdm(self._statistics_loader(dataset), desc="class statistics", unit="batch", leave=False,
                       disable=not (shows_progress(args) and self.is_world_process_zero()))
        return add_class_statistics(statistics, model, args, batches, self.task_id, list(range(total)), positions)

    def _statistics_loader(self, dataset: Any) -> DataLoader:
        """This process's exact share, batched as evaluation batches are (the trainer's collator)."""
        import datasets

        collator = self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="statistics")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="statistics")
        args = self.args
        return DataLoader(process_share(dataset), batch_size=args.per_device_eval_batch_size, collate_fn=collator,
                          num_workers=args.dataloader_num_workers,
                          pin_memory=args.dataloader_pin_memory and torch.cuda.is_available())

    def evaluated_accuracy(self) -> float | None:
        """`eval_accuracy` (in percent) of the model as it is now: the latest `evaluate` since training
        ended, else the evaluation of the weights training ended with (the best checkpoint's under
        `load_best_model_at_end`, the last step's otherwise), else None."""
        history = list(self.state.log_history)
        trained = self._trained_log_length
        if trained is None:  # not trained by this trainer: the latest evaluation is of the model as it is
            found = _latest_accuracy(history)
        else:
            found = _latest_accuracy(history[trained:])
            if found is None:
                step = self._saved_weights_step()
                found = None if step is None else _latest_accuracy([e for e in history[:trained]
                                                                    if e.get("step") == step])
        return None if found is None else _as_percent(found, history)

    def _saved_weights_step(self) -> int | None:
        """The step whose weights the model holds after training: the best checkpoint's under
        `load_best_model_at_end` (its folder is `checkpoint-<step>`), else the last step."""
        best = self.state.best_model_checkpoint
        if not (self.args.load_best_model_at_end and best):
            return self.state.global_step
        step = Path(best).name.rpartition("-")[2]
        return int(step) if step.isdigit() else None

    def task_history(self) -> dict[str, Any]:
        """`continual_state.json` of this run: one task of the model's classes, scored by `evaluated_accuracy`
        (a missing entry without an evaluation), as `ContinualLearner`'s CheckpointStep records a task."""
        model = self.slca_model
        sizes = list(model.classifier.task_sizes)
        accuracy = self.evaluated_accuracy()
        evaluated = self.eval_dataset if accuracy is not None and hasattr(self.eval_dataset, "__len__") else None
        ids = list(model.class_ids)
        names = model.label_names or [model.id2label[k] for k in range(model.num_outputs)]  # class-id order
        return {
            "method": self.args.method, "tasks_learned": len(sizes), "task_sizes": sizes, "class_order": ids,
            "class_ids": ids, "label_names": list(names), "task_data": [None] * len(sizes),
            "segments": [trainer_segment(len(sizes))],
            "accuracy_matrix": [[accuracy]], "seen_accuracy": [accuracy],
            "task_test_sizes": [len(evaluated) if evaluated is not None else 0],
            "timings": [dict(self._timing or {})], "training_seed": self.args.seed,
        }

    def continual_files(self) -> dict[str, Any]:
        """What `_save` writes beside the model files: the run state, once training ended with statistics
        (a checkpoint-N folder, saved while training, holds the model files only)."""
        if self.class_statistics is None:
            return {}
        return {"statistics": self.class_statistics, "state": self.task_history(),
                "unaligned_head": self.slca_model.classifier.snapshot()}


#: What a trainer run's accuracy was measured on (the card's `local_results.over`).
TRAINER_TEST_DATA = "the eval_dataset given to SLCATrainer"


def trainer_segment(tasks: int) -> dict[str, Any]:
    """The one part of a trainer run's task history: its tasks, learned from data it records no name of, scored
    on its `eval_dataset` (which a continuation's card keeps saying)."""
    return {"first_task": 0, "tasks": tasks, "data": None, "test_data": TRAINER_TEST_DATA}


def _size(dataset: Any) -> str:
    return str(len(dataset)) if hasattr(dataset, "__len__") else "all"
