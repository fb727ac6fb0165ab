"""The library's logging and progress bars, in the manner of `transformers.utils.logging`.

Every module logs to a child of the library root logger `slca_peft`. Results are log records (a
task's accuracies, the run's summary), so they reach whatever the application set up; when it set up
nothing, they must still show, as Trainer's metrics do. The library root therefore gets a default
handler that writes only when no other handler would: not once the application configured logging
(a handler on the root logger, e.g. `logging.basicConfig`, with propagation on), nor beside a
handler of its own on `slca_peft` (the recipe's). It writes the message alone, INFO and below to
stdout, warnings and errors to stderr (where Python's last-resort handler put them).

Levels: outside a run the standard library decides (WARNING unless configured). A run sets the
library's level from its arguments, as Trainer sets transformers' verbosity from them
(`set_verbosity_from_args`): `log_level` on the main process and `log_level_replica` on the others;
"passive" (the default) is INFO on the main process, so each task's result line shows (DEBUG when
transformers' verbosity is DEBUG), and transformers' verbosity on the others (WARNING by default).
So `SLCAConfig(log_level="warning")` silences the task lines, and
`transformers.logging.set_verbosity_debug()` adds the library's debug records.

Progress bars that run before a run's arguments exist (the image check) follow
`enable_progress_bar` / `disable_progress_bar`, as transformers' do.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

LIBRARY_NAME = "slca_peft"

_lock = threading.Lock()
_progress_bars = True


class _DefaultHandler(logging.Handler):
    """Writes a record only when no handler of the application would."""

    def filter(self, record: logging.LogRecord) -> bool:
        library = logging.getLogger(LIBRARY_NAME)
        if any(handler is not self for handler in library.handlers):
            return False
        if library.propagate and logging.getLogger().handlers:
            return False
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout  # the current ones
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _library_root() -> logging.Logger:
    """The `slca_peft` logger, with its default handler attached once."""
    library = logging.getLogger(LIBRARY_NAME)
    with _lock:
        if not any(isinstance(handler, _DefaultHandler) for handler in library.handlers):
            library.addHandler(_DefaultHandler())
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
        chosen = min(logging.INFO, verbosity) if main else verbosity
    set_verbosity(chosen)
    return chosen


def enable_progress_bar() -> None:
    global _progress_bars
    _progress_bars = True


def disable_progress_bar() -> None:
    global _progress_bars
    _progress_bars = False


def is_progress_bar_enabled() -> bool:
    return _progress_bars


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Progress bars on or off inside the block, restored after it. Off also turns off, for the
    block, those of transformers (loading and writing weights), `datasets` (building a dataset) and
    `huggingface_hub` (downloads), which Trainer's `disable_tqdm` does not reach."""
    global _progress_bars
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    previous, _progress_bars = _progress_bars, enabled
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
        _progress_bars = previous
        for on in turned_off:
            on()
