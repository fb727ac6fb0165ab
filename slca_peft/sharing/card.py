"""Model cards of slca-peft model folders and continual checkpoints (`huggingface_hub.ModelCard`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..artifacts.class_names import names_at
from ..artifacts.layout import CARD_FILE
from ..metrics import coverage_note, format_accuracy_table, summarize_accuracy_matrix
from .public import IMAGE_FOLDERS, base_display, is_local_name, names_by_class_id, public_name, public_state

#: Where the card names its own repo until an upload knows it (`slca_peft.sharing.hub.push_folder` fills it in).
REPO_PLACEHOLDER = "<this repo or directory>"
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

## Tasks

{{ task_history }}

## Classes (class id: name)

{{ classes }}

{{ id_statement }}

## Usage

Its classifier is slca-peft's per-task heads. With slca-peft imported, transformers' Auto classes and
`pipeline()` load it as the trained model, from its folder or from its Hub id once pushed (its
`config.json` has slca-peft's model type, registered on import):

```python
import slca_peft  # registers model type slca_peft with AutoModelForImageClassification
from transformers import pipeline

classify = pipeline("image-classification", model="{{ repo }}")  # a Hub id or a local folder
```

Without slca-peft, transformers refuses the model type. For a plain transformers model, export it
(adapter merged, heads folded, output k = class id k):

```bash
slca-peft export {{ repo }} exported/        # or export_model(model, "exported/") in Python
slca-peft push exported/ <your repo>          # upload the export, with its own model card
```

With slca-peft (continue training, inspect the per-task heads):

```python
from slca_peft import SLCAModel, export_model

model = SLCAModel.from_pretrained("{{ repo }}")  # in eval mode
logits = model(pixel_values).logits      # output k = class id k, named model.config.id2label[k]
export_model(model, "exported")          # plain transformers checkpoint for pipeline()
```

{{ peft_usage }}

{{ continuation }}
"""

#: Where the card's PEFT snippet names a base model that is a local copy (a path only its machine knows).
LOCAL_BASE_PLACEHOLDER = "path/to/base-model"

_PEFT_USAGE = """Without slca-peft, the backbone's adapted features with PEFT (the classifier needs slca-peft or an
export){local_note}:

```python
from peft import PeftModel
from transformers import {base_class}

base = {base_class}.from_pretrained("{base}"{base_kwargs})
backbone = PeftModel.from_pretrained(base, "{repo}").eval()
features = backbone(pixel_values=pixel_values).{feature}  # SLCA's feature
```"""

_FULL_BACKBONE = """The backbone is fully fine-tuned (no adapter): its features need slca-peft
(`SLCAModel.from_pretrained(...).features(pixel_values)`) or an export."""


def local_base_note(display: str) -> str:
    """The sentence the PEFT snippet gets when its base model is a local copy (`slca_peft.sharing.hub.push_folder`
    removes it when the upload names the base model's Hub id)."""
    return f". The base model is `{display}`: replace `{LOCAL_BASE_PLACEHOLDER}` with its path (or its Hub id)"


def peft_usage(settings: dict[str, Any], backbone: dict[str, Any] | None, repo: str) -> str:
    """The card's plain-PEFT snippet: the base model loaded as slca-peft loads it (`backbone`: its `class`, e.g.
    a CLIP checkpoint's vision tower, and `kwargs`, e.g. ViT's `add_pooling_layer=False`), the adapter on it,
    and SLCA's feature read from its output. It runs as written for a Hub base; a local base is a placeholder
    that says so."""
    if not settings.get("use_lora", True):
        return _FULL_BACKBONE
    backbone = backbone or {}
    base = settings.get("base_model_name_or_path")
    local = base is None or is_local_name(str(base))
    feature = "pooler_output" if settings.get("feature_source") == "pooler" else "last_hidden_state[:, 0]"
    kwargs = "".join(f", {k}={v!r}" for k, v in (backbone.get("kwargs") or {}).items())
    return _PEFT_USAGE.format(local_note=local_base_note(base_display(base)) if local else "",
                              base_class=backbone.get("class") or "AutoModel", base_kwargs=kwargs,
                              base=LOCAL_BASE_PLACEHOLDER if local else base, repo=repo, feature=feature)


