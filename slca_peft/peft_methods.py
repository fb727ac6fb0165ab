"""Any PEFT method as the slow learner: a user's `PeftConfig` applied to the backbone.

LoRA (with DoRA or rsLoRA), LoHa, LoKr, IA3 or any other PEFT tuner that wraps backbone modules
becomes the adapter; SLCA++'s Hybrid-SL extras (every LayerNorm, every bias, the class token) are
trained beside it as for the built-in LoRA. The adapter's tensors are recognised by the tuner's
prefix (`lora_`, `hada_`, `lokr_`, `ia3_`, ...) so the trainer gives them the adapter's rate.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

from .backbones import class_token, norm_module_names
from .lora_init import svd_init_lora

#: The head lives outside the backbone: a PEFT config naming it is a mistake, not a request.
CLASSIFIER_NAMES = ("classifier", "heads")


def peft_config_to_dict(config: PeftConfig | None) -> dict[str, Any] | None:
    """A JSON-ready dict that `peft_config_from_dict` turns back into the same config."""
    if config is None:
        return None
    data = config.to_dict()
    for key, value in list(data.items()):
        if isinstance(value, set):
            data[key] = sorted(value)
        elif hasattr(value, "value"):  # enums (peft_type, task_type)
            data[key] = value.value
    return data


def peft_config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """Rebuild a `PeftConfig` subclass from its dict (`peft_type` picks the class)."""
    if "peft_type" not in data:
        raise ValueError("peft_config lacks the field 'peft_type' (e.g. \"LORA\", \"LOHA\", \"LOKR\", \"IA3\"); "
                         "write it with PeftConfig.save_pretrained or config.to_dict().")
    data = dict(data)
    data.pop("runtime_config", None)
    try:
        return PeftConfig.from_peft_type(**data)
    except (TypeError, KeyError) as err:
        raise ValueError(f"peft_config could not be built ({err}); check its fields against PEFT's "
                         f"{data['peft_type']} config.") from err


def load_peft_config(path: str | Path) -> PeftConfig:
    """A PEFT config from a JSON file (`adapter_config.json`, `PeftConfig.to_dict()`) or from a directory
    holding `adapter_config.json`."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"peft_config file {path} does not exist; pass a JSON file written by "
                                "PeftConfig.save_pretrained (adapter_config.json) or config.to_dict().")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"peft_config file {path} is not valid JSON ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"peft_config file {path} must hold one JSON object (a PEFT config's fields).")
    return peft_config_from_dict(data)


def adapter_prefix(backbone: nn.Module) -> str:
    """The PEFT tuner's parameter prefix (`lora_` for LoRA/DoRA, `hada_` for LoHa, ...)."""
    if isinstance(backbone, PeftModel):
        return getattr(backbone.base_model, "prefix", "lora_")
    return "lora_"


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def check_peft_config(backbone: nn.Module, config: PeftConfig) -> None:
    """Refuse, before any training and naming the field, a config that targets the classifier, names
    modules the backbone does not have, or is not a tuner that wraps backbone modules."""
    if config.is_prompt_learning:
        raise ValueError(f"peft_config is {type(config).__name__}, a prompt-learning method: it adds tokens, not "
                         "weights the slow learner can train on an image backbone. Use an adapter method "
                         "(LoraConfig, LoHaConfig, LoKrConfig, IA3Config).")
    names = [n for n, _ in backbone.named_modules() if n]
    for field_name in ("target_modules", "modules_to_save"):
        value = getattr(config, field_name, None)
        for target in _as_list(value):
            if target.split(".")[0] in CLASSIFIER_NAMES:
                raise ValueError(
                    f"peft_config.{field_name} names {target!r}, the classifier: slca-peft trains its task heads "
                    "itself (one per task, aligned after each); target backbone modules only."
                )
        if field_name != "target_modules" or value is None:
            continue
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})
        if value == "all-linear":  # PEFT's own shorthand: every linear layer of the backbone
            continue
        if isinstance(value, str):
            if not any(re.fullmatch(value, n) for n in names):
                raise ValueError(f"peft_config.target_modules regex {value!r} matches no module of "
                                 f"{type(backbone).__name__}; linear layer names: {linears}.")
            continue
        missing = [t for t in value if t != "all-linear" and not any(_matches(n, t) for n in names)]
        if missing:
            raise ValueError(f"peft_config.target_modules {missing} match no module of {type(backbone).__name__}; "
                             f"linear layer names available: {linears}.")


def apply_peft_config(backbone: nn.Module, config: PeftConfig, svd_init: bool) -> PeftModel:
    """Wrap `backbone` with `config` as the slow learner, plus Hybrid-SL's LayerNorms (as PEFT
    `modules_to_save`, unless the config sets its own), biases and class token.

    `svd_init` starts LoRA A in the top-r right singular subspace of W (B = 0); it is defined for
    LoRA (with or without DoRA/rsLoRA) only and refused for other methods.
    """
    check_peft_config(backbone, config)
    if svd_init and not isinstance(config, LoraConfig):
        raise ValueError(f"lora_svd_init is defined for LoRA only, not {type(config).__name__}; set "
                         "lora_svd_init false (--lora_svd_init false) to use this PEFT method.")
    if svd_init and config.init_lora_weights not in (True, False):
        raise ValueError(f"lora_svd_init would overwrite peft_config.init_lora_weights={config.init_lora_weights!r}; "
                         "set lora_svd_init false or drop init_lora_weights.")
    applied = copy.deepcopy(config)
    if applied.modules_to_save is None:
        applied.modules_to_save = norm_module_names(backbone) or None
    wrapped = get_peft_model(backbone, applied)
    for name, param in wrapped.named_parameters():
        if ".original_module." in name:
            param.requires_grad_(False)
        elif name.endswith(".bias") and "modules_to_save" not in name:
            param.requires_grad_(True)  # Hybrid-SL trains every bias
    token = class_token(wrapped.get_base_model())
    if token is not None:
        token.requires_grad_(True)
    if svd_init:
        svd_init_lora(wrapped)
    return wrapped
