"""`ContinualLearner`: the task loop of SLCA.

The loop itself is thin: for each task it grows the classifier, trains with `SLCATrainer` and hands
the task to the after-task steps (statistics -> alignment -> evaluation -> checkpoint -> push ->
report, see `slca_peft.continual.steps`), then restores the unaligned heads for the next task. The steps
do the work and keep its state; add your own with `callbacks=[...]` or `add_callback`, and replace
or remove a built-in one with `replace_callback` / `remove_callback`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import TrainerCallback, set_seed

from ..data.continuation import ContinuedStream
from ..data.tasks import Task, TaskSequence, TaskStream, stream_class_ids
from ..data.transforms import collate_fn, make_batch_transform
from ..method.config import SLCAConfig, as_slca_config
from ..method.statistics import ClassStatistics
from ..method.trainer import SLCATrainer
from ..metrics import summarize_accuracy_matrix
from ..models.backbones import lora_targets_for
from ..models.model import SLCAModel
from ..utils import logging as logging_utils
from ..utils.errors import no_exit
from ..utils.files import task_dir_name
from ..utils.timing import checked_timings, clock
from .callbacks import Callback, CallbackHandler, ContinualCallback
from .checkpoint import load_checkpoint
from .run_dir import latest_checkpoint
from .steps import PushStep, StatisticsStep, default_steps
from .tracking import ContinualTracker

logger = logging_utils.get_logger(__name__)


@dataclass
class ContinualResult:
    """Accuracies in percent. `accuracy_matrix[t][j]`: task j's test classes after task t."""

    accuracy_matrix: list[list[float]] = field(default_factory=list)
    seen_accuracy: list[float] = field(default_factory=list)
    task_test_sizes: list[int] = field(default_factory=list)
    #: Per task: seconds and images of each phase (`slca_peft.utils.timing`); `{}` for a task not timed.
    timings: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return summarize_accuracy_matrix(self.accuracy_matrix, self.task_test_sizes)


