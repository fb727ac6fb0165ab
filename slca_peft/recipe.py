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
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import AutoConfig, AutoModel, HfArgumentParser, set_seed

from .callbacks import load_callback, write_plots
from .checkpoint import atomic_directory, atomic_write_text
from .config import SLCAConfig
from .continual import ContinualLearner
from .data import KNOWN_DATASETS, canonical_name, load_benchmark
from .data_checks import check_task_data, check_task_splits
from .domains import DomainSequence
from .errors import UserError, run_main
from .export import eval_transform_config
from .hardware import log_bf16_choice, resolve_bf16_flag
from .model import SLCAModel
from .peft_methods import load_peft_config
from .run_dir import check_checkpoint_matches, check_resumable, check_writable, claim_run_directory, run_fingerprint
from .tasks import TaskSequence
from .transforms import EvalTransform, ImageTransformConfig, TrainTransform


def _shipped(kind: str, name: str) -> Path:
    """A file under recipes/ (`configs`, `assets`): inside the installed package (a wheel ships them
    as slca_peft/_configs, slca_peft/_assets), else in the source tree."""
    here = Path(__file__).resolve().parent
    installed = here / f"_{kind}" / name
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
                  "RandomResizedCrop (the reference's CUB-200 augmentation: 300)."},
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips while training."})
    domains: list[str] | None = field(
        default=None,
        metadata={"help": "Domain-incremental: one task per domain, in this order, read from --data_dir (DomainNet's "
                  "release with <domain>_train.txt/<domain>_test.txt, or <domain>/train/<class>/ + "
                  "<domain>/test/<class>/). DomainNet: clipart infograph painting quickdraw real sketch."},
    )
    seeds: list[int] | None = field(
        default=None,
        metadata={"help": "Class-order seeds to run one after another (the paper: 1993 1996 1997), each into "
                  "OUTPUT_DIR/seed_<s>/, with a summary in OUTPUT_DIR/seeds.json. Overrides --class_order_seed."},
    )


def yaml_to_argv(path: str) -> list[str]:
    """Turn a YAML mapping into command-line flags, so the command line can override any of them."""
    if not Path(path).is_file():
        raise UserError(f"--config {path}: no such file; give the path of a YAML file of arguments.")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path} is not valid YAML ({' '.join(str(err).split())}); fix the file.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of argument names to values.")
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value))
    return argv


def refuse_trainer_flags(args: SLCAConfig) -> None:
    """Trainer flags the continual loop cannot honour, refused before anything runs, naming what to use."""
    problems = []
    evaluation = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if evaluation != "no":
        problems.append(f"--eval_strategy {evaluation}: the loop evaluates every seen task after each task "
                        "(metrics.json); drop the flag")
    save = str(getattr(args.save_strategy, "value", args.save_strategy))
    if save != "no":
        problems.append(f"--save_strategy {save}: the loop writes a checkpoint after each task "
                        "(OUTPUT_DIR/task_<t>); drop the flag")
    if args.load_best_model_at_end:
        problems.append("--load_best_model_at_end: there is no best model across tasks; drop the flag")
    if args.resume_from_checkpoint:
        problems.append(f"--resume_from_checkpoint {args.resume_from_checkpoint}: use --resume_from "
                        f"{args.resume_from_checkpoint} (a task_<t> checkpoint, a Hub repo id or `auto`)")
    if problems:
        raise SystemExit("the continual loop cannot honour " + "; ".join(problems) + ".")


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, SLCAConfig]:
    chosen = {"--config", "--dataset", "--train_dir", "--domains", "--model_name_or_path", "--model_config"}
    if not chosen & {a.split("=", 1)[0] for a in argv} and "-h" not in argv and "--help" not in argv:
        # No data and no model given: the offline demo, with any other flag overriding its settings. Its
        # YAML names the backbone relative to the source tree; point at wherever the backbone is.
        argv = ["--config", str(DEMO_CONFIG), "--model_name_or_path", str(DEMO_BACKBONE), *argv]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise SystemExit("--config needs a value: --config path/to/file.yaml.")
        config = argv[i + 1]
        if not Path(config).exists() and _shipped("configs", Path(config).name).is_file():
            config = str(_shipped("configs", Path(config).name))  # a shipped config by name
        argv = yaml_to_argv(config) + argv[:i] + argv[i + 2 :]
    argv = resolve_bf16_flag(argv)  # `--bf16 auto`, the recipe's default: bf16 where the hardware has it
    parser = HfArgumentParser((ModelArguments, DataArguments, SLCAConfig))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    refuse_trainer_flags(args)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise SystemExit(
            f"the launcher started {launched} processes but each would train alone on all the data (no GPU "
            "backend was found). Pass --use_cpu true for CPU processes (gloo), or check that the GPUs are visible."
        )
    if not (model_args.model_name_or_path or model_args.model_config):
        raise SystemExit("give --model_name_or_path (pre-trained backbone) or --model_config (random init).")
    if data_args.domains:
        if not data_args.data_dir or data_args.dataset or data_args.train_dir or data_args.test_dir:
            raise SystemExit("--domains reads every domain from --data_dir; drop --dataset/--train_dir/--test_dir.")
        if data_args.seeds:
            raise SystemExit("--seeds varies the class order, which a domain-incremental run lacks; use --seed.")
    elif not (data_args.dataset or (data_args.train_dir and data_args.test_dir)):
        raise SystemExit("give --dataset NAME, both --train_dir and --test_dir, or --domains with --data_dir.")
    if data_args.data_dir and not (data_args.dataset or data_args.domains):
        raise SystemExit("--data_dir needs --dataset NAME (e.g. --dataset cub200 --data_dir data/CUB_200_2011).")
    if data_args.train_resize and data_args.crop_scale_min != 0.08:
        raise SystemExit("--crop_scale_min sets RandomResizedCrop, which --train_resize replaces; drop one of them.")
    if data_args.seeds and model_args.resume_from not in (None, "auto"):
        raise SystemExit("with --seeds, --resume_from can only be `auto` (each seed resumes in its own seed_<s>/).")
    if data_args.seeds and len(set(data_args.seeds)) != len(data_args.seeds):
        raise SystemExit(f"--seeds {' '.join(map(str, data_args.seeds))} repeats a seed; give each seed once.")
    check_writable(args.output_dir)
    return model_args, data_args, args


