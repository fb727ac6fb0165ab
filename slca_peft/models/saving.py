"""A model's files on disk: safetensors + JSON only, read and written given a model.

This module never builds a model: `SLCAModel.from_pretrained` builds one from the files read here
(`read_model_config`, `load_model_state`). The file names are listed in `slca_peft.artifacts.layout`.

Model files (`save_model_files`; `SLCAModel.save_pretrained` / `from_pretrained`): `slca_config.json`,
the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`: LoRA, biases, LayerNorms and
the class token; `PeftModel.from_pretrained` loads it onto the base) or the whole backbone for full
fine-tuning (`backbone.safetensors`, `backbone_config.json`), `classifier.safetensors` (aligned
heads + scales) and the model card. The learner's run state beside them is
`slca_peft.continual.checkpoint`'s. Only these files are ever read; pickle-based files are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, PretrainedConfig

from ..artifacts import manifest
from ..artifacts.atomic import write_image_processor, write_json
from ..artifacts.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    AUTO_CONFIG_FILE,
    BACKBONE_CONFIG_FILE,
    BACKBONE_FILE,
    CLASSIFIER_FILE,
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    PROCESSOR_FILE,
)
from ..sharing.card import write_model_card
from ..utils.errors import MissingFileError, UserError
from ..utils.reading import path_kind, read_json, require_path
from .auto import auto_config_dict
from .config import SLCAModelConfig
from .loading import VISION_TOWERS, portable_name, resolve_recorded_base
from .verification import base_model_record

if TYPE_CHECKING:
    from .model import SLCAModel

logger = logging.getLogger(__name__)


def _backbone_extras(model: SLCAModel, adapter_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trainable backbone tensors that the PEFT adapter file does not hold."""
    from .adapters import adapter_prefix

    peft_model = model.backbone
    saved = set(adapter_state)
    prefix = adapter_prefix(peft_model)
    extras = {}
    for name, param in peft_model.named_parameters():
        if not param.requires_grad or prefix in name or "modules_to_save" in name:
            continue
        short = name.removeprefix("base_model.model.")
        if short not in saved and name not in saved:
            extras[short] = param.detach().cpu().contiguous()
    return extras


#: Where PEFT's `bias="all"` files a LayerNorm's bias a second time: the trained copy of a `modules_to_save`
#: module (saved once more under the module's own name) and the frozen original (the base model's value).
_DUPLICATE_PARTS = (".modules_to_save.", ".original_module.")


