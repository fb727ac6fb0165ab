"""The slow learner: how a backbone becomes the model SLCA++ trains, for every adapter.

One path. The built-in settings (`use_lora`, `lora_rank`, ...) become a `LoraConfig`; a user's
`PeftConfig` (LoRA with DoRA or rsLoRA, LoHa, LoKr, IA3 or any other PEFT tuner that wraps backbone
modules) is taken as given. Either goes through `apply_peft_config`, which adds SLCA++'s Hybrid-SL
extras (every LayerNorm, every bias, the class token), lays LoRA out per projection or as one
adapter on the fused qkv weight, and starts LoRA A in W's top-r right singular subspace (B = 0, so
the wrapped model is exactly the pre-trained one at step 0; PEFT's own `init_lora_weights` choices
change W or use another basis). The trainer gives each parameter the rate of its role; adapter
tensors are recognised by the tuner's prefix (`lora_`, `hada_`, `lokr_`, `ia3_`, ...).

Fused qkv: one rank-r adapter on the concatenated `W_qkv` (3d x d), i.e. one A (r x d) shared by the
three projections and a B of 3d rows, the authors' released layout. With separate q/k/v linears
(transformers' ViT) the three `lora_A` modules are tied to one, so `[B_q; B_k; B_v] A` is exactly
that update and PEFT saves, loads and merges each projection as usual; a backbone with a real fused
`qkv` linear (timm) needs no tying.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..artifacts.layout import ADAPTER_CONFIG_FILE
from ..utils.errors import MissingFileError, UserError
from ..utils.logging import known_warnings_filtered
from ..utils.reading import read_json
from .backbones import FUSED_QKV_NAMES, QKV_NAMES, backbone_spec, class_token, linear_names, norm_module_names
from .config import SLCAModelConfig
from .peft_limits import check_peft_fields, check_peft_sizes

#: Parameter roles: the trainer gives each its slow-learner rate (the adapter's is the same for LoRA,
#: LoHa, IA3, ...).
HEAD, ADAPTER, BACKBONE = "head", "adapter", "backbone"
#: The head lives outside the backbone: a PEFT config naming it is a mistake, not a request.
CLASSIFIER_NAMES = ("classifier", "heads")


# ---------------------------------------------------------------------- PEFT configs as files
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
    """Rebuild a `PeftConfig` subclass from its dict (`peft_type` picks the class); its sizes, numbers
    and patterns are checked first (`slca_peft.models.peft_limits`), before PEFT sees them."""
    if "peft_type" not in data:
        raise UserError("peft_config lacks the field 'peft_type' (e.g. \"LORA\", \"LOHA\", \"LOKR\", \"IA3\"); "
                         "write it with PeftConfig.save_pretrained or config.to_dict().")
    data = dict(data)
    data.pop("runtime_config", None)
    check_peft_fields(data)
    try:
        return PeftConfig.from_peft_type(**data)
    except (TypeError, KeyError) as err:
        raise UserError(f"peft_config could not be built ({err}); check its fields against PEFT's "
                         f"{data['peft_type']} config.") from err


def load_peft_config(path: str | Path) -> PeftConfig:
    """A PEFT config from a JSON file (`adapter_config.json`, `PeftConfig.to_dict()`) or from a directory
    holding `adapter_config.json`."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f"peft_config file {path} does not exist; pass a JSON file written by "
                                "PeftConfig.save_pretrained (adapter_config.json) or config.to_dict().")
    data = read_json(path, max_bytes=1 << 20)
    if not isinstance(data, dict):
        raise UserError(f"peft_config file {path} must hold one JSON object (a PEFT config's fields).")
    try:
        return peft_config_from_dict(data)
    except ValueError as err:
        raise UserError(f"peft_config file {path}: {err}") from None