_CONTINUABLE = """Finish the stream it was cut from: `slca-peft train --resume_from {repo} ...` (same data and split).
Teach it new classes from new data: `slca-peft train --continue_from {repo} --train_dir new/train
--test_dir new/test ...` (old classes keep their ids; see docs/hub.md, "Continue learning later")."""

_MODEL_ONLY = """These are the model files only, without the task history and class statistics a continual checkpoint
keeps beside them: `--resume_from` / `--continue_from` cannot go on from here (a run's `task_<t>` folders,
or `save_checkpoint`, hold all of it)."""


def id_statement(state: dict[str, Any]) -> str:
    """Whose label ids the outputs are, and how to score other data: output k is class id k of the task
    history, the first data's own label ids; a continuation on other data gave its new classes the next
    free ids, so such data is scored by class name through `label2id`."""
    segments = [s for s in state.get("segments") or [] if isinstance(s, dict)]
    first = (segments[0].get("data") if segments else None) or (state.get("task_data") or [None])[0] \
        or state.get("dataset")
    first = public_name(first)
    named = f"`{first}`" if first else "the training dataset"
    if first and first.startswith(IMAGE_FOLDERS):  # "image folders train, test": the folders' names
        named = f"the image-folder dataset `{first[len(IMAGE_FOLDERS):]}`"
    text = (f"Output k is the class {named} labels k (its class id), so `(logits.argmax(-1) == batch[\"label\"])` "
            f"on {named} scores what the run reported, and `config.id2label[k]` names output k.")
    later = list(dict.fromkeys(public_name(s.get("data")) or "other data" for s in segments[1:]))
    if later:
        text += (
            f"\n\nThe classes learned later, from {', '.join(f'`{d}`' for d in later)} (continued), took the next "
            f"free class ids after {named}'s: they are not that data's own label ids. Score such data by class "
            "name, through `label2id`:\n\n```python\nnames = dataset.features[\"label\"].int2str(batch[\"label\"])"
            "  # the data's own class names\ntarget = torch.tensor([model.config.label2id[n] for n in names])\n"
            "accuracy = (logits.argmax(-1) == target).float().mean()\n```"
        )
    return text


def _accuracy_table(state: dict[str, Any]) -> str:
    matrix = state.get("accuracy_matrix") or []
    if not matrix:
        return "_No task has been evaluated yet._"
    seen = state.get("seen_accuracy") or [float("nan")] * len(matrix)
    return format_accuracy_table(matrix, seen, markdown=True)


def card_metrics(state: dict[str, Any]) -> dict[str, Any]:
    """Last-Acc, Inc-Acc and forgetting of a task history, computed as metrics.json's are, and which of
    them are `partial`: computed over the measured entries only, because a task had no test data (a
    continuation whose old tasks' test data was not at hand). Last-Acc is whole when the last row is;
    Inc-Acc and forgetting read every row."""
    matrix = state.get("accuracy_matrix") or []
    if not matrix or all(v is None for v in matrix[-1]):  # nothing scored after the last task (no evaluation)
        return {}
    summary = summarize_accuracy_matrix(matrix, state.get("task_test_sizes") or None)
    last_whole = all(v is not None for v in matrix[-1])
    whole = not summary["missing_entries"]
    return {
        "last_accuracy": float(summary["last_accuracy"]),
        "average_incremental_accuracy": float(summary["average_incremental_accuracy"]),
        "average_forgetting": float(summary["average_forgetting"]),
        "missing_entries": int(summary["missing_entries"]),
        "partial": [key for key, ok in (("last_accuracy", last_whole), ("average_incremental_accuracy", whole),
                                        ("average_forgetting", whole)) if not ok],
    }


def _task_history(state: dict[str, Any], label_names: list[str] | None, class_ids: list[int]) -> str:
    """One row per learned task: its classes (`label_names` in class-id order, `class_ids` the id learned
    at each position) and the data it was learned from (grows with every continuation on new data)."""
    learned = int(state.get("tasks_learned", len(state.get("accuracy_matrix") or [])))
    sizes = list(state.get("task_sizes") or [])[:learned]
    if not sizes:
        return "_No task has been learned yet._"
    data = list(state.get("task_data") or [state.get("dataset")] * learned)
    lines = ["| task | classes | data |", "|---|---|---|"]
    start = 0
    for t, size in enumerate(sizes):
        ids = class_ids[start : start + size]
        names = names_at(label_names, ids) if label_names and len(ids) == size else None
        shown = ", ".join(names[:8]) + (f" (+{size - 8})" if size > 8 else "") if names else f"{size} classes"
        source = data[t] if t < len(data) and data[t] else "not recorded"
        lines.append(f"| {t + 1} | {shown} | {source} |")
        start += size
    return "\n".join(lines)


