"""slca-peft: SLCA++ continual learning (Slow Learner + Classifier Alignment) for Hugging Face ViTs.

The top level holds what a user starts from; each subpackage (`slca_peft.models`, `.data`, `.method`,
`.continual`, `.export`, `.sharing`, `.artifacts`, `.utils`) exports its own public names."""

from .continual import ContinualCallback, ContinualLearner, ContinualResult, default_steps, verify_checkpoint
from .data import (
    ContinuedStream,
    DomainSequence,
    EvalTransform,
    ImageTransformConfig,
    Task,
    TaskSequence,
    TaskStream,
    TrainTransform,
    collate_fn,
)
from .export import export_model
from .method import SLCAConfig, SLCATrainer
from .models import SLCAModel, SLCAModelConfig

__version__ = "0.1.0"

from .utils.logging import get_logger as _get_logger  # noqa: E402

_get_logger()  # the library's loggers under transformers' root: its verbosity and handlers apply

from .models.auto import register_auto_classes as _register_auto_classes  # noqa: E402

_register_auto_classes(SLCAModel)  # AutoModelForImageClassification / pipeline() load slca-peft model folders

__all__ = [
    "ContinualCallback",
    "ContinualLearner",
    "ContinualResult",
    "ContinuedStream",
    "DomainSequence",
    "EvalTransform",
    "ImageTransformConfig",
    "SLCAConfig",
    "SLCAModel",
    "SLCAModelConfig",
    "SLCATrainer",
    "Task",
    "TaskSequence",
    "TaskStream",
    "TrainTransform",
    "collate_fn",
    "default_steps",
    "export_model",
    "verify_checkpoint",
]