class ContinualLearner:
    """Runs a task stream (`TaskSequence`, `DomainSequence`, or any `TaskStream`) through an
    `SLCAModel` with the method `args.method` selects.

    `callbacks` takes `ContinualCallback`s (after-task hooks, run after the built-in steps in the
    order given) and `transformers.TrainerCallback`s (handed to every task's trainer); one object
    may be both. `statistics`, `result` and `unaligned_head` continue a run (`from_checkpoint`).
    """

    latest_checkpoint = staticmethod(latest_checkpoint)

    def __init__(
        self,
        model: SLCAModel,
        args: SLCAConfig,
        tasks: TaskStream,
        *,
        train_transform=None,
        eval_transform=None,
        callbacks: Sequence[Callback | type[Callback]] | None = None,
        statistics: ClassStatistics | None = None,
        result: ContinualResult | None = None,
        unaligned_head: dict[str, torch.Tensor] | None = None,
    ):
        args = as_slca_config(args)  # a plain TrainingArguments is converted, as SLCATrainer does
        self.model, self.args, self.tasks = model, args, tasks
        self.set_transforms(train_transform, eval_transform)
        self.result = result or ContinualResult()
        #: The current task's heads before alignment (representation learning continues from them).
        self.unaligned_head = unaligned_head
        self.trainer: SLCATrainer | None = None
        #: Extra facts a checkpoint's task history records (the recipe sets the dataset's Hub id).
        self.run_metadata: dict[str, Any] = {}
        #: `report_to` trackers, one run for the whole stream (the task trainers report through it).
        self.tracker = ContinualTracker(args.report_to)
        statistics = statistics or StatisticsStep.new_statistics(model, args)
        self.callback_handler = CallbackHandler(default_steps(statistics), callbacks or [])
        # The loop pushes whole continual checkpoints, one commit per task, and owns the trackers;
        # the Trainer's own pushes (adapter files only, mid-task) and trackers are switched off.
        self._trainer_args = copy.copy(args)
        self._trainer_args.report_to = "none"
        if args.push_to_hub:
            PushStep.check_pushable(model, args)
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
        with logging_utils.progress_bars(logging_utils.shows_progress(args)):
            model, statistics, state, unaligned = load_checkpoint(checkpoint, revision, expected_base=expected_base)
        check_resumable(checkpoint, model, statistics, state, args, tasks)
        result = ContinualResult(accuracy_matrix=state["accuracy_matrix"], seen_accuracy=state["seen_accuracy"],
                                 task_test_sizes=state["task_test_sizes"],
                                 timings=checked_timings(state.get("timings"), len(state["accuracy_matrix"]),
                                                         str(checkpoint)))
        return cls(model, args, tasks, statistics=statistics, result=result, unaligned_head=unaligned, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        args: SLCAConfig,
        tasks: TaskSequence | ContinuedStream,
        *,
        revision: str | None = None,
        expected_base: str | Sequence[str | None] | None = None,
        merge_existing_classes: bool = False,
        old_test: Dataset | None = None,
        **kwargs: Any,
    ) -> ContinualLearner:
        """Go on learning from a checkpoint (directory or Hub repo) with tasks of new classes.

        Model, class statistics, unaligned heads and task history are loaded; `tasks` (a `TaskSequence`
        of the new data) is appended after the learned tasks as a `ContinuedStream`: old classes keep
        their ids and names, new ones take the next positions and ids. `merge_existing_classes` and
        `old_test` (test images of learned classes, to keep scoring old tasks) are the stream's options.
        Continuing with another method or backbone setting than the checkpoint's is refused before any
        training, as is another base model than `expected_base`. To finish the stream a checkpoint was
        cut from after an interruption, use `from_checkpoint`.
        """
        with logging_utils.progress_bars(logging_utils.shows_progress(args)):
            model, statistics, state, unaligned = load_checkpoint(path_or_repo_id, revision,
                                                                  expected_base=expected_base)
        if state is None or statistics is None:
            raise ValueError(f"{path_or_repo_id} has no task history or class statistics, which continuing needs; "
                             "give a task_<t> checkpoint written by ContinualLearner (or the recipe).")
        check_same_model(path_or_repo_id, model, state, args)
        if not isinstance(tasks, ContinuedStream):
            tasks = ContinuedStream(state, tasks, merge_existing_classes=merge_existing_classes, old_test=old_test,
                                    continued_from=str(path_or_repo_id))
        elif merge_existing_classes or old_test is not None:
            raise ValueError("merge_existing_classes and old_test are options of the ContinuedStream; set them there.")
        learned = tasks.previous
        if model.classifier.task_sizes != learned["task_sizes"]:
            raise ValueError(f"{path_or_repo_id}: the classifier's heads {model.classifier.task_sizes} do not match "
                             f"the task history's {learned['task_sizes']}; the checkpoint is damaged.")
        missing = [c for c in range(tasks.num_old_classes) if c not in statistics.means]
        if missing:
            raise ValueError(f"{path_or_repo_id} lacks the class statistics of classes {missing[:5]}; it cannot go on.")
        model.label_names = tasks.label_names
        result = ContinualResult(accuracy_matrix=learned["accuracy_matrix"], seen_accuracy=learned["seen_accuracy"],
                                 task_test_sizes=learned["task_test_sizes"],
                                 timings=checked_timings(learned["timings"], len(learned["accuracy_matrix"]),
                                                         str(path_or_repo_id)))
        return cls(model, args, tasks, statistics=statistics, result=result, unaligned_head=unaligned, **kwargs)

    # ------------------------------------------------------------------ callbacks (as transformers.Trainer's)
    @property
    def callbacks(self) -> list[ContinualCallback]:
        """After-task hooks in the order they run: the built-in steps, then the user's."""
        return self.callback_handler.callbacks

    @property
    def trainer_callbacks(self) -> list[TrainerCallback]:
        return self.callback_handler.trainer_callbacks

    def add_callback(self, callback: Callback | type[Callback]) -> None:
        """Append a callback (`CallbackHandler.add_callback`)."""
        self.callback_handler.add_callback(callback)

    def get_callback(self, callback: Callback | type[Callback]) -> Any:
        """The first callback that is `callback` or an instance of that class, e.g. the `StatisticsStep`."""
        return self.callback_handler.get_callback(callback)

    def pop_callback(self, callback: Callback | type[Callback]) -> Callback | None:
        """Remove and return the first callback that is `callback` or an instance of that class."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: Callback | type[Callback]) -> None:
        """Remove the first callback that is `callback` or an instance of that class, e.g. `ReportStep`."""
        self.callback_handler.pop_callback(callback)

    def replace_callback(self, old: ContinualCallback | type[ContinualCallback], new: ContinualCallback) -> None:
        """Run `new` where `old` (an instance or a class, e.g. `EvaluationStep`) ran."""
        self.callback_handler.replace_callback(old, new)

    def call_event(self, event: str, *args: Any) -> None:
        """Run a hook on every callback in order (an error in one of the user's names it)."""
        self.callback_handler.call_event(event, self, *args)

    @property
    def statistics(self) -> ClassStatistics | None:
        """The class statistics the `StatisticsStep` keeps (None without that step)."""
        step = self.get_callback(StatisticsStep)
        return step.statistics if step is not None else None

    @statistics.setter
    def statistics(self, statistics: ClassStatistics) -> None:
        step = self.get_callback(StatisticsStep)
        if step is None:
            raise ValueError("the learner has no StatisticsStep to hold statistics; add one first.")
        step.statistics = statistics

    # ------------------------------------------------------------------ the loop
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

    def run(self) -> ContinualResult:
        """Learn every task not yet learned and return the accuracies."""
        if self.train_transform is None or self.eval_transform is None:
            raise ValueError("set the train and eval transforms (set_transforms) before run().")
        logging_utils.set_verbosity_from_args(self.args)  # each task's result line shows, as Trainer's metrics do
        start = len(self.result.accuracy_matrix)
        if self.unaligned_head is not None:
            self.model.classifier.restore(self.unaligned_head)
        with logging_utils.progress_bars(self.show_progress):  # transformers', datasets' and the Hub's bars too
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
                f"checkpoint of task {t} ({task_dir_name(t - 1)}) with its model."
            )
        # Everything a task does is a function of (seed, task id, model state), so a run resumed from a
        # checkpoint repeats an uninterrupted one exactly.
        set_seed(self.args.seed + t)
        if task.head_size > 0:
            self.model.grow(task.head_size)
            # The class id of every output so far: what exports and id2label key classes by.
            ids = stream_class_ids(self.tasks)
            if len(ids) >= self.model.classifier.num_classes:
                self.model.class_ids = ids[: self.model.classifier.num_classes]
        if task.head_size == 1:
            logger.warning(
                "task %d brings one new class: the loss over the current task's logits is 0 for a single logit, so "
                "training leaves the backbone and adapters as they are (only weight decay acts) and classifier "
                "alignment alone fits its output; put two or more new classes in a task (init_cls / increment) to "
                "also learn features for them.", t + 1)
        self.call_event("on_task_begin", task)
        # This task's times: training here, each after-task step with a `phase` in the CallbackHandler.
        timings, timing = self.result.timings, {}
        del timings[t:]
        timings.extend({} for _ in range(t - len(timings)))  # tasks a checkpoint from before timings did not time
        timings.append(timing)
        self.trainer = SLCATrainer(
            model=self.model,
            args=self._trainer_args,
            train_dataset=task.train.with_transform(self.train_transform),
            data_collator=collate_fn,
            callbacks=[*self.trainer_callbacks, self.tracker],
            task_id=t,
        )
        start = clock()
        with no_exit(f"training of task {t + 1}"):  # a TrainerCallback's sys.exit(0) is not a finished run
            self.trainer.train()
        timing["training_seconds"] = clock() - start
        timing["training_images"] = round(len(task.train) * (self.trainer.state.epoch or 0))
        timing["statistics_images"] = len(task.statistics_data)  # with the images of merged classes
        timing["evaluation_images"] = sum(len(self.tasks[j].test or ()) for j in range(t + 1))  # None: no test data
        self.unaligned_head = self.model.classifier.snapshot()
        self.call_event("on_task_end", task)
        self.model.classifier.restore(self.unaligned_head)
        return self.result.accuracy_matrix[-1] if len(self.result.accuracy_matrix) > t else []


