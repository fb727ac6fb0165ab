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
supplies defaults that flags on the command line override.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import AutoConfig, AutoModel, HfArgumentParser, set_seed

from .adapters import load_peft_config
from .callbacks import load_callback
from .checkpoint import verify_checkpoint
from .config import SLCAConfig
from .continual import ContinualLearner
from .continuation import load_test_folder
from .continue_run import check_continue_arguments, continuation_fingerprint, continued_stream
from .data import KNOWN_DATASETS, canonical_name, load_benchmark
from .data_checks import check_task_data, check_task_splits
from .domains import DomainSequence
from .errors import UserError, run_main
from .files import atomic_directory, atomic_write_text
from .hardware import log_bf16_choice, resolve_bf16_flag
from .logging_utils import progress_bars
from .manifest import MANIFEST_FILE, read_manifest, record_tree
from .model import SLCAModel
from .plotting import mean_std
from .run_dir import (
    check_checkpoint_matches,
    check_resumable,
    check_writable,
    claim_run_directory,
    finished_run,
    run_fingerprint,
)
from .steps import write_plots
from .tasks import TaskSequence
from .transforms import EvalTransform, ImageTransformConfig, TrainTransform, eval_transform_config


def _shipped(kind: str, name: str) -> Path:
    """A file under recipes/ (`configs`, `assets`): inside the installed package (a wheel ships them
    as slca_peft/_recipes/configs, slca_peft/_recipes/assets, keeping the configs' relative paths to
    the assets), else in the source tree."""
    here = Path(__file__).resolve().parent
    installed = here / "_recipes" / kind / name
    return installed if installed.exists() else here.parent / "recipes" / kind / name


DEMO_CONFIG = _shipped("configs", "demo_digits.yaml")
DEMO_BACKBONE = _shipped("assets", "tiny_vit_letters")
logger = logging.getLogger(__name__)


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
        metadata={"help": "Continue after the last task of a checkpoint: a task_<t> directory, a Hub repo id, "
                  "or `auto` (the newest complete checkpoint in --output_dir, if any)."},
    )
    resume_revision: str | None = field(default=None, metadata={"help": "Hub revision of --resume_from."})
    accept_changed_files: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint whose files or base model weights changed since it was written "
                  "(edited adapter or accuracies, replaced base weights); without it such a resume is refused."},
    )
    continue_from: str | None = field(
        default=None,
        metadata={"help": "Teach a trained checkpoint (a task_<t> directory or a Hub repo id) the classes of new data "
                  "(--train_dir/--test_dir or --dataset): they are split by --init_cls/--increment, ordered by "
                  "--class_order_seed, and appended after the learned ones, which keep their ids. Not with "
                  "--resume_from, which finishes an interrupted run of the same stream."},
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


#: Arguments that name an input file or folder: a relative value in a config file is looked up next to
#: the file first (see `yaml_to_argv`). Outputs (`output_dir`, `logging_dir`) stay relative to the
#: working directory, where the command runs.
CONFIG_PATH_KEYS = ("model_name_or_path", "model_config", "peft_config", "resume_from", "dataset", "data_dir",
                    "train_dir", "test_dir", "deepspeed", "fsdp_config", "accelerator_config")
#: A config file given without `--config`, as the first argument (transformers' example scripts: `run_x.py args.json`).
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _resolve_config_path(value: str, base: Path) -> str:
    """`value` against the config file's folder when it exists there, else as written (working directory).

    When both name the same file, the value is kept as written, so a run started before this rule
    keeps its fingerprint."""
    path = Path(value).expanduser()
    candidate = base / path
    if path.is_absolute() or value == "auto" or not candidate.exists():
        return value
    if path.exists() and os.path.samefile(path, candidate):
        return value
    return os.path.normpath(candidate)


def yaml_to_argv(path: str) -> list[str]:
    """Turn a YAML (or JSON) mapping into command-line flags, so the command line can override any of
    them. Relative input paths (`CONFIG_PATH_KEYS`) resolve against the file's own folder when they
    exist there, so a config and the files beside it work from any working directory."""
    kind = "JSON" if path.lower().endswith(".json") else "YAML"
    if not Path(path).is_file():
        raise UserError(f"--config {path}: no such file; give the path of a {kind} file of arguments.")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}  # JSON is YAML
    except yaml.YAMLError as err:
        raise UserError(f"--config {path} is not valid {kind} ({' '.join(str(err).split())}); fix the file.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of argument names to values.")
    base = Path(path).resolve().parent
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        elif key in CONFIG_PATH_KEYS and isinstance(value, str):
            argv.append(_resolve_config_path(value, base))
        else:
            argv.append(str(value))
    return argv


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """The config file (`--config FILE`, `--config=FILE`, or a .yaml/.yml/.json first argument) and the
    other arguments."""
    rest = list(argv)
    found: list[str] = []
    if rest and not rest[0].startswith("-") and rest[0].lower().endswith(CONFIG_SUFFIXES):
        found.append(rest.pop(0))
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--config":
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise SystemExit("--config needs a value: --config path/to/file.yaml.")
            found.append(rest[i + 1])
            del rest[i : i + 2]
        elif arg.startswith("--config="):
            if not arg.removeprefix("--config="):
                raise SystemExit("--config needs a value: --config path/to/file.yaml.")
            found.append(arg.removeprefix("--config="))
            del rest[i]
        else:
            i += 1
    if len(found) > 1:
        raise SystemExit(f"only one config file is read, got {len(found)} ({', '.join(found)}); merge them or "
                         "override single values with flags.")
    return (found[0] if found else None), rest


