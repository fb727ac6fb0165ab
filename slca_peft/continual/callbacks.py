"""The hooks of the continual loop, shared by the built-in steps (`slca_peft.continual.steps`) and yours.

`ContinualLearner.run()` calls, for each task of the stream:

    grow the classifier -> on_task_begin -> train (SLCATrainer) -> on_task_end

and `on_run_begin` / `on_run_end` around the whole stream; when the run stops with an error (in a
task, a hook or on_run_end itself, Ctrl-C included) every callback's `on_exception` runs instead of
the rest, then the error goes on. `on_task_end` runs the built-in steps first, in this order, then
the callbacks you pass:

    StatisticsStep -> AlignmentStep -> EvaluationStep (fires on_evaluate) -> CheckpointStep
    -> PushStep -> ReportStep -> TrackerStep

so a callback of yours sees the aligned heads, the new accuracy row and a checkpoint on disk. The
learner keeps them all in a `CallbackHandler` (`learner.callbacks`, in run order) managed as
`transformers.Trainer`'s callbacks are: `add_callback`, `pop_callback`, `remove_callback`, plus
`replace_callback` to swap a built-in step in place.

Each step owns what it makes, as Avalanche's plugins do: it creates it (or takes a checkpoint's),
checks what it needs in `on_run_begin` and closes it in `on_run_end` and `on_exception`, so removing
a step leaves nothing open. Hooks get the learner, which holds the loop's own parts (`model`, `args`,
`tasks`, `result`, `trainer`: this task's `SLCATrainer`) and reads the steps' (`statistics`,
`unaligned_head`, `tracker`; None without the step).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ..utils.errors import UserError, no_exit
from ..utils.timing import clock

if TYPE_CHECKING:
    from ..data.tasks import Task
    from .learner import ContinualLearner
    from .result import ContinualResult

logger = logging.getLogger(__name__)


class ContinualCallback:
    """Hooks of the continual loop; override the ones you need (every hook is a no-op here).

    Like `transformers.TrainerCallback`, but per task rather than per step. An exception raised
    in a hook stops the run; the error names the callback.
    """

    #: Name under which the learner times this callback's `on_task_end` (`result.timings`); None: untimed.
    phase: str | None = None

    def on_run_begin(self, learner: ContinualLearner) -> None:
        """Before the first task still to learn (also when resuming)."""

    def on_task_begin(self, learner: ContinualLearner, task: Task) -> None:
        """The classifier has grown for `task`; training has not started."""

    def on_task_end(self, learner: ContinualLearner, task: Task) -> None:
        """`task` is trained; from the `AlignmentStep` on, `learner.unaligned_head` holds its heads
        before alignment."""

    def on_evaluate(self, learner: ContinualLearner, task: Task, metrics: dict[str, float]) -> None:
        """The seen tasks were just scored (`metrics` as `EvaluationStep.continual_metrics`)."""

    def on_run_end(self, learner: ContinualLearner, result: ContinualResult) -> None:
        """Every task is learned."""

    def on_exception(self, learner: ContinualLearner, error: BaseException) -> None:
        """The run stopped with `error` (on_run_end does not run): close what the callback holds.
        Every callback's on_exception runs, then `error` is raised again."""

    def trainer_callbacks(self) -> list[TrainerCallback]:
        """`TrainerCallback`s this callback holds and hands to every task's trainer (the
        `TrackerStep`'s tracker); none here."""
        return []


Callback = ContinualCallback | TrainerCallback