def check_resumable(
    checkpoint: str | Path,
    model: SLCAModel,
    statistics: ClassStatistics | None,
    state: dict[str, Any] | None,
    args: SLCAConfig,
    tasks: TaskStream,
) -> None:
    """Refuse, in one line naming the difference, a checkpoint this run cannot continue."""
    if state is None or statistics is None:
        raise ValueError(f"{checkpoint} has no task history or class statistics; it cannot be resumed.")
    current = tasks.describe()
    for key in ("class_order", "task_sizes", "label_names", "incremental", "domains"):
        if state.get(key) != current.get(key):
            raise ValueError(
                f"{checkpoint}: {key} differs from this run's ({state.get(key)} vs {current.get(key)}); resume "
                "with the same dataset, class_order_seed, init_cls and increment (or the same domains)."
            )
    check_same_model(checkpoint, model, state, args)


def check_same_model(checkpoint: str | Path, model: SLCAModel, state: dict[str, Any], args: SLCAConfig) -> None:
    """Refuse, naming the difference, a checkpoint trained with another method or backbone setting."""
    if state.get("method") != args.method:
        raise ValueError(f"{checkpoint} was trained with method {state.get('method')!r}, not {args.method!r}; "
                         f"go on with --method {state.get('method')}.")
    trained_with, asked = model.slca_config, model.slca_config.fields_from(args)
    for key in ("lora_layout", "reset_final_norm") + (("lora_target_modules",) if trained_with.use_lora else ()):
        wanted, trained = asked[key], getattr(trained_with, key)
        if key == "lora_target_modules":  # as this backbone names them (timm: q/k/v mean its fused qkv)
            wanted = lora_targets_for(model.base_backbone, wanted)
        if trained != wanted:
            raise ValueError(
                f"{checkpoint} was trained with {key}={trained!r}, this run asks for "
                f"{wanted!r}; resume with the same setting (released_code and its knobs)."
            )
