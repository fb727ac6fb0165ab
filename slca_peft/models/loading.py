"""Loading a base model: the keywords a `from_pretrained` takes, the checks on what is passed as a
backbone, and how checkpoints name the base model they were trained on.

A checkpoint stores only what training changed and references its base model by name, so that
name must mean the same thing from any working directory and on any machine: a Hub id, or an
absolute path. Base weights are only read from safetensors (never a pickle).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from ..artifacts.layout import ADAPTER_CONFIG_FILE, CONFIG_FILE, EXPORT_CONFIG_FILE, PICKLE_SUFFIXES
from ..sharing.public import is_local_name
from ..utils.errors import MissingFileError, UserError
from ..utils.reading import path_kind, read_json, require_path

#: Multimodal checkpoints whose image tower is the backbone (a Hub id of the whole model loads its tower).
VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


#: `from_pretrained` keywords passed through to transformers when a model is loaded by name.
LOADING_KEYWORDS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "dtype",
                    "attn_implementation")
_QUANTIZED = ("quantized backbones are not supported: the slow learner trains the backbone's norms and biases; "
              "load it unquantized (dtype=torch.bfloat16 halves its memory).")
#: Loading keywords refused, and why (with what to do instead).
REFUSED_LOADING_KEYWORDS = {
    "device_map": "an SLCAModel keeps its backbone and heads on one device, which training and alignment move "
    "as a whole; load without device_map and call model.to(device) (several GPUs: accelerate launch, one copy "
    "per process, docs/distributed.md).",
    "quantization_config": _QUANTIZED, "load_in_8bit": _QUANTIZED, "load_in_4bit": _QUANTIZED,
    "trust_remote_code": "slca-peft builds only architectures transformers ships and runs no code from a "
    "checkpoint; use a backbone whose model_type transformers knows.",
    "use_safetensors": "slca-peft always reads safetensors (never pickles); drop the keyword.",
    "from_tf": "slca-peft reads safetensors weights only; convert the checkpoint and drop the keyword.",
    "from_flax": "slca-peft reads safetensors weights only; convert the checkpoint and drop the keyword.",
    "ignore_mismatched_sizes": "slca-peft loads every tensor at the shape it was saved with; new classes are "
    "learned by continuing the model (slca-peft train --continue_from), not by resizing its heads.",
}
#: The value of a refused keyword that asks for what slca-peft does anyway (transformers' example scripts
#: always pass `from_tf=False`, `trust_remote_code=False`, `ignore_mismatched_sizes=False`): accepted, and
#: dropped. Any keyword at None is unset.
DEFAULT_LOADING_VALUES = {"from_tf": False, "from_flax": False, "use_safetensors": True, "trust_remote_code": False,
                          "ignore_mismatched_sizes": False, "load_in_8bit": False, "load_in_4bit": False}


def split_loading_kwargs(kwargs: Mapping[str, Any], caller: str = "from_pretrained"
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the loading keywords among `kwargs`, the rest). A refused one (`device_map`, quantization,
    `trust_remote_code=True`, `from_tf=True`, ...) raises, saying why and what to do, unless its value asks
    for what slca-peft does anyway (`from_tf=False`: `DEFAULT_LOADING_VALUES`, or None); `torch_dtype` is
    read as `dtype`, as transformers v5 does; unset (None) keywords are dropped so transformers' defaults
    apply."""
    loading, rest = {}, {}
    for name, value in kwargs.items():
        if name in REFUSED_LOADING_KEYWORDS and (value is None or (
                name in DEFAULT_LOADING_VALUES and value is DEFAULT_LOADING_VALUES[name])):
            continue  # the default behaviour, which slca-peft gives
        if name in REFUSED_LOADING_KEYWORDS:
            raise UserError(f"{caller}: {name} is not supported: {REFUSED_LOADING_KEYWORDS[name]}")
        if name == "torch_dtype":
            name = "dtype"
        if name in LOADING_KEYWORDS:
            if value is not None:
                loading[name] = value
        else:
            rest[name] = value
    return loading, rest


def loading_kwargs(caller: str = "from_pretrained", **kwargs: Any) -> dict[str, Any]:
    """The keywords a `from_pretrained` passes on to transformers' (`LOADING_KEYWORDS`), checked: a refused
    or unknown one raises a one-line error naming it."""
    loading, rest = split_loading_kwargs(kwargs, caller)
    if rest:
        raise TypeError(f"{caller}: unknown keyword(s) {sorted(rest)}; the loading keywords are "
                        f"{list(LOADING_KEYWORDS)}.")
    return loading


def hub_kwargs(loading: Mapping[str, Any]) -> dict[str, Any]:
    """The loading keywords that also apply to fetching files from the Hub (snapshot_download's)."""
    return {k: v for k, v in loading.items() if k in ("token", "cache_dir", "local_files_only", "force_download")}


