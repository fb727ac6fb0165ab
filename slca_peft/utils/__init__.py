"""The leaf layer: one-line user errors, the bounded file readers, logging through transformers.logging,
hardware probes and timings. It imports nothing else of slca_peft."""

from .errors import MissingFileError, UserError, check_choice, run_main
from .hardware import MAX_DEFAULT_WORKERS, available_cores, cpu_bf16_instructions, cpu_bf16_training
from .reading import open_regular, read_bytes, read_json, read_text
from .timing import PHASES

__all__ = ["MAX_DEFAULT_WORKERS", "PHASES", "MissingFileError", "UserError", "available_cores", "check_choice",
           "cpu_bf16_instructions", "cpu_bf16_training", "open_regular", "read_bytes", "read_json", "read_text",
           "run_main"]
