"""The built-in after-task steps of the continual loop, each owning its part of the work and its state.

As Avalanche's plugins do, every step keeps what it produces, checks what it needs when the run
begins and lets go of it when the run ends or fails: `StatisticsStep` the run's `ClassStatistics`
(update over this process's share, reduce across processes, finalize; `learner.statistics` reads
them), `AlignmentStep` the heads before alignment (`learner.unaligned_head`), put back for the next
task, `EvaluationStep` the counting and the result rows it appends to `learner.result`,
`CheckpointStep` the task checkpoints on disk, `PushStep` their uploads (checked pushable first),
`ReportStep` metrics.json and the plots (`slca_peft.continual.reporting`) and `TrackerStep` the
`report_to` trackers (`slca_peft.continual.tracking`). `ContinualLearner` only runs them, in the
order `default_steps` gives, then the user's callbacks (the hook protocol:
`slca_peft.continual.callbacks`). Replace or remove one with
`learner.replace_callback(EvaluationStep, MyEvaluation())` or `learner.remove_callback(ReportStep)`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..artifacts.layout import task_dir_name
from ..artifacts.manifest import safe_path
from ..data.tasks import stream_class_ids
from ..data.transforms import collate_fn, default_image_processor
from ..method.alignment import AlignmentSettings, ClassifierAligner
from ..method.gathering import add_class_statistics, process_share
from ..method.statistics import ClassStatistics
from ..models.inference import inference_context
from ..sharing.hub import UPLOAD_ERRORS, check_pushable, check_run_repo_id, default_repo_id, push_folder
from ..utils.errors import UserError
from ..utils.logging import RepeatedWarning
from .callbacks import ContinualCallback
from .checkpoint import save_checkpoint
from .reporting import ReportStep, write_plots
from .run_dir import prune_checkpoints
from .tracking import TrackerStep

if TYPE_CHECKING:
    from ..data.tasks import Task
    from ..method.config import SLCAConfig
    from ..models.model import SLCAModel
    from .learner import ContinualLearner

__all__ = ["AlignmentStep", "CheckpointStep", "EvaluationStep", "PushStep", "ReportStep", "StatisticsStep",
           "TrackerStep", "default_steps", "write_plots"]

logger = logging.getLogger(__name__)


class StatisticsStep(ContinualCallback):
    """Per-class Gaussians of the task's training features (kept; old data is gone).

    Owns the run's `ClassStatistics` (`learner.statistics` reads it): one batched pass over the
    task's training images with eval transforms, adapters merged and in the run's precision; float64
    sums are reduced across processes, so every process holds the same, exact statistics.
    """

    phase = "statistics"

    def __init__(self, statistics: ClassStatistics | None = None):
        #: A checkpoint's statistics to go on from; None: empty ones are made when the run begins.
        self.statistics = statistics

    @classmethod
    def for_run(cls, model: SLCAModel, args: SLCAConfig, statistics: ClassStatistics | None = None) -> StatisticsStep:
        """The step of a run of `model` with `args`: with `statistics` to continue from, else with empty
        ones in the covariance form the run asks for (readable as `learner.statistics` before the run)."""
        return cls(statistics or cls.new_statistics(model, args))

    @staticmethod
    def new_statistics(model: SLCAModel, args: SLCAConfig) -> ClassStatistics:
        """Empty statistics in the covariance form the run asks for."""
        return ClassStatistics(model.feature_dim, ridge=args.ca_ridge, covariance_form=args.ca_covariance_form,
                               covariance_rank=args.ca_covariance_rank)

    def on_run_begin(self, learner):
        if self.statistics is None:
            self.statistics = self.new_statistics(learner.model, learner.args)

    def on_task_end(self, learner, task):
        self.compute(learner, task)

    def compute(self, learner: ContinualLearner, task: Task) -> ClassStatistics:
        """Add `task`'s classes to the statistics (update over this process's share, then finalize)."""
        self.on_run_begin(learner)  # called on its own, before any run
        device = learner.args.device
        if task.merged_classes:  # learned classes this task's data adds images to: their sums, counted once
            self.statistics.reopen([task.statistics_keys(c) for c in task.merged_classes],
                                   sums=PartialState().process_index == 0, device=device)
        batches = tqdm(self.loader(learner, task.statistics_data), desc=f"class statistics of task {task.task_id + 1}",
                       unit="batch", leave=False, disable=not learner.show_progress)
        return add_class_statistics(self.statistics, learner.model, learner.args, batches, task.task_id,
                                    [task.statistics_keys(c) for c in task.classes], task.statistics_keys)

    @staticmethod
    def loader(learner: ContinualLearner, dataset) -> DataLoader:
        """This process's exact share (every `world`-th sample): no sampler padding, so sums and
        counts reduced across processes count every sample once."""
        args = learner.args
        return DataLoader(
            process_share(dataset).with_transform(learner.eval_transform),
            batch_size=args.per_device_eval_batch_size,
            collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
        )


class AlignmentStep(ContinualCallback):
    """Retrain every head on features sampled from the class Gaussians (from the second task on).

    Owns the heads before alignment (`unaligned_head`, `learner.unaligned_head` reads them): taken
    when a task ends, before aligning; written with each checkpoint; put back into the classifier when
    the next task begins (representation learning goes on from them, not from the aligned heads) and
    when the run ends. A resumed run starts from those its checkpoint kept.
    """

    phase = "alignment"

    def __init__(self, unaligned_head: dict[str, torch.Tensor] | None = None):
        self.unaligned_head = unaligned_head

    def on_run_begin(self, learner):
        if learner.args.align and len(learner.tasks) > 1 and learner.get_callback(StatisticsStep) is None:
            raise RuntimeError("AlignmentStep samples the class statistics, but the learner has no StatisticsStep; "
                               "keep it, or remove AlignmentStep too (learner.remove_callback(AlignmentStep)).")
        self.restore(learner)

    def on_task_begin(self, learner, task):
        self.restore(learner)

    def on_run_end(self, learner, result):
        self.restore(learner)

    def restore(self, learner: ContinualLearner) -> None:
        """Put the unaligned heads back into the heads they were taken of (one grown since keeps its own)."""
        if self.unaligned_head is None:
            return
        classifier = learner.model.classifier
        current = classifier.state_dict()
        if not set(self.unaligned_head) <= set(current):
            classifier.restore(self.unaligned_head)  # raises, naming both
        with torch.no_grad():
            for key, value in self.unaligned_head.items():
                current[key][: len(value)].copy_(value)  # `scales` gains one entry per head grown

    def on_task_end(self, learner, task):
        self.unaligned_head = learner.model.classifier.snapshot()
        if not (learner.args.align and task.task_id > 0):
            return
        aligner = ClassifierAligner(AlignmentSettings.from_config(learner.args), seed=learner.args.seed)
        losses = aligner.align(
            learner.model.classifier, learner.statistics, task.task_id, learner.tasks.statistics_labels,
            progress=learner.show_progress,
        )
        logger.debug("task %d: classifier alignment losses %s", task.task_id + 1, [round(v, 4) for v in losses])


class EvaluationStep(ContinualCallback):
    """Accuracy on every seen task's test data with the aligned heads: appends the row to
    `learner.result` and fires `on_evaluate` with `continual_metrics`.

    A task whose test data is not at hand (`task.test is None`: learned before the stream was continued
    on new data) gets a missing entry (None), neither 0 nor dropped; the accuracy over all seen classes
    and the summaries are then over the tasks measured.
    """

    phase = "evaluation"

    def __init__(self):
        self._accelerator: Accelerator | None = None
        #: task index -> (its test data, the transform, the data with it): `with_transform` fingerprints the
        #: transform (a dill pickle, tens of ms), so each seen task's view is made once, not after every task.
        self._test_views: dict[int, tuple[Any, Any, Any]] = {}

    def on_run_end(self, learner, result):
        self._accelerator = None
        self._test_views = {}

    def on_exception(self, learner, error):
        self._accelerator = None
        self._test_views = {}

    def test_view(self, learner: ContinualLearner, task_id: int, test) -> Any:
        """`test.with_transform(learner.eval_transform)`, made once per task and kept while both are the same."""
        held = self._test_views.get(task_id)
        if held is None or held[0] is not test or held[1] is not learner.eval_transform:
            view = test.with_transform(learner.eval_transform)
            held = self._test_views[task_id] = (test, learner.eval_transform, view)
        return held[2]

    def on_task_end(self, learner, task):
        row, seen, sizes = self.evaluate(learner, task.task_id)
        learner.result.accuracy_matrix.append(row)
        learner.result.seen_accuracy.append(seen)
        learner.result.task_test_sizes = sizes
        learner.call_event("on_evaluate", task, self.continual_metrics(learner))

    def accelerator(self, learner: ContinualLearner) -> Accelerator:
        """The current task trainer's accelerator (one of this step's own before any training)."""
        if learner.trainer is not None:
            return learner.trainer.accelerator
        if self._accelerator is None:
            self._accelerator = Accelerator(cpu=learner.args.use_cpu)
        return self._accelerator

    def evaluate(self, learner: ContinualLearner, task_id: int) -> tuple[list[float], float, list[int]]:
        """Accuracy on each seen task's test data and over all of it (micro), predicting among all
        classes seen so far. Batches go through Accelerate (`gather_for_metrics`), so every test
        sample is counted once whatever the number of processes."""
        with inference_context(learner.model, learner.args):
            correct, total = self.count_correct(learner, task_id)
        given = np.array([learner.tasks[j].test is not None for j in range(task_id + 1)])
        if (given & (total == 0)).any():
            empty = [int(j) + 1 for j in np.nonzero(given & (total == 0))[0]]
            raise UserError(f"task(s) {empty} have no test images; every task needs test data to be scored.")
        if not given.any():
            raise UserError(f"no task up to task {task_id + 1} has test data; give the new data test images.")
        row = [float(100.0 * c / n) if g else None for c, n, g in zip(correct, total, given, strict=True)]
        # A task not measured now keeps the test size it was last measured with (0 if never): the weights
        # of the summaries over earlier rows.
        known = list(learner.result.task_test_sizes) + [0] * (task_id + 1)
        sizes = [int(n) if g else int(known[j]) for j, (n, g) in enumerate(zip(total, given, strict=True))]
        return row, float(100.0 * correct[given].sum() / total[given].sum()), sizes

    def count_correct(self, learner: ContinualLearner, task_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Correct predictions and test samples of each task up to `task_id`."""
        model, accelerator, args = learner.model, self.accelerator(learner), learner.args
        correct = np.zeros(task_id + 1)
        total = np.zeros(task_id + 1)
        for j in range(task_id + 1):
            test = learner.tasks[j].test
            if test is None:
                continue
            loader = accelerator.prepare_data_loader(DataLoader(
                self.test_view(learner, j, test),
                batch_size=args.per_device_eval_batch_size,
                collate_fn=collate_fn,
                num_workers=args.dataloader_num_workers,
            ))
            hits = torch.zeros((), dtype=torch.long, device=accelerator.device)
            for batch in tqdm(loader, desc=f"evaluating on task {j + 1}", unit="batch", leave=False,
                              disable=not learner.show_progress):
                # The heads' position order: the stream's test labels are positions.
                pixels = batch["pixel_values"].to(accelerator.device)
                preds = model(pixel_values=pixels, positions=True).logits.argmax(dim=1)
                preds, labels = accelerator.gather_for_metrics((preds, batch["labels"].to(accelerator.device)))
                hits += (preds == labels).sum()
                total[j] += labels.numel()
            correct[j] = hits.item()
        return correct, total

    @staticmethod
    def continual_metrics(learner: ContinualLearner) -> dict[str, float]:
        """The metrics after the newest task: accuracy on all seen classes, on each seen task, and
        the stream summaries so far (Last-Acc, Inc-Acc, forgetting, BWT)."""
        result = learner.result
        summary = result.summary()
        metrics = {"seen_accuracy": result.seen_accuracy[-1], "task": len(result.accuracy_matrix)}
        row = result.accuracy_matrix[-1]
        metrics.update({f"accuracy_{learner.tasks[j].display_name}": a for j, a in enumerate(row) if a is not None})
        for key in ("last_accuracy", "average_incremental_accuracy", "average_forgetting", "backward_transfer"):
            metrics[key] = float(summary[key])
        return metrics