def check_backbone_source(name_or_path: str | os.PathLike) -> None:
    """Refuse, naming the problem, a backbone name that is a missing local path or a folder that holds a
    fine-tuned result rather than a base model (an slca-peft checkpoint, a bare PEFT adapter)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            raise UserError(
                f"{name} is an slca-peft checkpoint, not a base model: load it with SLCAModel.from_pretrained("
                f"{name!r}), or continue its run with --resume_from {name} (--model_name_or_path names the "
                "base model it was trained on)."
            )
        if (path / ADAPTER_CONFIG_FILE).is_file() and not (path / EXPORT_CONFIG_FILE).is_file():
            try:
                base = read_json(path / ADAPTER_CONFIG_FILE, 1 << 20).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                base = None
            raise UserError(
                f"{name} holds a PEFT adapter (adapter_config.json), not a base model: pass its base model"
                f"{f' ({base})' if base else ''} as the backbone, and the adapter's settings as peft_config "
                "(--peft_config)."
            )
        if not (path / EXPORT_CONFIG_FILE).is_file():
            raise UserError(f"the backbone {name} is a folder without {EXPORT_CONFIG_FILE}, not a model folder; pass "
                            f"the folder that holds the model's {EXPORT_CONFIG_FILE} and weights, or a Hub id.")
    elif (kind := path_kind(path)) is not None:
        raise UserError(f"the backbone {name} is {kind}, not a model folder; pass the folder that holds its "
                         "config.json (a config JSON alone, for random weights: --model_config).")
    elif is_local_name(name):
        raise MissingFileError(
            f"the backbone path {name} does not exist (relative paths resolve from {os.getcwd()}); pass an "
            "existing model folder or a Hub id such as google/vit-base-patch16-224-in21k."
        )


def check_model_config(path: str | os.PathLike) -> None:
    """Refuse, in one line naming `--model_config PATH`, a config file transformers could not read: not a regular
    file (a FIFO would block it, `/dev/zero` fill memory), larger than a config, not JSON, or without the
    `model_type` that picks the architecture. Checked when the arguments are parsed, before any data is read."""
    fix = "give a model config JSON with a model_type (e.g. a ViT's config.json)"
    require_path(path, folder=False, what="--model_config", fix=fix)
    config = read_json(path, 1 << 20)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"--model_config {path} has no \"model_type\" (the architecture to build); {fix}.")


def load_backbone(name_or_path: str, revision: str | None = None, **kwargs: Any) -> PreTrainedModel:
    """The base model loader (safetensors only), except that a CLIP or SigLIP checkpoint gives its
    vision tower. The config is read as JSON, so nothing from the checkpoint runs. `kwargs` are loading
    keywords (`loading_kwargs`: token, cache_dir, local_files_only, force_download, dtype, ...). Damaged
    weights (a truncated or zeroed safetensors file) are a `UserError` naming the folder."""
    from safetensors import SafetensorError

    try:
        return _load_backbone(name_or_path, revision, **kwargs)
    except SafetensorError as err:
        files = sorted(p.name for p in Path(name_or_path).glob("*.safetensors")) if Path(name_or_path).is_dir() else []
        where = f"{Path(name_or_path) / files[0]}" if len(files) == 1 else f"{name_or_path} ({', '.join(files)})" \
            if files else str(name_or_path)
        raise UserError(f"{where}: the base model's safetensors weights are damaged ({' '.join(str(err).split())}); "
                        "download or save the base model again.") from None


def _load_backbone(name_or_path: str, revision: str | None = None, **kwargs: Any) -> PreTrainedModel:
    check_backbone_source(name_or_path)
    kwargs = loading_kwargs("load_backbone", **kwargs)
    try:
        config = PretrainedConfig.get_config_dict(name_or_path, revision=revision, **hub_kwargs(kwargs))[0]
        model_type = config.get("model_type")
    except OSError:
        model_type = None  # let the base model loader name the problem
    tower = VISION_TOWERS.get(model_type)
    if tower is not None:
        return getattr(transformers, tower).from_pretrained(name_or_path, revision=revision, use_safetensors=True,
                                                             **kwargs)
    return load_base_model(name_or_path, revision=revision, **kwargs)


def backbone_from_config(config: PretrainedConfig, **kwargs: Any) -> PreTrainedModel:
    """A randomly initialised backbone; a CLIP or SigLIP config gives its vision tower."""
    if config.model_type in VISION_TOWERS:
        config = config.vision_config
    return AutoModel.from_config(config, **kwargs)


def portable_name(name: str | os.PathLike | None) -> str | None:
    """A Hub id as is; an existing local directory as its absolute path."""
    if name is None:
        return None
    name = str(name)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def load_base_model(name: str, revision: str | None = None, **kwargs) -> PreTrainedModel:
    """`AutoModel.from_pretrained` reading safetensors only: a base folder holding only a pickle
    (pytorch_model.bin) is refused with an error that says how to convert it."""
    try:
        return AutoModel.from_pretrained(name, revision=revision, use_safetensors=True, **kwargs)
    except OSError as err:
        folder = Path(name)
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            raise UserError(
                f"the base model folder {folder} has no safetensors weights{f' (only {pickles})' if pickles else ''}; "
                "slca-peft never opens pickle files. Convert it once, in an environment you trust: "
                "AutoModel.from_pretrained(path, use_safetensors=False).save_pretrained(path) writes "
                "model.safetensors."
            ) from err
        raise UserError(f"the base model {name!r} could not be loaded ({' '.join(str(err).split())[:300]}); give a "
                        "local model folder or a Hub id that exists (offline, with HF_HUB_OFFLINE=1, it must be in "
                        "the local Hub cache).") from err


def resolve_recorded_base(
    base: str | None, source: str | Path, alternatives: Sequence[str | None] = ()
) -> str | None:
    """The base model a checkpoint records (a Hub id or an absolute path), made loadable: a path that no
    longer exists is replaced by an existing directory among `alternatives` (what the caller passed as
    the base model); otherwise one error names the missing path and the fix."""
    if base is None or not Path(base).is_absolute() or Path(base).exists():
        return base
    for name in alternatives:
        if name and Path(name).expanduser().is_dir():
            return portable_name(name)
    raise MissingFileError(
        f"{source} references the base model {base!r}, which does not exist. Pass the base model's location: "
        "--model_name_or_path PATH with the recipe, or load_checkpoint(..., expected_base=PATH) from Python."
    )