class CallbackHandler:
    """The learner's callbacks in the order they run, managed as `transformers.Trainer`'s are
    (`add_callback`, `pop_callback`, `remove_callback`), plus `replace_callback` to swap a step in place.

    A callback may be given as a class (it is instantiated) and removed by its class (the first
    instance goes). `ContinualCallback`s get the after-task hooks; `TrainerCallback`s are handed to
    every task's trainer; one object may be both.
    """

    def __init__(self, steps: Sequence[ContinualCallback], callbacks: Sequence[Callback | type[Callback]] = ()):
        self.callbacks: list[ContinualCallback] = list(steps)
        #: Classes of the built-in steps: their errors are one clear line already and pass through unwrapped.
        self.step_classes = tuple(type(step) for step in steps)
        self.trainer_callbacks: list[TrainerCallback] = []
        for callback in callbacks:
            self.add_callback(callback)

    def add_callback(self, callback: Callback | type[Callback]) -> None:
        """Append `callback`: it runs after those already held."""
        callback = callback() if isinstance(callback, type) else callback
        if not isinstance(callback, (ContinualCallback, TrainerCallback)):
            raise TypeError(
                f"callbacks must be ContinualCallback or TrainerCallback instances, got {type(callback).__name__}; "
                "subclass slca_peft.continual.callbacks.ContinualCallback for after-task steps."
            )
        if isinstance(callback, ContinualCallback):
            self.callbacks.append(callback)
        if isinstance(callback, TrainerCallback):
            self.trainer_callbacks.append(callback)

    def get_callback(self, callback: Callback | type[Callback]) -> Any:
        """The first callback held that is `callback`, or an instance of that class (None if none)."""
        for held in (*self.callbacks, *self.trainer_callbacks):
            if held is callback or (isinstance(callback, type) and isinstance(held, callback)):
                return held
        return None

    def pop_callback(self, callback: Callback | type[Callback]) -> Any:
        """Remove and return the first callback that is `callback` or an instance of it (None if none)."""
        held = self.get_callback(callback)
        for holder in (self.callbacks, self.trainer_callbacks):
            if any(c is held for c in holder):
                holder.remove(held)
        return held

    def remove_callback(self, callback: Callback | type[Callback]) -> None:
        self.pop_callback(callback)

    def replace_callback(self, old: ContinualCallback | type[ContinualCallback], new: ContinualCallback) -> None:
        """Put `new` where `old` (an instance or a class) runs, keeping the order."""
        if not isinstance(new, ContinualCallback):
            raise TypeError(f"replace_callback takes a ContinualCallback, got {type(new).__name__}.")
        held = self.get_callback(old)
        for i, callback in enumerate(self.callbacks):
            if callback is held:
                self.callbacks[i] = new
                return
        name = old.__name__ if isinstance(old, type) else type(old).__name__
        held_names = [type(c).__name__ for c in self.callbacks]
        raise UserError(f"no callback {name} to replace; the learner runs {held_names}.")

    def task_trainer_callbacks(self) -> list[TrainerCallback]:
        """What a task's trainer gets: the `TrainerCallback`s given, then those the callbacks hold."""
        held = [c for callback in self.callbacks for c in callback.trainer_callbacks()]
        return [*self.trainer_callbacks, *held]

    def call_event(self, event: str, learner: ContinualLearner, *args: Any) -> None:
        """Run hook `event` on every callback in order; an error in a callback of the user's is
        re-raised naming it."""
        if event == "on_exception":
            self.call_on_exception(learner, *args)
            return
        for callback in list(self.callbacks):
            phase = getattr(callback, "phase", None) if event == "on_task_end" else None
            if phase and learner.result.timings:  # the task's record, which learn_task opened
                start = clock()
                self._call(callback, event, learner, *args)
                learner.result.timings[-1][f"{phase}_seconds"] = clock() - start
            else:
                self._call(callback, event, learner, *args)

    def call_on_exception(self, learner: ContinualLearner, error: BaseException) -> None:
        """Run `on_exception` on every callback, whatever one of them raises: the run's own error is
        the one that goes on (a callback's is logged)."""
        for callback in list(self.callbacks):
            try:
                with no_exit(f"continual callback {type(callback).__name__}.on_exception"):
                    callback.on_exception(learner, error)
            except Exception as err:  # noqa: BLE001 - the run's error, not this one, is raised
                logger.warning("continual callback %s.on_exception failed after %s: %s: %s", type(callback).__name__,
                               type(error).__name__, type(err).__name__, err)

    def _call(self, callback: ContinualCallback, event: str, learner: ContinualLearner, *args: Any) -> None:
        if isinstance(callback, self.step_classes):
            getattr(callback, event)(learner, *args)
            return
        # sys.exit in a user's hook must not end the run as if it had finished (exit 0).
        with no_exit(f"continual callback {type(callback).__name__}.{event}"):
            try:
                getattr(callback, event)(learner, *args)
            except Exception as err:
                raise RuntimeError(
                    f"continual callback {type(callback).__name__}.{event} failed: {type(err).__name__}: {err}"
                ) from err


def load_callback(spec: str) -> Any:
    """`package.module:ClassName` (or `package.module.ClassName`) -> an instance, built without arguments.

    Every way the spec can be wrong (a module that does not import or has a syntax error, a missing
    name, a function, a class that needs arguments or is not a callback) is one error naming it."""
    import importlib

    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"--callbacks {spec!r}: give it as package.module:ClassName.")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as err:  # even sys.exit(0): the run would end "successfully" without training
        raise UserError(f"--callbacks {spec!r}: importing {module_name!r} called sys.exit({err.code!r}), so nothing "
                        "would train; put the module's script code under `if __name__ == \"__main__\":`.") from None
    except SyntaxError as err:
        raise UserError(f"--callbacks {spec!r}: {err.filename}:{err.lineno} has a syntax error ({err.msg}); fix "
                        "the module.") from None
    except ImportError as err:
        raise UserError(f"--callbacks {spec!r}: module {module_name!r} cannot be imported ({err}); check the "
                        "module path.") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise UserError(f"--callbacks {spec!r}: importing {module_name!r} failed ({type(err).__name__}: {err}); "
                        "fix the module.") from None
    target = getattr(module, attr, None)
    if target is None:
        raise UserError(f"--callbacks {spec!r} cannot be imported: module {module_name!r} has no {attr!r}; check the "
                        "class name.")
    if not isinstance(target, type):
        if isinstance(target, (ContinualCallback, TrainerCallback)):
            return target
        kind = "a function" if callable(target) else f"a {type(target).__name__}"
        raise UserError(f"--callbacks {spec!r} is {kind}, not a callback class; give a ContinualCallback or "
                        "TrainerCallback subclass.")
    if not issubclass(target, (ContinualCallback, TrainerCallback)):
        raise UserError(f"--callbacks {spec!r}: {attr} is not a ContinualCallback or TrainerCallback subclass; "
                        "subclass slca_peft.continual.callbacks.ContinualCallback.")
    try:
        with no_exit(f"building callback {spec}"):
            return target()
    except TypeError as err:
        raise UserError(f"--callbacks {spec!r}: {attr}() cannot be built without arguments ({err}); give its "
                        "arguments defaults, or add it from Python with learner.add_callback(...).") from None
