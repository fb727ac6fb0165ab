"""Pre-train the tiny demo ViT on synthetic rendered letters, so the offline demo has a real backbone.

SLCA++ assumes a pre-trained backbone: a randomly initialised ViT gives class-token features that
barely vary between images, and the slow-learner fine-tuning has nothing to build on. No pre-trained
weights are reachable offline, so this script makes an honest stand-in that has never seen a digit:

1. render letters A-Z, a-z and a few symbols with Pillow's built-in scalable font, white on black,
   with random size, aspect, position, rotation (+-20 deg), shear, stroke width, low-resolution
   "pixelation", blur, contrast and noise (32x32 grayscale, fed as RGB);
2. train `ViTForImageClassification` (recipes/configs/tiny_vit.json) to name the character;
3. save the backbone as a plain `ViTModel` plus a `ViTImageProcessor` (safetensors) into
   `--output_dir`, atomically; an existing model there is kept unless `--overwrite`;
4. report the letter accuracy and a linear probe on scikit-learn's digits (the demo's data) for the
   pre-trained backbone and for a random one.

    python recipes/pretrain_tiny_vit.py                      # -> outputs/tiny_vit_letters (~85 s on 2 idle cores)
    python recipes/train_seq.py --config recipes/configs/demo_digits.yaml \
        --model_name_or_path outputs/tiny_vit_letters --model_config ""

Everything is deterministic given `--seed` (CPU, fixed number of steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

from slca_peft import EvalTransform, ImageTransformConfig
from slca_peft.data import load_digits_dataset

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_vit.json"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SYMBOLS = "+@#%?*=<>!"  # no "&" or "$": they look too much like 8 and 5
MEAN = STD = 0.5  # ViT's default normalisation, also what the demo falls back to

_CANVAS = 96  # glyphs are drawn large, then transformed and shrunk, for smooth anti-aliasing
_FONT_SIZE = 64
_PIXELATE_P = 0.7  # share of renders made to look like low-resolution scans
_GRAY17 = [round(v * 16 / 255) * 255 // 16 for v in range(256)]  # 8-bit -> 17 gray levels (a 4-bit sensor)


@cache
def _font() -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at a large size (scalable since Pillow 10.1, when built with FreeType)."""
    try:
        font = ImageFont.load_default(size=_FONT_SIZE)
    except TypeError as err:  # Pillow < 10.1 has no `size`
        raise RuntimeError("rendering the letters needs Pillow >= 10.1 (a scalable default font)") from err
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("rendering the letters needs Pillow built with FreeType (a scalable default font)")
    return font