# ---------------------------------------------------------------------- parameter roles
def adapter_prefix(backbone: nn.Module) -> str:
    """The PEFT tuner's parameter prefix (`lora_` for LoRA/DoRA, `hada_` for LoHa, ...)."""
    if isinstance(backbone, PeftModel):
        return getattr(backbone.base_model, "prefix", "lora_")
    return "lora_"


def parameter_role(name: str, prefix: str) -> str:
    """The role of a parameter of an `SLCAModel`: its heads, the adapter's own tensors (named with the
    tuner's `prefix`), or the rest of the backbone (norms, biases, class token; all of it without
    an adapter)."""
    if name.startswith("classifier."):
        return HEAD
    return ADAPTER if prefix in name else BACKBONE


# ---------------------------------------------------------------------- checks
def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def weight_shapes(backbone: nn.Module) -> dict[str, int]:
    """The bounds `check_peft_sizes` needs: the largest rank (min(out, in)), dimension (max(out, in)) and
    element count of a weight of `backbone` (linear, conv, embedding), and its parameter count."""
    rank = dim = numel = 0
    for module in backbone.modules():
        param = getattr(module, "weight", None)
        if isinstance(param, torch.Tensor) and param.ndim >= 2:
            out, inner = param.shape[0], param[0].numel()
            rank, dim, numel = max(rank, min(out, inner)), max(dim, out, inner), max(numel, param.numel())
    return {"rank": rank, "dim": dim, "numel": numel, "total": sum(p.numel() for p in backbone.parameters())}


def check_layer_replication(backbone: nn.Module, value: Any) -> None:
    """`layer_replication` as PEFT takes it: [start, end) ranges of the backbone's layers, 0 <= start < end <=
    its layer count, at most 8 times the layers in all (PEFT indexes the layers with them: a range beyond
    them was an IndexError)."""
    if value is None:
        return
    layers = getattr(getattr(backbone, "config", None), "num_hidden_layers", None)
    fix = "give [start, end) ranges of the backbone's layers, or drop the field"
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(type(n) is int for n in pair) for pair in value):
        raise UserError(f"peft_config.layer_replication is {str(value)[:80]}, not a list of [start, end] pairs; {fix}.")
    if not isinstance(layers, int):
        raise UserError(f"peft_config.layer_replication needs a backbone with numbered layers, and "
                        f"{type(backbone).__name__} has no num_hidden_layers; drop the field.")
    for start, end in value:
        if not 0 <= start < end <= layers:
            raise UserError(f"peft_config.layer_replication range [{start}, {end}) lies outside the backbone's "
                            f"{layers} layers; {fix}.")
    if sum(end - start for start, end in value) > 8 * layers:
        raise UserError(f"peft_config.layer_replication repeats more than 8 x {layers} layers; {fix}.")


def check_peft_config(backbone: nn.Module, config: PeftConfig) -> None:
    """Refuse, before any training and naming the field, a config that targets the classifier, names
    modules the backbone does not have, or is not a tuner that wraps backbone modules; and, before PEFT
    allocates or matches anything, sizes beyond the backbone's shapes, non-finite numbers and regexes
    that could backtrack without bound."""
    data = peft_config_to_dict(config) or {}
    check_peft_fields(data)
    check_peft_sizes(data, weight_shapes(backbone), type(backbone).__name__)
    check_layer_replication(backbone, data.get("layer_replication"))
    if config.is_prompt_learning:
        raise UserError(f"peft_config is {type(config).__name__}, a prompt-learning method: it adds tokens, not "
                         "weights the slow learner can train on an image backbone. Use an adapter method "
                         "(LoraConfig, LoHaConfig, LoKrConfig, IA3Config).")
    names = [n for n, _ in backbone.named_modules() if n]
    for field_name in ("target_modules", "modules_to_save"):
        value = getattr(config, field_name, None)
        for target in _as_list(value):
            if target.split(".")[0] in CLASSIFIER_NAMES:
                raise UserError(
                    f"peft_config.{field_name} names {target!r}, the classifier: slca-peft trains its task heads "
                    "itself (one per task, aligned after each); target backbone modules only."
                )
        if field_name != "target_modules" or value is None or value == "all-linear":  # PEFT's every-linear
            continue
        if isinstance(value, str):
            if not any(re.fullmatch(value, n) for n in names):
                raise UserError(f"peft_config.target_modules regex {value!r} matches no module of "
                                 f"{type(backbone).__name__}; linear layer names: {linear_names(backbone)}.")
            continue
        missing = [t for t in value if t != "all-linear" and not any(_matches(n, t) for n in names)]
        if missing:
            raise UserError(f"peft_config.target_modules {missing} match no module of {type(backbone).__name__}; "
                             f"linear layer names available: {linear_names(backbone)}.")