class CheckpointStep(ContinualCallback):
    """`OUTPUT_DIR/task_<t>`, written atomically: model, statistics, unaligned heads and task history."""

    phase = "checkpoint"

    def __init__(self, run_metadata: dict[str, Any] | None = None):
        #: Extra facts each task history records (the recipe sets the dataset's Hub id, `dataset`).
        self.run_metadata: dict[str, Any] = dict(run_metadata or {})

    def on_task_end(self, learner, task):
        self.save(learner, learner.output_dir / task_dir_name(task.task_id))

    def state(self, learner: ContinualLearner) -> dict[str, Any]:
        """The task history a checkpoint records (`continual_state.json`)."""
        result = learner.result
        tasks = learner.tasks
        # What each task was learned from (a `ContinuedStream` lists it per task; a stream's `source` else).
        source = getattr(tasks, "source", None) or self.run_metadata.get("dataset")
        return {
            "method": learner.args.method,
            "tasks_learned": len(result.accuracy_matrix),
            "task_data": [source] * len(tasks),
            "class_ids": stream_class_ids(tasks),
            **tasks.describe(),
            "accuracy_matrix": result.accuracy_matrix,
            "seen_accuracy": result.seen_accuracy,
            "task_test_sizes": result.task_test_sizes,
            "timings": result.timings,  # this task's without its own checkpoint write (timed after it)
            "training_seed": learner.args.seed,
            **self.run_metadata,
        }

    def save(self, learner: ContinualLearner, directory: Path) -> None:
        """The main process writes; the others wait so nobody reads a checkpoint being written."""
        trainer = learner.trainer
        state = self.state(learner)
        if trainer is None or trainer.is_world_process_zero():
            # A symlink at task_<t> (or a parent leading out of the run) is refused, never replaced or followed.
            directory = safe_path(directory.parent, directory.name)
            if learner.model.image_processor is None:  # no EvalTransform given: the one slca-peft evaluates with
                learner.model.image_processor = default_image_processor(learner.model)
            save_checkpoint(learner.model, directory, statistics=learner.statistics, state=state,
                            unaligned_head=learner.unaligned_head)
            prune_checkpoints(directory.parent, learner.args.save_total_limit)  # only once the new one is whole
        if trainer is not None:
            trainer.accelerator.wait_for_everyone()