def render_character(char: str, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """Draw one randomly distorted character, white on black, as a ``(size, size)`` uint8 array."""
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = int(rng.integers(0, 7))  # at _FONT_SIZE, so 0-~2.5 px once shrunk to 32x32
    draw.text((_CANVAS / 2, _CANVAS / 2), char, fill=255, font=_font(), anchor="mm", stroke_width=stroke,
              stroke_fill=255)
    shear = float(rng.uniform(-0.3, 0.3))  # italic-like slant
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, shear, -shear * _CANVAS / 2, 0, 1, 0),
                              resample=Image.Resampling.BILINEAR)
    canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)
    box = canvas.getbbox()
    if box is None:  # cannot happen with the bundled font, but keep the sample well defined
        return np.zeros((image_size, image_size), np.uint8)
    glyph = canvas.crop(box)

    # Random size (longest side 50-100% of the image) and aspect ratio, at a random position.
    w, h = glyph.size
    target = rng.uniform(0.5, 1.0) * image_size
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
    scale = target / max(w * aspect, h)
    new_w = int(np.clip(round(w * aspect * scale), 1, image_size))
    new_h = int(np.clip(round(h * scale), 1, image_size))
    glyph = glyph.resize((new_w, new_h), Image.Resampling.LANCZOS)
    image = Image.new("L", (image_size, image_size), 0)
    image.paste(glyph, (int(rng.integers(0, image_size - new_w + 1)), int(rng.integers(0, image_size - new_h + 1))))

    # Low-resolution scans: most renders are shrunk to 6-16 px, quantised to 17 gray levels and blown up
    # again (nearest or bilinear), so blocky inputs are not out of distribution for the backbone.
    if rng.random() < _PIXELATE_P:
        low = int(rng.integers(6, 17))
        image = image.resize((low, low), Image.Resampling.BOX).point(_GRAY17)
        up = Image.Resampling.NEAREST if rng.random() < 0.7 else Image.Resampling.BILINEAR
        image = image.resize((image_size, image_size), up)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))

    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.6, 1.0)  # contrast
    if rng.random() < 0.5:
        pixels += rng.normal(0.0, rng.uniform(2.0, 20.0), pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def make_letters_dataset(
    samples_per_class: int, seed: int, chars: str = LETTERS + SYMBOLS, image_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``samples_per_class`` images of each character in ``chars``.

    Returns ``(images, labels)``: uint8 ``(N, image_size, image_size)`` and int64 ``(N,)``, where label
    ``i`` is ``chars[i]``. Each sample has its own generator seeded by ``(seed, class, index)``, so the
    result only depends on the arguments.
    """
    images = np.empty((len(chars) * samples_per_class, image_size, image_size), np.uint8)
    labels = np.repeat(np.arange(len(chars), dtype=np.int64), samples_per_class)
    for label, char in enumerate(chars):
        for i in range(samples_per_class):
            rng = np.random.default_rng([seed, label, i])
            images[label * samples_per_class + i] = render_character(char, rng, image_size)
    return images, labels


def to_pixel_values(images: np.ndarray, num_channels: int = 3) -> torch.Tensor:
    """uint8 grayscale ``(N, H, W)`` -> normalised float ``(N, C, H, W)``, the gray copied to every channel."""
    x = torch.from_numpy(images).float().div_(255.0).sub_(MEAN).div_(STD)
    return x.unsqueeze(1).expand(-1, num_channels, -1, -1).contiguous()


@dataclass
class PretrainSettings:
    """Optimisation settings of `pretrain` (AdamW, linear warm-up then cosine decay, fixed step count)."""

    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.0
    sincos_init: bool = True
    seed: int = 0


def sincos_position_embeddings(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (as in MAE), ``(grid * grid, dim)``; ``dim % 4 == 0``."""
    if dim % 4:
        raise ValueError(f"hidden size must be a multiple of 4 for 2-D sin-cos embeddings, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def init_for_small_data(model: ViTForImageClassification) -> None:
    """Start-up help for a ViT trained from scratch on little data (both are only initial values, all trainable).

    With HF's default init (everything ~N(0, 0.02)) the position embeddings are drowned out, attention is
    uniform and a tiny ViT sits on a loss plateau for a long time. As MAE / timm's "jax" init do: 2-D sin-cos
    position embeddings (zero for the class token) and a Xavier-uniform patch projection.
    """
    embeddings = model.vit.embeddings
    projection = embeddings.patch_embeddings.projection
    with torch.no_grad():
        weight = projection.weight.view(projection.weight.shape[0], -1)
        torch.nn.init.xavier_uniform_(weight)
        projection.bias.zero_()
        grid = int(round((embeddings.position_embeddings.shape[1] - 1) ** 0.5))
        pos = sincos_position_embeddings(grid, embeddings.position_embeddings.shape[-1])
        embeddings.position_embeddings[0, 0].zero_()
        embeddings.position_embeddings[0, 1:].copy_(pos)


def pretrain(
    config: ViTConfig, images: np.ndarray, labels: np.ndarray, settings: PretrainSettings
) -> ViTForImageClassification:
    """Train a freshly initialised ``ViTForImageClassification`` on the rendered characters.

    AdamW with linear warm-up and cosine decay, a fixed number of steps and a seeded shuffle, so the
    weights depend only on the inputs (CPU).
    """
    torch.manual_seed(settings.seed)
    model = ViTForImageClassification(config)
    if settings.sincos_init:
        init_for_small_data(model)
    model.train()
    x, y = to_pixel_values(images, config.num_channels), torch.from_numpy(labels)
    steps_per_epoch = (len(y) + settings.batch_size - 1) // settings.batch_size
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup_fraction * total))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "embeddings" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup
        else 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup))),
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    generator = torch.Generator().manual_seed(settings.seed)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(y), generator=generator)
        running, correct, start = 0.0, 0, time.perf_counter()
        for step in range(steps_per_epoch):
            idx = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            logits = model(pixel_values=x[idx]).logits
            loss = loss_fn(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == y[idx]).sum())
        print(f"epoch {epoch + 1}/{settings.epochs}: loss {running / len(y):.3f}  "
              f"train acc (running) {correct / len(y):.3f}  {time.perf_counter() - start:.1f}s", flush=True)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: ViTForImageClassification, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of the classifier on rendered characters."""
    model.eval()
    x = to_pixel_values(images, model.config.num_channels)
    preds = torch.cat(
        [model(pixel_values=x[i : i + batch_size]).logits.argmax(-1) for i in range(0, len(x), batch_size)]
    )
    return float((preds.numpy() == labels).mean())


@torch.no_grad()
def class_token_features(backbone: ViTModel, images: list[Image.Image], transform: EvalTransform) -> np.ndarray:
    """``last_hidden_state[:, 0]`` (the class token after the final LayerNorm) for PIL images."""
    backbone.eval()
    x = torch.stack([transform(img) for img in images])
    batches = [backbone(pixel_values=x[i : i + 256]).last_hidden_state[:, 0] for i in range(0, len(x), 256)]
    return torch.cat(batches).numpy()


def digits_probe(backbone: ViTModel) -> dict[str, float]:
    """Linear probe on scikit-learn's digits with the demo's eval preprocessing (mean = std = 0.5).

    Returns the test accuracy of an L-BFGS logistic regression on the class-token features, and how
    much those features vary between images (per-dimension std over the training images, averaged).
    """
    from sklearn.linear_model import LogisticRegression

    config = backbone.config
    data = load_digits_dataset(image_size=int(config.image_size))
    transform = EvalTransform(ImageTransformConfig.from_model_config(config))
    train = class_token_features(backbone, list(data["train"]["image"]), transform)
    test = class_token_features(backbone, list(data["test"]["image"]), transform)
    probe = LogisticRegression(max_iter=5000).fit(train, data["train"]["label"])
    return {
        "probe_accuracy": float(probe.score(test, data["test"]["label"])),
        "feature_std": float(train.std(axis=0).mean()),
    }


def holds_model(path: Path) -> bool:
    """Whether ``path`` already holds a saved model (a config and safetensors weights)."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def extract_backbone(model: ViTForImageClassification, backbone_config: ViTConfig, seed: int) -> ViTModel:
    """The trained encoder of ``model`` as a plain `ViTModel` of ``backbone_config`` (no label fields).

    `ViTForImageClassification` has no pooler; the `ViTModel` gets a seeded, untrained one so that
    `AutoModel.from_pretrained` reports no missing weights (SLCA drops it and uses the class token).
    """
    torch.manual_seed(seed)
    backbone = ViTModel(backbone_config)
    missing, unexpected = backbone.load_state_dict(model.vit.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(f"backbone weights do not match: missing {missing}, unexpected {unexpected}")
    return backbone.eval()


def save_backbone(backbone: ViTModel, output_dir: Path, files: dict[str, str]) -> None:
    """Save ``backbone`` + a `ViTImageProcessor` (and extra text ``files``) into ``output_dir``, atomically.

    Everything is written to a temporary sibling directory that is renamed into place at the end; an
    existing ``output_dir`` (``--overwrite``) is only removed once the new one is complete.
    """
    size = int(backbone.config.image_size)
    channels = int(backbone.config.num_channels)
    processor = ViTImageProcessor(
        do_resize=True, size={"height": size, "width": size}, image_mean=[MEAN] * channels,
        image_std=[STD] * channels,
    )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the final directory should look like any other
    try:
        backbone.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
        for path in tmp.iterdir():  # some writers make private files
            path.chmod(0o666 & ~umask)
        old = None
        if output_dir.exists():
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            output_dir.rename(old)
        tmp.rename(output_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_readme(args: argparse.Namespace, chars: str, settings: PretrainSettings, results: dict) -> str:
    """The model card saved next to the weights."""
    probe = ""
    if "pretrained" in results:
        probe = (f"; linear probe (logistic regression on the class token) on scikit-learn's digits: "
                 f"{results['pretrained']['probe_accuracy']:.3f} (random init: "
                 f"{results['random_init']['probe_accuracy']:.3f})")
    return f"""# {Path(args.output_dir).name}

A tiny `ViTModel` ({results['num_parameters']:,} parameters, config `{Path(args.config).name}`), pre-trained by
`recipes/pretrain_tiny_vit.py` as an offline stand-in for a pre-trained backbone in the digits demo.

**Training data**: synthetic, rendered with Pillow's bundled font, {args.samples_per_class} images of each of
{len(chars)} characters, white on black at {results['image_size']}x{results['image_size']} grayscale (fed as RGB),
with random size, aspect, position, rotation (+-20 deg), shear, stroke width, low-resolution pixelation, blur,
contrast and noise. Characters: `{chars}`.
**No digits** were rendered or used for training; scikit-learn's digits only serve afterwards to evaluate a
linear probe.

**Objective**: {len(chars)}-way character classification from the class token (`ViTForImageClassification`),
AdamW with warm-up and cosine decay, sin-cos initial position embeddings. The classification head is not saved and
the pooler is untrained: SLCA uses the class token after the final LayerNorm. Settings:
`{json.dumps(asdict(settings))}`.

**Preprocessing**: `ViTImageProcessor`, resize to {results['image_size']}x{results['image_size']}, mean = std = 0.5.

**Results**: letters accuracy {results['train_accuracy']:.3f} on the training renders, {results['heldout_accuracy']:.3f}
on fresh ones{probe}. Details in `pretrain_results.json`.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(
        description="Pre-train the tiny demo ViT on synthetic rendered letters (never on digits).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="ViT config JSON of the backbone.")
    parser.add_argument("--output_dir", default="outputs/tiny_vit_letters", help="Where to save the backbone.")
    parser.add_argument("--overwrite", action="store_true", help="Retrain even if --output_dir holds a model.")
    parser.add_argument("--samples_per_class", type=int, default=300, help="Training renders per character.")
    parser.add_argument("--heldout_per_class", type=int, default=20, help="Fresh renders to test the letters on.")
    symbols = SYMBOLS.replace("%", "%%")  # argparse %-formats help strings
    parser.add_argument("--no_symbols", action="store_true", help=f"Letters only, without {symbols!r}.")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="Passes over the renders.")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size, help="Training batch size.")
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate, help="Peak AdamW learning rate.")
    parser.add_argument("--weight_decay", type=float, default=defaults.weight_decay, help="AdamW decay (matrices).")
    parser.add_argument("--label_smoothing", type=float, default=defaults.label_smoothing, help="Label smoothing.")
    parser.add_argument("--no_sincos_init", action="store_true", help="Keep HF's default position embeddings.")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Seeds the renders, the init and the order.")
    parser.add_argument("--skip_probe", action="store_true", help="Skip the digits linear probes.")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch CPU threads (None: torch's choice); 1 is faster on a busy machine.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Render, pre-train, probe, save; returns the results (``None`` when the model already exists)."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if holds_model(output_dir) and not args.overwrite:
        print(f"{output_dir} already holds a model; nothing to do (--overwrite to retrain).")
        return None
    torch.use_deterministic_algorithms(True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    chars = LETTERS if args.no_symbols else LETTERS + SYMBOLS
    backbone_config = ViTConfig.from_json_file(args.config)
    config = ViTConfig.from_json_file(args.config)
    config.num_labels = len(chars)
    config.id2label = dict(enumerate(chars))
    config.label2id = {c: i for i, c in enumerate(chars)}
    size = int(config.image_size)
    settings = PretrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, sincos_init=not args.no_sincos_init,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    images, labels = make_letters_dataset(args.samples_per_class, args.seed, chars, size)
    heldout = make_letters_dataset(args.heldout_per_class, args.seed + 1_000_003, chars, size)
    render_s = time.perf_counter() - t0
    print(f"rendered {len(labels)} training + {len(heldout[1])} held-out images of {len(chars)} characters "
          f"in {render_s:.1f}s", flush=True)

    t1 = time.perf_counter()
    model = pretrain(config, images, labels, settings)
    train_s = time.perf_counter() - t1
    backbone = extract_backbone(model, backbone_config, args.seed)
    results: dict = {
        "characters": chars,
        "image_size": size,
        "train_accuracy": accuracy(model, images, labels),
        "heldout_accuracy": accuracy(model, *heldout),
        "num_parameters": sum(p.numel() for p in model.vit.parameters()),
        "settings": asdict(settings),
        "render_seconds": round(render_s, 1),
        "train_seconds": round(train_s, 1),
    }
    if not args.skip_probe:
        t2 = time.perf_counter()
        torch.manual_seed(args.seed)
        results["random_init"] = digits_probe(ViTModel(backbone_config))  # what the demo uses without this script
        results["pretrained"] = digits_probe(backbone)
        results["probe_seconds"] = round(time.perf_counter() - t2, 1)

    save_backbone(backbone, output_dir, {
        "README.md": build_readme(args, chars, settings, results),
        "pretrain_results.json": json.dumps(results, indent=2) + "\n",
    })
    print(f"saved the backbone and its image processor to {output_dir}")
    print(f"time: render {render_s:.1f}s, train {train_s:.1f}s, total {time.perf_counter() - t0:.1f}s")
    print(f"letters ({len(chars)} classes): accuracy {results['train_accuracy']:.3f} on the training renders, "
          f"{results['heldout_accuracy']:.3f} on fresh ones")
    for name in ("random_init", "pretrained"):
        if name in results:
            r = results[name]
            print(f"digits linear probe, {name + ' backbone:':<21} test accuracy {r['probe_accuracy']:.3f}, "
                  f"class-token per-dim std {r['feature_std']:.3f}")
    return results


if __name__ == "__main__":
    main()
