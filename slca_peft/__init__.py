"""slca-peft: SLCA++ continual learning (Slow Learner + Classifier Alignment) for Hugging Face ViTs."""

from .continual.callbacks import ContinualCallback
from .continual.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from .continual.learner import ContinualLearner, ContinualResult
from .continual.steps import AlignmentStep, CheckpointStep, EvaluationStep, PushStep, ReportStep, StatisticsStep
from .continual.tracking import TrackerStep
from .data.continuation import ContinuedStream
from .data.domains import DomainSequence
from .data.tasks import Task, TaskSequence, TaskStream
from .data.transforms import EvalTransform, ImageTransformConfig, TrainTransform, collate_fn
from .method.alignment import AlignmentSettings, ClassifierAligner
from .method.config import SLCAConfig
from .method.statistics import ClassStatistics
from .method.trainer import SLCATrainer, symmetric_cross_entropy
from .models.config import SLCAModelConfig
from .models.head import ContinualClassifier
from .models.inference import inference_context, merged_adapters
from .models.model import SLCAModel
from .sharing.export import export_model

__version__ = "0.1.0"

from .utils.logging import get_logger as _get_logger  # noqa: E402

_get_logger()  # the library's loggers under transformers' root: its verbosity and handlers apply

from .models.auto import register_auto_classes as _register_auto_classes  # noqa: E402

_register_auto_classes(SLCAModel)  # AutoModelForImageClassification / pipeline() load slca-peft model folders

__all__ = [
    "AlignmentSettings",
    "AlignmentStep",
    "CheckpointStep",
    "ClassStatistics",
    "ClassifierAligner",
    "ContinualCallback",
    "ContinualClassifier",
    "ContinualLearner",
    "ContinualResult",
    "ContinuedStream",
    "DomainSequence",
    "EvalTransform",
    "EvaluationStep",
    "ImageTransformConfig",
    "PushStep",
    "ReportStep",
    "SLCAConfig",
    "SLCAModel",
    "SLCAModelConfig",
    "SLCATrainer",
    "StatisticsStep",
    "Task",
    "TaskSequence",
    "TaskStream",
    "TrackerStep",
    "TrainTransform",
    "collate_fn",
    "export_model",
    "inference_context",
    "load_checkpoint",
    "merged_adapters",
    "save_checkpoint",
    "symmetric_cross_entropy",
    "verify_checkpoint",
]