def _argument_parser(prog: str | None = None) -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, SLCAConfig), prog=prog)
    parser.add_argument(
        "--config", metavar="FILE",
        help="A YAML or JSON file of arguments (also accepted as the first argument, as in transformers' example "
             "scripts); flags on the command line override its values. A shipped config can be named without "
             "its folder (e.g. cifar100_in21k_slca++.yaml).",
    )
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
     "(a task_<t> checkpoint, a Hub repo id or `auto`)"),
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
    (lambda m, d, a: d.domains and (not d.data_dir or d.dataset or d.train_dir or d.test_dir),
     "--domains reads every domain from --data_dir; drop --dataset/--train_dir/--test_dir."),
    (lambda m, d, a: d.domains and d.seeds,
     "--seeds varies the class order, which a domain-incremental run lacks; use --seed."),
    (lambda m, d, a: not (d.domains or d.dataset or (d.train_dir and d.test_dir)),
     "give --dataset NAME, both --train_dir and --test_dir, or --domains with --data_dir."),
    (lambda m, d, a: d.data_dir and not (d.dataset or d.domains),
     "--data_dir needs --dataset NAME (e.g. --dataset cub200 --data_dir data/CUB_200_2011)."),
    (lambda m, d, a: d.train_resize and d.crop_scale_min != 0.08,
     "--crop_scale_min sets RandomResizedCrop, which --train_resize replaces; drop one of them."),
    (lambda m, d, a: d.seeds and m.resume_from not in (None, "auto"),
     "with --seeds, --resume_from can only be `auto` (each seed resumes in its own seed_<s>/)."),
    (lambda m, d, a: d.seeds and len(set(d.seeds)) != len(d.seeds),
     "--seeds {seeds} repeats a seed; give each seed once."),
)


def refuse_trainer_flags(args: SLCAConfig) -> None:
    """Trainer flags the continual loop cannot honour, refused before anything runs, naming what to use."""
    names = {"a": args, "eval": _value(args.eval_strategy), "save": _value(args.save_strategy)}
    problems = [problem.format(**names) for is_set, problem in TRAINER_FLAG_RULES if is_set(args)]
    if problems:
        raise SystemExit("the continual loop cannot honour " + "; ".join(problems) + ".")


def check_arguments(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig) -> None:
    """The trainer flags, `ARGUMENT_RULES` and the output directory: one line naming flag and fix."""
    refuse_trainer_flags(args)
    check_continue_arguments(model_args, data_args, args)
    for broken, message in ARGUMENT_RULES:
        if broken(model_args, data_args, args):
            raise SystemExit(message.format(env=os.environ, seeds=" ".join(map(str, data_args.seeds or []))))
    check_writable(args.output_dir)


