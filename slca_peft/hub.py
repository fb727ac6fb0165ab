"""Model cards and Hub uploads for continual checkpoints."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import CONFIG_FILE, STATE_FILE

ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's, which also names the base model


def _accuracy_table(state: dict[str, Any]) -> str:
    matrix = state.get("accuracy_matrix") or []
    if not matrix:
        return "_No task has been evaluated yet._"
    n = len(matrix)
    head = "| after task | " + " | ".join(f"T{j + 1}" for j in range(n)) + " | all seen |"
    rule = "|---" * (n + 2) + "|"
    seen = state.get("seen_accuracy") or [float("nan")] * n
    rows = [
        f"| {t + 1} | " + " | ".join(f"{a:.1f}" for a in row) + " |" * (n - len(row)) + f" | {seen[t]:.1f} |"
        for t, row in enumerate(matrix)
    ]
    return "\n".join([head, rule, *rows])


def write_model_card(directory: str | Path, settings: dict[str, Any], state: dict[str, Any] | None) -> Path:
    """README.md with Hub metadata, the accuracy matrix and a usage snippet."""
    state = state or {}
    base = settings.get("base_model_name_or_path")
    metadata: dict[str, Any] = {
        "library_name": "slca-peft",
        "tags": ["continual-learning", "slca", "lora", "image-classification"],
        "pipeline_tag": "image-classification",
    }
    if base:
        metadata["base_model"] = str(base)
    learned = state.get("tasks_learned", len(settings.get("task_sizes", [])))
    total = len(state.get("task_sizes", [])) or learned
    card = f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# SLCA++ continual checkpoint

A `{base}` backbone trained with slca-peft (method `{state.get('method', 'slca++')}`) on {learned} of
{total} tasks ({sum(settings.get('task_sizes', []))} classes so far, class order seed {state.get('seed')}).

## Accuracy (%) on each task's test classes after learning each task

{_accuracy_table(state)}

## Usage

```python
from slca_peft import SLCAModel

model = SLCAModel.from_pretrained("<this repo or directory>")
logits = model(pixel_values).logits      # over all classes seen so far
model.export("exported")                 # plain transformers checkpoint for pipeline()
```

Continue with the next task: `python recipes/train_seq.py --resume_from <this repo> ...`.
"""
    path = Path(directory) / "README.md"
    path.write_text(card)
    return path


def is_local_path(name: str) -> bool:
    """A base model name that only this machine can resolve (a directory, not a Hub id)."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or Path(name).exists()


def local_base_problem(base: str | None, use_lora: bool, base_model_id: str | None) -> str | None:
    """Why an upload of a checkpoint on `base` could not be loaded elsewhere, or None if it can."""
    if base_model_id is not None or not use_lora or not base or not is_local_path(str(base)):
        return None
    return (
        f"its base model is the local path {base!r}, which nobody who downloads the repo can load. "
        "Upload the base model first (e.g. ViTModel.from_pretrained(path).push_to_hub('me/base')) and pass its "
        "Hub id as base_model_id (`slca-peft push ... --base_model_id me/base`, or `--hub_base_model_id` when "
        "training with --push_to_hub)."
    )


def _rebase(directory: Path, base_model_id: str) -> None:
    """Make a checkpoint copy name `base_model_id` as its base model, in every file that records it."""
    settings: dict[str, Any] = {}
    for name in (CONFIG_FILE, ADAPTER_CONFIG_FILE):
        path = directory / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["base_model_name_or_path"] = base_model_id
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            settings = data if name == CONFIG_FILE else settings
    state_path = directory / STATE_FILE
    write_model_card(directory, settings, json.loads(state_path.read_text()) if state_path.is_file() else None)


def push_to_hub(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload SLCA++ continual checkpoint",
    token: str | None = None,
    revision: str | None = None,
    base_model_id: str | None = None,
) -> Any:
    """Create the repo if needed and upload a checkpoint directory as one commit.

    A LoRA checkpoint refers to its base model by name; one built on a local directory would load
    nowhere else, so it is refused unless `base_model_id` names the same weights on the Hub (the
    uploaded copy then records that id; the local directory is left as it is).
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    settings = json.loads(config_path.read_text()) if config_path.is_file() else {}
    base = settings.get("base_model_name_or_path")
    problem = local_base_problem(base, settings.get("use_lora", False), base_model_id)
    if problem:
        raise ValueError(f"{directory}: {problem}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = directory
        if base_model_id is not None:
            folder = Path(tmp) / directory.name
            shutil.copytree(directory, folder)
            _rebase(folder, base_model_id)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            revision=revision,
            repo_type="model",
        )
