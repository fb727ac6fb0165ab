"""Sharing results: the one door to the Hub (`push_folder`, which every upload takes), model cards,
the names a shared file may carry, and a run's report (results.md and its figures)."""

from .card import build_model_card
from .hub import check_pushable, push_folder
from .report import mean_std, write_report

__all__ = ["build_model_card", "check_pushable", "mean_std", "push_folder", "write_report"]
