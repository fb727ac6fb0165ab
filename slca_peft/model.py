"""`SLCAModel`: a PEFT-wrapped image backbone plus a `ContinualClassifier`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .config import DEFAULT_LORA_TARGETS, LORA_LAYOUTS
from .head import ContinualClassifier
from .layout import check_fused_qkv_backbone, tie_fused_qkv
from .layout import reset_final_norm as reset_final_norm_of
from .lora_init import svd_init_lora

logger = logging.getLogger(__name__)

# Parameter roles, used by the trainer to give each its slow-learner rate.
HEAD, LORA, BACKBONE = "head", "lora", "backbone"


def _find_cls_token(backbone: nn.Module) -> nn.Parameter | None:
    embeddings = getattr(backbone, "embeddings", None)
    token = getattr(embeddings, "cls_token", None)
    return token if isinstance(token, nn.Parameter) else None


def _linear_names(backbone: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})


def _load_with_sdpa(load, *args: Any, **kwargs: Any) -> PreTrainedModel:
    """PyTorch's fused attention (SDPA) where the architecture supports it, else its default."""
    try:
        return load(*args, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as error:
        logger.debug("SDPA attention unavailable (%s); loading with the default attention", error)
        return load(*args, **kwargs)


class SLCAModel(nn.Module):
    """Backbone (optionally LoRA-wrapped) + per-task heads, returning HF outputs.

    Hybrid-SL (``use_lora=True``) trains LoRA on the target linears plus every LayerNorm, every bias
    and the class token; full fine-tuning trains the whole backbone. Either way the head sees the
    pooled feature of `features()`.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        *,
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_scale: float = 0.8,
        lora_target_modules: list[str] | None = None,
        lora_svd_init: bool = True,
        lora_layout: str = "per_projection",
        reset_final_norm: bool = False,
        final_norm_eps: float = 1e-5,
        base_model_name_or_path: str | None = None,
        revision: str | None = None,
        task_sizes: list[int] | None = None,
    ):
        super().__init__()
        if isinstance(backbone, PeftModel):
            raise ValueError("pass the plain backbone; SLCAModel adds LoRA itself (use_lora=True).")
        if hasattr(backbone, "pooler") and backbone.pooler is not None and _find_cls_token(backbone) is not None:
            # ViT's pooler is an extra dense+tanh layer: SLCA's feature is the normed class token.
            backbone.pooler = None
        self.feature_source = "cls" if _find_cls_token(backbone) is not None else "pooler"
        self.use_lora = use_lora
        self.lora_rank = lora_rank
        self.lora_scale = lora_scale
        self.lora_target_modules = list(lora_target_modules or DEFAULT_LORA_TARGETS)
        self.lora_svd_init = lora_svd_init
        if lora_layout not in LORA_LAYOUTS:
            raise ValueError(f"lora_layout={lora_layout!r} is not one of {LORA_LAYOUTS}.")
        self.lora_layout = lora_layout
        self.reset_final_norm = reset_final_norm
        self.final_norm_eps = final_norm_eps
        if reset_final_norm:
            reset_final_norm_of(backbone, final_norm_eps)
        self.base_model_name_or_path = base_model_name_or_path or getattr(backbone, "name_or_path", None)
        self.revision = revision
        self.feature_dim = int(backbone.config.hidden_size)
        if self.feature_source == "pooler":
            self._check_pooled_output(backbone)
        if use_lora:
            if lora_layout == "fused_qkv":
                check_fused_qkv_backbone(backbone, self.lora_target_modules)
            backbone = self._wrap_lora(backbone)
        else:
            backbone.requires_grad_(True)
        self.backbone = backbone
        self.classifier = ContinualClassifier(self.feature_dim, task_sizes)

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

        `args` (an `SLCAConfig`) supplies the method and LoRA settings; keyword arguments override it.
        """
        settings: dict[str, Any] = {}
        if args is not None:
            settings = {
                "use_lora": args.use_lora,
                "lora_rank": args.lora_rank,
                "lora_scale": args.lora_scale,
                "lora_target_modules": args.lora_target_modules,
                "lora_svd_init": args.lora_svd_init,
                "lora_layout": args.lora_layout,
                "reset_final_norm": args.reset_final_norm,
                "final_norm_eps": args.final_norm_eps,
            }
        settings.update(kwargs)
        name = None
        if isinstance(model, str):
            # A local directory is recorded as an absolute path, so checkpoints load from anywhere.
            name = str(Path(model).resolve()) if Path(model).is_dir() else model
            backbone = _load_with_sdpa(AutoModel.from_pretrained, model, revision=revision)
        elif isinstance(model, PretrainedConfig):
            backbone = _load_with_sdpa(AutoModel.from_config, model)
        elif isinstance(model, PreTrainedModel):
            backbone = model
        else:
            raise TypeError(f"model must be a Hub id, a path, a config or a PreTrainedModel, got {type(model)}.")
        return cls(backbone, base_model_name_or_path=name, revision=revision, **settings)

    def _check_pooled_output(self, backbone: PreTrainedModel) -> None:
        config = backbone.config
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        with torch.no_grad():
            out = backbone(pixel_values=torch.zeros(1, channels, size, size))
        if getattr(out, "pooler_output", None) is None:
            raise ValueError(
                f"{type(backbone).__name__} has no class token (embeddings.cls_token) and returns no "
                "pooler_output, so there is no pooled image feature for the classifier. Use a ViT-family "
                "backbone (ViT, DeiT, DINOv2, CLIP vision) or one whose output has pooler_output."
            )

    def _wrap_lora(self, backbone: PreTrainedModel) -> PeftModel:
        available = _linear_names(backbone)
        missing = [t for t in self.lora_target_modules if t not in available]
        if missing:
            raise ValueError(
                f"LoRA target module(s) {missing} match no linear layer of {type(backbone).__name__}. "
                f"Linear layer names available: {available}. Set lora_target_modules to some of them."
            )
        norm_names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.LayerNorm)}
        )
        config = LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_scale * self.lora_rank,
            target_modules=self.lora_target_modules,
            lora_dropout=0.0,
            bias="all",
            modules_to_save=norm_names or None,
        )
        wrapped = get_peft_model(backbone, config)
        # bias="all" also flags the biases of the frozen originals that modules_to_save keeps aside.
        for name, param in wrapped.named_parameters():
            if ".original_module." in name:
                param.requires_grad_(False)
        token = _find_cls_token(wrapped.get_base_model())
        if token is not None:
            token.requires_grad_(True)
        if self.lora_svd_init:
            svd_init_lora(wrapped)
        if self.lora_layout == "fused_qkv":
            tie_fused_qkv(wrapped, svd_init=self.lora_svd_init)
        return wrapped

    # ------------------------------------------------------------------ forward
    @property
    def base_backbone(self) -> PreTrainedModel:
        return self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone

    @property
    def config(self) -> PretrainedConfig:
        return self.base_backbone.config

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled image feature: the class token after the final LayerNorm (ViT family)."""
        out = self.backbone(pixel_values=pixel_values)
        if self.feature_source == "cls":
            return out.last_hidden_state[:, 0]
        return out.pooler_output

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        """Logits over all classes seen so far; `loss` is plain cross-entropy over them when labels
        are given (the trainer replaces it with the current-task loss while training)."""
        logits = self.classifier(self.features(pixel_values))
        loss = None
        if labels is not None:
            if labels.numel() and int(labels.max()) >= logits.shape[1]:
                raise ValueError(
                    f"label {int(labels.max())} is beyond the {logits.shape[1]} classes seen so far; "
                    "grow the classifier for the task before training or evaluating on it."
                )
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def merged_adapters(self):
        """Context manager: LoRA merged into the weights for no-grad passes, the exact weights
        restored on exit (`slca_peft.inference.merged_adapters`)."""
        from .inference import merged_adapters

        return merged_adapters(self)

    def grow(self, num_new_classes: int) -> None:
        """Add the head of a new task (old heads are frozen)."""
        self.classifier.grow(num_new_classes)

    # ------------------------------------------------------------------ parameter roles
    def parameter_role(self, name: str) -> str:
        """Which slow-learner rate a trainable parameter gets: head, LoRA, or other backbone."""
        if name.startswith("classifier."):
            return HEAD
        if "lora_" in name:
            return LORA
        return BACKBONE

    def settings(self) -> dict[str, Any]:
        """What `from_pretrained` needs to rebuild the same model around the referenced base."""
        return {
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": self.revision,
            "use_lora": self.use_lora,
            "lora_rank": self.lora_rank,
            "lora_scale": self.lora_scale,
            "lora_target_modules": self.lora_target_modules,
            "lora_layout": self.lora_layout,
            "reset_final_norm": self.reset_final_norm,
            "final_norm_eps": self.final_norm_eps,
            "feature_dim": self.feature_dim,
            "feature_source": self.feature_source,
            "task_sizes": self.classifier.task_sizes,
        }

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory: str, **parts: Any) -> None:
        """Write a checkpoint directory (see `slca_peft.checkpoint`); `parts` may add `statistics`,
        `state` and `unaligned_head`."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, save_directory, **parts)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, revision: str | None = None) -> SLCAModel:
        """Load a checkpoint directory or Hub repo written by `save_pretrained` (the base model is
        loaded from the id or path the checkpoint references)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(path_or_repo_id, revision)[0]

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, commit_message: str = "Upload SLCA++ checkpoint",
        token: str | None = None, base_model_id: str | None = None, **parts: Any,
    ) -> Any:
        """Save to a temporary directory and upload it as one commit (the base model is referenced:
        pass `base_model_id` when it was loaded from a local directory)."""
        import tempfile

        from .hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            target = f"{tmp}/checkpoint"
            self.save_pretrained(target, **parts)
            return push_to_hub(target, repo_id, private=private, commit_message=commit_message, token=token,
                               base_model_id=base_model_id)

    def export(self, save_directory: str, label_names: list[str] | None = None, image_processor=None) -> None:
        """Write a plain `AutoModelForImageClassification` checkpoint (LoRA merged, heads and scales
        folded) that `pipeline("image-classification")` loads without slca-peft."""
        from .export import export_model

        export_model(self, save_directory, label_names=label_names, image_processor=image_processor)

