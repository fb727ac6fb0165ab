"""The training recipe: a ViT over a sequence of tasks with SLCA++ (or SLCA / SL / Seq-FT).

It lives in the package so `slca-peft train` works from an installed wheel; `recipes/train_seq.py`
is the thin entry point for `accelerate launch`.

    python recipes/train_seq.py                      # offline demo: digits, tiny ViT
    slca-peft train --num_train_epochs 2             # the demo with a flag overridden
    python recipes/train_seq.py --config recipes/configs/cifar100_in21k_slca++.yaml   # the paper's CIFAR-100 row
    slca-peft train --config cifar100_in21k_slca++.yaml   # a config shipped in the package, by name
    python recipes/train_seq.py --config recipes/configs/cub200_in21k_slca++.yaml --data_dir data/CUB_200_2011
    accelerate launch recipes/train_seq.py --config ... --output_dir runs/cifar --seeds 1993 1996 1997

Any SLCAConfig / TrainingArguments field is a flag (`--learning_rate 0.01`); `--config file.yaml`
supplies defaults that flags on the command line override. The arguments, config files and the checks
that refuse a command line live in `slca_peft.commands.arguments`; this module turns them into data, a model
and a run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from transformers import AutoConfig, AutoModel, set_seed

from ..artifacts.atomic import atomic_directory, atomic_write_text
from ..artifacts.layout import MANIFEST_FILE, METRICS_FILE, SEEDS_FILE, seed_dir_name, task_dir_name
from ..artifacts.manifest import read_manifest, record_tree
from ..artifacts.task_history import read_state
from ..continual.callbacks import load_callback
from ..continual.checkpoint import verify_checkpoint
from ..continual.fingerprint import read_fingerprint, run_fingerprint
from ..continual.learner import ContinualLearner
from ..continual.resume import check_checkpoint_matches, check_unaligned_heads, finished_run
from ..continual.run_dir import claim_run_directory, latest_checkpoint, refuse_links_where_a_run_writes
from ..continual.steps import CheckpointStep, write_plots
from ..data.benchmarks import KNOWN_DATASETS, canonical_name, load_benchmark
from ..data.checks import check_task_data, check_task_splits, use_decoded_record
from ..data.continuation import (
    ContinuedStream,
    before_last_continuation,
    checkpoint_digest,
    learned_part,
    load_test_folder,
)
from ..data.domains import DomainSequence
from ..data.tasks import TaskSequence
from ..data.transforms import (
    EvalTransform,
    ImageTransformConfig,
    ProcessorTransform,
    TrainTransform,
    checkpoint_eval_transform,
    describe_image_processor,
    eval_transform_config,
)
from ..method.config import SLCAConfig
from ..metrics import summarize_accuracy_matrix
from ..models.adapters import load_peft_config
from ..models.loading import check_model_config
from ..models.model import SLCAModel
from ..models.saving import resolve_checkpoint
from ..sharing.hub import default_repo_id
from ..sharing.public import IMAGE_FOLDERS
from ..sharing.report import mean_std
from ..utils.errors import UserError, run_main
from ..utils.logging import LIBRARY_NAME, progress_bars, set_verbosity_from_args, shows_progress
from .arguments import DataArguments, ModelArguments, parse_args

logger = logging.getLogger(__name__)


def data_source(data_args: DataArguments) -> str | None:
    """What the data is, as each task's history records it: the dataset's Hub id or name, or the image folders."""
    if data_args.train_dir:
        return f"{IMAGE_FOLDERS}{data_args.train_dir}, {data_args.test_dir}"
    return dataset_hub_id(data_args.dataset) or data_args.dataset


def build_tasks(data_args: DataArguments, args: SLCAConfig, *, min_classes: int = 2) -> TaskSequence | DomainSequence:
    """The task stream, with all of its data checked (every image decoded once) before any training;
    the check's progress bars show on the main process unless `--disable_tqdm`. `min_classes`: 1 for the
    new data of a continuation (a task of one class is supported), else 2."""
    progress = shows_progress(args)
    # The main process writes the record; every process trusts what it lists (after hashing the bytes).
    use_decoded_record(data_args.image_check_record, write=args.process_index == 0)
    with progress_bars(progress):
        tasks = _load_tasks(data_args, args, min_classes)
        if not data_args.domains:
            tasks.source = data_source(data_args)
        if data_args.train_dir:
            check_task_splits(tasks)  # from_image_folders has decoded every image
        else:
            check_task_data(tasks, progress=progress)
    return tasks


def _load_tasks(data_args: DataArguments, args: SLCAConfig, min_classes: int = 2) -> TaskSequence | DomainSequence:
    if data_args.domains:
        return DomainSequence.from_folders(data_args.data_dir, data_args.domains)
    split = {"init_cls": args.init_cls, "increment": args.increment, "seed": args.class_order_seed,
             "min_classes": min_classes}
    if data_args.train_dir:
        return TaskSequence.from_image_folders(data_args.train_dir, data_args.test_dir, **split)
    data, spec = load_benchmark(data_args.dataset, data_args.data_dir, data_args.dataset_revision)
    return TaskSequence.from_dataset_dict(
        data,
        train_split=spec.train_split,
        test_split=spec.test_split,
        image_column=data_args.image_column or spec.image_column,
        label_column=data_args.label_column or spec.label_column,
        **split,
    )


def dataset_hub_id(name: str | None) -> str | None:
    """The Hub id a model card names for `--dataset` (a benchmark's Hub copy, or the id given)."""
    if not name:
        return None
    key = canonical_name(name)
    if key in KNOWN_DATASETS:
        return KNOWN_DATASETS[key].hub_id
    return name if key != "digits" and "/" in name and not Path(name).exists() else None


def build_model(model_args: ModelArguments, args: SLCAConfig) -> SLCAModel:
    source = model_args.model_name_or_path
    if source is None:
        # A random backbone has no Hub id: save it so checkpoints can point at it.
        set_seed(args.seed)
        config = AutoConfig.from_pretrained(model_args.model_config)
        source = str(Path(args.output_dir) / "base_model")
        if args.process_index == 0:
            if ContinualLearner.latest_checkpoint(args.output_dir) is not None:
                raise UserError(f"{args.output_dir} holds checkpoints trained on its base_model/, which a new "
                                "random backbone would replace; resume with --resume_from auto or use "
                                "--overwrite_output_dir.")
            if os.path.lexists(source) and read_manifest(source) is None:
                raise UserError(f"{source} exists but was not written by slca-peft (it has no {MANIFEST_FILE}); "
                                "--model_config saves its random backbone there: move that folder or choose another "
                                "--output_dir.")
            with atomic_directory(source) as tmp:
                AutoModel.from_config(config).save_pretrained(tmp)
                record_tree(tmp, {"kind": "model"})
    peft_config = load_peft_config(model_args.peft_config) if model_args.peft_config else None
    with args.main_process_first(desc="backbone"):
        return SLCAModel.from_backbone(source, args, revision=model_args.model_revision, peft_config=peft_config)


def transform_config_for(model: SLCAModel, brightness: float) -> ImageTransformConfig:
    """The base model's image processor statistics, or ViT's defaults when it ships none (the same
    ones an export's image processor uses)."""
    return dataclasses.replace(eval_transform_config(model), brightness=brightness)


def run_seeds(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig) -> dict:
    """Train once per class-order seed, each into OUTPUT_DIR/seed_<s>/, then write OUTPUT_DIR/seeds.json
    with every seed's Last-Acc / Inc-Acc and their mean and sample standard deviation."""
    root = Path(args.output_dir)
    if args.process_index == 0:  # the summary's results.md and plots are written after every seed trained
        refuse_links_where_a_run_writes(root)
    runs = {}
    for seed in data_args.seeds:
        seed_args = copy.copy(args)
        seed_args.class_order_seed, seed_args.output_dir = seed, str(root / seed_dir_name(seed))
        if args.push_to_hub:  # one repo per seed: each has its own task history
            seed_args.hub_model_id = f"{default_repo_id(args)}-seed{seed}"
        logger.info("class-order seed %d -> %s", seed, seed_args.output_dir)
        summary = train(model_args, data_args, seed_args)
        runs[str(seed)] = {
            "output_dir": seed_dir_name(seed),
            "last_accuracy": summary["last_accuracy"],
            "average_incremental_accuracy": summary["average_incremental_accuracy"],
        }
    result = {"method": args.method, "seeds": list(data_args.seeds), "runs": runs}
    for key in ("last_accuracy", "average_incremental_accuracy"):
        mean, std = mean_std([run[key] for run in runs.values()])
        result[key] = {"mean": mean, "std": std}
    if args.process_index == 0:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / SEEDS_FILE, json.dumps(result, indent=2) + "\n")
        last, inc = result["last_accuracy"], result["average_incremental_accuracy"]
        logger.info(f"seeds {data_args.seeds}: Last-Acc {last['mean']:.2f} ± {last['std']:.2f}  "
              f"Inc-Acc {inc['mean']:.2f} ± {inc['std']:.2f}  ({root / SEEDS_FILE})")
        write_plots(root)  # mean heatmap, per-seed curves and the results table over the seeds
    return result


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a record is emitted."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(args: SLCAConfig) -> None:
    """The library's records on stdout, once, with time and logger name, at the level the run itself
    sets (`logging_utils.set_verbosity_from_args`: `--log_level` on the main process, `--log_level_replica`
    on the others), so the lines before the first task follow the same rule as the rest."""
    set_verbosity_from_args(args)
    package = logging.getLogger(LIBRARY_NAME)
    if not any(isinstance(h, _StdoutHandler) for h in package.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
    package.propagate = False  # one line per record, whatever the root logger does


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Train; with `argv=None` (the command line) a user error ends with one line, not a traceback.
    `prog`: the command in the usage line (default: the script's name)."""
    if argv is None:
        prog = prog or os.path.basename(sys.argv[0]) or "slca-peft train"
        return run_main(lambda args: main(args, prog), prog=prog)
    model_args, data_args, args = parse_args(argv, prog)
    configure_logging(args)
    if args.precision_choice:
        logger.info(args.precision_choice)
    if data_args.seeds:
        return run_seeds(model_args, data_args, args)
    return train(model_args, data_args, args)


def train(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig) -> dict:
    """One run over the task sequence of `args.class_order_seed`; returns the metrics summary.

    The output directory is claimed for this run first (`claim_run_directory`): another run's files
    there, a concurrent run or a resume with other settings stop it before any training. A run that
    already finished there with the same settings is not repeated: its results are logged and returned
    (nothing to do, as `make` would). Progress bars, of other libraries too, show on the main process
    unless `--disable_tqdm`."""
    with progress_bars(shows_progress(args)):
        return _start(model_args, data_args, args)


def _start(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig) -> dict:
    # What needs no image decode runs before the decode pass: the callbacks import, and the checkpoint a
    # continuation goes on from is found (or the run refused) and hashed.
    callbacks = [load_callback(spec) for spec in model_args.callbacks or []]
    if model_args.model_config and not model_args.model_name_or_path:  # a FIFO, device, folder or non-config
        check_model_config(model_args.model_config)
    named_checkpoint, resuming = model_args.resume_from not in (None, "auto"), bool(model_args.resume_from)
    if model_args.resume_from == "auto":  # resolved once, in this run's own output directory
        found = latest_checkpoint(args.output_dir)
        logger.info("resume auto: %s", found or "no complete checkpoint, starting from the first task")
        model_args = dataclasses.replace(model_args, resume_from=str(found) if found else None)
    continuation = continuation_fingerprint(model_args, data_args, args.output_dir)
    tasks = build_tasks(data_args, args, min_classes=1 if continuation else 2)
    logger.info("%d classes in %d tasks %s, class order seed %s", tasks.num_classes, len(tasks),
                tasks.task_sizes, args.class_order_seed)
    fingerprint = run_fingerprint(
        args, base_model=model_args.model_name_or_path or model_args.model_config,
        base_revision=model_args.model_revision, tasks=tasks, peft_config=model_args.peft_config,
        extra={**{k: getattr(data_args, k) for k in ("brightness_jitter", "crop_scale_min", "train_resize",
                                                     "horizontal_flip")}, **continuation},
    )
    done = None if args.overwrite_output_dir or named_checkpoint else \
        finished_run(args.output_dir, fingerprint, learned_before(model_args) + len(tasks))
    if done is not None:
        return _finished(args, done)
    with claim_run_directory(args.output_dir, fingerprint, overwrite=args.overwrite_output_dir,
                             resume=resuming, main_process=args.process_index == 0):
        return _train(model_args, data_args, args, tasks, fingerprint, callbacks)


def _finished(args: SLCAConfig, metrics: dict) -> dict:
    """The summary of a finished run, logged as the run logged it, without training again."""
    last = Path(args.output_dir) / task_dir_name(len(metrics["accuracy_matrix"]) - 1)
    state = read_state(last) or {}
    summary = summarize_accuracy_matrix(metrics["accuracy_matrix"], state.get("task_test_sizes") or None)
    if args.process_index == 0:
        logger.info("nothing to do: %s already holds this run, finished (same settings and data). Last-Acc %.2f  "
                    "Inc-Acc %.2f  forgetting %.2f  BWT %.2f  (%s); pass --overwrite_output_dir to train it again.",
                    args.output_dir, summary["last_accuracy"], summary["average_incremental_accuracy"],
                    summary["average_forgetting"], summary["backward_transfer"],
                    Path(args.output_dir) / METRICS_FILE)
        if args.push_to_hub:
            logger.warning("--push_to_hub: nothing was trained, so nothing was pushed; upload a checkpoint with "
                           "`slca-peft push %s REPO_ID`.", last)
    return summary


def _train(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig, tasks, fingerprint,
           callbacks: list) -> dict:
    expected_base = [model_args.model_name_or_path, args.hub_base_model_id]  # what the checkpoint must be trained on
    resume = model_args.resume_from
    if resume:
        if Path(resume).is_dir():
            check_checkpoint_matches(resume, fingerprint)
            check_unaligned_heads(resume, align=args.align)
            verify_checkpoint(resume, expected_base, accept_changed_files=model_args.accept_changed_files)
        continued = continued_stream(model_args, data_args, tasks)
        learner = ContinualLearner.from_checkpoint(
            resume, args, continued or tasks, revision=model_args.resume_revision,
            expected_base=expected_base,
            train_transform=None, eval_transform=None, callbacks=callbacks,
        )
        logger.info("resumed from %s after task %d", resume, len(learner.result.accuracy_matrix))
    elif model_args.continue_from:
        if Path(model_args.continue_from).is_dir():  # a Hub repo carries no local history to compare
            verify_checkpoint(model_args.continue_from, expected_base,
                              accept_changed_files=model_args.accept_changed_files)
        old_test = load_test_folder(data_args.old_test_dir) if data_args.old_test_dir else None
        learner = ContinualLearner.from_pretrained(
            model_args.continue_from, args, tasks, revision=model_args.continue_revision,
            expected_base=expected_base,
            merge_existing_classes=model_args.merge_existing_classes, old_test=old_test,
            train_transform=None, eval_transform=None, callbacks=callbacks,
        )
        logger.info("continuing %s (%d tasks, %d classes learned) with %d new classes in %d tasks%s",
                    model_args.continue_from, learner.tasks.num_old_tasks, learner.tasks.num_old_classes,
                    learner.tasks.num_classes - learner.tasks.num_old_classes, len(tasks),
                    " (--init_cls/--increment split them)" if args.init_cls else "")
    else:
        learner = ContinualLearner(build_model(model_args, args), args, tasks, train_transform=None,
                                   eval_transform=None, callbacks=callbacks)
    tc, eval_transform = eval_transforms_for(learner.model, data_args, from_checkpoint=bool(
        resume or model_args.continue_from))
    dataset_id = dataset_hub_id(data_args.dataset)
    if dataset_id:  # each checkpoint's task history names it
        learner.get_callback(CheckpointStep).run_metadata["dataset"] = dataset_id
    learner.set_transforms(
        TrainTransform(tc, scale=(data_args.crop_scale_min, 1.0), flip_p=0.5 if data_args.horizontal_flip else 0.0,
                       resize=data_args.train_resize or None),
        eval_transform,
    )
    return learner.run().summary()


def eval_transforms_for(model: SLCAModel, data_args: DataArguments, *, from_checkpoint: bool
                        ) -> tuple[ImageTransformConfig, EvalTransform | ProcessorTransform]:
    """The training transform's size and normalisation and the evaluation transform. A run that goes on from a
    checkpoint carrying an image processor (`model.image_processor`) follows it: the class statistics it
    holds were computed on its pixels, so the new statistics, every score and the processor each new
    checkpoint holds are too (logged when it is not the one the recipe would build); training crops to its
    size with its normalisation. Otherwise both come from the base model (`transform_config_for`)."""
    default = transform_config_for(model, data_args.brightness_jitter)
    processor = model.image_processor if from_checkpoint else None
    if processor is None:
        return default, EvalTransform(default)
    eval_transform = checkpoint_eval_transform(processor)
    tc = dataclasses.replace(eval_transform.config, brightness=data_args.brightness_jitter)
    if isinstance(eval_transform, ProcessorTransform) or tc != default:
        logger.info("preprocessing: the checkpoint's image processor (%s), with which its class statistics were "
                    "computed, for the statistics, evaluation and the processor of every new checkpoint; training "
                    "crops to %d pixels with its normalisation.", describe_image_processor(processor), tc.size)
    return tc, eval_transform


# ------------------------------------------------------------------------------------------ continuations
def continuation_of(model_args: ModelArguments) -> tuple[str, str | None] | None:
    """(checkpoint, revision) this run goes on from with new classes: `--continue_from`, or, when resuming an
    interrupted continuation, the one its checkpoint records. None for a run of one stream."""
    if model_args.continue_from:
        return model_args.continue_from, model_args.continue_revision
    segment = _continued_segment(model_args)
    return (segment["continued_from"], segment.get("continued_revision")) if segment else None


def _resume_state(model_args: ModelArguments) -> dict | None:
    if not model_args.resume_from:
        return None
    return read_state(resolve_checkpoint(model_args.resume_from, model_args.resume_revision))


def _continued_segment(model_args: ModelArguments) -> dict | None:
    state = _resume_state(model_args)
    segments = (state or {}).get("segments") or []
    return segments[-1] if len(segments) > 1 and segments[-1].get("continued_from") else None


def continuation_fingerprint(model_args: ModelArguments, data_args: DataArguments, output_dir: str | None = None
                             ) -> dict:
    """What a continuation adds to the run fingerprint: the checkpoint it goes on from, by content. Resuming
    an interrupted continuation does not need that checkpoint any more (its own last checkpoint holds all
    it learned): when it is gone, the digest the run in `output_dir` recorded of it stands in."""
    source = continuation_of(model_args)
    if source is None:
        return {}
    checkpoint, revision = source
    try:
        digest = checkpoint_digest(resolve_checkpoint(checkpoint, revision))
    except FileNotFoundError as err:
        recorded = _recorded_source(output_dir, checkpoint) if output_dir and not model_args.continue_from else None
        if recorded is None:
            raise UserError(f"this run goes on from {checkpoint}, which is needed ({err})") from None
        digest = recorded
    return {"continue_from": checkpoint, "continue_revision": revision, "continue_sha256": digest,
            "merge_existing_classes": model_args.merge_existing_classes, "old_test_dir": data_args.old_test_dir}


def learned_before(model_args: ModelArguments) -> int:
    """How many tasks the stream had learned before this run's data: those of the checkpoint `--continue_from`
    goes on from, or, resuming an interrupted continuation, those its history records before the new data;
    0 for a run of one stream. A continuation's metrics hold a row for each of them too."""
    if model_args.continue_from:
        try:
            state = read_state(resolve_checkpoint(model_args.continue_from, model_args.continue_revision))
            return learned_part(state)["tasks_learned"] if state else 0
        except (OSError, ValueError):  # refused, naming the file, when the checkpoint is loaded
            return 0
    segment = _continued_segment(model_args)
    return int(segment["first_task"]) if segment else 0


def _recorded_source(output_dir: str, checkpoint: str) -> str | None:
    """The digest of `checkpoint` that the run in `output_dir` recorded when it went on from it, if any."""
    recorded = read_fingerprint(output_dir) if Path(output_dir).is_dir() else None
    if recorded and recorded.get("continue_from") == checkpoint and isinstance(recorded.get("continue_sha256"), str):
        return recorded["continue_sha256"]
    return None


def continued_stream(model_args: ModelArguments, data_args: DataArguments, tasks: TaskSequence
                     ) -> ContinuedStream | None:
    """The stream an interrupted continuation was learning (its history before the new data, then the new
    data's tasks), to resume it; None when the checkpoint resumed is not a continuation."""
    state = _resume_state(model_args)
    previous = before_last_continuation(state) if state else None
    if previous is None:
        return None
    segment = state["segments"][-1]
    old_test = load_test_folder(data_args.old_test_dir) if data_args.old_test_dir else None
    return ContinuedStream(previous, tasks, merge_existing_classes=model_args.merge_existing_classes,
                           old_test=old_test, continued_from=segment["continued_from"],
                           continued_revision=segment.get("continued_revision"))


if __name__ == "__main__":
    main()
