"""The `slca-peft` command line and the training recipe (`recipes/train_seq.py` is a thin wrapper)."""

from .cli import main
from .recipe import main as train

__all__ = ["main", "train"]
