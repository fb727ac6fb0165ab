"""slca-peft: SLCA++ continual learning (Slow Learner + Classifier Alignment) for Hugging Face ViTs."""

from .alignment import AlignmentSettings, ClassifierAligner
from .callbacks import ContinualCallback
from .config import SLCAConfig
from .continual import ContinualLearner, ContinualResult
from .domains import DomainSequence
from .head import ContinualClassifier
from .inference import inference_context, merged_adapters
from .losses import symmetric_cross_entropy
from .model import SLCAModel
from .model_config import SLCAModelConfig
from .statistics import ClassStatistics
from .tasks import Task, TaskSequence, TaskStream
from .trainer import SLCATrainer
from .transforms import EvalTransform, ImageTransformConfig, TrainTransform

__version__ = "0.1.0"

__all__ = [
    "AlignmentSettings",
    "ClassStatistics",
    "ClassifierAligner",
    "ContinualCallback",
    "ContinualClassifier",
    "ContinualLearner",
    "ContinualResult",
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
    "inference_context",
    "merged_adapters",
    "symmetric_cross_entropy",
]
