"""Model cards and Hub uploads for slca-peft model folders and continual checkpoints."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .base_model import is_local_name
from .checkpoint import CONFIG_FILE, STATE_FILE

ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's, which also names the base model
_REPO_PLACEHOLDER = "<this repo or directory>"
CARD_TAGS = ["continual-learning", "slca", "lora", "image-classification"]

_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A `{{ base_model }}` backbone trained with slca-peft (method `{{ method }}`) on
{{ learned }} of {{ total }} tasks ({{ num_classes }} classes so far).

## Accuracy (%) on each task's test classes after learning each task

{{ accuracy_table }}

{{ metrics_line }}

## Classes

{{ classes }}

## Usage

With slca-peft (continue training, inspect the per-task heads):

```python
from slca_peft import SLCAModel

model = SLCAModel.from_pretrained("{{ repo }}")
logits = model(pixel_values).logits      # over all classes seen so far
model.export("exported")                 # plain transformers checkpoint for pipeline()
```

Without slca-peft, the backbone's adapted features with PEFT (the classifier needs slca-peft or an
export):

```python
from peft import PeftModel
from transformers import AutoModel

backbone = PeftModel.from_pretrained(AutoModel.from_pretrained("{{ base_model }}"), "{{ repo }}")
```

Continue with the next task: `slca-peft train --resume_from {{ repo }} ...`.
"""


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


def card_metrics(state: dict[str, Any]) -> dict[str, float]:
    """Last-Acc, Inc-Acc and forgetting of a task history, computed as metrics.json's are."""
    matrix = state.get("accuracy_matrix") or []
    if not matrix:
        return {}
    from .metrics import summarize_accuracy_matrix

    summary = summarize_accuracy_matrix(matrix, state.get("task_test_sizes") or None)
    return {
        "last_accuracy": float(summary["last_accuracy"]),
        "average_incremental_accuracy": float(summary["average_incremental_accuracy"]),
        "average_forgetting": float(summary["average_forgetting"]),
    }


_METRIC_NAMES = {
    "last_accuracy": ("accuracy", "Last-Acc"),
    "average_incremental_accuracy": ("accuracy", "Inc-Acc"),
    "average_forgetting": ("forgetting", "Forgetting"),
}


def build_model_card(
    settings: dict[str, Any],
    state: dict[str, Any] | None = None,
    *,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    model_name: str | None = None,
    repo: str = _REPO_PLACEHOLDER,
):
    """A `huggingface_hub.ModelCard`: metadata (base model, datasets, license, class names,
    `model-index` results equal to the run's metrics) and a usage snippet."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    state = state or {}
    base = settings.get("base_model_name_or_path")
    label_names = settings.get("label_names") or state.get("label_names")
    num_classes = sum(settings.get("task_sizes") or [])
    dataset = (datasets or [None])[0] or state.get("dataset")
    model_name = model_name or "SLCA++ continual checkpoint"
    metrics = card_metrics(state)
    eval_results = [
        EvalResult(
            task_type="image-classification", task_name="Class-incremental image classification",
            dataset_type=dataset or "custom", dataset_name=dataset or "custom",
            metric_type=metric_type, metric_name=metric_name, metric_value=round(metrics[key], 4),
        )
        for key, (metric_type, metric_name) in _METRIC_NAMES.items() if key in metrics
    ]
    data = ModelCardData(
        library_name="slca-peft",
        pipeline_tag="image-classification",
        tags=list(dict.fromkeys([*CARD_TAGS, *(tags or [])])),
        license=license or "other",
        base_model=None if base is None or is_local_name(str(base)) else str(base),
        datasets=list(datasets) if datasets else ([dataset] if dataset else None),
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        label_names=list(label_names[:num_classes]) if label_names else None,
    )
    learned = state.get("tasks_learned", len(settings.get("task_sizes") or []))
    metrics_line = ""
    if metrics:
        metrics_line = (f"Last-Acc {metrics['last_accuracy']:.2f}, "
                        f"Inc-Acc {metrics['average_incremental_accuracy']:.2f}, "
                        f"average forgetting {metrics['average_forgetting']:.2f}.")
    classes = ", ".join(label_names[:num_classes]) if label_names else "_Not named (class indices only)._"
    return ModelCard.from_template(
        data, template_str=_CARD_TEMPLATE, model_name=model_name, base_model=base, method=state.get("method", "slca++"),
        learned=learned, total=len(state.get("task_sizes") or []) or learned, num_classes=num_classes,
        accuracy_table=_accuracy_table(state), metrics_line=metrics_line, classes=classes, repo=repo,
    )


def write_model_card(directory: str | Path, settings: dict[str, Any], state: dict[str, Any] | None,
                     **card: Any) -> Path:
    """README.md of a model folder."""
    path = Path(directory) / "README.md"
    build_model_card(settings, state, **card).save(path)
    return path


def is_local_path(name: str) -> bool:
    """A base model name that only this machine can resolve (a directory, not a Hub id)."""
    return is_local_name(name)


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


def _prepare_upload(directory: Path, repo_id: str, base_model_id: str | None, tags: list[str] | None) -> None:
    """Make an upload copy name `base_model_id` as its base model in every file that records it, and
    its card point at the repo."""
    settings: dict[str, Any] = {}
    local_base = None
    for name in (CONFIG_FILE, ADAPTER_CONFIG_FILE):
        path = directory / name
        if path.is_file():
            data = json.loads(path.read_text())
            if base_model_id is not None:
                local_base = local_base or data.get("base_model_name_or_path")
                data["base_model_name_or_path"] = base_model_id
                path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            settings = data if name == CONFIG_FILE else settings
    card_path = directory / "README.md"
    if not card_path.is_file():
        state_path = directory / STATE_FILE
        write_model_card(directory, settings, json.loads(state_path.read_text()) if state_path.is_file() else None)
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path)
    if base_model_id is not None:
        card.data.base_model = base_model_id
        if local_base:
            card.text = card.text.replace(str(local_base), base_model_id)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *(tags or [])]))
    card.text = card.text.replace(_REPO_PLACEHOLDER, repo_id)
    card.save(card_path)


def push_to_hub(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload SLCA++ continual checkpoint",
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    base_model_id: str | None = None,
) -> Any:
    """Create the repo (and the `revision` branch) if needed and upload a model folder or checkpoint
    as one commit, or as one pull request with `create_pr`.

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
        folder = Path(tmp) / directory.name
        shutil.copytree(directory, folder)
        _prepare_upload(folder, repo_id, base_model_id, tags)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            # upload_folder refuses a branch that does not exist yet (a pull request targets it too).
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