def _looked_for() -> str:
    separate = " / ".join("+".join(names) for names in QKV_NAMES)
    return f"a module with separate {separate} linears, or a fused {' / '.join(FUSED_QKV_NAMES)} linear"


def attention_projections(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(attention module name, names of its q/k/v children) for every attention block: three names
    for separate projections, one for a fused qkv linear."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        for names in QKV_NAMES:
            if all(n in children for n in names):
                found.append((name, list(names)))
                break
        else:
            fused = [n for n in FUSED_QKV_NAMES if n in children]
            if fused:
                found.append((name, fused[:1]))
    return found


def check_fused_qkv_backbone(model: nn.Module, target_modules: list[str]) -> list[str]:
    """The q/k/v child names the fused layout adapts; refuses a backbone without them."""
    blocks = attention_projections(model)
    if not blocks:
        raise UserError(
            f"lora_layout='fused_qkv' (set by released_code) needs attention blocks with query/key/value "
            f"projections; {type(model).__name__} has no {_looked_for()}. Use lora_layout='per_projection' "
            "and lora_target_modules naming its attention linears."
        )
    names = blocks[0][1]
    missing = [n for n in names if n not in target_modules]
    if missing:
        raise UserError(
            f"lora_layout='fused_qkv' adapts the concatenated {'/'.join(names)} weight of "
            f"{type(model).__name__}, but lora_target_modules {target_modules} lacks {missing}; add them."
        )
    return names


# ---------------------------------------------------------------------- layout and initialisation
def tie_fused_qkv(model: nn.Module, adapter_name: str = "default") -> list[list[LoraLayer]]:
    """Tie the `lora_A` of each attention block's q/k/v LoRA layers to one module (the first
    projection's). Returns the LoRA layers of each block, which now share one A."""
    blocks = []
    for name, names in attention_projections(model):
        parent = model.get_submodule(name)
        layers = [getattr(parent, n) for n in names]
        if not all(isinstance(layer, LoraLayer) and adapter_name in layer.lora_A for layer in layers):
            continue
        shared = layers[0].lora_A[adapter_name]
        for layer in layers[1:]:
            layer.lora_A[adapter_name] = shared
        blocks.append(layers)
    return blocks


@torch.no_grad()
def svd_init_lora(layers: Sequence[LoraLayer], adapter_name: str = "default") -> None:
    """Set the `lora_A` that `layers` share (one layer, or the tied q/k/v of a block) to the top-r
    rows of `Vh` from the SVD of their concatenated base weight, and every `lora_B` to zero."""
    lora_a = layers[0].lora_A[adapter_name].weight
    weight = torch.cat([layer.get_base_layer().weight.detach().to(torch.float32) for layer in layers])
    rank = lora_a.shape[0]
    if rank > min(weight.shape):
        raise UserError(f"LoRA rank {rank} exceeds min(weight shape) {tuple(weight.shape)}; lower lora_rank.")
    _, _, vh = torch.linalg.svd(weight, full_matrices=False)
    lora_a.copy_(vh[:rank].to(lora_a.dtype))
    for layer in layers:
        layer.lora_B[adapter_name].weight.zero_()


# ---------------------------------------------------------------------- the one path
def lora_config(backbone: nn.Module, settings: SLCAModelConfig) -> LoraConfig:
    """The built-in LoRA as a PEFT config: rank r, update `lora_scale * B A` on the (already resolved)
    target linears, every bias trained."""
    available = linear_names(backbone)
    missing = [t for t in settings.lora_target_modules if t not in available]
    if missing:
        raise UserError(
            f"LoRA target module(s) {missing} match no linear layer of {type(backbone).__name__}. "
            f"Linear layer names available: {available}. Set lora_target_modules to some of them."
        )
    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_scale * settings.lora_rank,
        target_modules=list(settings.lora_target_modules),
        lora_dropout=0.0,
        bias="all",
    )


