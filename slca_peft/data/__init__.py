"""Task streams (class- and domain-incremental, continued), benchmarks by name, image checks, transforms."""

from .continuation import ContinuedStream
from .domains import DomainSequence
from .formats import load_digits_dataset, load_split_image_folders
from .tasks import Task, TaskSequence, TaskStream
from .transforms import EvalTransform, ImageTransformConfig, TrainTransform, collate_fn, make_batch_transform

__all__ = [
    "ContinuedStream", "DomainSequence", "EvalTransform", "ImageTransformConfig", "Task", "TaskSequence", "TaskStream",
    "TrainTransform", "collate_fn", "load_digits_dataset", "load_split_image_folders", "make_batch_transform",
]
