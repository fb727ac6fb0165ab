"""The recipe's arguments: the model and data dataclasses, their parser (`--help` lists the recipe's own flags
first), config files (`slca_peft.commands.config_file`) and the checks that refuse a command line before
anything runs.

`parse_args` turns a command line into (`ModelArguments`, `DataArguments`, `SLCAConfig`); the recipe
(`slca_peft.commands.recipe`) trains with them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

import torch
from transformers import HfArgumentParser, TrainingArguments

from ..artifacts.layout import seed_dirs
from ..continual.fingerprint import read_fingerprint
from ..continual.run_dir import check_output_arguments, check_writable, task_checkpoint
from ..method.config import SLCAConfig
from ..models.loading import check_backbone_source
from ..utils.errors import UserError
from .config_file import DEMO_CONFIG, read_config, shipped_file, split_config


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local directory of the pre-trained backbone."}
    )
    model_config: str | None = field(
        default=None, metadata={"help": "A config JSON to build a randomly initialised backbone (demo, tests)."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the backbone."})
    peft_config: str | None = field(
        default=None,
        metadata={"help": "A PEFT config JSON (adapter_config.json or PeftConfig.to_dict(): LoRA with DoRA/rsLoRA, "
                  "LoHa, LoKr, IA3, ...) used as the slow learner instead of the lora_* settings."},
    )
    resume_from: str | None = field(
        default=None,
        metadata={"help": "Continue after the last task of a checkpoint: a task_<t> directory, a run directory (its "
                  "newest complete task_<t>), a Hub repo id, or `auto` (the newest complete checkpoint in "
                  "--output_dir, if any)."},
    )
    resume_revision: str | None = field(default=None, metadata={"help": "Hub revision of --resume_from."})
    accept_changed_files: bool = field(
        default=False,
        metadata={"help": "Resume or continue from a checkpoint whose files or base model weights changed since it was "
                  "written (edited adapter or accuracies, replaced base weights); without it that is refused."},
    )
    continue_from: str | None = field(
        default=None,
        metadata={"help": "Teach a trained checkpoint (a task_<t> directory, a run directory or a Hub repo id) the "
                  "classes of new data (--train_dir/--test_dir or --dataset): one task of them unless "
                  "--init_cls/--increment are given, ordered by --class_order_seed, and appended after the learned "
                  "ones, which keep their ids. Not with --resume_from, which finishes an interrupted run of the "
                  "same stream."},
    )
    continue_revision: str | None = field(default=None, metadata={"help": "Hub revision of --continue_from."})
    merge_existing_classes: bool = field(
        default=False,
        metadata={"help": "With --continue_from: a new class named like a learned one adds its images to that class's "
                  "statistics (no second output) instead of being refused."},
    )
    callbacks: list[str] | None = field(
        default=None,
        metadata={"help": "After-task steps of your own, run after the built-in ones: package.module:ClassName "
                  "(a ContinualCallback or TrainerCallback subclass built without arguments)."},
    )


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None,
        metadata={"help": "A benchmark (cifar100, imagenet_r, cub200, cars196, digits) or any Hub image dataset id."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Read --dataset from this local copy instead of the Hub: the benchmark's usual layout "
                  "(cifar-100-python/, imagenet-r/<wnid>/, CUB_200_2011/) or train/<class>/ + test/<class>/ folders."},
    )
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Hub revision of the dataset (default: the commit the benchmark is pinned to)."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (one sub-folder per class)."})
    test_dir: str | None = field(default=None, metadata={"help": "Image folder with the same class names."})
    image_column: str | None = field(default=None, metadata={"help": "Override the image column name."})
    label_column: str | None = field(default=None, metadata={"help": "Override the label column name."})
    brightness_jitter: float = field(default=0.0, metadata={"help": "Train brightness jitter (63/255 for CIFAR)."})
    crop_scale_min: float = field(
        default=0.08, metadata={"help": "Smallest area fraction of RandomResizedCrop (0.08 in the paper)."}
    )
    train_resize: int | None = field(
        default=None,
        metadata={"help": "Resize training images to N x N and random-crop the model's size instead of "
                  "RandomResizedCrop (CUB-200's augmentation in the authors' released `utils/data.py`: 300)."},
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips while training."})
    domains: list[str] | None = field(
        default=None,
        metadata={"help": "Domain-incremental: one task per domain, in this order, read from --data_dir (DomainNet's "
                  "release with <domain>_train.txt/<domain>_test.txt, or <domain>/train/<class>/ + "
                  "<domain>/test/<class>/). DomainNet: clipart infograph painting quickdraw real sketch."},
    )
    old_test_dir: str | None = field(
        default=None,
        metadata={"help": "With --continue_from: test images of learned classes (one sub-folder per class, named as "
                  "the class), to keep scoring the old tasks; without it their accuracies are missing, not 0."},
    )
    seeds: list[int] | None = field(
        default=None,
        metadata={"help": "Class-order seeds to run one after another (the paper: 1993 1996 1997), each into "
                  "OUTPUT_DIR/seed_<s>/, with a summary in OUTPUT_DIR/seeds.json. Overrides --class_order_seed."},
    )
    image_check_record: str | None = field(
        default=None,
        metadata={"help": "A file (safetensors, 32 bytes an image) recording the SHA-256 of every image content "
                  "that decoded in full: later runs with the same file still read and hash every image, and skip "
                  "the decode of bytes it lists. Created if missing; off by default."},
    )


class RecipeArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose `--help` lists the recipe's own flags first, in groups: the model and data
    arguments, SLCAConfig's method fields, the TrainingArguments whose defaults SLCAConfig changes, then the
    rest of TrainingArguments (some 700 lines)."""

    GROUPS = {ModelArguments: "model arguments", DataArguments: "data arguments"}

    def _add_dataclass_arguments(self, dtype) -> None:
        hints = get_type_hints(dtype)
        if issubclass(dtype, TrainingArguments):
            inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
            declared = set(vars(dtype).get("__annotations__", {}))  # the fields SLCAConfig itself declares
            method = self.add_argument_group(f"SLCA++ method ({dtype.__name__})")
            changed = self.add_argument_group(f"TrainingArguments with {dtype.__name__}'s defaults")
            rest = self.add_argument_group("other TrainingArguments (transformers)")
            group_of = lambda name: rest if name not in declared else changed if name in inherited else method  # noqa: E731
        else:
            group = self.add_argument_group(self.GROUPS.get(dtype, dtype.__name__))
            group_of = lambda name: group  # noqa: E731
        for f in dataclasses.fields(dtype):
            if f.init:
                f.type = hints[f.name]
                self._parse_dataclass_field(group_of(f.name), f)


