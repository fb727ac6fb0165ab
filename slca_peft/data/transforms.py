"""Image augmentations of SLCA++ (arXiv 2408.08295), written with PIL + numpy + torch only.

torchvision is deliberately not used: its wheels pin a torch version that conflicts with ours. The
pipelines below reproduce the torchvision recipe the paper uses:

* train: ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic)`` -- or, for CUB-200
  and Cars-196, ``Resize((300, 300), bicubic)`` + ``RandomCrop(size)`` -- -> horizontal flip (p=0.5)
  -> optional brightness jitter (63/255 for CIFAR) -> ``[0, 1]`` float -> normalise;
* eval: resize the shorter side to ``round(size * 256 / 224)`` (bicubic) -> center crop ``size`` ->
  normalise.

Randomness comes from Python's global :mod:`random` module unless a ``random.Random`` is given, so
``transformers.set_seed`` (which seeds it) makes runs reproducible, and PyTorch ``DataLoader`` workers,
which reseed :mod:`random` per worker, get independent streams.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..utils.errors import UserError

if TYPE_CHECKING:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ..models.model import SLCAModel

__all__ = [
    "EvalTransform",
    "ImageTransformConfig",
    "ProcessorTransform",
    "TrainTransform",
    "collate_fn",
    "checkpoint_eval_transform",
    "default_image_processor",
    "describe_image_processor",
    "eval_image_processor",
    "eval_transform_config",
    "make_batch_transform",
    "random_resized_crop_params",
    "same_pixels",
]

_BICUBIC = Image.Resampling.BICUBIC
# Modes whose pixels are 16-bit (or wider) integers; PIL's own convert() would clip them at 255.
_WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_GREY_MODES = ("1", "L", *_WIDE_INT_MODES)


def _conversion_losses(img: Image.Image, target: str) -> list[str]:
    """What converting `img` to `target` ('RGB' or 'L') loses; empty when it is exact."""
    losses = []
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        losses.append("alpha dropped, not composited")
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        losses.append("16/32-bit values divided by 257 and rounded to 8 bit")
    if img.mode == "CMYK":
        losses.append("PIL's naive CMYK formula")
    elif target == "L" and img.mode not in _GREY_MODES:
        losses.append("colour reduced to ITU-R 601-2 luma")
    return losses
# Ratio of the eval resize to the crop size, as in the standard ImageNet recipe (256 / 224).
EVAL_RESIZE_RATIO = 256 / 224


def _as_float_tuple(value: Any, n: int | None = None) -> tuple[float, ...]:
    """Accept a scalar or a sequence (processors store either) and return a float tuple."""
    if isinstance(value, (int, float)):
        return (float(value),) * (n or 3)
    return tuple(float(v) for v in value)


def _read_size(size: Any) -> int:
    """Square crop size from a processor's ``size`` (int, dict or transformers ``SizeDict``)."""
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge"):
        value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
        if value is not None:
            return int(value)
    raise UserError(f"processor.size has neither 'height' nor 'shortest_edge': {size!r}")


@dataclass
class ImageTransformConfig:
    """What the transforms need to know about the model's input: crop size and normalisation.

    The number of channels is ``len(mean)``, so one config drives both the colour conversion and
    the normalisation and they cannot disagree.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    brightness: float = 0.0  # jitter amount; the paper uses 63/255 for CIFAR-100

    def __post_init__(self) -> None:
        self.mean = _as_float_tuple(self.mean)
        self.std = _as_float_tuple(self.std)
        if self.size <= 0:
            raise UserError(f"size must be positive, got {self.size}")
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise UserError(f"mean/std must both have 1 or 3 entries, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise UserError(f"std must be positive, got {self.std}")
        if self.brightness < 0:
            raise UserError(f"brightness must be >= 0, got {self.brightness}")

    @property
    def num_channels(self) -> int:
        return len(self.mean)

    @classmethod
    def from_image_processor(cls, processor: Any, brightness: float = 0.0) -> ImageTransformConfig:
        """Use the checkpoint's processor stats so inputs match what the backbone was trained on.

        The model's input is the crop when the processor centre-crops (DINOv2, CLIP: shorter side
        256 or 224, then a 224 crop); timm processors keep everything in `data_config`."""
        data_config = getattr(processor, "data_config", None)
        if data_config is not None:  # TimmWrapperImageProcessor
            mean = _as_float_tuple(data_config["mean"])
            return cls(size=int(data_config["input_size"][-1]), mean=mean,
                       std=_as_float_tuple(data_config["std"], len(mean)), brightness=brightness)
        mean = _as_float_tuple(processor.image_mean)
        std = _as_float_tuple(processor.image_std, len(mean))
        crop = getattr(processor, "crop_size", None)
        size = _read_size(crop) if getattr(processor, "do_center_crop", False) and crop else _read_size(processor.size)
        return cls(size=size, mean=mean, std=std, brightness=brightness)

    @classmethod
    def from_model_config(cls, config: Any, brightness: float = 0.0) -> ImageTransformConfig:
        """Fallback when a checkpoint ships no processor: ViT's default stats are mean = std = 0.5."""
        from ..models.backbones import input_size

        n = int(getattr(config, "num_channels", 3))
        return cls(size=input_size(config), mean=(0.5,) * n, std=(0.5,) * n, brightness=brightness)


