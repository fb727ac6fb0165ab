"""Model cards and Hub uploads for continual checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


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


def push_to_hub(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload SLCA++ continual checkpoint",
    token: str | None = None,
    revision: str | None = None,
) -> Any:
    """Create the repo if needed and upload a checkpoint directory as one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        commit_message=commit_message,
        revision=revision,
        repo_type="model",
    )
