"""Train a ViT over a sequence of tasks with SLCA++ (or SLCA / SL / Seq-FT) and report accuracies.

    python recipes/train_seq.py                      # offline demo: digits, tiny ViT
    python recipes/train_seq.py --config recipes/configs/cifar100_in21k_slca++.yaml   # the paper's CIFAR-100 row
    accelerate launch recipes/train_seq.py --config ... --output_dir runs/cifar

Any SLCAConfig / TrainingArguments field is a flag (`--learning_rate 0.01`); `--config file.yaml`
supplies defaults that flags on the command line override.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import AutoConfig, AutoImageProcessor, AutoModel, HfArgumentParser, set_seed

from slca_peft import (
    ContinualLearner,
    EvalTransform,
    ImageTransformConfig,
    SLCAConfig,
    SLCAModel,
    TaskSequence,
    TrainTransform,
)
from slca_peft.continual import format_accuracy_table
from slca_peft.data import load_named_dataset

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo_digits.yaml"
logger = logging.getLogger("train_seq")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local directory of the pre-trained backbone."}
    )
    model_config: str | None = field(
        default=None, metadata={"help": "A config JSON to build a randomly initialised backbone (demo, tests)."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the backbone."})
    resume_from: str | None = field(
        default=None,
        metadata={"help": "Continue after the last task of a checkpoint: a task_<t> directory, a Hub repo id, "
                  "or `auto` (the newest complete checkpoint in --output_dir, if any)."},
    )
    resume_revision: str | None = field(default=None, metadata={"help": "Hub revision of --resume_from."})


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None, metadata={"help": "A `datasets` name (cifar100, digits, or any Hub image dataset)."}
    )
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub revision of the dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (one sub-folder per class)."})
    test_dir: str | None = field(default=None, metadata={"help": "Image folder with the same class names."})
    image_column: str | None = field(default=None, metadata={"help": "Override the image column name."})
    label_column: str | None = field(default=None, metadata={"help": "Override the label column name."})
    brightness_jitter: float = field(default=0.0, metadata={"help": "Train brightness jitter (63/255 for CIFAR)."})
    crop_scale_min: float = field(
        default=0.08, metadata={"help": "Smallest area fraction of RandomResizedCrop (0.08 in the paper)."}
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips while training."})


def yaml_to_argv(path: str) -> list[str]:
    """Turn a YAML mapping into command-line flags, so the command line can override any of them."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values.")
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


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, SLCAConfig]:
    if not argv:
        argv = ["--config", str(DEMO_CONFIG)]
    if "--config" in argv:
        i = argv.index("--config")
        argv = yaml_to_argv(argv[i + 1]) + argv[:i] + argv[i + 2 :]
    parser = HfArgumentParser((ModelArguments, DataArguments, SLCAConfig))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise SystemExit(
            f"the launcher started {launched} processes but each would train alone on all the data (no GPU "
            "backend was found). Pass --use_cpu true for CPU processes (gloo), or check that the GPUs are visible."
        )
    if not (model_args.model_name_or_path or model_args.model_config):
        raise SystemExit("give --model_name_or_path (pre-trained backbone) or --model_config (random init).")
    if not (data_args.dataset or (data_args.train_dir and data_args.test_dir)):
        raise SystemExit("give --dataset NAME or both --train_dir and --test_dir.")
    return model_args, data_args, args


def build_tasks(data_args: DataArguments, args: SLCAConfig) -> TaskSequence:
    split = {"init_cls": args.init_cls, "increment": args.increment, "seed": args.class_order_seed}
    if data_args.train_dir:
        return TaskSequence.from_image_folders(data_args.train_dir, data_args.test_dir, **split)
    data, spec = load_named_dataset(data_args.dataset, data_args.dataset_revision)
    return TaskSequence.from_dataset_dict(
        data,
        train_split=spec.train_split,
        test_split=spec.test_split,
        image_column=data_args.image_column or spec.image_column,
        label_column=data_args.label_column or spec.label_column,
        **split,
    )


def build_model(model_args: ModelArguments, args: SLCAConfig) -> SLCAModel:
    source = model_args.model_name_or_path
    if source is None:
        # A random backbone has no Hub reference: save it so checkpoints can point at it.
        set_seed(args.seed)
        config = AutoConfig.from_pretrained(model_args.model_config)
        source = str(Path(args.output_dir) / "base_model")
        if args.process_index == 0:
            AutoModel.from_config(config).save_pretrained(source)
    with args.main_process_first(desc="backbone"):
        return SLCAModel.from_backbone(source, args, revision=model_args.model_revision)


def transform_config_for(model: SLCAModel, brightness: float) -> ImageTransformConfig:
    """The base model's image processor statistics, or ViT's defaults when it ships none."""
    try:
        processor = AutoImageProcessor.from_pretrained(model.base_model_name_or_path, revision=model.revision)
        return ImageTransformConfig.from_image_processor(processor, brightness=brightness)
    except (OSError, ValueError, TypeError):
        return ImageTransformConfig.from_model_config(model.config, brightness=brightness)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, args = parse_args(sys.argv[1:] if argv is None else argv)
    tasks = build_tasks(data_args, args)
    logger.info("%d classes in %d tasks %s, class order seed %s", tasks.num_classes, len(tasks),
                tasks.task_sizes, args.class_order_seed)
    resume = model_args.resume_from
    if resume == "auto":
        resume = ContinualLearner.latest_checkpoint(args.output_dir)
        logger.info("resume auto: %s", resume or "no complete checkpoint, starting from the first task")
    if resume:
        learner = ContinualLearner.from_checkpoint(
            resume, args, tasks, revision=model_args.resume_revision,
            expected_base=model_args.model_name_or_path, train_transform=None, eval_transform=None,
        )
        logger.info("resumed from %s after task %d", resume, len(learner.result.accuracy_matrix))
    else:
        learner = ContinualLearner(build_model(model_args, args), args, tasks, train_transform=None,
                                   eval_transform=None)
    tc = transform_config_for(learner.model, data_args.brightness_jitter)
    learner.set_transforms(
        TrainTransform(tc, scale=(data_args.crop_scale_min, 1.0), flip_p=0.5 if data_args.horizontal_flip else 0.0),
        EvalTransform(tc),
    )
    result = learner.run()
    summary = result.summary()
    if args.process_index == 0:
        print("\nAccuracy (%) on each task's test classes after learning each task:")
        print(format_accuracy_table(result.accuracy_matrix, result.seen_accuracy))
        print(f"Last-Acc {summary['last_accuracy']:.2f}  Inc-Acc {summary['average_incremental_accuracy']:.2f}  "
              f"forgetting {summary['average_forgetting']:.2f}  BWT {summary['backward_transfer']:.2f}")
        print(f"metrics: {Path(args.output_dir) / 'metrics.json'}")
    return summary


if __name__ == "__main__":
    main()
