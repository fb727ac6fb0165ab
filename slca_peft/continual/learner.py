"""`ContinualLearner`: the task loop of SLCA.

The loop itself is thin: for each task it grows the classifier, trains with `SLCATrainer` and hands
the task to the after-task steps (statistics -> alignment -> evaluation -> checkpoint -> push ->
report -> trackers, see `slca_peft.continual.steps`). The learner keeps the loop, the model, the
stream, the arguments, the result and the callbacks; the steps do the work and keep its state
(statistics, unaligned heads, trackers), which they create, check and close themselves. Add your own
with `callbacks=[...]` or `add_callback`, and replace or remove a built-in one with
`replace_callback` / `remove_callback`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import TrainerCallback, set_seed

from ..artifacts.layout import checkpoint_dirs
from ..data.continuation import ContinuedStream
from ..data.tasks import Task, TaskSequence, TaskStream, stream_class_ids
from ..data.transforms import (
    EvalTransform,
    ProcessorTransform,
    collate_fn,
    describe_image_processor,
    eval_image_processor,
    make_batch_transform,
    same_pixels,
)
from ..method.config import SLCAConfig, as_slca_config
from ..method.statistics import ClassStatistics
from ..method.trainer import SLCATrainer
from ..models.model import SLCAModel
from ..sharing.hub import default_repo_id, push_folder
from ..utils import logging as logging_utils
from ..utils.errors import UserError, no_exit
from ..utils.timing import clock, finish_timing
from .callbacks import Callback, CallbackHandler, ContinualCallback
from .checkpoint import load_checkpoint
from .result import ContinualResult
from .resume import check_heads_before, check_learned_tasks, check_run_state, check_same_model, check_same_stream
from .run_dir import latest_checkpoint
from .steps import AlignmentStep, StatisticsStep, TrackerStep, default_steps
from .tracking import ContinualTracker

__all__ = ["ContinualLearner", "ContinualResult"]

logger = logging_utils.get_logger(__name__)


class ContinualLearner:
    """Runs a task stream (`TaskSequence`, `DomainSequence`, or any `TaskStream`) through an
    `SLCAModel` with the method `args.method` selects.

    `callbacks` takes `ContinualCallback`s (after-task hooks, run after the built-in steps in the
    order given) and `transformers.TrainerCallback`s (handed to every task's trainer); one object
    may be both. `statistics`, `result` and `unaligned_head` continue a run (`from_checkpoint`): the
    result is the learner's, the others go to the steps that keep them.
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
        #: The image processor the model came with (a checkpoint's): its statistics were computed on its pixels.
        self._loaded_processor = model.image_processor
        self.set_transforms(train_transform, eval_transform)
        self.result = result or ContinualResult()
        self.trainer: SLCATrainer | None = None
        steps = default_steps(model, args, statistics=statistics, unaligned_head=unaligned_head)
        self.callback_handler = CallbackHandler(steps, callbacks or [])
        # The steps push whole continual checkpoints, one commit per task, and hold the trackers; the
        # Trainer's own pushes (adapter files only, mid-task) and trackers are switched off.
        self._trainer_args = copy.copy(args)
        self._trainer_args.report_to, self._trainer_args.push_to_hub = "none", False

    def set_transforms(self, train_transform, eval_transform) -> None:
        """Image -> tensor callables for training and for statistics/evaluation. An `EvalTransform`'s image
        processor (`eval_image_processor`), or a `ProcessorTransform`'s processor, goes into every checkpoint, so
        `pipeline()` preprocesses as the run evaluated."""
        cols = (self.tasks.image_column, self.tasks.label_column)
        if isinstance(eval_transform, EvalTransform):
            self.model.image_processor = eval_image_processor(eval_transform.config)
        elif isinstance(eval_transform, ProcessorTransform):  # a checkpoint's own processor: kept as it is
            self.model.image_processor = eval_transform.processor
        loaded, now = self._loaded_processor, self.model.image_processor
        if loaded is not None and now is not None and not same_pixels(loaded, now):
            logger.warning("the eval transform preprocesses otherwise than the image processor the model came with "
                           "(%s; now %s), which its class statistics were computed with: old and new statistics "
                           "and scores would come from different pixels; pass "
                           "checkpoint_eval_transform(model.image_processor) to keep it.",
                           describe_image_processor(loaded), describe_image_processor(now))
        self.train_transform = make_batch_transform(train_transform, *cols) if train_transform else None
        self.eval_transform = make_batch_transform(eval_transform, *cols) if eval_transform else None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, args: SLCAConfig, tasks: TaskStream, *,
                        revision: str | None = None, expected_base: str | Sequence[str | None] | None = None,
                        **kwargs: Any) -> ContinualLearner:
        """Continue after the last task a checkpoint (directory or Hub repo) has learned.

        The checkpoint must describe the same stream: class order, split and label names.
        """
        with logging_utils.progress_bars(logging_utils.shows_progress(args)):
            model, statistics, state, unaligned = load_checkpoint(checkpoint, revision, expected_base=expected_base)
        check_run_state(checkpoint, statistics, state)
        check_same_stream(checkpoint, state, tasks)
        check_same_model(checkpoint, model, state, args)
        result = ContinualResult.from_history(state, str(checkpoint))
        return cls(model, args, tasks, statistics=statistics, result=result, unaligned_head=unaligned, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, args: SLCAConfig, tasks: TaskSequence | ContinuedStream, *,
                        revision: str | None = None, expected_base: str | Sequence[str | None] | None = None,
                        merge_existing_classes: bool = False, old_test: Dataset | None = None,
                        **kwargs: Any) -> ContinualLearner:
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
        check_run_state(path_or_repo_id, statistics, state)
        check_same_model(path_or_repo_id, model, state, args)
        if not isinstance(tasks, ContinuedStream):
            tasks = ContinuedStream(state, tasks, merge_existing_classes=merge_existing_classes, old_test=old_test,
                                    continued_from=str(path_or_repo_id))
        elif merge_existing_classes or old_test is not None:
            raise UserError("merge_existing_classes and old_test are options of the ContinuedStream; set them there.")
        check_learned_tasks(path_or_repo_id, model, statistics, tasks)
        model.label_names = tasks.label_names
        result = ContinualResult.from_history(tasks.previous, str(path_or_repo_id))
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
        return getattr(self.get_callback(StatisticsStep), "statistics", None)

    @statistics.setter
    def statistics(self, statistics: ClassStatistics) -> None:
        step = self.get_callback(StatisticsStep)
        if step is None:
            raise UserError("the learner has no StatisticsStep to hold statistics; add one first.")
        step.statistics = statistics

    @property
    def unaligned_head(self) -> dict[str, torch.Tensor] | None:
        """The heads before alignment the `AlignmentStep` keeps (None without that step)."""
        return getattr(self.get_callback(AlignmentStep), "unaligned_head", None)

    @property
    def tracker(self) -> ContinualTracker | None:
        """The run's trackers, which the `TrackerStep` holds while a run lasts (None otherwise)."""
        return getattr(self.get_callback(TrackerStep), "tracker", None)

    def push_to_hub(self, repo_id: str | None = None, *, commit_message: str | None = None, **upload: Any) -> Any:
        """Upload the last task's checkpoint (model, class statistics, heads before alignment, task
        history: what `--continue_from` goes on from) as one commit, through the one door every upload
        takes (`slca_peft.sharing.hub.push_folder`). `repo_id` defaults to `hub_model_id` or the output
        directory's name; `upload`: `push_folder`'s keywords (`private`, `token`, `revision`, `create_pr`,
        `tags`, `commit_description`, `base_model_id`, which defaults to `hub_base_model_id`)."""
        done = checkpoint_dirs(self.output_dir)
        if not done:
            raise UserError(f"{self.output_dir} holds no task checkpoint yet; run() the learner first (each task's "
                            "checkpoint is what push_to_hub uploads).")
        last = max(done)
        upload.setdefault("base_model_id", self.args.hub_base_model_id)
        upload.setdefault("image_processor", self.model.image_processor)  # for a checkpoint saved without one
        message = commit_message or f"task {last + 1}/{len(self.tasks)}"
        return push_folder(done[last], repo_id or default_repo_id(self.args),
                           commit_message=message, **upload)

    # ------------------------------------------------------------------ the loop
    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def is_main_process(self) -> bool:
        return PartialState().is_main_process

    @property
    def show_progress(self) -> bool:
        """Progress bars on the main process unless `disable_tqdm` or transformers' switch
        (`transformers.utils.logging.disable_progress_bar()`) turned them off."""
        return not self.args.disable_tqdm and self.is_main_process and logging_utils.is_progress_bar_enabled()

    def run(self) -> ContinualResult:
        """Learn every task not yet learned and return the accuracies."""
        if self.train_transform is None or self.eval_transform is None:
            raise UserError("set the train and eval transforms (set_transforms) before run().")
        logging_utils.set_verbosity_from_args(self.args)  # each task's result line shows, as Trainer's metrics do
        start = len(self.result.accuracy_matrix)
        try:
            with logging_utils.progress_bars(self.show_progress):  # transformers', datasets' and the Hub's bars too
                self.call_event("on_run_begin")
                for t in range(start, len(self.tasks)):
                    started = clock()
                    task = self.tasks[t]
                    building = clock() - started
                    self.learn_task(task)
                    record = self.result.timings[t] if len(self.result.timings) > t else {}
                    if "other_seconds" in record:  # building the task is part of its `other` phase
                        record["other_seconds"] += building
                self.call_event("on_run_end", self.result)
        except BaseException as error:  # Ctrl-C too: the steps close what they hold, then it goes on
            self.call_event("on_exception", error)
            raise
        return self.result

    def learn_task(self, task: Task) -> list[float]:
        """Grow, train and run the after-task steps; returns the accuracy row. The task's wall time minus
        its phases is its `other` phase (`finish_timing`)."""
        started = clock()
        t = task.task_id
        check_heads_before(self.model, self.tasks, t)
        # Everything a task does is a function of (seed, task id, model state), so a run resumed from a
        # checkpoint repeats an uninterrupted one exactly.
        set_seed(self.args.seed + t)
        grow_for(self.model, self.tasks, task)
        self.call_event("on_task_begin", task)
        timing = self.result.new_timing(t)  # training here, each step with a `phase` in the CallbackHandler
        self.trainer = SLCATrainer(
            model=self.model,
            args=self._trainer_args,
            train_dataset=task.train.with_transform(self.train_transform),
            data_collator=collate_fn,
            callbacks=self.callback_handler.task_trainer_callbacks(),
            task_id=t,
            gather_statistics=False,  # the StatisticsStep gathers them, with the task's merged classes
        )
        start = clock()
        with no_exit(f"training of task {t + 1}"):  # a TrainerCallback's sys.exit(0) is not a finished run
            self.trainer.train()
        timing["training_seconds"] = clock() - start
        timing["training_images"] = round(len(task.train) * (self.trainer.state.epoch or 0))
        timing["statistics_images"] = len(task.statistics_data)  # with the images of merged classes
        timing["evaluation_images"] = sum(len(self.tasks[j].test or ()) for j in range(t + 1))  # None: no test data
        self.call_event("on_task_end", task)
        finish_timing(timing, clock() - started)
        return self.result.accuracy_matrix[-1] if len(self.result.accuracy_matrix) > t else []


def grow_for(model: SLCAModel, tasks: TaskStream, task: Task) -> None:
    """Grow the classifier by `task`'s head (none for a new domain) and name every output's class id."""
    if task.head_size > 0:
        model.grow(task.head_size)
        # The class id of every output so far: what exports and id2label key classes by.
        ids = stream_class_ids(tasks)
        if len(ids) >= model.classifier.num_classes:
            model.class_ids = ids[: model.classifier.num_classes]
    if task.head_size == 1:
        logger.warning(
            "task %d brings one new class: the loss over the current task's logits is 0 for a single logit, so "
            "training leaves the backbone and adapters as they are (only weight decay acts) and classifier "
            "alignment alone fits its output; put two or more new classes in a task (init_cls / increment) to "
            "also learn features for them.", task.task_id + 1)
