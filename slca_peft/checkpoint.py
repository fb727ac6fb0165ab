"""Continual checkpoints: one directory (and Hub repo) per model state, safetensors + JSON only.

Layout:
  slca_config.json              model settings and the referenced base model
  adapter_config.json,
  adapter_model.safetensors     PEFT adapter: LoRA, biases, LayerNorms (Hybrid-SL)
  backbone_extras.safetensors   trainable backbone tensors PEFT does not save (the class token)
  backbone.safetensors,
  backbone_config.json          the whole backbone, for full fine-tuning
  classifier.safetensors        aligned heads + scales, and the unaligned ones under `unaligned.`
  class_statistics.safetensors  per-class Gaussians
  continual_state.json          task history: class order, task sizes, names, accuracy matrix
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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
EXTRAS_FILE = "backbone_extras.safetensors"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_CONFIG_FILE = "backbone_config.json"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory and move it to `path` only if the block succeeds, so a
    checkpoint directory is either complete or absent (an older one is replaced at the end)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
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
                save_file(extras, str(tmp / EXTRAS_FILE))
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
    return Path(directory)


def resolve_checkpoint(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local directory as is, otherwise a Hub repo id fetched (or read from the local cache)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(path_or_repo_id), revision=revision))


def load_checkpoint(
    path_or_repo_id: str | Path, revision: str | None = None
) -> tuple[SLCAModel, ClassStatistics | None, dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """Rebuild model, statistics, task history and unaligned head from a checkpoint."""
    from .model import SLCAModel

    root = resolve_checkpoint(path_or_repo_id, revision)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; {root} is not an slca-peft checkpoint.")
    settings = json.loads(config_path.read_text())
    if settings.get("use_lora"):
        base = settings.get("base_model_name_or_path")
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
        base_model_name_or_path=settings.get("base_model_name_or_path"),
        revision=settings.get("revision"),
        task_sizes=settings["task_sizes"],
    )
    if model.use_lora:
        result = set_peft_model_state_dict(model.backbone, load_file(str(root / ADAPTER_FILE)))
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"{root / ADAPTER_FILE} has keys this model lacks: {missing[:5]}.")
        if (root / EXTRAS_FILE).is_file():
            model.base_backbone.load_state_dict(load_file(str(root / EXTRAS_FILE)), strict=False)
    else:
        model.base_backbone.load_state_dict(load_file(str(root / BACKBONE_FILE)), strict=True)
    head = load_file(str(root / CLASSIFIER_FILE))
    aligned = {k: v for k, v in head.items() if not k.startswith("unaligned.")}
    unaligned = {k.removeprefix("unaligned."): v for k, v in head.items() if k.startswith("unaligned.")}
    model.classifier.restore(aligned)
    statistics = ClassStatistics.load(root, model.feature_dim) if (root / STATISTICS_FILE).is_file() else None
    state = json.loads((root / STATE_FILE).read_text()) if (root / STATE_FILE).is_file() else None
    return model, statistics, state, unaligned or None
