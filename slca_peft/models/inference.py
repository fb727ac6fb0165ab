"""No-grad passes at the cost of the plain backbone: LoRA merged into the weights, autocast on.

Training keeps LoRA as a separate low-rank path (cheaper gradients); statistics and evaluation
only run forward, where the extra path is pure overhead. `adapters_merged_into_weights` folds it into the
base weights for the duration of a pass and puts the saved base weights back afterwards, bit for
bit (merging and unmerging in floating point would leave rounding residue that training would
then start from). `inference_context` adds the run's mixed precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


@contextmanager
def adapters_merged_into_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Merge the LoRA adapters of `model` (an `SLCAModel` or a `PeftModel`) into its weights inside
    the block; on exit, also after an exception, the exact base weights are restored.

    Keeps one copy of every adapted layer's base weight (on its device) while the block runs. A
    no-op for full fine-tuning (no adapters) and for adapters that are already merged.
    """
    peft_model = _backbone(model)
    if not isinstance(peft_model, PeftModel):
        yield model
        return
    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer) and not m.merged]
    if not layers:
        yield model
        return
    saved = []
    with torch.no_grad():
        for layer in layers:
            base = layer.get_base_layer()
            saved.append((base.weight, base.weight.detach().clone()))
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge()
        yield model
    finally:
        with torch.no_grad(), torch.inference_mode(False):
            for layer in layers:
                if layer.merged:
                    layer.merged_adapters.clear()  # the weights are restored below, not unmerged
            for weight, copy in saved:
                if weight.is_inference():
                    # Some PEFT merges (DoRA, IA3) replace `weight.data` with a new tensor, made under
                    # the pass's inference mode; training cannot use it, so put back a normal one.
                    weight.data = copy.clone()
                else:
                    weight.copy_(copy)


def autocast_dtype(args: Any) -> torch.dtype | None:
    """The mixed-precision dtype a `TrainingArguments` asks for (`--bf16`, `--fp16`), or None."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


@contextmanager
def inference_context(model: nn.Module, args: Any = None) -> Iterator[nn.Module]:
    """What a statistics or evaluation pass runs under: `torch.inference_mode`, eval mode, merged
    adapters and autocast in the run's precision (from `args`, a `TrainingArguments`).

    Features may come out in bfloat16/float16; `ClassStatistics.update` accumulates in float64
    whatever their dtype. The model's train/eval mode is restored on exit.
    """
    dtype = autocast_dtype(args) if args is not None else None
    device = next(model.parameters()).device
    was_training = model.training
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        model.eval()
        stack.callback(model.train, was_training)
        stack.enter_context(adapters_merged_into_weights(model))
        stack.enter_context(torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext())
        yield model