_METRIC_NAMES = {
    "last_accuracy": ("accuracy", "Last-Acc"),
    "average_incremental_accuracy": ("accuracy", "Inc-Acc"),
    "average_forgetting": ("forgetting", "Forgetting"),
}


#: `datasets` loaders that read local files: a name a card may be given for data, but no Hub dataset.
_LOCAL_LOADERS = frozenset({"imagefolder", "audiofolder", "videofolder", "csv", "json", "parquet", "arrow", "text",
                            "webdataset", "custom"})


def is_hub_dataset(name: Any) -> bool:
    """Whether `name` can be a Hub dataset id (`owner/name`, or a canonical `name`): not a path of this
    machine, not a local loader (`imagefolder`), not a recorded image-folder source."""
    return (isinstance(name, str) and bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name))
            and name.lower() not in _LOCAL_LOADERS and not is_local_name(name))


def _whole_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics measured over every class the model knows (never a partial one), by their card names."""
    return {metric_name: round(metrics[key], 4) for key, (_, metric_name) in _METRIC_NAMES.items()
            if key in metrics and key not in metrics["partial"]}


def _eval_results(metrics: dict[str, Any], dataset: str) -> list:
    """`model-index` entries of the whole metrics, on the Hub dataset `dataset`."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="image-classification", task_name="Class-incremental image classification",
            dataset_type=dataset, dataset_name=dataset,
            metric_type=metric_type, metric_name=metric_name, metric_value=round(metrics[key], 4),
        )
        for key, (metric_type, metric_name) in _METRIC_NAMES.items()
        if key in metrics and key not in metrics["partial"]
    ]


def _task_span(first: int, count: int) -> str:
    return f"task {first + 1}" if count == 1 else f"tasks {first + 1}-{first + count}"


def results_over(state: dict[str, Any]) -> str:
    """What a history's figures were measured on, in a few words: each part's test data (image folders by
    their names; a run that recorded no data name, e.g. `SLCATrainer`'s, on the evaluation data it was given),
    and, after a continuation, the old tasks on the old test data it was given (`--old_test_dir`)."""
    learned = int(state.get("tasks_learned", len(state.get("accuracy_matrix") or [])))
    segments = [s for s in state.get("segments") or [] if isinstance(s, dict)]
    if not segments:
        data = list(state.get("task_data") or [])
        segments = [{"first_task": 0, "tasks": learned,
                     "data": next((d for d in data if d), None) or state.get("dataset")}]

    def test_data(segment: dict[str, Any]) -> str:
        if isinstance(segment.get("test_data"), str):  # what the run scored on, as it recorded it
            return segment["test_data"]
        data = segment.get("data")
        return f"the test data of {data}" if data else "the evaluation data the run was given (no name recorded)"

    if len(segments) == 1:
        return test_data(segments[0])
    parts = [f"{_task_span(int(s.get('first_task', 0)), int(s.get('tasks', 1)))}: {test_data(s)}"
             for s in segments]
    matrix = state.get("accuracy_matrix") or []
    first_new = int(segments[1].get("first_task", 0))
    if any(v is not None for row in matrix[first_new:] for v in row[:first_new]):
        parts.append("the earlier tasks after a continuation: the old test data it was given (--old_test_dir)")
    return "; ".join(parts)


def local_results(metrics: dict[str, Any], state: dict[str, Any]) -> dict[str, Any] | None:
    """The card metadata of the whole metrics of a run on data with no Hub id (image folders, a local
    copy): `model-index` must name a Hub dataset, and a placeholder id would link to someone else's."""
    whole = _whole_metrics(metrics)
    if not whole:
        return None
    return {"over": results_over(state), **whole}