def _argument_parser(prog: str | None = None) -> HfArgumentParser:
    parser = RecipeArgumentParser((ModelArguments, DataArguments, SLCAConfig), prog=prog,
                                  usage="%(prog)s [CONFIG.yaml | --config FILE] [--FLAG VALUE ...]")
    parser.add_argument(
        "--config", metavar="FILE",
        help="A YAML or JSON file of arguments (also accepted as the first argument, as in transformers' example "
             "scripts); flags on the command line override its values. A shipped config can be named without "
             "its folder (e.g. cifar100_in21k_slca++.yaml).",
    )
    parser.set_defaults(bf16="auto")  # the recipe's default; SLCAConfig resolves it when it is built
    return parser


def _value(option) -> str:
    """An enum option's value as the command line spells it."""
    return str(getattr(option, "value", option))


#: Trainer flags the continual loop cannot honour, as (set, problem): every one set is named, with what to use.
TRAINER_FLAG_RULES: tuple[tuple[Callable[[SLCAConfig], bool], str], ...] = (
    (lambda a: _value(a.eval_strategy) != "no",
     "--eval_strategy {eval}: the loop evaluates every seen task after each task (metrics.json); drop the flag"),
    (lambda a: _value(a.save_strategy) != "no",
     "--save_strategy {save}: the loop writes a checkpoint after each task (OUTPUT_DIR/task_<t>); drop the flag"),
    (lambda a: a.load_best_model_at_end,
     "--load_best_model_at_end: there is no best model across tasks; drop the flag"),
    (lambda a: a.resume_from_checkpoint,
     "--resume_from_checkpoint {a.resume_from_checkpoint}: use --resume_from {a.resume_from_checkpoint} "
     "(a task_<t> checkpoint, a run directory, a Hub repo id or `auto`)"),
)

