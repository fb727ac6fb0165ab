"""The library's logging follows `transformers.logging`: its verbosity, its handlers, its progress-bar switch."""

from __future__ import annotations

import contextlib
import io
import logging
from types import SimpleNamespace

from transformers.utils import logging as hf_logging

from slca_peft.method.config import SLCAConfig
from slca_peft.utils.logging import get_logger, is_progress_bar_enabled, set_verbosity_from_args


@contextlib.contextmanager
def transformers_handler():
    """A handler added the transformers way, the library's logger as a fresh process has it (no handler of
    the recipe's, propagating, level unset); all restored after."""
    stream, library = io.StringIO(), get_logger()
    handler, verbosity = logging.StreamHandler(stream), hf_logging.get_verbosity()
    saved = library.handlers, library.propagate, library.level
    library.handlers, library.propagate = [], True
    library.setLevel(logging.NOTSET)
    hf_logging.add_handler(handler)
    try:
        yield stream
    finally:
        hf_logging.remove_handler(handler)
        hf_logging.set_verbosity(verbosity)
        library.handlers, library.propagate = saved[:2]
        library.setLevel(saved[2])


def test_library_records_follow_transformers_verbosity_and_reach_its_handlers():
    record = logging.getLogger("slca_peft.method.trainer")
    with transformers_handler() as stream:
        hf_logging.set_verbosity_info()
        record.info("Loading best model from checkpoint-6")
        hf_logging.set_verbosity_error()
        record.info("hidden info")
        record.warning("hidden warning")
        hf_logging.set_verbosity_warning()
        record.warning("shown warning")
    assert stream.getvalue().splitlines() == ["Loading best model from checkpoint-6", "shown warning"]


def test_a_run_at_passive_keeps_transformers_error_verbosity(tmp_path):
    """`set_verbosity_error()` silences the task lines of a run; passive is INFO otherwise."""
    task_line = logging.getLogger("slca_peft.continual.callbacks")
    args = SLCAConfig(output_dir=str(tmp_path), use_cpu=True)
    with transformers_handler() as stream:
        hf_logging.set_verbosity_error()
        assert set_verbosity_from_args(args) == logging.ERROR
        task_line.info("task 1/6 hidden")
        hf_logging.set_verbosity_warning()
        assert set_verbosity_from_args(args) == logging.INFO
        task_line.info("task 1/6 shown")
    assert stream.getvalue().splitlines() == ["task 1/6 shown"]


def test_the_learners_progress_bars_follow_transformers_switch():
    from slca_peft.continual.learner import ContinualLearner

    learner = SimpleNamespace(args=SimpleNamespace(disable_tqdm=False), is_main_process=True)
    shows = ContinualLearner.show_progress.fget
    assert shows(learner)
    try:
        hf_logging.disable_progress_bar()
        assert not is_progress_bar_enabled() and not shows(learner)
    finally:
        hf_logging.enable_progress_bar()
    assert shows(learner)