def parse_args(argv: list[str], prog: str | None = None) -> tuple[ModelArguments, DataArguments, SLCAConfig]:
    """The three argument dataclasses from `argv`: a config file (`--config FILE`, `--config=FILE` or a
    .yaml/.json first argument) supplies defaults that the other flags override. `prog` names the
    command in the usage line."""
    config, argv = _split_config(argv)
    chosen = {"--dataset", "--train_dir", "--domains", "--model_name_or_path", "--model_config"}
    if config is None and not chosen & {a.split("=", 1)[0] for a in argv} and "-h" not in argv \
            and "--help" not in argv:
        config = str(DEMO_CONFIG)  # the offline demo, with any other flag overriding its settings
    if config is not None:
        if not Path(config).exists() and _shipped("configs", Path(config).name).is_file():
            config = str(_shipped("configs", Path(config).name))  # a shipped config by name
        argv = yaml_to_argv(config) + argv
    argv = resolve_bf16_flag(argv)  # `--bf16 auto`, the recipe's default: bf16 where the hardware has it
    model_args, data_args, args, *_ = _argument_parser(prog).parse_args_into_dataclasses(args=argv)
    check_arguments(model_args, data_args, args)
    from .run_dir import check_output_arguments  # noqa: PLC0415

    check_output_arguments(args.output_dir, overwrite=args.overwrite_output_dir, resume_from=model_args.resume_from,
                           data=[data_args.data_dir], image_folders=[data_args.train_dir, data_args.test_dir],
                           model=model_args.model_name_or_path)
    return model_args, data_args, args


def data_source(data_args: DataArguments) -> str | None:
    """What the data is, as each task's history records it: the dataset's Hub id or name, or the image folders."""
    if data_args.train_dir:
        return f"image folders {data_args.train_dir}, {data_args.test_dir}"
    return dataset_hub_id(data_args.dataset) or data_args.dataset


def build_tasks(data_args: DataArguments, args: SLCAConfig) -> TaskSequence | DomainSequence:
    """The task stream, with all of its data checked (every image decoded once) before any training;
    the check's progress bars show on the main process unless `--disable_tqdm`."""
    progress = not args.disable_tqdm and args.process_index == 0
    with progress_bars(progress):
        tasks = _load_tasks(data_args, args)
        if not data_args.domains:
            tasks.source = data_source(data_args)
        if data_args.train_dir:
            check_task_splits(tasks)  # from_image_folders has decoded every image
        else:
            check_task_data(tasks, progress=progress)
    return tasks


def _load_tasks(data_args: DataArguments, args: SLCAConfig) -> TaskSequence | DomainSequence:
    if data_args.domains:
        return DomainSequence.from_folders(data_args.data_dir, data_args.domains)
    split = {"init_cls": args.init_cls, "increment": args.increment, "seed": args.class_order_seed}
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
    runs = {}
    for seed in data_args.seeds:
        seed_args = copy.copy(args)
        seed_args.class_order_seed, seed_args.output_dir = seed, str(root / f"seed_{seed}")
        if args.push_to_hub:  # one repo per seed: each has its own task history
            seed_args.hub_model_id = f"{args.hub_model_id or root.absolute().name}-seed{seed}"
        logger.info("class-order seed %d -> %s", seed, seed_args.output_dir)
        summary = train(model_args, data_args, seed_args)
        runs[str(seed)] = {
            "output_dir": f"seed_{seed}",
            "last_accuracy": summary["last_accuracy"],
            "average_incremental_accuracy": summary["average_incremental_accuracy"],
        }
    result = {"method": args.method, "seeds": list(data_args.seeds), "runs": runs}
    for key in ("last_accuracy", "average_incremental_accuracy"):
        mean, std = mean_std([run[key] for run in runs.values()])
        result[key] = {"mean": mean, "std": std}
    if args.process_index == 0:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / "seeds.json", json.dumps(result, indent=2) + "\n")
        last, inc = result["last_accuracy"], result["average_incremental_accuracy"]
        logger.info(f"seeds {data_args.seeds}: Last-Acc {last['mean']:.2f} ± {last['std']:.2f}  "
              f"Inc-Acc {inc['mean']:.2f} ± {inc['std']:.2f}  ({root / 'seeds.json'})")
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
    """The library's records on stdout, once: INFO on the main process (or `--log_level`), WARNING on
    the others (or `--log_level_replica`), as transformers' example scripts do."""
    from transformers.training_args import trainer_log_levels as levels

    chosen = levels[args.log_level if args.should_log else args.log_level_replica]
    if chosen == -1:  # "passive"
        chosen = logging.INFO if args.should_log else logging.WARNING
    package = logging.getLogger("slca_peft")
    package.setLevel(chosen)
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
    log_bf16_choice()
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
    with progress_bars(not args.disable_tqdm and args.process_index == 0):
        return _start(model_args, data_args, args)