#: Arguments refused before anything runs, as (broken, message) over the model, data and SLCAConfig
#: arguments (`m`, `d`, `a`), checked in order: the first broken rule ends the run with its one line.
ARGUMENT_RULES: tuple[tuple[Callable[[ModelArguments, DataArguments, SLCAConfig], bool], str], ...] = (
    (lambda m, d, a: int(os.environ.get("WORLD_SIZE", "1")) > 1 and a.world_size == 1,  # torchrun / accelerate
     "the launcher started {env[WORLD_SIZE]} processes but each would train alone on all the data (no GPU backend was "
     "found). Pass --use_cpu true for CPU processes (gloo), or check that the GPUs are visible."),
    # --continue_from and --resume_from load the model from their checkpoint (--model_name_or_path then guards it).
    (lambda m, d, a: not (m.model_name_or_path or m.model_config or m.continue_from or m.resume_from),
     "give --model_name_or_path (pre-trained backbone) or --model_config (random init)."),
    (lambda m, d, a: m.model_name_or_path and m.model_config and not m.resume_from,
     "--model_name_or_path (a pre-trained backbone) and --model_config (a random one from a config) both name the "
     "model; give one of them."),
    (lambda m, d, a: d.domains and (not d.data_dir or d.dataset or d.train_dir or d.test_dir),
     "--domains reads every domain from --data_dir; drop --dataset/--train_dir/--test_dir."),
    (lambda m, d, a: d.domains and d.seeds,
     "--seeds varies the class order, which a domain-incremental run lacks; use --seed."),
    (lambda m, d, a: m.resume_from and not (d.domains or d.dataset or d.train_dir or d.test_dir),
     "--resume_from goes on with the run's own data: give its flags again (--dataset NAME, --train_dir and "
     "--test_dir, or --domains with --data_dir; the offline demo: --config demo_digits.yaml)."),
    (lambda m, d, a: not (d.domains or d.dataset or (d.train_dir and d.test_dir)),
     "give --dataset NAME, both --train_dir and --test_dir, or --domains with --data_dir."),
    (lambda m, d, a: d.data_dir and not (d.dataset or d.domains),
     "--data_dir needs --dataset NAME (e.g. --dataset cub200 --data_dir data/CUB_200_2011)."),
    (lambda m, d, a: d.train_resize and d.crop_scale_min != 0.08,
     "--crop_scale_min sets RandomResizedCrop, which --train_resize replaces; drop one of them."),
    (lambda m, d, a: d.seeds and m.resume_from not in (None, "auto"),
     "with --seeds, --resume_from can only be `auto` (each seed resumes in its own seed_<s>/)."),
    (lambda m, d, a: d.seeds and not all(0 <= s < 1 << 32 for s in d.seeds),
     "--seeds {seeds}: each class-order seed must be 0 to 4294967295 (numpy's seeds)."),
    (lambda m, d, a: d.seeds and len(set(d.seeds)) != len(d.seeds),
     "--seeds {seeds} repeats a seed; give each seed once."),
)


def refuse_trainer_flags(args: SLCAConfig) -> None:
    """Trainer flags the continual loop cannot honour, refused before anything runs, naming what to use."""
    names = {"a": args, "eval": _value(args.eval_strategy), "save": _value(args.save_strategy)}
    problems = [problem.format(**names) for is_set, problem in TRAINER_FLAG_RULES if is_set(args)]
    if problems:
        raise UserError("the continual loop cannot honour " + "; ".join(problems) + ".")


