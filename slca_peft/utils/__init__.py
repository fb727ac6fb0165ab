"""The leaf layer: one-line user errors, the bounded file readers, logging through transformers.logging,
hardware probes and timings. It imports nothing else of slca_peft."""

from .errors import UserError, check_choice, run_main
from .reading import open_regular, read_bytes, read_json, read_text

__all__ = ["UserError", "check_choice", "open_regular", "read_bytes", "read_json", "read_text", "run_main"]
