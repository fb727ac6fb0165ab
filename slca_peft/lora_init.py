"""SVD initialisation of LoRA A, as SLCA++'s Hybrid-SL does it.

PEFT's `init_lora_weights` choices (Gaussian, PiSSA, OLoRA, ...) either change the frozen weight or
use a different basis; SLCA++ keeps W untouched and starts A in W's top-r right singular subspace
with B = 0, so the wrapped model is exactly the pre-trained one at step 0.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


@torch.no_grad()
def svd_init_lora(model: nn.Module, adapter_name: str = "default") -> int:
    """Set `lora_A` to the top-r rows of `Vh` from `svd(W)` and `lora_B` to zero for every LoRA
    layer of `model`. Returns the number of layers initialised."""
    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        lora_a = module.lora_A[adapter_name].weight
        weight = module.get_base_layer().weight.detach().to(torch.float32)
        rank = lora_a.shape[0]
        if rank > min(weight.shape):
            raise ValueError(
                f"LoRA rank {rank} exceeds min(weight shape) {tuple(weight.shape)}; lower lora_rank."
            )
        _, _, vh = torch.linalg.svd(weight, full_matrices=False)
        lora_a.copy_(vh[:rank].to(lora_a.dtype))
        module.lora_B[adapter_name].weight.zero_()
        count += 1
    return count