def check_continue_arguments(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig) -> None:
    """`--continue_from` and its options, refused in one line where they cannot apply."""
    options = [flag for flag, value in (("--merge_existing_classes", model_args.merge_existing_classes),
                                        ("--old_test_dir", data_args.old_test_dir)) if value]
    if not model_args.continue_from:
        if model_args.continue_revision:
            raise UserError("--continue_revision is the Hub revision of --continue_from; add --continue_from REPO.")
        if options and not model_args.resume_from:  # resuming an interrupted continuation takes them again
            raise UserError(f"{' and '.join(options)} go with --continue_from (new classes from new data); add "
                             "--continue_from CHECKPOINT_OR_REPO or drop them.")
        return
    if not (data_args.dataset or data_args.train_dir or data_args.test_dir or data_args.domains):
        raise UserError("--continue_from needs the new data whose classes it teaches the checkpoint: give "
                        "--train_dir DIR --test_dir DIR (image folders, one sub-folder per class) or --dataset NAME.")
    if model_args.resume_from:
        raise UserError("--continue_from teaches a checkpoint new classes from new data; --resume_from finishes an "
                         "interrupted run of the same stream: give one of them (an interrupted --continue_from run "
                         "resumes with --resume_from auto and the same new data once it finished a new task; "
                         "before that, rerun the original --continue_from command).")
    refused = [(data_args.domains, "--domains (a domain-incremental stream adds no classes)"),
               (data_args.seeds, "--seeds (one checkpoint goes on with one stream; use --class_order_seed)"),
               (model_args.model_config, "--model_config (the model is the checkpoint's)"),
               (model_args.peft_config, "--peft_config (the adapter is the checkpoint's)")]
    for given, flag in refused:
        if given:
            raise UserError(f"--continue_from cannot take {flag}; drop it.")
    source = Path(model_args.continue_from)
    if args.overwrite_output_dir and source.exists() and source.resolve().is_relative_to(
            Path(args.output_dir).resolve()):
        raise UserError(f"--overwrite_output_dir would delete {source}, which --continue_from goes on from; choose "
                         "another --output_dir.")


def check_arguments(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig) -> None:
    """The trainer flags, `ARGUMENT_RULES` and the output directory: one line naming flag and fix."""
    refuse_trainer_flags(args)
    check_continue_arguments(model_args, data_args, args)
    for broken, message in ARGUMENT_RULES:
        if broken(model_args, data_args, args):
            raise UserError(message.format(env=os.environ, seeds=" ".join(map(str, data_args.seeds or []))))
    if model_args.model_name_or_path:  # a missing path or a checkpoint given as the backbone: before any decode
        check_backbone_source(model_args.model_name_or_path)
    check_writable(args.output_dir)


def _given(argv: list[str], *names: str) -> bool:
    """Whether any of these flags is on the command line (or in the config file, whose keys are flags by now)."""
    flags = {f"--{name}" for name in names} | {f"--{name.replace('_', '-')}" for name in names}
    return any(token.split("=", 1)[0] in flags for token in argv)


#: Flags that name the user's own data, model or checkpoint: any of them switches the offline demo's config off.
USER_RUN_FLAGS = ("dataset", "data_dir", "dataset_revision", "train_dir", "test_dir", "domains", "model_name_or_path",
                  "model_config", "continue_from", "continue_revision", "old_test_dir", "merge_existing_classes")


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value of `--name` on the command line (`--name V` or `--name=V`), if given."""
    value = None
    for i, token in enumerate(argv):
        flag, eq, rest = token.partition("=")
        if flag in (f"--{name}", f"--{name.replace('_', '-')}"):
            value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return value


def _runs_the_demo(argv: list[str]) -> bool:
    """Whether a command line without a config file is the offline demo (`slca-peft train` and flags that
    only tune it): not when it names data, a model or a checkpoint of the user's. `--resume_from auto`
    resumes the demo in its own output directory only (no `--output_dir`); with another output directory
    or a named checkpoint it resumes the user's run, whose data must be given again."""
    if "-h" in argv or "--help" in argv or _given(argv, *USER_RUN_FLAGS):
        return False
    resume = _flag_value(argv, "resume_from")
    if resume is None:
        return True
    output_dir = _flag_value(argv, "output_dir")
    return resume == "auto" and (output_dir is None or _holds_the_demo(output_dir))