def partial_results(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The card metadata of the partial metrics (kept out of `model-index`), labelled as such."""
    if not metrics.get("partial"):
        return None
    return {
        "partial": True,
        "over": "the tasks with test data only (the others' test data was not at hand)",
        "missing_entries": metrics["missing_entries"],
        **{_METRIC_NAMES[key][1]: round(metrics[key], 4) for key in metrics["partial"]},
    }


def hub_datasets(state: dict[str, Any]) -> list[str]:
    """The Hub datasets a task history learned from, in task order (a continuation on other data adds
    its own), then the run's `dataset`: each task's data is named as recorded, so only `owner/name` ids
    count (image folders, local paths and bundled data are no Hub datasets)."""
    recorded = [d for d in state.get("task_data") or [] if is_hub_dataset(d) and "/" in d]
    if is_hub_dataset(state.get("dataset")):
        recorded.append(state["dataset"])
    return list(dict.fromkeys(recorded))


def _card_data(state: dict[str, Any], *, base: str | None, datasets: list[str] | None, license: str | None,
               tags: list[str], model_name: str, lora: bool = True, **fields: Any) -> tuple[Any, str]:
    """What a checkpoint's and an export's card share: the metadata (results as `model-index`, the
    datasets, license, tags and a base model others can load) and the text's metrics line."""
    from huggingface_hub import ModelCardData

    # The results are over every task, so they name the run's own dataset, not the first task's; data with no
    # Hub id (image folders, a local path, `imagefolder`) is named by no Hub id at all, in `datasets` or results.
    given = [d for d in datasets or [] if is_hub_dataset(d)]
    learned_from = set(hub_datasets({"task_data": state.get("task_data")}))
    if len(learned_from) != 1 or len(set(state.get("task_data") or [])) != 1:
        learned_from = set()  # only every task from one Hub dataset makes the results its own
    candidates = [*given, state.get("dataset"), *learned_from]
    dataset = next((d for d in candidates if is_hub_dataset(d)), None)
    datasets = given if datasets else hub_datasets(state)
    metrics = card_metrics(state)
    eval_results = _eval_results(metrics, dataset) if dataset else []
    partial = partial_results(metrics)
    local = None if dataset or not metrics else local_results(metrics, state)
    data = ModelCardData(
        tags=list(dict.fromkeys([*(t for t in CARD_TAGS if lora or t != "lora"), *tags])),  # lora: adapter files
        license=license or "other",
        base_model=None if base is None or is_local_name(str(base)) else str(base),
        datasets=datasets or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        **({"partial_results": partial} if partial else {}),
        **({"local_results": local} if local else {}),
        **fields,
    )
    metrics_line = ""
    if metrics:
        marks = {key: " (partial)" if key in metrics["partial"] else "" for key in _METRIC_NAMES}
        metrics_line = (f"Last-Acc {metrics['last_accuracy']:.2f}{marks['last_accuracy']}, "
                        f"Inc-Acc {metrics['average_incremental_accuracy']:.2f}"
                        f"{marks['average_incremental_accuracy']}, average forgetting "
                        f"{metrics['average_forgetting']:.2f}{marks['average_forgetting']}. "
                        f"{coverage_note(metrics)}").strip()
    return data, metrics_line


def build_model_card(
    settings: dict[str, Any],
    state: dict[str, Any] | None = None,
    *,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    model_name: str | None = None,
    repo: str = REPO_PLACEHOLDER,
    continuable: bool = True,
    card_data: dict[str, Any] | None = None,
    backbone: dict[str, Any] | None = None,
):
    """A `huggingface_hub.ModelCard`: metadata (base model, datasets, license, class names by class id,
    `model-index` results equal to the run's metrics, partial ones apart) and usage snippets.
    `continuable`: the folder also holds the run state `--resume_from` / `--continue_from` need.
    `card_data`: more metadata fields (e.g. `language`, as `Trainer.create_model_card` takes it).
    `backbone`: how plain transformers loads the base model as slca-peft does (`class`, `kwargs`:
    `slca_peft.models.saving.card_backbone`), for the PEFT snippet.
    The title is `model_name`, else what the folder is ("SLCA++ continual checkpoint", or "SLCA++ continual
    model" for the model files alone)."""
    from huggingface_hub import ModelCard

    state = public_state(state) or {}
    base = settings.get("base_model_name_or_path")
    label_names = settings.get("label_names") or state.get("label_names")
    num_classes = sum(settings.get("task_sizes") or [])
    ids = settings.get("class_ids") or list(range(num_classes))
    # The id learned at each position of the history: the model's (its learned classes), else the history's.
    history_ids = settings.get("class_ids") or state.get("class_ids") or state.get("class_order") or ids
    id2label = names_by_class_id(label_names, ids) if num_classes else {}
    model_name = model_name or ("SLCA++ continual checkpoint" if continuable else "SLCA++ continual model")
    # No pipeline_tag: pipeline() cannot serve the per-task heads (the export can, and its card says so).
    data, metrics_line = _card_data(
        state, base=base, datasets=datasets, license=license, tags=tags or [], model_name=model_name,
        lora=settings.get("use_lora", True), library_name="slca-peft",
        label_names=list(id2label.values()) if label_names else None,
        **{k: v for k, v in (card_data or {}).items() if v is not None},
    )
    learned = state.get("tasks_learned", len(settings.get("task_sizes") or []))
    classes = "\n".join(f"- {k}: {name}" for k, name in id2label.items()) or "_No class learned yet._"
    return ModelCard.from_template(
        data, template_str=_CARD_TEMPLATE, model_name=model_name, base_model=base_display(base),
        method=state.get("method", "slca++"), learned=learned, total=len(state.get("task_sizes") or []) or learned,
        num_classes=num_classes, accuracy_table=_accuracy_table(state), metrics_line=metrics_line, classes=classes,
        repo=repo, task_history=_task_history(state, label_names, history_ids), id_statement=id_statement(state),
        continuation=_CONTINUABLE.format(repo=repo) if continuable else _MODEL_ONLY,
        peft_usage=peft_usage(settings, backbone, repo),
    )


def write_model_card(directory: str | Path, settings: dict[str, Any], state: dict[str, Any] | None,
                     **card: Any) -> Path:
    """README.md of a model folder."""
    path = Path(directory) / CARD_FILE
    build_model_card(settings, state, **card).save(path)
    return path


_EXPORT_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A plain `{{ architecture }}` exported by slca-peft from the continual checkpoint `{{ source }}`
{{ provenance }}: the adapter is merged into the `{{ base_model }}` backbone and the per-task heads are
folded into one classifier. It needs only `transformers` (no slca-peft, no `trust_remote_code`).

{{ id_statement }}

## Usage

```python
from transformers import pipeline

classify = pipeline("image-classification", model="{{ repo }}")
classify("some_image.jpg", top_k=3)
```

## Accuracy (%) of the run on each task's test classes after learning each task

{{ accuracy_table }}

{{ metrics_line }}

## Classes (class id: name)

{{ classes }}
"""


def build_export_card(
    base_model: str | None,
    id2label: dict[int, str],
    state: dict[str, Any] | None = None,
    *,
    architecture: str = "AutoModelForImageClassification",
    source: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    model_name: str | None = None,
    repo: str = REPO_PLACEHOLDER,
):
    """The card of an export: a `pipeline("image-classification")` model, with the run's results and
    where it came from (which checkpoint, after which task). Its tags describe a plain transformers
    classifier (no `lora`: the adapter is merged); `export_model` names it after the export's folder."""
    from huggingface_hub import ModelCard

    state = public_state(state) or {}
    model_name = model_name or "SLCA++ continual model (exported)"
    data, metrics_line = _card_data(
        state, base=base_model, datasets=datasets, license=license, tags=["vision", "slca-peft", *(tags or [])],
        model_name=model_name, lora=False, library_name="transformers", pipeline_tag="image-classification",
        label_names=[id2label[k] for k in sorted(id2label)],
    )
    learned = state.get("tasks_learned")
    total = len(state.get("task_sizes") or []) or learned
    provenance = (f"after task {learned} of {total} (method `{state.get('method', 'slca++')}`)" if learned
                  else "(no task history recorded)")
    classes = "\n".join(f"- {k}: {id2label[k]}" for k in sorted(id2label))
    return ModelCard.from_template(
        data, template_str=_EXPORT_TEMPLATE, model_name=model_name, architecture=architecture,
        source=public_name(source, "checkpoint") or "(built in memory)", provenance=provenance,
        base_model=base_display(base_model), accuracy_table=_accuracy_table(state), metrics_line=metrics_line,
        classes=classes, repo=repo, id_statement=id_statement(state),
    )