def build_tasks(data_args: DataArguments, args: SLCAConfig) -> TaskSequence | DomainSequence:
    """The task stream, with all of its data checked (every image decoded once) before any training."""
    tasks = _load_tasks(data_args, args)
    if data_args.train_dir:
        check_task_splits(tasks)  # from_image_folders has decoded every image
    else:
        check_task_data(tasks)
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
        # A random backbone has no Hub reference: save it so checkpoints can point at it.
        set_seed(args.seed)
        config = AutoConfig.from_pretrained(model_args.model_config)
        source = str(Path(args.output_dir) / "base_model")
        if args.process_index == 0:
            if ContinualLearner.latest_checkpoint(args.output_dir) is not None:
                raise UserError(f"{args.output_dir} holds checkpoints trained on its base_model/, which a new "
                                "random backbone would replace; resume with --resume_from auto or use "
                                "--overwrite_output_dir.")
            with atomic_directory(source) as tmp:
                AutoModel.from_config(config).save_pretrained(tmp)
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
        values = [run[key] for run in runs.values()]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        result[key] = {"mean": statistics.fmean(values), "std": std}
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


def main(argv: list[str] | None = None) -> dict:
    """Train; with `argv=None` (the command line) a user error ends with one line, not a traceback."""
    if argv is None:
        return run_main(main, prog="slca-peft train")
    model_args, data_args, args = parse_args(argv)
    configure_logging(args)
    log_bf16_choice()
    if data_args.seeds:
        return run_seeds(model_args, data_args, args)
    return train(model_args, data_args, args)


def train(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig) -> dict:
    """One run over the task sequence of `args.class_order_seed`; returns the metrics summary.

    The output directory is claimed for this run first (`claim_run_directory`): another run's files
    there, a concurrent run or a resume with other settings stop it before any training."""
    tasks = build_tasks(data_args, args)
    logger.info("%d classes in %d tasks %s, class order seed %s", tasks.num_classes, len(tasks),
                tasks.task_sizes, args.class_order_seed)
    fingerprint = run_fingerprint(
        args, base_model=model_args.model_name_or_path or model_args.model_config,
        base_revision=model_args.model_revision, tasks=tasks,
        extra={k: getattr(data_args, k) for k in ("brightness_jitter", "crop_scale_min", "train_resize",
                                                  "horizontal_flip")},
    )
    with claim_run_directory(args.output_dir, fingerprint, overwrite=args.overwrite_output_dir,
                             resume=bool(model_args.resume_from), main_process=args.process_index == 0):
        return _train(model_args, data_args, args, tasks, fingerprint)


def _train(model_args: ModelArguments, data_args: DataArguments, args: SLCAConfig, tasks, fingerprint) -> dict:
    callbacks = [load_callback(spec) for spec in model_args.callbacks or []]
    resume = model_args.resume_from
    if resume == "auto":
        resume = ContinualLearner.latest_checkpoint(args.output_dir)
        logger.info("resume auto: %s", resume or "no complete checkpoint, starting from the first task")
    if resume:
        if Path(resume).is_dir():
            check_checkpoint_matches(resume, fingerprint)
            check_resumable(resume, align=args.align)
        learner = ContinualLearner.from_checkpoint(
            resume, args, tasks, revision=model_args.resume_revision,
            expected_base=[model_args.model_name_or_path, args.hub_base_model_id],
            train_transform=None, eval_transform=None, callbacks=callbacks,
        )
        logger.info("resumed from %s after task %d", resume, len(learner.result.accuracy_matrix))
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
