"""Continual checkpoints: one directory (and Hub repo) per model state, safetensors + JSON only.

Layout:
  slca_config.json              model settings and the referenced base model
  adapter_config.json,
  adapter_model.safetensors     PEFT adapter: LoRA, biases, LayerNorms and the class token
                                (Hybrid-SL); `PeftModel.from_pretrained` loads it onto the base
  backbone.safetensors,
  backbone_config.json          the whole backbone, for full fine-tuning
  classifier.safetensors        aligned heads + scales, and the unaligned ones under `unaligned.`
  class_statistics.safetensors  per-class Gaussians
  continual_state.json          task history: class order, task sizes, names, accuracy matrix
  README.md                     model card

Only these files are ever read; pickle-based files are refused.
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

from .statistics import STATISTICS_FILE, ClassStatistics

if TYPE_CHECKING:
    from .model import SLCAModel

CONFIG_FILE = "slca_config.json"
STATE_FILE = "continual_state.json"
CLASSIFIER_FILE = "classifier.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_CONFIG_FILE = "backbone_config.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory and move it to `path` only if the block succeeds, so a
    checkpoint directory is either complete or absent (an older one is replaced at the end)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a writer that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
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
    peft_model = model.backbone
    saved = set(adapter_state)
    extras = {}
    for name, param in peft_model.named_parameters():
        if not param.requires_grad or "lora_" in name or "modules_to_save" in name:
            continue
        short = name.removeprefix("base_model.model.")
        if short not in saved and name not in saved:
            extras[short] = param.detach().cpu().contiguous()
    return extras


def save_checkpoint(
    model: SLCAModel,
    directory: str | Path,
    *,
    statistics: ClassStatistics | None = None,
    state: dict[str, Any] | None = None,
    unaligned_head: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write everything needed to continue or serve `model`, atomically."""
    settings = model.settings()
    if model.use_lora and not settings["base_model_name_or_path"]:
        raise ValueError(
            "this model's backbone was built from a config and has no saved base weights to reference; "
            "save the backbone first (backbone.save_pretrained(path)) and build the model from that path."
        )
    with atomic_directory(directory) as tmp:
        _write_json(tmp / CONFIG_FILE, {"format_version": FORMAT_VERSION, **settings})
        if model.use_lora:
            model.backbone.save_pretrained(str(tmp))
            adapter_state = get_peft_model_state_dict(model.backbone)
            extras = _backbone_extras(model, adapter_state)
            if extras:
                # PEFT loads any key of the adapter file that names a model tensor, so the class token
                # rides along and `PeftModel.from_pretrained` restores the whole trained backbone.
                merged = load_file(str(tmp / ADAPTER_FILE))
                merged.update({f"base_model.model.{k}": v for k, v in extras.items()})
                save_file(merged, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        else:
            backbone = model.base_backbone
            save_file({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()},
                      str(tmp / BACKBONE_FILE))
            _write_json(tmp / BACKBONE_CONFIG_FILE, backbone.config.to_dict())
        head = {k: v.detach().cpu().contiguous() for k, v in model.classifier.state_dict().items()}
        if unaligned_head is not None:
            head.update({f"unaligned.{k}": v.detach().cpu().contiguous() for k, v in unaligned_head.items()})
        save_file(head, str(tmp / CLASSIFIER_FILE))
        if statistics is not None:
            statistics.save(tmp)
        if state is not None:
            _write_json(tmp / STATE_FILE, state)
        from .hub import write_model_card

        write_model_card(tmp, settings, state)
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

    return Path(snapshot_download(repo_id=str(path_or_repo_id), revision=revision))


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


def load_checkpoint(
    path_or_repo_id: str | Path,
    revision: str | None = None,
    expected_base: str | Sequence[str | None] | None = None,
) -> tuple[SLCAModel, ClassStatistics | None, dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """Rebuild model, statistics, task history and unaligned head from a checkpoint.

    `expected_base` (a Hub id or path, or several names of the same weights, e.g. a local copy and
    its Hub id) refuses a checkpoint that was trained on another backbone.
    """
    from .model import SLCAModel

    root = resolve_checkpoint(path_or_repo_id, revision)
    _check_no_pickle(root)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; {root} is not an slca-peft checkpoint.")
    try:
        settings = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); the file is damaged.") from err
    required = {"use_lora", "lora_rank", "lora_scale", "lora_target_modules", "task_sizes", "feature_dim"}
    missing_fields = sorted(required - set(settings))
    if missing_fields:
        raise ValueError(f"{config_path} lacks the field(s) {missing_fields}.")
    base = settings.get("base_model_name_or_path")
    accepted = [expected_base] if isinstance(expected_base, (str, Path)) else list(expected_base or [])
    accepted = [str(name) for name in accepted if name]
    if accepted and base is not None and str(base) not in accepted:
        raise ValueError(
            f"{config_path}: base_model_name_or_path is {base!r} but this run uses {' / '.join(accepted)!r}; "
            "resume with the base model the checkpoint was trained on."
        )
    if settings["use_lora"]:
        backbone = AutoModel.from_pretrained(base, revision=settings.get("revision"))
    else:
        config_dict = json.loads((root / BACKBONE_CONFIG_FILE).read_text())
        model_type = config_dict.pop("model_type")
        backbone = AutoModel.from_config(AutoConfig.for_model(model_type, **config_dict))
    model = SLCAModel(
        backbone,
        use_lora=settings["use_lora"],
        lora_rank=settings["lora_rank"],
        lora_scale=settings["lora_scale"],
        lora_target_modules=settings["lora_target_modules"],
        lora_svd_init=False,
        lora_layout=settings.get("lora_layout", "per_projection"),
        reset_final_norm=settings.get("reset_final_norm", False),
        final_norm_eps=settings.get("final_norm_eps", 1e-5),
        base_model_name_or_path=base,
        revision=settings.get("revision"),
        task_sizes=settings["task_sizes"],
    )
    if model.feature_dim != settings["feature_dim"]:
        raise ValueError(
            f"{config_path}: feature_dim {settings['feature_dim']} but the base model {base!r} gives "
            f"{model.feature_dim}; the checkpoint belongs to a different base model."
        )
    if model.use_lora:
        # PEFT stores adapter tensors without the adapter name ("lora_A.weight") and the trained copy
        # of a `modules_to_save` module under the module's own name.
        expected = {}
        for key, value in model.base_backbone.state_dict().items():
            for variant in (key, key.replace(".default.", "."), key.replace(".modules_to_save.default.", ".")):
                expected[f"base_model.model.{variant}"] = value
        set_peft_model_state_dict(model.backbone, read_safetensors(root / ADAPTER_FILE, expected))
    else:
        expected = dict(model.base_backbone.state_dict())
        model.base_backbone.load_state_dict(read_safetensors(root / BACKBONE_FILE, expected), strict=True)
    head_expected = dict(model.classifier.state_dict())
    head_expected.update({f"unaligned.{k}": v for k, v in list(head_expected.items())})
    head = read_safetensors(root / CLASSIFIER_FILE, head_expected)
    aligned = {k: v for k, v in head.items() if not k.startswith("unaligned.")}
    unaligned = {k.removeprefix("unaligned."): v for k, v in head.items() if k.startswith("unaligned.")}
    model.classifier.restore(aligned)
    statistics = ClassStatistics.load(root, model.feature_dim) if (root / STATISTICS_FILE).is_file() else None
    state = json.loads((root / STATE_FILE).read_text()) if (root / STATE_FILE).is_file() else None
    return model, statistics, state, unaligned or None
