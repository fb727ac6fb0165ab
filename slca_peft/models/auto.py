"""transformers' Auto classes and `pipeline()` on an slca-peft model folder: the model the run trained, never a
random head.

A model folder (a trainer's `output_dir`, its `checkpoint-N`, a run's `task_N`) holds a PEFT adapter
(`adapter_config.json`) beside slca-peft's own files. Given such a folder, transformers 5's
`AutoModelForImageClassification.from_pretrained` and `pipeline()` load the base model that
`adapter_config.json` names, put the adapter on it and add a randomly initialised classification head:
a model that answers at chance, without a word. So every model folder also holds a `config.json` whose
`model_type` is slca-peft's own (`slca_peft`), which transformers then reads in place of the base model's:

- with `slca_peft` imported, that model type is registered with `AutoConfig` and
  `AutoModelForImageClassification` (as `SLCAModel`, whose `from_pretrained` drops the keywords only the Auto
  classes pass, `without_auto_keywords`): the Auto class
  and `pipeline("image-classification", model=DIR)` give the trained model (its heads in class-id order,
  `config.id2label` naming them);
- without it, transformers refuses the unknown model type `slca_peft` instead of guessing.

`slca-peft export` writes a folder that plain transformers loads with no slca-peft at all.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig

MODEL_TYPE = "slca_peft"
#: transformers' `from_pretrained` keywords that mean nothing to an slca-peft folder (the Auto classes and
#: `pipeline()` always pass them).
_AUTO_ONLY = ("_from_auto", "_from_pipeline", "adapter_kwargs", "code_revision", "_commit_hash")


class SLCAPeftConfig(PretrainedConfig):
    """The `config.json` of an slca-peft model folder: the model type the Auto classes dispatch on and the
    class names (`id2label`); the model's settings are in `slca_config.json`."""

    model_type = MODEL_TYPE


def without_auto_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` less what transformers' Auto classes and `pipeline()` pass to every `from_pretrained` and an
    slca-peft folder has no use for (`SLCAModel.from_pretrained` refuses unknown keywords)."""
    kwargs = dict(kwargs)
    for name in ("trust_remote_code", "subfolder", "proxies"):  # the Auto classes' defaults (False, "", None)
        if not kwargs.get(name):
            kwargs.pop(name, None)
    for name in ("dtype", "torch_dtype"):
        if kwargs.get(name) == "auto":
            kwargs.pop(name)
    if isinstance(kwargs.get("config"), SLCAPeftConfig):
        kwargs.pop("config")  # the folder's own config.json, read again from slca_config.json
    for name in _AUTO_ONLY:
        kwargs.pop(name, None)
    return kwargs


def auto_config_dict(id2label: dict[int, str]) -> dict[str, Any]:
    """The `config.json` of a model folder whose outputs `id2label` names."""
    config = SLCAPeftConfig(id2label=dict(id2label), label2id={name: k for k, name in id2label.items()})
    config.architectures = ["SLCAModel"]
    return config.to_dict()


def register_auto_classes(model_class: type) -> None:
    """`model_type` `slca_peft` for `AutoConfig`, and `model_class` (`SLCAModel`: its class name is what
    `pipeline()` checks the model against) for it in `AutoModelForImageClassification` (once)."""
    try:
        AutoConfig.register(MODEL_TYPE, SLCAPeftConfig)
    except ValueError:  # registered already
        return
    AutoModelForImageClassification.register(SLCAPeftConfig, model_class, exist_ok=True)