def without_duplicates(adapter_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter file's tensors less the second copies PEFT's `bias="all"` adds for a `modules_to_save`
    module (`layernorm.modules_to_save.bias`, `layernorm.original_module.bias` beside `layernorm.bias`).
    `PeftModel.from_pretrained` has no place for them ("Found unexpected adapter keys"); the trained value
    is the module's own key, which stays."""
    kept = {}
    for key, value in adapter_state.items():
        part = next((p for p in _DUPLICATE_PARTS if p in key), None)
        if part is None or key.replace(part, ".") not in adapter_state:
            kept[key] = value
    return kept


def detached(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_model_files(model: SLCAModel, folder: Path, state: dict[str, Any] | None,
                      card: dict[str, Any] | None, *, continuable: bool = False) -> None:
    """The model files into `folder` (`continuable`: the learner's run state goes beside them, which
    the card then says can be continued)."""
    settings = model.settings()
    if model.slca_config.use_lora and not settings["base_model_name_or_path"]:
        raise UserError(
            "this model's backbone was built from a config and has no saved base weights to reference; "
            "save the backbone first (backbone.save_pretrained(path)) and build the model from that path."
        )
    write_json(folder / CONFIG_FILE, settings)
    if model.slca_config.use_lora:
        # PEFT records the name the backbone was loaded by; make it the portable one (absolute path or Hub id).
        for peft_config in model.backbone.peft_config.values():
            peft_config.base_model_name_or_path = settings["base_model_name_or_path"]
        # An image backbone has no token embeddings: PEFT's "auto" would look the base model up on the Hub
        # (a request per save and load, a warning offline) to learn what is known.
        model.backbone.save_pretrained(str(folder), save_embedding_layers=False)
        adapter_state = get_peft_model_state_dict(model.backbone, save_embedding_layers=False)
        extras = _backbone_extras(model, adapter_state)
        stored = load_file(str(folder / ADAPTER_FILE))
        tensors = without_duplicates(stored)
        # PEFT loads any key of the adapter file that names a model tensor, so the class token
        # rides along and `PeftModel.from_pretrained` restores the whole trained backbone.
        tensors.update({f"base_model.model.{k}": v for k, v in extras.items()})
        if tensors.keys() != stored.keys():
            save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    else:
        backbone = model.base_backbone
        save_file(detached(backbone.state_dict()), str(folder / BACKBONE_FILE))
        write_json(folder / BACKBONE_CONFIG_FILE, backbone.config.to_dict())
    save_file(detached(model.classifier.state_dict()), str(folder / CLASSIFIER_FILE))
    # transformers' Auto classes and pipeline() read this instead of the adapter's base (a random head).
    write_json(folder / AUTO_CONFIG_FILE, auto_config_dict(model.id2label if model.classifier.num_tasks else {}))
    if model.image_processor is not None:  # pipeline() preprocesses with it, as the run evaluated
        write_image_processor(model.image_processor, folder)
    write_model_card(folder, settings, state, continuable=continuable, backbone=card_backbone(model), **(card or {}))


def card_backbone(model: SLCAModel) -> dict[str, Any]:
    """How plain transformers loads `model`'s base model as slca-peft does, for the card's PEFT snippet: the
    class (a CLIP or SigLIP checkpoint's vision tower; `AutoModel` else) and its keywords (ViT's and DeiT's
    pooler left out: it is no part of SLCA's feature)."""
    name = type(model.base_backbone).__name__
    return {"class": name if name in VISION_TOWERS.values() else "AutoModel",
            "kwargs": {"add_pooling_layer": False} if model.backbone_spec.drop_pooler else {}}


def read_image_processor(root: Path) -> Any | None:
    """The image processor a model folder holds (`preprocessor_config.json`), or None when it holds none (a
    folder written before slca-peft saved one). A file that is not a processor transformers reads is refused,
    naming it: the model would be served with other pixels than it was evaluated on."""
    path = root / PROCESSOR_FILE
    if not path.is_file():
        return None
    from transformers import AutoImageProcessor

    fix = "delete it and save the model with its image processor again."
    data = read_json(path)  # a regular file of bounded size holding JSON, before transformers opens it
    kinds = [data.get(key) for key in ("image_processor_type", "processor_class")] if isinstance(data, dict) else []
    if not isinstance(data, dict) or any(kind is not None and not isinstance(kind, str) for kind in kinds):
        raise UserError(f"{path} is not an image processor's settings (a JSON object naming its type); {fix}")
    try:
        return AutoImageProcessor.from_pretrained(str(root), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # what a malformed file makes it raise
        raise UserError(f"{path} is not an image processor transformers can read ({' '.join(str(err).split())[:200]}); "
                         f"{fix}") from err


def save_model_files(model: SLCAModel, directory: str | Path, *, state: dict[str, Any] | None = None,
                     card: dict[str, Any] | None = None) -> Path:
    """Write the model files into `directory` (other files there are kept, like
    `PreTrainedModel.save_pretrained`); each file appears whole, through a rename."""
    stale = (BACKBONE_FILE, BACKBONE_CONFIG_FILE) if model.slca_config.use_lora else (ADAPTER_FILE, ADAPTER_CONFIG_FILE)
    manifest.write_in_place(directory, lambda folder: write_model_files(model, folder, state, card), replaces=stale,
                            extra=base_model_record(model, kind="model"))
    return Path(directory)


def resolve_checkpoint(path_or_repo_id: str | Path, revision: str | None = None, **hub: Any) -> Path:
    """A local directory as is, otherwise a Hub repo id fetched (or read from the local cache); `hub`:
    snapshot_download's `token`, `cache_dir`, `local_files_only`, `force_download`."""
    path = Path(path_or_repo_id)
    if path.is_file():
        hint = " Pickle files are never loaded." if path.suffix in PICKLE_SUFFIXES else ""
        raise UserError(f"{path} is a file; pass the checkpoint directory (or a Hub repo id).{hint}")
    if path.is_dir():
        return path
    if path_kind(path) is not None or str(path_or_repo_id).startswith((".", "/")) or \
            str(path_or_repo_id).count("/") > 1:  # a FIFO or a device is named for what it is
        require_path(path, folder=True, what="checkpoint directory",
                     fix="pass a checkpoint directory (task_N) or a Hub repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=str(path_or_repo_id), revision=revision, **hub))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise MissingFileError(
            f"{path_or_repo_id} is neither a local checkpoint directory nor a Hub repo that could be fetched "
            f"({type(err).__name__}); check the path, or the repo id and your connection."
        ) from err


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _dtype_fits(stored: torch.dtype | None, reference: torch.dtype) -> bool:
    """A float tensor may be stored in any float precision (a bf16 checkpoint loads into fp32);
    anything else must match exactly."""
    if stored is None:
        return False
    return stored.is_floating_point if reference.is_floating_point else stored == reference


def read_safetensors(path: Path, expected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning truncation and layout mismatches into errors that name it.

    With `expected` (the model's own tensors by name), every stored tensor's name, shape and dtype
    is checked against the model from the header, before any data is read.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MissingFileError(f"{path} is missing; the checkpoint is incomplete.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if expected is not None:
                unknown = [k for k in keys if k not in expected]
                if unknown:
                    raise UserError(f"{path} holds tensors this model does not have: {unknown[:5]}.")
                for key in keys:
                    stored = fh.get_slice(key)
                    shape, reference = tuple(stored.get_shape()), expected[key]
                    if shape != tuple(reference.shape):
                        raise UserError(
                            f"{path}: tensor {key} has shape {shape}, the model expects {tuple(reference.shape)}; "
                            "the checkpoint was made for a different base model or configuration."
                        )
                    dtype = stored.get_dtype()
                    if not _dtype_fits(_SAFETENSORS_DTYPES.get(dtype), reference.dtype):
                        raise UserError(
                            f"{path}: tensor {key} is stored as {dtype}, the model expects {reference.dtype}; "
                            "the file is damaged or was not written by slca-peft."
                        )
            tensors = {k: fh.get_tensor(k) for k in keys}
    except SafetensorError as err:
        raise UserError(f"{path} is not a valid safetensors file ({err}); it may be truncated.") from err
    for key, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32, torch.bool)):
            raise UserError(f"{path}: tensor {key} has unexpected dtype {tensor.dtype}.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: tensor {key} has non-finite values; the file is damaged.")
    return tensors


def _check_no_pickle(root: Path) -> None:
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{root} contains pickle-based files {pickles}; slca-peft only reads safetensors and JSON and "
            "refuses them because loading pickle can run code. Remove them or convert to safetensors."
        )


def _same_base(a: str, b: str) -> bool:
    return a == b or portable_name(a) == portable_name(b)


def read_model_config(
    path_or_repo_id: str | Path,
    revision: str | None = None,
    expected_base: str | Sequence[str | None] | None = None,
    **hub: Any,
) -> tuple[SLCAModelConfig, Path]:
    """The validated `slca_config.json` of a model folder (its base model resolved) and the local
    directory it was read from.

    `expected_base` (a Hub id or path, or several names of the same weights, e.g. a local copy and
    its Hub id) refuses files trained on another backbone, and locates a base model that has moved.
    """
    root = resolve_checkpoint(path_or_repo_id, revision, **hub)
    _check_no_pickle(root)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} is missing; {root} is not an slca-peft checkpoint.")
    # Validated before anything is allocated: a crafted file cannot ask for a huge model.
    config = SLCAModelConfig.from_dict(read_json(config_path), str(config_path))
    accepted = [expected_base] if isinstance(expected_base, (str, Path)) else list(expected_base or [])
    accepted = [str(name) for name in accepted if name]
    base = resolve_recorded_base(config.base_model_name_or_path, config_path, accepted)
    if accepted and base is not None and not any(_same_base(base, name) for name in accepted):
        raise UserError(
            f"{config_path}: base_model_name_or_path is {base!r} but this run uses {' / '.join(accepted)!r}; "
            "leave out --model_name_or_path (the checkpoint names its base model; in Python, expected_base), "
            "or give the base model it was trained on."
        )
    config.base_model_name_or_path = base
    return config, root


def read_backbone_config(root: str | Path) -> PretrainedConfig:
    """The architecture of a fully fine-tuned backbone (`backbone_config.json`)."""
    config_dict = read_json(Path(root) / BACKBONE_CONFIG_FILE)
    model_type = config_dict.pop("model_type")
    return AutoConfig.for_model(model_type, **config_dict)


def load_model_state(model: SLCAModel, root: str | Path) -> None:
    """Fill a freshly built `model` with the adapter (or backbone) and aligned heads stored in `root`,
    every tensor checked against the model's own before any data is read."""
    root = Path(root)
    if model.slca_config.use_lora:
        # PEFT stores adapter tensors without the adapter name ("lora_A.weight") and the trained copy
        # of a `modules_to_save` module under the module's own name.
        expected = {}
        for key, value in model.base_backbone.state_dict().items():
            for variant in (key, key.replace(".default.", "."), key.replace(".modules_to_save.default.", ".")):
                expected[f"base_model.model.{variant}"] = value
        # Any tuner's own key names (DoRA, LoHa, ...).
        expected.update(get_peft_model_state_dict(model.backbone, save_embedding_layers=False))
        set_peft_model_state_dict(model.backbone, read_safetensors(root / ADAPTER_FILE, expected))
    else:
        expected = dict(model.base_backbone.state_dict())
        model.base_backbone.load_state_dict(read_safetensors(root / BACKBONE_FILE, expected), strict=True)
    model.classifier.restore(read_safetensors(root / CLASSIFIER_FILE, dict(model.classifier.state_dict())))
