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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import read_own_json, read_text

logger = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 4
#: /proc/cpuinfo flags of x86 CPUs with native bfloat16 matrix instructions.
CPUINFO = Path("/proc/cpuinfo")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_TRUE = ("yes", "true", "t", "y", "1")  # what transformers' string_to_bool reads as True
_pending_choice: str | None = None


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


#: The options the pre-read looks at, by the name their value is stored under.
_PRE_READ = ("bf16", "fp16", "use_cpu", "output_dir", "resume_from")
#: Largest run_fingerprint.json the pre-read reads (the fingerprint's own bound).
_MAX_FINGERPRINT_BYTES = 16 << 20


def default_spellings(names: Sequence[str] = _PRE_READ) -> dict[str, str]:
    """{option string: name} for `--name` and `--name-with-dashes`, the spellings HfArgumentParser gives
    every field (a parser's full table, with abbreviations, comes from `option_spellings`)."""
    table = {}
    for name in names:
        table[f"--{name}"] = name
        table[f"--{name.replace('_', '-')}"] = name
    return table


def option_spellings(parser: Any) -> tuple[dict[str, str], bool]:
    """({option string: destination}, whether abbreviations are accepted) of an argparse parser: what
    `resolve_bf16_flag` needs to read the command line exactly as that parser will."""
    table = {option: action.dest for option, action in parser._option_string_actions.items()
             if option.startswith("--")}
    return table, bool(getattr(parser, "allow_abbrev", True))


def _option_name(token: str, spellings: Mapping[str, str], abbrev: bool) -> tuple[str | None, str | None]:
    """(destination, inline `=value` or None) of a command-line token, as argparse reads it: an exact
    option string, else (with `abbrev`) the one option string it is a prefix of; None for anything else
    (a value, an unknown or ambiguous option)."""
    if not token.startswith("--") or token == "--":
        return None, None
    option, eq, value = token.partition("=")
    inline = value if eq else None
    if option in spellings:
        return spellings[option], inline
    if abbrev:
        matches = [o for o in spellings if o.startswith(option)]
        if len(matches) == 1:
            return spellings[matches[0]], inline
    return None, None


def _flag_values(argv: Sequence[str], name: str, spellings: Mapping[str, str] | None = None, abbrev: bool = False,
                 ) -> list[tuple[int, int, str | None]]:
    """Each occurrence of option `name` in argv, in any spelling the parser accepts: (start, number of
    tokens, value or None when bare)."""
    spellings = default_spellings() if spellings is None else spellings
    found = []
    for i, token in enumerate(argv):
        dest, inline = _option_name(token, spellings, abbrev)
        if dest != name:
            continue
        if inline is not None:
            found.append((i, 1, inline))
        else:
            bare = i + 1 >= len(argv) or argv[i + 1].startswith("--")
            found.append((i, 1 if bare else 2, None if bare else argv[i + 1]))
    return found


def _last_bool(argv: Sequence[str], name: str, spellings: Mapping[str, str] | None = None,
               abbrev: bool = False) -> bool | None:
    values = _flag_values(argv, name, spellings, abbrev)
    if not values:
        return None
    value = values[-1][2]
    return True if value is None else value.lower() in _TRUE


def _recorded_bf16(argv: Sequence[str], spellings: Mapping[str, str] | None = None, abbrev: bool = False,
                   ) -> bool | None:
    """The precision a resumed run recorded in its run_fingerprint.json (its own or, with --seeds, a
    seed's), read through the bounded reader: a FIFO, a device or a symlink there is refused, never
    read (`read_own_json`)."""
    resume = _flag_values(argv, "resume_from", spellings, abbrev)
    output = _flag_values(argv, "output_dir", spellings, abbrev)
    if not resume or not resume[-1][2]:
        return None
    candidates = []
    if resume[-1][2] != "auto" and Path(resume[-1][2]).is_dir():
        candidates.append(Path(resume[-1][2]).parent)
    if output and output[-1][2]:
        root = Path(output[-1][2])
        seeds = sorted(p for p in root.glob("seed_*") if p.is_dir() and not p.is_symlink()) if root.is_dir() else []
        candidates += [root, *seeds]
    for directory in candidates:
        data = read_own_json(directory / "run_fingerprint.json", _MAX_FINGERPRINT_BYTES,
                             "remove it or use --overwrite_output_dir")
        recorded = data.get("bf16") if isinstance(data, dict) else None
        if isinstance(recorded, bool):
            return recorded
    return None


def resolve_bf16_flag(argv: Sequence[str], spellings: Mapping[str, str] | None = None,
                      abbrev: bool = False) -> list[str]:
    """Command-line arguments with `--bf16 auto` (or no `--bf16`, the recipe's default) replaced by
    `--bf16 true` or `--bf16 false` for this machine; explicit true/false pass through unchanged.

    A resumed run (`--resume_from`) keeps the precision its run_fingerprint.json recorded, so a run
    started elsewhere or before `auto` existed resumes with its own settings. On a machine without
    any GPU, bf16 also sets `--use_cpu true` (transformers runs CPU bf16 only with it; the run is on
    the CPU either way). The choice is logged by `log_bf16_choice` once logging is configured.

    `spellings` ({option string: destination}) and `abbrev` are the parser's (`option_spellings`), so
    every spelling it accepts (`--output-dir`, `--resume_f auto`, `--bf16=auto`) is read here too; by
    default `--name` and `--name-with-dashes`.
    """
    global _pending_choice
    argv = list(argv)
    occurrences = _flag_values(argv, "bf16", spellings, abbrev)
    if occurrences and (occurrences[-1][2] is None or occurrences[-1][2].lower() != "auto"):
        return argv
    for start, length, _ in reversed(occurrences):
        del argv[start : start + length]
    use_cpu = bool(_last_bool(argv, "use_cpu", spellings, abbrev)) or _env_use_cpu()
    recorded = _recorded_bf16(argv, spellings, abbrev)
    if _last_bool(argv, "fp16", spellings, abbrev):
        bf16, why = False, "--fp16 is set"
    elif recorded is not None:
        bf16, why = recorded, "the run being resumed recorded it"
    else:
        bf16, why = choose_bf16(use_cpu)
    if bf16 and not use_cpu and not _has_accelerator():
        if _last_bool(argv, "use_cpu", spellings, abbrev) is False or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            bf16, why = False, "there is no GPU and CPU bfloat16 needs --use_cpu true"
        else:
            argv += ["--use_cpu", "true"]
    argv += ["--bf16", "true" if bf16 else "false"]
    chosen = "bfloat16 autocast" if bf16 else "fp32"
    _pending_choice = f"--bf16 auto chose {chosen}: {why} (--bf16 true/false overrides)"
    return argv


def log_bf16_choice() -> None:
    """Log what the last `resolve_bf16_flag` chose, once."""
    global _pending_choice
    if _pending_choice is not None:
        logger.info(_pending_choice)
        _pending_choice = None


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
