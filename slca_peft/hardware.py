"""Precision and data-loader settings checked against the machine before anything trains.

A GPU step on ViT-B/16 consumes a few hundred images per second while one process decodes PIL
images at a fraction of that, so loader workers are on by default when CUDA trains; on the CPU
they stay off (one process, deterministic, nothing to feed).
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 4


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def uses_cuda(args) -> bool:
    return not args.use_cpu and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") \
        and torch.cuda.is_available()


def check_hardware(args) -> None:
    """Resolve the loader defaults and refuse precision the hardware lacks (called by
    `SLCAConfig.__post_init__`, before the Trainer or any data exists)."""
    cuda = uses_cuda(args)
    if args.fp16 and not cuda:
        raise ValueError(
            "fp16=True needs a CUDA GPU (float16 autocast with loss scaling); this run is on the CPU. "
            "Use --bf16 for mixed precision on the CPU, or drop --fp16."
        )
    if args.bf16 and not args.use_cpu:
        if not torch.cuda.is_available():
            raise ValueError(
                "bf16=True but no CUDA GPU is available; add --use_cpu to train in bfloat16 on the CPU, "
                "or drop --bf16."
            )
        if not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"bf16=True but {torch.cuda.get_device_name()} has no bfloat16 support (it needs an Ampere "
                "or newer GPU); use --fp16 instead."
            )
    cores = available_cores()
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = min(MAX_DEFAULT_WORKERS, cores) if cuda else 0
    elif args.dataloader_num_workers < 0:
        raise ValueError(f"dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    elif args.dataloader_num_workers > cores:
        logger.warning(
            "dataloader_num_workers=%d is more than the %d CPU cores available; using %d.",
            args.dataloader_num_workers, cores, cores,
        )
        args.dataloader_num_workers = cores
    if args.dataloader_persistent_workers is None:
        args.dataloader_persistent_workers = args.dataloader_num_workers > 0
    elif args.dataloader_persistent_workers and args.dataloader_num_workers == 0:
        raise ValueError(
            "dataloader_persistent_workers=True needs dataloader_num_workers > 0 (there are no worker "
            "processes to keep); set dataloader_num_workers or drop dataloader_persistent_workers."
        )
