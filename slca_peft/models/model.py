"""`SLCAModel`: a PEFT-wrapped image backbone plus a `ContinualClassifier`."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from ..sharing.hub import push_folder
from ..sharing.public import names_by_class_id
from ..utils.errors import MissingFileError, UserError
from ..utils.logging import progress_bars, shows_progress
from .adapters import adapt_backbone, adapter_prefix, parameter_role, peft_config_from_dict, peft_config_to_dict
from .backbones import (
    backbone_spec,
    check_pooled_feature,
    feature_dim,
    lora_targets_for,
    pooled_feature,
    reset_final_norm,
)
from .config import SLCAModelConfig, fit_class_ids, model_settings
from .head import ContinualClassifier, by_class_id
from .loading import (
    backbone_from_config,
    hub_kwargs,
    load_backbone,
    loading_kwargs,
    portable_name,
    split_loading_kwargs,
)

logger = logging.getLogger(__name__)


def _load_with_sdpa(load, *args: Any, **kwargs: Any) -> PreTrainedModel:
    """PyTorch's fused attention (SDPA) where the architecture supports it, else its default (an
    `attn_implementation` the caller chose wins)."""
    if "attn_implementation" in kwargs:
        return load(*args, **kwargs)
    try:
        return load(*args, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as error:
        logger.debug("SDPA attention unavailable (%s); loading with the default attention", error)
        return load(*args, **kwargs)


class SLCAModel(nn.Module):
    """Backbone (optionally adapter-wrapped) + per-task heads, returning HF outputs.

    Hybrid-SL (``use_lora=True``) trains LoRA (or a user's PEFT adapter) on the target linears plus
    every LayerNorm, every bias and the class token; full fine-tuning trains the whole backbone. Either
    way the head sees the pooled feature of `features()`. The settings are `slca_config`
    (`SLCAModelConfig`), what `slca_config.json` holds.
    """

    def __init__(self, backbone: PreTrainedModel, config: SLCAModelConfig | None = None, **overrides: Any):
        """`config` (or its fields as keywords, e.g. ``use_lora=False``) says how to wrap `backbone`."""
        super().__init__()
        if isinstance(backbone, PeftModel):
            raise UserError("pass the plain backbone; SLCAModel adds LoRA itself (use_lora=True).")
        values = config.to_dict() if config is not None else {}
        values.pop("format_version", None)
        values.update(overrides)
        #: Per-architecture facts (feature, LoRA targets, final norm, export route): `slca_peft.models.backbones`.
        self.backbone_spec = backbone_spec(backbone)
        values["lora_target_modules"] = lora_targets_for(backbone, values.get("lora_target_modules"))
        if isinstance(values.get("peft_config"), PeftConfig):
            values["peft_config"] = peft_config_to_dict(values["peft_config"])
        values["task_sizes"] = list(values.get("task_sizes") or [])
        config = SLCAModelConfig(**values)
        #: A user's PEFT config (LoRA, DoRA, LoHa, LoKr, IA3, ...) in place of the built-in LoRA settings.
        self.peft_config = peft_config_from_dict(config.peft_config) if config.peft_config else None
        if self.peft_config is not None and not config.use_lora:
            raise UserError("peft_config is the slow learner of slca++/sl; full fine-tuning (slca, seq_ft) "
                             "trains the whole backbone. Drop peft_config or use method slca++.")
        if self.backbone_spec.drop_pooler and getattr(backbone, "pooler", None) is not None:
            # ViT's pooler is an extra dense+tanh layer: SLCA's feature is the normed class token.
            backbone.pooler = None
        config.feature_source = self.backbone_spec.feature
        config.base_model_name_or_path = portable_name(
            config.base_model_name_or_path or getattr(backbone, "name_or_path", None) or None
        )
        width = feature_dim(backbone)
        if config.feature_dim is not None and config.feature_dim != width:
            raise UserError(
                f"the config's feature_dim is {config.feature_dim} but the base model "
                f"{config.base_model_name_or_path!r} "
                f"gives {width}; the checkpoint belongs to a different base model."
            )
        config.feature_dim = width
        self.slca_config = config
        check_pooled_feature(backbone, self.backbone_spec)
        if config.reset_final_norm:
            reset_final_norm(backbone, config.final_norm_eps)
        self.backbone = adapt_backbone(backbone, config, self.peft_config)
        self.classifier = ContinualClassifier(self.feature_dim, config.task_sizes or None)
        #: Where the model was loaded from (`from_pretrained`), as transformers' models record it.
        self.name_or_path: str | None = None
        #: The image processor that computes the run's evaluation transform: saved beside the model files
        #: (`preprocessor_config.json`) so `pipeline()` preprocesses as the run evaluated; loaded back with them.
        self.image_processor: Any | None = None

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature the heads read (what class statistics are sized by)."""
        return self.slca_config.feature_dim

    @property
    def label_names(self) -> list[str] | None:
        """Class names in class-id order (`label_names[k]` names class id k, output k of `forward`), when
        the training data named its classes: `label_names[logits.argmax(-1)]` names the prediction, and a
        dataset's `features["label"].names` may be set here as is (classes not learned yet included).
        The learning order is `class_ids` (position p of the head is class id `class_ids[p]`)."""
        return self.slca_config.label_names

    @label_names.setter
    def label_names(self, names: list[str] | None) -> None:
        self.slca_config.label_names = list(names) if names is not None else None
        self.slca_config.validate()

    @property
    def class_ids(self) -> list[int]:
        """Position -> class id of every output (the dataset's label ids; the identity for files written
        before class ids were recorded). Outputs grown since the ids were set take the next free ids."""
        ids = fit_class_ids(self.slca_config.class_ids, self.classifier.num_classes)
        return ids if ids is not None else list(range(self.classifier.num_classes))

    @class_ids.setter
    def class_ids(self, ids: list[int] | None) -> None:
        self.slca_config.task_sizes = list(self.classifier.task_sizes)
        self.slca_config.class_ids = [int(i) for i in ids] if ids is not None else None
        self.slca_config.validate()

    @property
    def num_outputs(self) -> int:
        """Width of `forward`'s logits: the largest class id + 1 (0 before any head)."""
        return max(self.class_ids, default=-1) + 1

    @property
    def id2label(self) -> dict[int, str]:
        """Output k -> the name of class id k, for every output `forward` gives (what `config.id2label`
        and an export's config hold): `label_names[k]`, or `class_<k>` where it names none (an id below the
        largest that is not learned yet has an output too; it never wins)."""
        return names_by_class_id(self.label_names, self.class_ids)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        model: str | PretrainedConfig | PreTrainedModel,
        args: Any | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> SLCAModel:
        """Build from a Hub id, a local directory, a config (random weights) or a loaded model.

        `args` (an `SLCAConfig`; a plain `TrainingArguments` is converted) supplies the model settings.
        Keywords override it: any `SLCAModelConfig` field and the `SLCAConfig` fields that shape the
        model (`method`, `released_code`, `lora_rank`, ...). Loading by name also takes transformers'
        loading keywords (`token`, `cache_dir`, `local_files_only`, `force_download`, `dtype`);
        `device_map` and quantization are refused, saying why.
        """
        loading, kwargs = split_loading_kwargs(kwargs, "SLCAModel.from_backbone")
        settings = model_settings(args, **kwargs)
        name = None
        if isinstance(model, (str, os.PathLike)):
            # A local directory is recorded as an absolute path, so checkpoints load from anywhere.
            name = portable_name(model)
            with progress_bars(args is None or shows_progress(args)):  # `disable_tqdm` reaches the loading bar
                backbone = _load_with_sdpa(load_backbone, str(model), revision=revision, **loading)
        elif isinstance(model, PretrainedConfig):
            extra = set(loading) - {"dtype", "attn_implementation"}
            if revision is not None or extra:
                raise UserError(f"SLCAModel.from_backbone: {sorted(extra) or ['revision']} apply when loading by "
                                 "name; a config builds random weights (only dtype applies).")
            backbone = _load_with_sdpa(backbone_from_config, model, **loading)
        elif isinstance(model, PreTrainedModel):
            if revision is not None or loading:
                raise UserError(f"SLCAModel.from_backbone: {sorted(loading) or ['revision']} apply when loading "
                                 "by name; the model passed is already loaded (convert it with model.to(dtype)).")
            backbone = model
        else:
            raise TypeError(f"model must be a Hub id, a path, a config or a PreTrainedModel, got {type(model)}.")
        # As keywords: None targets (the backbone's defaults) and a PeftConfig are resolved in __init__.
        return cls(backbone, base_model_name_or_path=name, revision=revision, **settings)

    @property
    def device(self) -> torch.device:
        """Where the parameters are (as `PreTrainedModel.device`)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's floating-point dtype (as `PreTrainedModel.dtype`): what the features come in."""
        return self.base_backbone.dtype

    # ------------------------------------------------------------------ forward
    @property
    def base_backbone(self) -> PreTrainedModel:
        return self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone

    @property
    def config(self) -> PretrainedConfig:
        """The backbone's config, its `id2label` / `label2id` (and so `num_labels`) naming the model's
        outputs, as `forward` orders them: `model.config.id2label[logits.argmax(-1)]` names the prediction."""
        config = self.base_backbone.config
        if self.classifier.num_tasks:
            id2label = self.id2label
            if getattr(config, "id2label", None) != id2label:
                config.id2label = id2label
                config.label2id = {name: i for i, name in id2label.items()}
        return config

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled image feature the backbone table names (ViT family: the class token after the
        final LayerNorm)."""
        return pooled_feature(self.backbone_spec, self.backbone(pixel_values=pixel_values))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, *,
                positions: bool = False) -> ImageClassifierOutput:
        """Logits over all classes seen so far in class-id order, as an export's: output k is the class
        the dataset labels k (`config.id2label[k]`); an id below the largest that is not learned yet gets
        the dtype's lowest value (never the argmax, no probability). `labels` are class ids and `loss` is
        cross-entropy over them (the trainer replaces it with the current-task loss while training).

        `positions=True` gives the heads' own order instead (output p is class `class_ids[p]`, each
        task's outputs contiguous), with `labels` as positions: the internal path of the task loss and
        the per-task evaluation, whose data carries the stream's labels (positions)."""
        logits = self.classifier(self.features(pixel_values))
        if not positions:
            logits = by_class_id(logits, self.class_ids, dim=1)
        loss = None
        if labels is not None:
            self._check_labels(labels, logits.shape[1], positions)
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def _check_labels(self, labels: torch.Tensor, width: int, positions: bool) -> None:
        if not labels.numel():
            return
        if positions:
            if int(labels.max()) >= width:
                raise UserError(f"label {int(labels.max())} is beyond the {width} classes seen so far; grow the "
                                 "classifier for the task before training or evaluating on it.")
            return
        unknown = sorted(set(labels.unique().tolist()) - set(self.class_ids))
        if unknown:
            raise UserError(f"label(s) {unknown[:5]} are not class ids this model has learned (its outputs are class "
                             f"ids {sorted(self.class_ids)[:10]}{' ...' if len(self.class_ids) > 10 else ''}); labels "
                             "are class ids, as `config.label2id` gives them (positions need positions=True).")

    def merged_adapters(self):
        """Context manager: LoRA merged into the weights for no-grad passes, the exact weights
        restored on exit (`slca_peft.models.inference.adapters_merged_into_weights`)."""
        from .inference import adapters_merged_into_weights

        return adapters_merged_into_weights(self)

    def grow(self, num_new_classes: int) -> None:
        """Add the head of a new task (old heads are frozen)."""
        self.classifier.grow(num_new_classes)

    # ------------------------------------------------------------------ parameter roles
    def parameter_role(self, name: str) -> str:
        """Which slow-learner rate a trainable parameter gets: head, adapter (LoRA or the PEFT method's
        own tensors, found by the tuner's prefix: `lora_`, `hada_`, `lokr_`, `ia3_`, ...), or other
        backbone."""
        return parameter_role(name, adapter_prefix(self.backbone))

    def settings(self) -> dict[str, Any]:
        """What `from_pretrained` needs to rebuild the same model around the referenced base
        (`slca_config.json`), with the classifier's current task sizes."""
        self.slca_config.task_sizes = list(self.classifier.task_sizes)
        self.slca_config.class_ids = fit_class_ids(self.slca_config.class_ids, self.classifier.num_classes)
        return self.slca_config.to_dict()

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory: str | Path, *, state: dict[str, Any] | None = None,
                        card: dict[str, Any] | None = None, **run_state: Any) -> Path:
        """Write the model files: `slca_config.json`, the PEFT adapter (or the whole backbone), the
        classifier, `config.json`, `model.image_processor` when set and a model card. The learner's run
        state is written by `slca_peft.method.learner_state.save_learner_state`. `state` (a task history)
        only feeds the card's results; `card` sets its `license`, `datasets`, `tags` and `model_name`."""
        from .saving import save_model_files

        if run_state:
            raise TypeError(
                f"save_pretrained writes the model files only; {sorted(run_state)} belong to the learner's run "
                "state: use slca_peft.continual.save_checkpoint(model, directory, statistics=..., state=..., "
                "unaligned_head=...) for a resumable checkpoint."
            )
        return save_model_files(self, save_directory, state=state, card=card)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, revision: str | None = None,
                        base_model_name_or_path: str | None = None, **kwargs: Any) -> SLCAModel:
        """Load a directory or Hub repo written by `save_pretrained` (the base model is loaded from the
        id or path the files reference; `base_model_name_or_path` points at it when it has moved).

        Takes transformers' loading keywords (`token`, `cache_dir`, `local_files_only`,
        `force_download` for both the checkpoint and the base model; `dtype` for the backbone);
        `device_map` and quantization are refused, saying why. The model comes back in eval mode, as
        transformers' does (`model.train()` before training it by hand). The model is the model only: the
        run state beside it in a continual checkpoint (class statistics, heads before alignment, task
        history) is the learner's (`ContinualLearner.from_checkpoint` / `from_pretrained`)."""
        from .auto import SLCAPeftConfig, without_auto_keywords
        from .saving import read_image_processor, read_model_config

        given = kwargs.get("config")
        loading = loading_kwargs("SLCAModel.from_pretrained", **without_auto_keywords(kwargs))
        config, root = read_model_config(path_or_repo_id, revision, expected_base=base_model_name_or_path,
                                         **hub_kwargs(loading))
        model = cls._from_files(config, root, **loading)
        if isinstance(given, SLCAPeftConfig) and given.id2label:
            named = {int(k): v for k, v in given.id2label.items()}
            if named != model.id2label:
                # A config whose labels were set for other data (a script's `AutoConfig.from_pretrained(DIR,
                # id2label=...)`) would score that data against outputs that mean other classes.
                raise UserError(
                    f"SLCAModel.from_pretrained: the config passed names the outputs {_few(named)} but "
                    f"{path_or_repo_id} was trained on {_few(model.id2label)}; evaluate it on data of its own "
                    "classes (config.id2label), or teach it new classes with slca-peft train --continue_from.")
        model.name_or_path = str(path_or_repo_id)
        model.image_processor = read_image_processor(root)
        return model.eval()

    @classmethod
    def _from_files(cls, config: SLCAModelConfig, root: Path, **loading: Any) -> SLCAModel:
        """Build the model `config` (read from `root`) describes and fill it with `root`'s tensors
        (`loading`: checked loading keywords for the base model)."""
        from transformers import AutoModel

        from ..artifacts.layout import CONFIG_FILE
        from .saving import load_model_state, read_backbone_config

        config_path = root / CONFIG_FILE
        base = config.base_model_name_or_path
        if config.use_lora:
            try:
                backbone = _load_with_sdpa(load_backbone, base, revision=config.revision, **loading)
            except OSError as err:
                if Path(base).is_absolute() or base.startswith("."):
                    raise
                raise MissingFileError(
                    f"{config_path} references the base model {base!r}, which is neither a directory here nor a "
                    f"loadable Hub model ({err}); pass the base model's location: --model_name_or_path PATH with "
                    "the recipe, or load_checkpoint(..., expected_base=PATH) from Python."
                ) from err
        else:
            dtype = {"dtype": loading["dtype"]} if "dtype" in loading else {}
            backbone = AutoModel.from_config(read_backbone_config(root), **dtype)
        config.lora_svd_init = False  # the stored adapter replaces any initialisation
        try:
            model = cls(backbone, config)
        except ValueError as err:
            raise UserError(f"{config_path}: {err}") from None
        load_model_state(model, root)
        return model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload SLCA++ model",
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        base_model_id: str | None = None,
        state: dict[str, Any] | None = None,
        card: dict[str, Any] | None = None,
    ) -> Any:
        """Upload the model files as one commit, as `PeftModel.push_to_hub` uploads an adapter (`revision`
        is created as a branch when missing; `commit_description` and `create_pr` as huggingface_hub takes
        them). The model is the model only: a repo that `--continue_from` can go on from is a continual
        checkpoint, which `ContinualLearner.push_to_hub` (or `slca-peft push task_<t>`) uploads.

        The base model is referenced: pass `base_model_id` when it was loaded from a local directory (a
        local base is refused otherwise, as by `slca-peft push`). `state` (a task history) fills the card's
        results; `card` sets its `license`, `datasets`, `tags` and `model_name`."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", state=state, card=card)
            return push_folder(folder, repo_id, commit_message=commit_message, commit_description=commit_description,
                               private=private, token=token, revision=revision, create_pr=create_pr, tags=tags,
                               base_model_id=base_model_id)


def _few(id2label: dict[int, str]) -> str:
    """The first few outputs' names, for a message."""
    shown = ", ".join(f"{k}: {v}" for k, v in list(id2label.items())[:4])
    return "{" + shown + (", ...}" if len(id2label) > 4 else "}")
