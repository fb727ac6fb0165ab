"""The continual loop: ContinualLearner (owning the run state: statistics, unaligned heads, task
history), its callbacks and after-task steps, trackers, checkpoints with the run state, resume checks."""

from .callbacks import ContinualCallback
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from .learner import ContinualLearner
from .result import ContinualResult
from .steps import (
    AlignmentStep,
    CheckpointStep,
    EvaluationStep,
    PushStep,
    ReportStep,
    StatisticsStep,
    default_steps,
)
from .tracking import TrackerStep

__all__ = [
    "AlignmentStep", "Checkpoint", "CheckpointStep", "ContinualCallback", "ContinualLearner", "ContinualResult",
    "EvaluationStep", "PushStep", "ReportStep", "StatisticsStep", "TrackerStep", "default_steps", "load_checkpoint",
    "save_checkpoint", "verify_checkpoint",
]
