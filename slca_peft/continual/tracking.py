"""One tracker run per continual run.

A `Trainer` builds its `report_to` integrations (TensorBoard, W&B, MLflow, ...) anew and restarts
its step counter, so one trainer per task would give one tracker run per task. `ContinualTracker`
builds the integrations once, is handed to every task's trainer as a callback, and forwards every
event with the global step shifted by the steps of the tasks before: the trackers see one run whose
step keeps counting across tasks, and the continual metrics are logged on the same path.

`TrackerStep`, a built-in step of the loop, owns that tracker: it builds it when the run begins,
hands it to each task's trainer and closes it when the run ends or fails, so a run without the
`ReportStep` still ends its tracker run (and one without the `TrackerStep` reports to no tracker).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.integrations import get_reporting_integration_callbacks

from ..utils.reading import open_regular
from .callbacks import ContinualCallback

if TYPE_CHECKING:
    from .learner import ContinualLearner

logger = logging.getLogger(__name__)


class ContinualTracker(TrainerCallback):
    """The `report_to` integrations of a continual run, shared by the trainers of all its tasks."""

    def __init__(self, report_to: str | list[str] | None):
        self.callbacks: list[TrainerCallback] = [cls() for cls in get_reporting_integration_callbacks(report_to)]
        self.step_offset = 0
        self._started = False
        self._args = None
        self._state: TrainerState | None = None

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken over every task so far."""
        return self.step_offset

    def _shifted(self, state: TrainerState, step: int | None = None) -> TrainerState:
        shifted = copy.copy(state)
        shifted.global_step = state.global_step + self.step_offset if step is None else step
        return shifted

    def _forward(self, event: str, args, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._args, self._state = args, state
        for callback in self.callbacks:
            getattr(callback, event)(args, self._shifted(state), control, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._started:  # the trackers open their run once, for the first task
            self._started = True
            self._forward("on_train_begin", args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        # The run goes on with the next task: keep the trackers open, count this task's steps.
        self._args, self._state = args, state
        self.step_offset += state.global_step

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send `metrics` to every tracker at `step` (default: the global step now)."""
        if not self.callbacks or self._state is None:
            return
        state = self._shifted(self._state, self.global_step if step is None else step)
        for callback in self.callbacks:
            callback.on_log(self._args, state, TrainerControl(), logs=dict(metrics))

    def log_scalars(self, scalars: dict[str, float], step: int | None = None) -> None:
        """Send `scalars` under the names given (e.g. `time/training_seconds`). `log` goes through
        the integrations' `on_log`, and TensorBoard's and W&B's file every name without an `eval_`
        prefix under `train/`; these are not training metrics."""
        if not self.callbacks or self._state is None:
            return
        step = self.global_step if step is None else step
        for callback in self.callbacks:
            name = type(callback).__name__
            if name == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is not None:
                for tag, value in scalars.items():
                    callback.tb_writer.add_scalar(tag, value, step)
                callback.tb_writer.flush()
            elif name == "WandbCallback" and getattr(callback, "_wandb", None) is not None:
                callback._wandb.log({**scalars, "train/global_step": step})
            else:
                callback.on_log(self._args, self._shifted(self._state, step), TrainerControl(), logs=dict(scalars))

    def log_image(self, tag: str, path: str | Path, step: int | None = None) -> None:
        """Send a PNG to the trackers that take images (TensorBoard, W&B, MLflow)."""
        step = self.global_step if step is None else step
        for callback in self.callbacks:
            name = type(callback).__name__
            if name == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is not None:
                import numpy as np
                from PIL import Image

                with open_regular(path, fix="the plot is written by the run") as handle, Image.open(handle) as image:
                    array = np.asarray(image.convert("RGB"))
                callback.tb_writer.add_image(tag, array, step, dataformats="HWC")
                callback.tb_writer.flush()
            elif name == "WandbCallback" and getattr(callback, "_wandb", None) is not None:
                callback._wandb.log({tag: callback._wandb.Image(str(path))})
            elif name == "MLflowCallback" and getattr(callback, "_ml_flow", None) is not None:
                callback._ml_flow.log_artifact(str(path))
            else:
                logger.debug("%s takes no images; %s not sent to it", name, tag)

    def close(self) -> None:
        """End the trackers' run (at the end of the continual run)."""
        if self._state is not None and self._started:
            for callback in self.callbacks:
                callback.on_train_end(self._args, self._shifted(self._state, self.global_step), TrainerControl())
        self._started = False


class TrackerStep(ContinualCallback):
    """Owns the run's `ContinualTracker` (`learner.tracker` reads it): built from `args.report_to`
    when the run begins, handed to every task's trainer, closed when the run ends (after the
    `ReportStep` sent the last figures) or fails. None outside a run."""

    def __init__(self):
        self.tracker: ContinualTracker | None = None

    def on_run_begin(self, learner: ContinualLearner) -> None:
        self.close()  # a tracker left by a run that stopped without on_exception
        self.tracker = ContinualTracker(learner.args.report_to)

    def trainer_callbacks(self) -> list[TrainerCallback]:
        return [self.tracker] if self.tracker is not None else []

    def on_run_end(self, learner, result):
        self.close()

    def on_exception(self, learner, error):
        self.close()

    def close(self) -> None:
        """End the trackers' run, if one is open."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.close()


def _forwarder(event: str):
    def forward(self: ContinualTracker, args, state, control, **kwargs):
        self._forward(event, args, state, control, **kwargs)

    forward.__name__ = event
    return forward


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_")]:
    if _event not in vars(ContinualTracker):
        setattr(ContinualTracker, _event, _forwarder(_event))
