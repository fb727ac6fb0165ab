"""The library's logging and progress bars, through `transformers.utils.logging`.

Every module logs to a child of the library root logger `slca_peft`, and that root hangs under
transformers' root logger (`transformers`): the library follows transformers' verbosity
(`transformers.logging.set_verbosity_error()` silences it, `set_verbosity_info()` shows its INFO lines
such as SLCATrainer's "Loading best model"), and its records reach transformers' handlers (its default
handler on stderr, `enable_explicit_format`, `add_handler`), then the root logger's when transformers
propagates. Results are log records (a task's accuracies, the run's summary), so they reach whatever
the application set up; when nothing would write them (transformers' default handler disabled and no
root handler), the library root's fallback handler writes the message alone, INFO and below to stdout,
warnings and errors to stderr. A handler of the application on `slca_peft` itself (the recipe's) takes
over from the fallback.

Levels: outside a run transformers' verbosity decides (WARNING unless configured). A run sets the
library's level from its arguments, as Trainer sets transformers' verbosity from them
(`set_verbosity_from_args`): `log_level` on the main process and `log_level_replica` on the others;
"passive" (the default) is INFO on the main process, so each task's result line shows (DEBUG when
transformers' verbosity is DEBUG; transformers' own when the application lowered it to ERROR or
CRITICAL), and transformers' verbosity on the others. So `SLCAConfig(log_level="warning")` and
`transformers.logging.set_verbosity_error()` silence the task lines, and
`transformers.logging.set_verbosity_debug()` adds the library's debug records.

Progress bars go through the libraries' own switches: `progress_bars(False)` turns off transformers',
`datasets`' and `huggingface_hub`'s for a block, and the library's own (the image check, class
statistics, evaluation, alignment) follow transformers' switch (`disable_progress_bar()`). A run turns
them off with `disable_tqdm` (and on every process but the main one) from the Python API as from the
recipe: loading a backbone or checkpoint with those arguments, `ContinualLearner.run` and
`SLCATrainer.train` run inside `progress_bars(shows_progress(args))`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

LIBRARY_NAME = "slca_peft"
#: Other libraries' warnings that the library's own calls trigger on every run and a user cannot act on, as
#: (message regex, category): filtered around those calls (`known_warnings_filtered`), wherever they run from.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # transformers 5 renamed `is_gradient_checkpointing`; PEFT reads the old name while wrapping a backbone.
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
)

_lock = threading.Lock()


class _DefaultHandler(logging.Handler):
    """Writes a record only when no handler of the application would."""

    def filter(self, record: logging.LogRecord) -> bool:
        library = logging.getLogger(LIBRARY_NAME)
        if any(handler is not self for handler in library.handlers):
            return False
        logger = library
        while logger.propagate and logger.parent is not None:  # transformers' handlers, then the root's
            logger = logger.parent
            if logger.handlers:
                return False
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout  # the current ones
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class RepeatedWarning:
    """A warning that every save of a run could repeat (an upload that fails each time): the first record of
    each kind is a WARNING, saying that repeats follow at INFO; the repeats are INFO records, so a long run's
    log shows the problem once and each occurrence is still recorded."""

    NOTE = " (repeats in this run are logged at INFO level)"

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def log(self, logger: logging.Logger, kind: str, message: str, *args: Any) -> None:
        """`message % args` to `logger`: WARNING (with `NOTE`) the first time `kind` occurs, then INFO."""
        if kind in self._seen:
            logger.info(message, *args)
        else:
            self._seen.add(kind)
            logger.warning(message + self.NOTE, *args)


def _library_root() -> logging.Logger:
    """The `slca_peft` logger under transformers' root logger, with its fallback handler attached once."""
    from transformers.utils import logging as hf_logging

    library = logging.getLogger(LIBRARY_NAME)
    with _lock:
        if not any(isinstance(handler, _DefaultHandler) for handler in library.handlers):
            library.addHandler(_DefaultHandler())
        # Its level and handlers are transformers' (the logging module resolves both through `parent`).
        library.parent = hf_logging.get_logger()
    return library


def get_logger(name: str | None = None) -> logging.Logger:
    """A logger under the library root (the root itself for None)."""
    _library_root()
    return logging.getLogger(name or LIBRARY_NAME)


def get_verbosity() -> int:
    """The library's effective level."""
    return _library_root().getEffectiveLevel()


def set_verbosity(level: int) -> None:
    """Set the library's level (`logging.INFO`, ...)."""
    _library_root().setLevel(level)


def set_verbosity_from_args(args: Any) -> int:
    """The level a run logs at, from its `TrainingArguments` (see the module docstring); returns it."""
    from transformers.training_args import trainer_log_levels
    from transformers.utils import logging as hf_logging

    main = bool(getattr(args, "should_log", True))
    chosen = trainer_log_levels[args.log_level if main else args.log_level_replica]
    if chosen == -1:  # "passive"
        verbosity = hf_logging.get_verbosity()
        chosen = min(logging.INFO, verbosity) if main and verbosity <= logging.WARNING else verbosity
    set_verbosity(chosen)
    return chosen


def is_progress_bar_enabled() -> bool:
    """Whether the library's own progress bars (the image check) show: transformers' switch, so
    `transformers.utils.logging.disable_progress_bar()` turns them off too, and `progress_bars(False)` for a block."""
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled()


def shows_progress(args: Any) -> bool:
    """Whether a run with these `TrainingArguments` shows progress bars: on the main process unless `disable_tqdm`."""
    return not args.disable_tqdm and getattr(args, "process_index", 0) == 0


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Progress bars off inside the block unless `enabled`, restored after it, through the libraries' own
    switches: transformers' (loading and writing weights; the library's bars follow it), `datasets`'
    (building a dataset) and `huggingface_hub`'s (downloads, uploads), which Trainer's `disable_tqdm` does
    not reach. `enabled=True` changes nothing: bars switched off by the application stay off."""
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    switches = [  # (is off now, turn off, turn on)
        (datasets.are_progress_bars_disabled, datasets.disable_progress_bars, datasets.enable_progress_bars),
        (hub.are_progress_bars_disabled, hub.disable_progress_bars, hub.enable_progress_bars),
        (lambda: not hf_logging.is_progress_bar_enabled(), hf_logging.disable_progress_bar,
         hf_logging.enable_progress_bar),
    ]
    turned_off = []
    if not enabled:
        for is_off, off, on in switches:
            if not is_off():
                off()
                turned_off.append(on)
    try:
        yield
    finally:
        for on in turned_off:
            on()


@contextlib.contextmanager
def known_warnings_filtered() -> Iterator[None]:
    """`KNOWN_WARNINGS` ignored inside the block (the recipe, the `slca-peft` commands and the Python API all
    reach them through the same calls); every other warning shows as before."""
    with warnings.catch_warnings():
        for message, category in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
