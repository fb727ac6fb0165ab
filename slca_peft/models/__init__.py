"""The model: a (PEFT-adapted) image backbone and the continual head, its config and label names."""

from .config import SLCAModelConfig
from .head import ContinualClassifier
from .inference import adapters_merged_into_weights, inference_context
from .model import SLCAModel

__all__ = ["ContinualClassifier", "SLCAModel", "SLCAModelConfig", "adapters_merged_into_weights", "inference_context"]