class PushStep(ContinualCallback):
    """Uploads each task checkpoint as one commit (`--push_to_hub`); a Hub failure is logged with
    the command that retries it, not fatal (the local checkpoint is complete). Whether the checkpoints
    could be loaded elsewhere is checked when the run begins, before any training."""

    def __init__(self) -> None:
        self.failures = RepeatedWarning()  # a Hub that fails at every task warns once per run

    def on_run_begin(self, learner):
        self.failures = RepeatedWarning()
        if learner.args.push_to_hub:
            check_pushable(learner.model.settings(), learner.args.hub_base_model_id, "push_to_hub is on but ")
            check_run_repo_id(learner.args)  # a repo id the Hub would refuse is refused before any training

    def on_task_end(self, learner, task):
        if learner.args.push_to_hub:
            seen = learner.result.seen_accuracy[-1]
            self.push(learner, learner.output_dir / task_dir_name(task.task_id),
                      f"task {task.task_id + 1}/{len(learner.tasks)}: seen classes {seen:.2f}%")

    def push(self, learner: ContinualLearner, directory: Path, message: str) -> None:
        """Upload a task checkpoint as one commit (main process only)."""
        if not learner.is_main_process:
            return
        args, repo_id = learner.args, default_repo_id(learner.args)
        try:
            push_folder(directory, repo_id, private=args.hub_private_repo, token=args.hub_token,
                        revision=args.hub_revision, commit_message=message, base_model_id=args.hub_base_model_id)
        except UPLOAD_ERRORS as err:  # the Hub or the network (a bug of slca-peft keeps its traceback)
            options = "".join(
                f" {flag} {value}" for flag, value in (("--base_model_id", args.hub_base_model_id),
                                                       ("--revision", args.hub_revision)) if value
            ) + (" --private" if args.hub_private_repo else "")
            self.failures.log(
                logger, type(err).__name__,
                "pushing %s to %s failed (%s); the checkpoint is complete on disk. Push it later with: "
                "slca-peft push %s %s%s", directory, repo_id, err, directory, repo_id, options,
            )
        else:
            logger.info("pushed %s to %s (%s)", directory.name, repo_id, message)


def default_steps(model: SLCAModel, args: SLCAConfig, *, statistics: ClassStatistics | None = None,
                  unaligned_head: dict[str, torch.Tensor] | None = None) -> list[ContinualCallback]:
    """The built-in steps of a run of `model` with `args`, in the order they run (`statistics` and
    `unaligned_head`: a checkpoint's, to continue from)."""
    return [StatisticsStep.for_run(model, args, statistics), AlignmentStep(unaligned_head), EvaluationStep(),
            CheckpointStep(), PushStep(), ReportStep(), TrackerStep()]
