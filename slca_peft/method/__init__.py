"""The method: SLCAConfig, SLCATrainer and its loss (the slow learner), class statistics, classifier alignment."""

from .alignment import AlignmentSettings, ClassifierAligner
from .config import SLCAConfig
from .statistics import ClassStatistics
from .trainer import SLCATrainer, symmetric_cross_entropy

__all__ = ["AlignmentSettings", "ClassStatistics", "ClassifierAligner", "SLCAConfig", "SLCATrainer",
           "symmetric_cross_entropy"]
