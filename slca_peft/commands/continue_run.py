"""The recipe's `--continue_from`: its arguments, its run fingerprint, and resuming a continuation.

`--continue_from CHECKPOINT_OR_REPO` teaches a trained checkpoint the classes of new data
(`ContinualLearner.from_pretrained`, a `ContinuedStream`). An interrupted continuation resumes with
`--resume_from` and the same new data: its checkpoint records the history it started from and the
checkpoint it went on from, so the same stream (and the same fingerprint) is rebuilt; the checkpoint
it went on from is not needed any more (the run's fingerprint recorded its digest). Killed before it
finished a new task, it has no checkpoint to resume: the original command runs it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..continual.fingerprint import read_fingerprint
from ..continual.run_dir import latest_checkpoint
from ..data.continuation import ContinuedStream, before_last_continuation, checkpoint_digest, load_test_folder
from ..models.config import read_state
from ..models.saving import resolve_checkpoint
from ..utils.errors import UserError

if TYPE_CHECKING:
    from ..data.tasks import TaskSequence
    from ..method.config import SLCAConfig
    from .arguments import DataArguments, ModelArguments


def check_continue_arguments(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig) -> None:
    """`--continue_from` and its options, refused in one line where they cannot apply."""
    options = [flag for flag, value in (("--merge_existing_classes", model_args.merge_existing_classes),
                                        ("--old_test_dir", data_args.old_test_dir)) if value]
    if not model_args.continue_from:
        if model_args.continue_revision:
            raise SystemExit("--continue_revision is the Hub revision of --continue_from; add --continue_from REPO.")
        if options and not model_args.resume_from:  # resuming an interrupted continuation takes them again
            raise SystemExit(f"{' and '.join(options)} go with --continue_from (new classes from new data); add "
                             "--continue_from CHECKPOINT_OR_REPO or drop them.")
        return
    if model_args.resume_from:
        raise SystemExit("--continue_from teaches a checkpoint new classes from new data; --resume_from finishes an "
                         "interrupted run of the same stream: give one of them (an interrupted --continue_from run "
                         "resumes with --resume_from auto and the same new data once it finished a new task; before "
                         "that, rerun the original --continue_from command).")
    refused = [(data_args.domains, "--domains (a domain-incremental stream adds no classes)"),
               (data_args.seeds, "--seeds (one checkpoint goes on with one stream; use --class_order_seed)"),
               (model_args.model_config, "--model_config (the model is the checkpoint's)"),
               (model_args.peft_config, "--peft_config (the adapter is the checkpoint's)")]
    for given, flag in refused:
        if given:
            raise SystemExit(f"--continue_from cannot take {flag}; drop it.")
    source = Path(model_args.continue_from)
    if args.overwrite_output_dir and source.exists() and source.resolve().is_relative_to(
            Path(args.output_dir).resolve()):
        raise SystemExit(f"--overwrite_output_dir would delete {source}, which --continue_from goes on from; choose "
                         "another --output_dir.")


def continuation_of(model_args: ModelArguments, output_dir: str) -> tuple[str, str | None] | None:
    """(checkpoint, revision) this run goes on from with new classes: `--continue_from`, or, when resuming an
    interrupted continuation, the one its checkpoint records. None for a run of one stream."""
    if model_args.continue_from:
        return model_args.continue_from, model_args.continue_revision
    segment = _continued_segment(model_args, output_dir)
    return (segment["continued_from"], segment.get("continued_revision")) if segment else None


def _resume_state(model_args: ModelArguments, output_dir: str) -> dict | None:
    resume = model_args.resume_from
    if resume == "auto":
        resume = latest_checkpoint(output_dir)
    if not resume:
        return None
    root = resolve_checkpoint(resume, model_args.resume_revision)
    return read_state(root)


def _continued_segment(model_args: ModelArguments, output_dir: str) -> dict | None:
    state = _resume_state(model_args, output_dir)
    segments = (state or {}).get("segments") or []
    return segments[-1] if len(segments) > 1 and segments[-1].get("continued_from") else None


def continuation_fingerprint(model_args: ModelArguments, data_args: DataArguments, output_dir: str) -> dict:
    """What a continuation adds to the run fingerprint: the checkpoint it goes on from, by content."""
    source = continuation_of(model_args, output_dir)
    if source is None:
        return {}
    checkpoint, revision = source
    try:
        digest = checkpoint_digest(resolve_checkpoint(checkpoint, revision))
    except FileNotFoundError as err:
        # Resuming: the continuation's own checkpoint holds everything it learned, so the run's recorded
        # digest of where it went on from stands in for the source, which may be gone.
        recorded = _recorded_source(output_dir, checkpoint) if not model_args.continue_from else None
        if recorded is None:
            raise UserError(f"this run goes on from {checkpoint}, which is needed ({err})") from None
        digest = recorded
    return {"continue_from": checkpoint, "continue_revision": revision, "continue_sha256": digest,
            "merge_existing_classes": model_args.merge_existing_classes, "old_test_dir": data_args.old_test_dir}


def _recorded_source(output_dir: str, checkpoint: str) -> str | None:
    """The digest of `checkpoint` that the run in `output_dir` recorded when it went on from it, if any."""
    recorded = read_fingerprint(output_dir) if Path(output_dir).is_dir() else None
    if recorded and recorded.get("continue_from") == checkpoint and isinstance(recorded.get("continue_sha256"), str):
        return recorded["continue_sha256"]
    return None


def continued_stream(model_args: ModelArguments, data_args: DataArguments, tasks: TaskSequence,
                     output_dir: str) -> ContinuedStream | None:
    """The stream an interrupted continuation was learning (its history before the new data, then the new
    data's tasks), to resume it; None when the checkpoint resumed is not a continuation."""
    state = _resume_state(model_args, output_dir)
    previous = before_last_continuation(state) if state else None
    if previous is None:
        return None
    segment = state["segments"][-1]
    old_test = load_test_folder(data_args.old_test_dir) if data_args.old_test_dir else None
    return ContinuedStream(previous, tasks, merge_existing_classes=model_args.merge_existing_classes,
                           old_test=old_test, continued_from=segment["continued_from"],
                           continued_revision=segment.get("continued_revision"))