def _holds_the_demo(directory: str) -> bool:
    """Whether `directory` holds a run of the demo (its fingerprint names the demo's base model): `--resume_from
    auto --output_dir D` with no data flags then resumes it as the demo; any other run needs its flags again."""
    try:
        recorded = read_fingerprint(directory) if Path(directory).is_dir() else None
    except UserError:
        return False
    base = (recorded or {}).get("base_model")
    demo_base = _flag_value(read_config(str(DEMO_CONFIG), _argument_parser()), "model_name_or_path")
    return isinstance(base, str) and demo_base is not None and os.path.realpath(base) == os.path.realpath(demo_base)


def _resolve_run_directories(model_args: ModelArguments) -> ModelArguments:
    """`--resume_from RUN` and `--continue_from RUN` given a run directory: its last complete task."""
    changes = {name: task_checkpoint(value, f"--{name}") for name in ("resume_from", "continue_from")
               if (value := getattr(model_args, name))}
    return dataclasses.replace(model_args, **changes)


def _recorded_precision(model_args: ModelArguments, args: SLCAConfig) -> bool | None:
    """The bf16 a resumed run recorded in its run_fingerprint.json (its own or a seed run's), when this run's
    `--bf16 auto` chose otherwise; None when not resuming, not auto, or the same."""
    if not model_args.resume_from or args.precision_choice is None:
        return None
    root = Path(args.output_dir)
    candidates = [] if model_args.resume_from == "auto" else [Path(model_args.resume_from).parent]
    candidates += [root, *seed_dirs(root)]
    for directory in candidates:
        recorded = (read_fingerprint(directory) or {}).get("bf16") if directory.is_dir() else None
        if isinstance(recorded, bool):
            return recorded if recorded != args.bf16 else None
    return None


def parse_args(argv: list[str], prog: str | None = None) -> tuple[ModelArguments, DataArguments, SLCAConfig]:
    """The three argument dataclasses from `argv`: a config file (`--config FILE`, `--config=FILE` or a
    .yaml/.json first argument) supplies defaults that the other flags override. `prog` names the
    command in the usage line."""
    config, argv = split_config(argv)
    if config is None and _runs_the_demo(argv):
        config = str(DEMO_CONFIG)  # the offline demo, with any other flag overriding its settings
    parser = _argument_parser(prog)
    if config is not None:
        if not Path(config).exists() and shipped_file("configs", Path(config).name).is_file():
            config = str(shipped_file("configs", Path(config).name))  # a shipped config by name
        argv = read_config(config, parser) + argv
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:  # argparse's own one-line usage error, as for a bad value
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (--help lists the flags)")
    model_args, data_args, args = parsed[:3]
    recorded = _recorded_precision(model_args, args)
    if recorded is not None:  # a resumed `--bf16 auto` run keeps the precision it started with
        model_args, data_args, args, *_ = parser.parse_args_into_dataclasses(
            args=[*argv, "--bf16", str(recorded).lower(),
                  *(["--use_cpu", "true"] if args.use_cpu or (recorded and not torch.cuda.is_available()) else [])])
        args.precision_choice = f"--bf16 auto kept {'bfloat16 autocast' if recorded else 'fp32'}: the run being " \
            "resumed recorded it (--bf16 true/false overrides)"
    model_args = _resolve_run_directories(model_args)
    if model_args.continue_from and not _given(argv, "init_cls", "increment"):
        args.init_cls = args.increment = None  # the new classes as one task (TaskSequence's split)
    check_arguments(model_args, data_args, args)
    check_output_arguments(args.output_dir, overwrite=args.overwrite_output_dir, resume_from=model_args.resume_from,
                           data=[data_args.data_dir], image_folders=[data_args.train_dir, data_args.test_dir],
                           model=model_args.model_name_or_path)
    return model_args, data_args, args