def _start(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig) -> dict:
    # Checks that need no image decode run before the decode pass.
    callbacks = [load_callback(spec) for spec in model_args.callbacks or []]
    tasks = build_tasks(data_args, args)
    logger.info("%d classes in %d tasks %s, class order seed %s", tasks.num_classes, len(tasks),
                tasks.task_sizes, args.class_order_seed)
    fingerprint = run_fingerprint(
        args, base_model=model_args.model_name_or_path or model_args.model_config,
        base_revision=model_args.model_revision, tasks=tasks, peft_config=model_args.peft_config,
        extra={**{k: getattr(data_args, k) for k in ("brightness_jitter", "crop_scale_min", "train_resize",
                                                     "horizontal_flip")},
               **continuation_fingerprint(model_args, data_args, args.output_dir)},
    )
    done = None if args.overwrite_output_dir or model_args.resume_from not in (None, "auto") else \
        finished_run(args.output_dir, fingerprint, len(tasks))
    if done is not None:
        return _finished(args, done)
    with claim_run_directory(args.output_dir, fingerprint, overwrite=args.overwrite_output_dir,
                             resume=bool(model_args.resume_from), main_process=args.process_index == 0):
        return _train(model_args, data_args, args, tasks, fingerprint, callbacks)


def _finished(args: SLCAConfig, metrics: dict) -> dict:
    """The summary of a finished run, logged as the run logged it, without training again."""
    from .errors import read_json
    from .metrics import summarize_accuracy_matrix

    last = Path(args.output_dir) / f"task_{len(metrics['accuracy_matrix']) - 1}"
    state = read_json(last / "continual_state.json")
    summary = summarize_accuracy_matrix(metrics["accuracy_matrix"], state.get("task_test_sizes") or None)
    if args.process_index == 0:
        logger.info("nothing to do: %s already holds this run, finished (same settings and data). Last-Acc %.2f  "
                    "Inc-Acc %.2f  forgetting %.2f  BWT %.2f  (%s); pass --overwrite_output_dir to train it again.",
                    args.output_dir, summary["last_accuracy"], summary["average_incremental_accuracy"],
                    summary["average_forgetting"], summary["backward_transfer"],
                    Path(args.output_dir) / "metrics.json")
        if args.push_to_hub:
            logger.warning("--push_to_hub: nothing was trained, so nothing was pushed; upload a checkpoint with "
                           "`slca-peft push %s REPO_ID`.", last)
    return summary


def _train(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig, tasks, fingerprint,
           callbacks: list) -> dict:
    resume = model_args.resume_from
    if resume == "auto":
        resume = ContinualLearner.latest_checkpoint(args.output_dir)
        logger.info("resume auto: %s", resume or "no complete checkpoint, starting from the first task")
    if resume:
        if Path(resume).is_dir():
            check_checkpoint_matches(resume, fingerprint)
            check_resumable(resume, align=args.align)
            verify_checkpoint(resume, [model_args.model_name_or_path, args.hub_base_model_id],
                              accept_changed_files=model_args.accept_changed_files)
        continued = continued_stream(model_args, data_args, tasks, args.output_dir)
        learner = ContinualLearner.from_checkpoint(
            resume, args, continued or tasks, revision=model_args.resume_revision,
            expected_base=[model_args.model_name_or_path, args.hub_base_model_id],
            train_transform=None, eval_transform=None, callbacks=callbacks,
        )
        logger.info("resumed from %s after task %d", resume, len(learner.result.accuracy_matrix))
    elif model_args.continue_from:
        old_test = load_test_folder(data_args.old_test_dir) if data_args.old_test_dir else None
        learner = ContinualLearner.from_pretrained(
            model_args.continue_from, args, tasks, revision=model_args.continue_revision,
            expected_base=[model_args.model_name_or_path, args.hub_base_model_id],
            merge_existing_classes=model_args.merge_existing_classes, old_test=old_test,
            train_transform=None, eval_transform=None, callbacks=callbacks,
        )
        logger.info("continuing %s (%d tasks, %d classes learned) with %d new classes in %d tasks",
                    model_args.continue_from, learner.tasks.num_old_tasks, learner.tasks.num_old_classes,
                    learner.tasks.num_classes - learner.tasks.num_old_classes, len(tasks))
    else:
        learner = ContinualLearner(build_model(model_args, args), args, tasks, train_transform=None,
                                   eval_transform=None, callbacks=callbacks)
    tc = transform_config_for(learner.model, data_args.brightness_jitter)
    dataset_id = dataset_hub_id(data_args.dataset)
    if dataset_id:
        learner.run_metadata["dataset"] = dataset_id
    learner.set_transforms(
        TrainTransform(tc, scale=(data_args.crop_scale_min, 1.0), flip_p=0.5 if data_args.horizontal_flip else 0.0,
                       resize=data_args.train_resize or None),
        EvalTransform(tc),
    )
    return learner.run().summary()


if __name__ == "__main__":
    main()