def eval_transform_config(model: SLCAModel) -> ImageTransformConfig:
    """Crop size and normalisation of the evaluation transform: the base model's
    image processor statistics, or ViT's defaults (mean = std = 0.5) when it ships none. Training,
    evaluation and an export's image processor all start from it, so they cannot disagree."""
    base = model.slca_config.base_model_name_or_path
    if base:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(base, revision=model.slca_config.revision)
            return ImageTransformConfig.from_image_processor(processor)
        except (OSError, ValueError, TypeError):
            pass
    return ImageTransformConfig.from_model_config(model.config)


def eval_image_processor(config: ImageTransformConfig) -> CLIPImageProcessorPil:
    """A transformers image processor that computes `EvalTransform(config)`: shorter side to
    round(size * 256 / 224) with PIL's bicubic (the longer side truncated), centre crop, rescale
    by 1/255, normalise. Saved as `CLIPImageProcessor`; the PIL backend (the one used where
    torchvision is not installed, or with `backend="pil"`) gives the same pixels."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = config.size
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": round(size * EVAL_RESIZE_RATIO)},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(config.mean),
        image_std=list(config.std),
        do_convert_rgb=config.num_channels == 3,
    )


def default_image_processor(model: SLCAModel) -> CLIPImageProcessorPil:
    """The processor matching the transform slca-peft evaluates `model` with (`EvalTransform` of
    `eval_transform_config(model)`)."""
    return eval_image_processor(eval_transform_config(model))


def _to_model_mode(img: Image.Image, num_channels: int) -> Image.Image:
    """Convert any PIL mode to 'RGB' (3 channels) or 'L' (1 channel); a conversion that loses
    information (alpha, bit depth, colour) warns once per source mode.

    16-bit integer images are rescaled to 8 bit (x / 257, so 65535 -> 255) instead of being clipped
    by PIL, which would turn most of a 16-bit image white. Alpha is dropped, not composited.
    """
    target = "RGB" if num_channels == 3 else "L"
    if img.mode == target:
        return img
    losses = _conversion_losses(img, target)
    if losses:
        # Same text per mode, so Python's warning registry shows it once per call site (and per
        # DataLoader worker), not once per image.
        warnings.warn(
            f"images in mode {img.mode!r} are converted to {target!r} for the model ({'; '.join(losses)}); "
            "see docs/reliability.md.",
            UserWarning,
            stacklevel=2,
        )
    if img.mode in _WIDE_INT_MODES:
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)  # mode 'L'
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns on a direct P -> RGB with transparency
    return img if img.mode == target else img.convert(target)


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """Sample a crop box ``(top, left, h, w)`` exactly as torchvision's ``RandomResizedCrop``.

    Ten attempts at an area fraction ~ U(scale) and a log-uniform aspect ratio; if none fits inside
    the image, fall back to a center crop with the aspect ratio clamped into ``ratio``.
    """
    r = rng if rng is not None else random
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * r.uniform(scale[0], scale[1])
        aspect = math.exp(r.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = r.randint(0, height - h)
            left = r.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _BaseTransform:
    """Shared tail of both pipelines: PIL image -> ``[0, 1]`` float tensor -> normalised tensor."""

    def __init__(self, config: ImageTransformConfig) -> None:
        self.config = config
        c = config.num_channels
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(c, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(c, 1, 1)

    def _to_unit_tensor(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class TrainTransform(_BaseTransform):
    """SLCA++ training augmentation: random resized crop, horizontal flip, optional brightness jitter.

    With ``resize=N`` the crop is the CUB-200 / Cars-196 form of the authors' released code
    (`utils/data.py`) instead: resize to N×N (bicubic), then a uniformly placed ``size``×``size`` crop.

    Brightness is applied to the ``[0, 1]`` float image (``clip(x * f, 0, 1)``, f ~ U[max(0, 1-b), 1+b])
    as torchvision's tensor path does, avoiding an extra 8-bit rounding step.
    """

    def __init__(
        self,
        config: ImageTransformConfig,
        rng: random.Random | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        resize: int | None = None,
    ) -> None:
        super().__init__(config)
        if resize is not None and resize < config.size:
            raise UserError(
                f"resize={resize} is smaller than the crop size {config.size}; use resize >= {config.size}."
            )
        self.rng = rng
        self.scale = scale
        self.ratio = ratio
        self.flip_p = flip_p
        self.resize = resize

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # Looked up per call so that re-seeding the global `random` (set_seed) takes effect.
        r = self.rng if self.rng is not None else random
        img = _to_model_mode(img, self.config.num_channels)
        size = self.config.size
        if self.resize is not None:
            img = img.resize((self.resize, self.resize), _BICUBIC)
            top, left = r.randint(0, self.resize - size), r.randint(0, self.resize - size)
            img = img.crop((left, top, left + size, top + size))
        else:
            top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, r)
            img = img.crop((left, top, left + w, top + h)).resize((size, size), _BICUBIC)
        if r.random() < self.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = self._to_unit_tensor(img)
        b = self.config.brightness
        if b > 0:
            factor = r.uniform(max(0.0, 1.0 - b), 1.0 + b)
            x = (x * factor).clamp_(0.0, 1.0)
        return self._normalize(x)


class EvalTransform(_BaseTransform):
    """Deterministic evaluation pipeline: resize shorter side to ``round(size*256/224)``, center crop."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = _to_model_mode(img, self.config.num_channels)
        size = self.config.size
        short = round(size * EVAL_RESIZE_RATIO)
        w, h = img.size
        # torchvision's Resize(int): the shorter side becomes `short`, the longer one is truncated.
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), _BICUBIC)
        # Floor, as transformers' image processors crop: an exported model's processor gives the
        # same pixels (torchvision rounds half to even, one pixel apart for some aspect ratios).
        top = (new_h - size) // 2
        left = (new_w - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return self._normalize(self._to_unit_tensor(img))


class ProcessorTransform:
    """Evaluation pipeline that is a transformers image processor itself (a checkpoint's own, e.g. the
    `ViTImageProcessor` of a stock script's run: resize to ``size``, bilinear): the pixels the checkpoint's
    class statistics and scores were computed on. `config` holds its crop size and normalisation, for a
    training transform of the same input."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.config = ImageTransformConfig.from_image_processor(processor)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = _to_model_mode(img, self.config.num_channels)
        pixels = self.processor(images=img, return_tensors="pt")["pixel_values"][0]
        return pixels.to(torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({describe_image_processor(self.processor)})"


#: Processor fields that change no pixel (its class name and backend, transformers' bookkeeping).
_PROCESSOR_BOOKKEEPING = ("image_processor_type", "processor_class", "_processor_class", "backend")


def _pixel_settings(processor: Any) -> dict[str, Any]:
    settings = {k: v for k, v in processor.to_dict().items() if k not in _PROCESSOR_BOOKKEEPING}
    return json.loads(json.dumps(settings, default=str))  # tuples and lists alike


def same_pixels(a: Any, b: Any) -> bool:
    """Whether two image processors compute the same pixels (the same settings, whatever their class name or
    backend)."""
    return _pixel_settings(a) == _pixel_settings(b)


def describe_image_processor(processor: Any) -> str:
    """A processor in a few words for a log line: its type, resize, crop and normalisation."""
    d = processor.to_dict()
    parts = [str(d.get("image_processor_type") or type(processor).__name__)]
    if d.get("do_resize", True) and d.get("size"):
        resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(d.get("resample"), d.get("resample"))
        parts.append(f"resize {d['size']} {resample}")
    if d.get("do_center_crop") and d.get("crop_size"):
        parts.append(f"centre crop {d['crop_size']}")
    if d.get("do_normalize", True) and "image_mean" in d:
        parts.append(f"mean {list(d['image_mean'])} std {list(d.get('image_std', []))}")
    return ", ".join(parts)


def checkpoint_eval_transform(processor: Any) -> EvalTransform | ProcessorTransform:
    """The evaluation transform that gives the pixels of a checkpoint's image processor: `EvalTransform`
    when the processor is the one slca-peft writes for it (`eval_image_processor`), else the processor
    itself (`ProcessorTransform`). Going on from a checkpoint with it keeps its class statistics, the new
    ones and every score on the same preprocessing, and the processor the new checkpoints hold the same."""
    config = ImageTransformConfig.from_image_processor(processor)
    if same_pixels(processor, eval_image_processor(config)):
        return EvalTransform(config)
    return ProcessorTransform(processor)


def make_batch_transform(
    transform: Callable[[Image.Image], torch.Tensor],
    image_column: str = "image",
    label_column: str = "label",
) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """Wrap a per-image transform for ``datasets.Dataset.with_transform`` (lazy, per batch).

    Augmenting on access (rather than ``map``) draws fresh crops every epoch. The returned dict
    replaces the raw columns, so train with ``remove_unused_columns=False`` in the Trainer.
    """

    def batch_transform(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        images = [
            im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
            for im in batch[image_column]
        ]
        return {
            "pixel_values": [transform(im) for im in images],
            "labels": [int(y) for y in batch[label_column]],
        }

    return batch_transform


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Trainer ``data_collator``: stack images to ``[B, C, H, W]`` and labels to a LongTensor."""
    return {
        "pixel_values": torch.stack([ex["pixel_values"] for ex in examples]),
        "labels": torch.tensor([int(ex["labels"]) for ex in examples], dtype=torch.long),
    }
