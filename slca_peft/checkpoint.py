"""Continual checkpoints: one directory (and Hub repo) per model state, safetensors + JSON only.

Model files (`SLCAModel.save_pretrained` / `from_pretrained`):
  slca_config.json              `SLCAModelConfig`: settings, class names and the referenced base model
  adapter_config.json,
  adapter_model.safetensors     PEFT adapter: LoRA, biases, LayerNorms and the class token
                                (Hybrid-SL); `PeftModel.from_pretrained` loads it onto the base
  backbone.safetensors,
  backbone_config.json          the whole backbone, for full fine-tuning
  classifier.safetensors        aligned heads + scales
  README.md                     model card

Learner run state beside them (`save_learner_state` / `load_learner_state`), as a Trainer keeps
trainer_state.json beside its model:
  classifier_unaligned.safetensors  heads before alignment (the next task aligns from them)
  class_statistics.safetensors  per-class Gaussians
  continual_state.json          task history: class order, task sizes, names, accuracy matrix

`save_checkpoint` / `load_checkpoint` write and read both. Only these files are ever read;
pickle-based files are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from .backbones import load_backbone
from .base_model import portable_name, resolve_recorded_base
from .model_config import SLCAModelConfig, validate_state
from .statistics import STATISTICS_FILE, ClassStatistics

if TYPE_CHECKING:
    from .model import SLCAModel

CONFIG_FILE = "slca_config.json"
STATE_FILE = "continual_state.json"
CLASSIFIER_FILE = "classifier.safetensors"
UNALIGNED_FILE = "classifier_unaligned.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_CONFIG_FILE = "backbone_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def recover_replaced(target: str | Path) -> None:
    """Undo a replacement killed between its two renames: `.NAME.old-*` goes back to `NAME` when
    `NAME` is missing, and is removed when `NAME` exists (the replacement completed)."""
    target = Path(target)
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory and move it to `path` only if the block succeeds, so a
    checkpoint directory is either complete or absent (an older one is replaced at the end)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a writer that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the checkpoint follows the umask
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file follows the umask
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _write_model_files(model: SLCAModel, folder: Path, state: dict[str, Any] | None,
                       card: dict[str, Any] | None) -> None:
    settings = model.settings()
    if model.slca_config.use_lora and not settings["base_model_name_or_path"]:
        raise ValueError(
            "this model's backbone was built from a config and has no saved base weights to reference; "
            "save the backbone first (backbone.save_pretrained(path)) and build the model from that path."
        )
    _write_json(folder / CONFIG_FILE, settings)
    if model.slca_config.use_lora:
        # PEFT records the name the backbone was loaded by; make it the portable one (absolute path or Hub id).
        for peft_config in model.backbone.peft_config.values():
            peft_config.base_model_name_or_path = settings["base_model_name_or_path"]
        model.backbone.save_pretrained(str(folder))
        adapter_state = get_peft_model_state_dict(model.backbone)
        extras = _backbone_extras(model, adapter_state)
        if extras:
            # PEFT loads any key of the adapter file that names a model tensor, so the class token
            # rides along and `PeftModel.from_pretrained` restores the whole trained backbone.
            merged = load_file(str(folder / ADAPTER_FILE))
            merged.update({f"base_model.model.{k}": v for k, v in extras.items()})
            save_file(merged, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    else:
        backbone = model.base_backbone
        save_file(_tensors(backbone.state_dict()), str(folder / BACKBONE_FILE))
        _write_json(folder / BACKBONE_CONFIG_FILE, backbone.config.to_dict())
    save_file(_tensors(model.classifier.state_dict()), str(folder / CLASSIFIER_FILE))
    from .hub import write_model_card

    write_model_card(folder, settings, state, **(card or {}))


def save_model_files(model: SLCAModel, directory: str | Path, *, state: dict[str, Any] | None = None,
                     card: dict[str, Any] | None = None) -> Path:
    """Write the model files into `directory` (other files there are kept, like
    `PreTrainedModel.save_pretrained`); each file appears whole, through a rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".slca-save-", dir=directory))
    try:
        _write_model_files(model, tmp, state, card)
        adapted = model.slca_config.use_lora
        stale = (BACKBONE_FILE, BACKBONE_CONFIG_FILE) if adapted else (ADAPTER_FILE, "adapter_config.json")
        for name in stale:
            (directory / name).unlink(missing_ok=True)
        for child in tmp.iterdir():
            os.replace(child, directory / child.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def save_learner_state(
    directory: str | Path,
    *,
    statistics: ClassStatistics | None = None,
    state: dict[str, Any] | None = None,
    unaligned_head: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the continual learner's run state beside the model files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if unaligned_head is not None:
        save_file(_tensors(unaligned_head), str(directory / UNALIGNED_FILE))
    if statistics is not None:
        statistics.save(directory)
    if state is not None:
        validate_state(state)
        atomic_write_text(directory / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    model: SLCAModel,
    directory: str | Path,
    *,
    statistics: ClassStatistics | None = None,
    state: dict[str, Any] | None = None,
    unaligned_head: dict[str, torch.Tensor] | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Write everything needed to continue or serve `model`, atomically: the directory is either
    complete or absent."""
    if state and state.get("label_names") and not model.label_names:
        model.label_names = state["label_names"]
    with atomic_directory(directory) as tmp:
        _write_model_files(model, tmp, state, card)
        save_learner_state(tmp, statistics=statistics, state=state, unaligned_head=unaligned_head)
    return Path(directory)


def resolve_checkpoint(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local directory as is, otherwise a Hub repo id fetched (or read from the local cache)."""
    path = Path(path_or_repo_id)
    if path.is_file():
        hint = " Pickle files are never loaded." if path.suffix in PICKLE_SUFFIXES else ""
        raise ValueError(f"{path} is a file; pass the checkpoint directory (or a Hub repo id).{hint}")
    if path.is_dir():
        return path
    if str(path_or_repo_id).startswith((".", "/")) or str(path_or_repo_id).count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {path} does not exist.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=str(path_or_repo_id), revision=revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(
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
        raise FileNotFoundError(f"{path} is missing; the checkpoint is incomplete.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if expected is not None:
                unknown = [k for k in keys if k not in expected]
                if unknown:
                    raise ValueError(f"{path} holds tensors this model does not have: {unknown[:5]}.")
                for key in keys:
                    stored = fh.get_slice(key)
                    shape, reference = tuple(stored.get_shape()), expected[key]
                    if shape != tuple(reference.shape):
                        raise ValueError(
                            f"{path}: tensor {key} has shape {shape}, the model expects {tuple(reference.shape)}; "
                            "the checkpoint was made for a different base model or configuration."
                        )
                    dtype = stored.get_dtype()
                    if not _dtype_fits(_SAFETENSORS_DTYPES.get(dtype), reference.dtype):
                        raise ValueError(
                            f"{path}: tensor {key} is stored as {dtype}, the model expects {reference.dtype}; "
                            "the file is damaged or was not written by slca-peft."
                        )
            tensors = {k: fh.get_tensor(k) for k in keys}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err}); it may be truncated.") from err
    for key, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32, torch.bool)):
            raise ValueError(f"{path}: tensor {key} has unexpected dtype {tensor.dtype}.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {key} has non-finite values; the file is damaged.")
    return tensors


def _check_no_pickle(root: Path) -> None:
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{root} contains pickle-based files {pickles}; slca-peft only reads safetensors and JSON and "
            "refuses them because loading pickle can run code. Remove them or convert to safetensors."
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged.") from err


def _same_base(a: str, b: str) -> bool:
    return a == b or portable_name(a) == portable_name(b)


def load_model_files(
    path_or_repo_id: str | Path,
    revision: str | None = None,
    expected_base: str | Sequence[str | None] | None = None,
) -> tuple[SLCAModel, Path]:
    """Rebuild the model `save_model_files` wrote; returns it and the local directory read.

    `expected_base` (a Hub id or path, or several names of the same weights, e.g. a local copy and
    its Hub id) refuses files trained on another backbone, and locates a base model that has moved.
    """
    from .model import SLCAModel, _load_with_sdpa

    root = resolve_checkpoint(path_or_repo_id, revision)
    _check_no_pickle(root)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; {root} is not an slca-peft checkpoint.")
    # Validated before anything is allocated: a crafted file cannot ask for a huge model.
    config = SLCAModelConfig.from_dict(_read_json(config_path), str(config_path))
    accepted = [expected_base] if isinstance(expected_base, (str, Path)) else list(expected_base or [])
    accepted = [str(name) for name in accepted if name]
    base = resolve_recorded_base(config.base_model_name_or_path, config_path, accepted)
    if accepted and base is not None and not any(_same_base(base, name) for name in accepted):
        raise ValueError(
            f"{config_path}: base_model_name_or_path is {base!r} but this run uses {' / '.join(accepted)!r}; "
            "resume with the base model the checkpoint was trained on."
        )
    config.base_model_name_or_path = base
    if config.use_lora:
        try:
            backbone = _load_with_sdpa(load_backbone, base, revision=config.revision)
        except OSError as err:
            if Path(base).is_absolute() or base.startswith("."):
                raise
            # "runs/base" may be a Hub id or a path relative to where an older run started.
            raise FileNotFoundError(
                f"{config_path} references the base model {base!r}, which is neither a directory here nor a "
                f"loadable Hub model ({err}). If it is a path relative to where the run started, pass the base "
                "model's location: --model_name_or_path PATH with the recipe, or "
                "load_checkpoint(..., expected_base=PATH) from Python."
            ) from err
    else:
        config_dict = _read_json(root / BACKBONE_CONFIG_FILE)
        model_type = config_dict.pop("model_type")
        backbone = AutoModel.from_config(AutoConfig.for_model(model_type, **config_dict))
    config.lora_svd_init = False
    try:
        model = SLCAModel(backbone, config)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    if model.slca_config.use_lora:
        # PEFT stores adapter tensors without the adapter name ("lora_A.weight") and the trained copy
        # of a `modules_to_save` module under the module's own name.
        expected = {}
        for key, value in model.base_backbone.state_dict().items():
            for variant in (key, key.replace(".default.", "."), key.replace(".modules_to_save.default.", ".")):
                expected[f"base_model.model.{variant}"] = value
        expected.update(get_peft_model_state_dict(model.backbone))  # any tuner's own key names (DoRA, LoHa, ...)
        set_peft_model_state_dict(model.backbone, read_safetensors(root / ADAPTER_FILE, expected))
    else:
        expected = dict(model.base_backbone.state_dict())
        model.base_backbone.load_state_dict(read_safetensors(root / BACKBONE_FILE, expected), strict=True)
    head_expected = dict(model.classifier.state_dict())
    # Checkpoints before the run state had its own files kept the unaligned heads under `unaligned.`.
    head_expected.update({f"unaligned.{k}": v for k, v in list(head_expected.items())})
    head = read_safetensors(root / CLASSIFIER_FILE, head_expected)
    model.classifier.restore({k: v for k, v in head.items() if not k.startswith("unaligned.")})
    model._legacy_unaligned = {k.removeprefix("unaligned."): v for k, v in head.items() if k.startswith("unaligned.")}
    return model, root


def load_learner_state(
    directory: str | Path, model: SLCAModel
) -> tuple[ClassStatistics | None, dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """The learner's run state `save_learner_state` wrote beside `model`'s files (each part None
    when absent)."""
    root = Path(directory)
    statistics = ClassStatistics.load(root, model.feature_dim) if (root / STATISTICS_FILE).is_file() else None
    state = validate_state(_read_json(root / STATE_FILE), str(root / STATE_FILE)) if (root / STATE_FILE).is_file() \
        else None
    unaligned = getattr(model, "_legacy_unaligned", None) or None
    if (root / UNALIGNED_FILE).is_file():
        expected = dict(model.classifier.state_dict())
        unaligned = read_safetensors(root / UNALIGNED_FILE, expected)
    return statistics, state, unaligned


def load_checkpoint(
    path_or_repo_id: str | Path,
    revision: str | None = None,
    expected_base: str | Sequence[str | None] | None = None,
) -> tuple[SLCAModel, ClassStatistics | None, dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """Rebuild model, statistics, task history and unaligned head from a checkpoint.

    `expected_base` (a Hub id or path, or several names of the same weights, e.g. a local copy and
    its Hub id) refuses a checkpoint that was trained on another backbone.
    """
    model, root = load_model_files(path_or_repo_id, revision, expected_base)
    statistics, state, unaligned = load_learner_state(root, model)
    if state and state.get("label_names") and not model.label_names:
        model.label_names = state["label_names"]
    return model, statistics, state, unaligned
