"""Precision and data-loader settings checked against the machine before anything trains.

A GPU step on ViT-B/16 consumes a few hundred images per second while one process decodes PIL
images at a fraction of that, so loader workers are on by default when CUDA trains; on the CPU
they stay off (one process, deterministic, nothing to feed).

`--bf16 auto` (the recipe's default) picks bfloat16 autocast where the device computes it natively:
a CUDA GPU of compute capability 8.0 or newer, or a CPU with AVX512-BF16 or AMX, where it roughly
halves a ViT step's time at fp32's accuracy (docs/method.md, "Precision"); fp32 everywhere else,
where bf16 would be emulated and slower.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .reading import read_text

logger = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 4
#: /proc/cpuinfo flags of x86 CPUs with native bfloat16 matrix instructions.
CPUINFO = Path("/proc/cpuinfo")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_TRUE = ("yes", "true", "t", "y", "1")  # what transformers' string_to_bool reads as True


# ---------------------------------------------------------------------------------------------- bf16 auto
def _cpuinfo_flags() -> set[str]:
    try:
        text = read_text(CPUINFO, 16 << 20)
    except (OSError, ValueError):  # not Linux
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_bf16_instructions() -> list[str]:
    """The native bfloat16 instruction sets of this CPU (`AVX512-BF16`, `AMX`), empty when it has none.

    Asks torch's own CPU probe (the one its oneDNN kernels dispatch on); a torch without it falls back
    to the /proc/cpuinfo flags."""
    found = []
    try:
        if torch.cpu._is_avx512_bf16_supported():
            found.append("AVX512-BF16")
        if torch.cpu._is_amx_tile_supported():
            found.append("AMX")
        return found
    except (AttributeError, RuntimeError):
        flags = _cpuinfo_flags()
        return [name for flag, name in zip(CPU_BF16_FLAGS, ("AVX512-BF16", "AMX"), strict=True) if flag in flags]


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return torch.cuda.is_available() or (accelerator is not None and accelerator.is_available())


def choose_bf16(use_cpu: bool) -> tuple[bool, str]:
    """What `--bf16 auto` resolves to on this machine, and why (one sentence for the log)."""
    if not use_cpu and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        if major >= 8:
            return True, f"{name} (compute capability {major}.{minor}) computes bfloat16 natively"
        return False, f"{name} (compute capability {major}.{minor}, below 8.0) has no native bfloat16"
    if not use_cpu and _has_accelerator():
        kind = torch.accelerator.current_accelerator().type
        return False, f"auto picks bf16 on CUDA and CPUs only and this run is on {kind}"
    found = cpu_bf16_instructions()
    if found:
        return True, f"the CPU computes bfloat16 natively with {' and '.join(found)}"
    return False, "the CPU has neither AVX512-BF16 nor AMX, so bfloat16 would be emulated and slower"


def resolve_precision(bf16: bool | str, *, fp16: bool, use_cpu: bool) -> tuple[bool, bool, str | None]:
    """(bf16, use_cpu, why) for a `bf16` setting of true, false or "auto" (as `SLCAConfig` builds itself,
    the way it resolves `lr_scheduler_type`): auto picks bf16 autocast where the device computes it
    natively (`choose_bf16`) and, on a machine without any GPU, also sets `use_cpu` (transformers runs
    CPU bf16 only with it; the run is on the CPU either way). `why` says what auto chose, None when the
    value was explicit. Strings are read as transformers' `string_to_bool` reads them."""
    if isinstance(bf16, str):
        value = bf16.strip().lower()
        if value != "auto":
            if value not in (*_TRUE, "no", "false", "f", "n", "0"):
                raise UserError(f"bf16={bf16!r} is not one of true, false or auto.")
            return value in _TRUE, use_cpu, None
    else:
        return bool(bf16), use_cpu, None
    use_cpu_now = use_cpu or _env_use_cpu()
    if fp16:
        chosen, why = False, "--fp16 is set"
    else:
        chosen, why = choose_bf16(use_cpu_now)
    if chosen and not use_cpu_now and not _has_accelerator():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            chosen, why = False, "there is no GPU and CPU bfloat16 needs --use_cpu true"
        else:
            use_cpu = True
    return chosen, use_cpu, f"--bf16 auto chose {'bfloat16 autocast' if chosen else 'fp32'}: {why} " \
        "(--bf16 true/false overrides)"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _env_use_cpu() -> bool:
    """Whether `accelerate launch --cpu` (ACCELERATE_USE_CPU) forces the run onto the CPU."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE


def uses_cuda(args) -> bool:
    return not args.use_cpu and not _env_use_cpu() and torch.cuda.is_available()


def check_hardware(args) -> None:
    """Resolve the loader defaults and refuse precision the hardware lacks (called by
    `SLCAConfig.__post_init__`, before the Trainer or any data exists)."""
    cuda = uses_cuda(args)
    if args.fp16 and not cuda:
        raise UserError(
            "fp16=True needs a CUDA GPU (float16 autocast with loss scaling); this run is on the CPU. "
            "Use --bf16 for mixed precision on the CPU, or drop --fp16."
        )
    if args.bf16 and not args.use_cpu:
        if not torch.cuda.is_available():
            raise UserError(
                "bf16=True but no CUDA GPU is available; add --use_cpu to train in bfloat16 on the CPU, "
                "or drop --bf16."
            )
        if not torch.cuda.is_bf16_supported():
            raise UserError(
                f"bf16=True but {torch.cuda.get_device_name()} has no bfloat16 support (it needs an Ampere "
                "or newer GPU); use --fp16 instead."
            )
    cores = available_cores()
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = min(MAX_DEFAULT_WORKERS, cores) if cuda else 0
    elif args.dataloader_num_workers < 0:
        raise UserError(f"dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    elif args.dataloader_num_workers > cores:
        logger.warning(
            "dataloader_num_workers=%d is more than the %d CPU cores available; using %d.",
            args.dataloader_num_workers, cores, cores,
        )
        args.dataloader_num_workers = cores
    if args.dataloader_persistent_workers is None:
        args.dataloader_persistent_workers = args.dataloader_num_workers > 0
    elif args.dataloader_persistent_workers and args.dataloader_num_workers == 0:
        raise UserError(
            "dataloader_persistent_workers=True needs dataloader_num_workers > 0 (there are no worker "
            "processes to keep); set dataloader_num_workers or drop dataloader_persistent_workers."
        )


# ---------------------------------------------------------------------------------------------- CPU bf16 training
#: LayerNorms inside a transformer block (ViT/DINOv2 `layer.N`, CLIP/SigLIP `layers.N`, timm `blocks.N`): in these
#: pre-norm blocks their output feeds only linear layers (attention projections, MLP input).
_BLOCK_NORM = re.compile(r"\.(layer|layers|blocks)\.\d+\.")


def _bf16_block_norm_output(module: nn.Module, inputs, output):
    if torch.is_grad_enabled() and torch.is_autocast_enabled("cpu") and isinstance(output, torch.Tensor):
        return output.to(torch.get_autocast_dtype("cpu"))
    return None


@contextmanager
def cpu_bf16_training(model: nn.Module, args) -> Iterator[None]:
    """Train under CPU bfloat16 autocast without work that computes nothing (ViT-B/16, 1 thread,
    paired: 1.14x the released setting's step, 1.21x the paper setting's; docs/benchmarks.md):

    * attention through transformers' eager path instead of SDPA: PyTorch's CPU flash-attention
      backward in bfloat16 costs several times the two bf16 matmuls it replaces (no-grad passes,
      where SDPA is faster, keep it);
    * each block's LayerNorm output cast to bfloat16 once, where autocast casts it again for every
      linear that reads it (q, k, v and each of their LoRA adapters), and casts every gradient back;
    * PEFT's cast of a LoRA input to the adapter's float32 dtype skipped: autocast casts it back to
      bfloat16 at once.

    The forward values are plain autocast's; a LayerNorm output's gradient is summed over its readers
    in bfloat16 instead of float32. Anything other than bf16 on the CPU runs unchanged; all settings are
    restored on exit.
    """
    params = next(model.parameters(), None)
    if not getattr(args, "bf16", False) or params is None or params.device.type != "cpu":
        yield
        return
    from peft.tuners.lora import LoraLayer
    from transformers import PretrainedConfig

    configs = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    attention = {id(c): (c, c._attn_implementation) for c in configs}  # sub-configs follow their parent's
    loras = [(m, getattr(m, "cast_input_dtype_enabled", True)) for m in model.modules() if isinstance(m, LoraLayer)]
    hooks = [m.register_forward_hook(_bf16_block_norm_output) for name, m in model.named_modules()
             if isinstance(m, nn.LayerNorm) and _BLOCK_NORM.search(f".{name}")]
    try:
        for config, implementation in attention.values():
            if implementation == "sdpa":
                config._attn_implementation = "eager"
        for layer, _ in loras:
            layer.cast_input_dtype_enabled = False
        yield
    finally:
        for config, implementation in attention.values():
            config._attn_implementation = implementation
        for layer, enabled in loras:
            layer.cast_input_dtype_enabled = enabled
        for hook in hooks:
            hook.remove()