def apply_peft_config(backbone: nn.Module, config: PeftConfig, svd_init: bool,
                      layout: str = "per_projection") -> PeftModel:
    """Wrap `backbone` with `config` as the slow learner, plus Hybrid-SL's LayerNorms (as PEFT
    `modules_to_save`, unless the config sets its own), biases and class token.

    `svd_init` starts LoRA A in the top-r right singular subspace of W (B = 0); it is defined for
    LoRA (with or without DoRA/rsLoRA) only and refused for other methods. `layout='fused_qkv'`
    ties each block's q/k/v LoRA A (and initialises it from the concatenated W_qkv).
    """
    check_peft_config(backbone, config)
    if svd_init and not isinstance(config, LoraConfig):
        raise UserError(f"lora_svd_init is defined for LoRA only, not {type(config).__name__}; set "
                         "lora_svd_init false (--lora_svd_init false) to use this PEFT method.")
    if svd_init and config.init_lora_weights not in (True, False):
        raise UserError(f"lora_svd_init would overwrite peft_config.init_lora_weights={config.init_lora_weights!r}; "
                         "set lora_svd_init false or drop init_lora_weights.")
    applied = copy.deepcopy(config)
    if applied.modules_to_save is None:
        applied.modules_to_save = norm_module_names(backbone) or None
    with known_warnings_filtered():  # PEFT reads transformers' renamed `is_gradient_checkpointing`
        wrapped = get_peft_model(backbone, applied)
    # PEFT's bias="all" also flags the biases of the frozen originals that modules_to_save keeps aside.
    for name, param in wrapped.named_parameters():
        if ".original_module." in name:
            param.requires_grad_(False)
        elif name.endswith(".bias") and "modules_to_save" not in name:
            param.requires_grad_(True)  # Hybrid-SL trains every bias
    token = class_token(wrapped.get_base_model())
    if token is not None:
        token.requires_grad_(True)
    tied = tie_fused_qkv(wrapped) if layout == "fused_qkv" else []
    if svd_init:
        in_blocks = {id(layer) for block in tied for layer in block}
        single = [[m] for m in wrapped.modules()
                  if isinstance(m, LoraLayer) and "default" in m.lora_A and id(m) not in in_blocks]
        for layers in tied + single:
            svd_init_lora(layers)
    return wrapped


def adapt_backbone(backbone: nn.Module, settings: SLCAModelConfig, peft_config: PeftConfig | None) -> nn.Module:
    """The slow learner `settings` describe: the adapter (the built-in LoRA, or `peft_config`) with
    Hybrid-SL's extras when `use_lora`, else the whole backbone trainable (full fine-tuning)."""
    if not settings.use_lora:
        return backbone.requires_grad_(True)
    if peft_config is None:
        if settings.lora_layout == "fused_qkv":
            check_fused_qkv_backbone(backbone, settings.lora_target_modules)
        peft_config = lora_config(backbone, settings)
    elif settings.lora_layout == "fused_qkv" and not backbone_spec(backbone).fused_qkv:
        raise UserError("lora_layout='fused_qkv' (set by released_code) ties slca-peft's own LoRA; with "
                         "peft_config set lora_layout='per_projection' and configure the adapter yourself.")
    return apply_peft_config(backbone, peft_config, svd_init=settings.lora_svd_init, layout=settings.lora_layout)
