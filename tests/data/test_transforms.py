import math
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from slca_peft.data.transforms import (
    EvalTransform,
    ImageTransformConfig,
    TrainTransform,
    collate_fn,
    make_batch_transform,
    random_resized_crop_params,
)

RAW = ImageTransformConfig(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output = pixel / 255


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def unit(img: Image.Image) -> torch.Tensor:
    """Reference [0, 1] tensor of an RGB image, independent of the module's conversion code."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def full_crop_train(cfg: ImageTransformConfig, **kw) -> TrainTransform:
    """A train transform whose crop is always the whole (square) image: only flip/jitter are random."""
    return TrainTransform(cfg, scale=(1.0, 1.0), ratio=(1.0, 1.0), **kw)


# --------------------------------------------------------------------------- config


def test_config_from_vit_image_processor():
    transformers = pytest.importorskip("transformers")
    proc_cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    proc = proc_cls(size={"height": 384, "width": 384}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    cfg = ImageTransformConfig.from_image_processor(proc, brightness=63 / 255)
    assert cfg.size == 384
    assert cfg.mean == pytest.approx((0.1, 0.2, 0.3))
    assert cfg.std == pytest.approx((0.4, 0.5, 0.6))
    assert cfg.brightness == pytest.approx(63 / 255)
    assert cfg.num_channels == 3


def test_config_from_plain_processor_with_shortest_edge():
    proc = SimpleNamespace(size={"shortest_edge": 160}, image_mean=[0.5, 0.5, 0.5], image_std=(0.25,) * 3)
    cfg = ImageTransformConfig.from_image_processor(proc)
    assert (cfg.size, cfg.mean, cfg.std, cfg.brightness) == (160, (0.5,) * 3, (0.25,) * 3, 0.0)
    with pytest.raises(ValueError):
        ImageTransformConfig.from_image_processor(
            SimpleNamespace(size={"width": 3}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        )


def test_config_from_model_config():
    cfg = ImageTransformConfig.from_model_config(SimpleNamespace(image_size=48, num_channels=1))
    assert (cfg.size, cfg.mean, cfg.std, cfg.num_channels) == (48, (0.5,), (0.5,), 1)
    transformers = pytest.importorskip("transformers")
    cfg = ImageTransformConfig.from_model_config(transformers.ViTConfig(image_size=224))
    assert (cfg.size, cfg.mean, cfg.std) == (224, (0.5,) * 3, (0.5,) * 3)


def test_config_rejects_mismatched_stats():
    with pytest.raises(ValueError):
        ImageTransformConfig(size=8, mean=(0.5, 0.5, 0.5), std=(0.5,))


# --------------------------------------------------------------------------- eval


def test_eval_output_shape_and_dtype():
    cfg = ImageTransformConfig(size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = EvalTransform(cfg)(noise_image(300, 200))
    assert out.shape == (3, 224, 224)
    assert out.dtype == torch.float32


def test_eval_constant_image_normalises_exactly():
    cfg = ImageTransformConfig(size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = EvalTransform(cfg)(Image.new("RGB", (50, 40), (255, 0, 128)))  # resized and cropped
    expected = torch.tensor([(1.0 - 0.5) / 0.2, (0.0 - 0.4) / 0.25, (128 / 255 - 0.3) / 0.5])
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 24, 24), rtol=0, atol=1e-5)


def test_eval_center_crop_is_exactly_the_center():
    # size 224 -> shorter side resized to 256: a 320x256 image is not resized, so the crop must be
    # rows 16..240 and columns 48..272 exactly. Only that region is white.
    arr = np.zeros((256, 320, 3), dtype=np.uint8)
    arr[16:240, 48:272] = 255
    cfg = ImageTransformConfig(size=224, mean=(0.0,) * 3, std=(1.0,) * 3)
    out = EvalTransform(cfg)(Image.fromarray(arr))
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, torch.ones(3, 224, 224))


def test_eval_resizes_shorter_side_then_crops_center_of_long_axis():
    # 1536x512 with three vertical stripes: resized to 768x256, the central 224 columns (272..496)
    # fall inside the middle stripe (256..512).
    arr = np.zeros((512, 1536, 3), dtype=np.uint8)
    arr[:, :512] = (255, 0, 0)
    arr[:, 512:1024] = (0, 255, 0)
    arr[:, 1024:] = (0, 0, 255)
    cfg = ImageTransformConfig(size=224, mean=(0.0,) * 3, std=(1.0,) * 3)
    out = EvalTransform(cfg)(Image.fromarray(arr))
    expected = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 224, 224)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_eval_is_deterministic_and_ignores_global_random():
    img = noise_image(70, 50)
    t = EvalTransform(RAW)
    random.seed(0)
    a = t(img)
    random.seed(123)
    assert torch.equal(a, t(img))


# --------------------------------------------------------------------------- mode conversion


@pytest.mark.parametrize(
    ("img", "rgb"),
    [
        (Image.new("L", (40, 40), 100), (100, 100, 100)),
        (Image.new("LA", (40, 40), (77, 0)), (77, 77, 77)),
        (Image.new("RGBA", (40, 40), (10, 20, 30, 0)), (10, 20, 30)),
        (Image.new("1", (40, 40), 1), (255, 255, 255)),
        (Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)), (255, 255, 255)),  # I;16 white
        (Image.fromarray(np.full((40, 40), 257 * 100, dtype=np.uint16)), (100, 100, 100)),  # I;16
        (Image.fromarray(np.full((40, 40), 257 * 200, dtype=np.int32)), (200, 200, 200)),  # mode I
    ],
    ids=["L", "LA", "RGBA", "1", "I;16-white", "I;16-mid", "I"],
)
def test_any_mode_gives_three_channels_with_correct_values(img, rgb):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = EvalTransform(RAW)(img)
    # Only a conversion that loses something (alpha, bit depth) warns; grey or 1-bit to RGB is exact.
    lossy = img.mode not in ("L", "1")
    assert [str(w.message).startswith(f"images in mode {img.mode!r} are converted to 'RGB'") for w in caught] == (
        [True] if lossy else []
    )
    expected = torch.tensor(rgb, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_rgb_and_grey_images_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EvalTransform(RAW)(Image.new("RGB", (40, 40), (1, 2, 3)))
        EvalTransform(RAW)(Image.new("L", (40, 40), 7))


@pytest.mark.parametrize(
    ("mode", "channels", "lost"),
    [
        ("1", 1, None), ("L", 3, None), ("P", 3, None), ("RGBA", 3, "alpha dropped, not composited"),
        ("P", 1, "colour reduced to ITU-R 601-2 luma"), ("RGB", 1, "colour reduced to ITU-R 601-2 luma"),
        ("RGBA", 1, "alpha dropped, not composited; colour reduced to ITU-R 601-2 luma"),
        ("I;16", 1, "16/32-bit values divided by 257 and rounded to 8 bit"),
    ],
)
def test_conversion_warning_names_what_is_lost(mode, channels, lost):
    img = Image.new(mode, (20, 20)) if mode != "I;16" else Image.fromarray(np.zeros((20, 20), dtype=np.uint16))
    cfg = ImageTransformConfig(size=16, mean=(0.5,) * channels, std=(0.5,) * channels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EvalTransform(cfg)(img)
    target = "RGB" if channels == 3 else "L"
    expected = [] if lost is None else [f"images in mode {mode!r} are converted to {target!r} for the model ({lost})"]
    assert [str(w.message).rsplit("; see", 1)[0] for w in caught] == expected


def test_sixteen_bit_white_equals_eight_bit_white():
    t = EvalTransform(RAW)
    white16 = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))
    assert white16.mode == "I;16"
    assert torch.equal(t(white16), t(Image.new("RGB", (40, 40), (255, 255, 255))))
    # A 16-bit gradient must keep its contrast (clipping would make nearly all of it white).
    grad = Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1)))
    out = t(grad)
    assert out.min() < 0.1 and out.max() > 0.9


def test_palette_image_uses_palette_colour():
    img = Image.new("P", (40, 40), 1)
    img.putpalette([0, 0, 0, 12, 34, 56] + [0] * (256 * 3 - 6))
    expected = torch.tensor([12, 34, 56], dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(EvalTransform(RAW)(img), expected, rtol=0, atol=1e-6)


def test_single_channel_model_gets_luminance():
    cfg = ImageTransformConfig(size=16, mean=(0.5,), std=(0.5,))
    out = EvalTransform(cfg)(Image.new("RGB", (20, 20), (255, 0, 0)))
    assert out.shape == (1, 16, 16)
    expected = (Image.new("RGB", (1, 1), (255, 0, 0)).convert("L").getpixel((0, 0)) / 255 - 0.5) / 0.5
    torch.testing.assert_close(out, torch.full((1, 16, 16), expected), rtol=0, atol=1e-6)
    white16 = Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
    torch.testing.assert_close(TrainTransform(cfg)(white16), torch.ones(1, 16, 16), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- random resized crop


def test_crop_params_within_scale_and_ratio_bounds():
    rng = random.Random(0)
    width, height = 500, 375  # in-range aspect ratio, so the fallback is the full image
    area = width * height
    scales, tops, lefts = [], set(), set()
    for _ in range(5000):
        top, left, h, w = random_resized_crop_params(width, height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 < h and 0 < w and top >= 0 and left >= 0
        assert top + h <= height and left + w <= width
        if (top, left, h, w) == (0, 0, height, width):
            continue  # fallback
        # w and h are roundings of sqrt(area * r) and sqrt(area / r): allow half a pixel each.
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
        assert (w + 0.5) * (h + 0.5) >= 0.08 * area and (w - 0.5) * (h - 0.5) <= area
        scales.append(w * h / area)
        tops.add(top)
        lefts.add(left)
    assert len(scales) > 4500
    assert min(scales) < 0.1 and max(scales) > 0.9
    counts, _ = np.histogram(scales, bins=10, range=(0.08, 1.0))
    assert counts.min() > 30  # the whole scale range is sampled, not just part of it
    assert len(tops) > 50 and len(lefts) > 50


class ScriptedRng:
    """Stands in for random.Random with fixed answers, to check the arithmetic against torchvision."""

    def __init__(self, uniforms, randints):
        self.uniforms, self.randints, self.calls = list(uniforms), list(randints), []

    def uniform(self, a, b):
        self.calls.append(("uniform", a, b))
        return self.uniforms.pop(0)

    def randint(self, a, b):
        self.calls.append(("randint", a, b))
        return self.randints.pop(0)


def test_crop_params_follow_torchvision_algorithm():
    # area fraction 0.25, log-ratio log(4/3) on a 100x80 image: w = round(sqrt(2000 * 4/3)) = 52,
    # h = round(sqrt(2000 * 3/4)) = 39; top ~ randint(0, 41), left ~ randint(0, 48), both inclusive.
    rng = ScriptedRng([0.25, math.log(4 / 3)], [7, 11])
    assert random_resized_crop_params(100, 80, (0.08, 1.0), (3 / 4, 4 / 3), rng) == (7, 11, 39, 52)
    assert rng.calls[0] == ("uniform", 0.08, 1.0)
    assert rng.calls[1] == ("uniform", math.log(3 / 4), math.log(4 / 3))
    assert rng.calls[2:] == [("randint", 0, 41), ("randint", 0, 48)]
    # A first attempt too big for the image is retried.
    rng = ScriptedRng([1.0, math.log(4 / 3), 0.25, 0.0], [0, 0])
    assert random_resized_crop_params(100, 80, (0.08, 1.0), (3 / 4, 4 / 3), rng) == (0, 0, 45, 45)


def test_crop_params_fallback_clamps_ratio_to_center():
    rng = random.Random(0)
    # Very wide: every attempt is taller than 10 px, so fall back to h=10, w=round(10*4/3)=13, centered.
    assert random_resized_crop_params(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (0, 493, 10, 13)
    # Very tall: w=10, h=round(10/(3/4))=13.
    assert random_resized_crop_params(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (493, 0, 13, 10)


# --------------------------------------------------------------------------- train


def test_resize_then_random_crop_is_a_window_of_the_resized_image():
    img = noise_image(70, 45)
    resized = np.asarray(img.resize((40, 40), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    t = TrainTransform(RAW, rng=random.Random(3), flip_p=0.0, resize=40)
    corners = set()
    for _ in range(40):
        out = t(img).numpy().transpose(1, 2, 0)
        # Find the 32x32 window of the 40x40 resize the crop came from: exactly one must match.
        matches = [(i, j) for i in range(9) for j in range(9) if np.array_equal(resized[i : i + 32, j : j + 32], out)]
        assert len(matches) == 1
        corners.add(matches[0])
    assert len(corners) > 10  # placed at random, not always the same window
    with pytest.raises(ValueError, match="resize=16 is smaller than the crop size 32"):
        TrainTransform(RAW, resize=16)


def test_train_output_shape():
    cfg = ImageTransformConfig(size=64, mean=(0.5,) * 3, std=(0.5,) * 3, brightness=63 / 255)
    out = TrainTransform(cfg)(Image.new("L", (90, 120), 30))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32


def test_train_deterministic_under_global_seed_and_varies_across_seeds():
    cfg = ImageTransformConfig(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, brightness=63 / 255)
    t = TrainTransform(cfg)
    img = noise_image(64, 48)
    random.seed(0)
    a = [t(img) for _ in range(3)]
    random.seed(0)
    b = [t(img) for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], a[1])  # successive draws differ
    outs = []
    for seed in range(5):
        random.seed(seed)
        outs.append(t(img))
    assert all(not torch.equal(outs[i], outs[j]) for i in range(5) for j in range(i + 1, 5))


def test_train_uses_given_rng_not_global_random():
    img = noise_image(64, 48)
    t1 = TrainTransform(RAW, rng=random.Random(5))
    t2 = TrainTransform(RAW, rng=random.Random(5))
    random.seed(1)
    a = t1(img)
    random.seed(2)
    assert torch.equal(a, t2(img))
    state = random.getstate()
    t1(img)
    assert random.getstate() == state  # the global stream is left untouched


def test_flip_actually_flips():
    img = noise_image(32, 32, seed=3)  # left-right asymmetric
    ref = unit(img)
    assert not torch.equal(ref, ref.flip(-1))
    flipped = 0
    for seed in range(200):
        out = full_crop_train(RAW, rng=random.Random(seed))(img)
        if torch.equal(out, ref.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(out, ref)
    assert 60 <= flipped <= 140  # p = 0.5
    assert torch.equal(full_crop_train(RAW, flip_p=1.0)(img), ref.flip(-1))
    assert torch.equal(full_crop_train(RAW, flip_p=0.0)(img), ref)
    # Same seeded RNG -> same flip decision.
    assert torch.equal(
        full_crop_train(RAW, rng=random.Random(7))(img), full_crop_train(RAW, rng=random.Random(7))(img)
    )


def test_brightness_jitter_within_bound():
    b = 0.25
    cfg = ImageTransformConfig(size=32, mean=(0.0,) * 3, std=(1.0,) * 3, brightness=b)
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    base = 128 / 255
    factors = []
    for seed in range(200):
        out = full_crop_train(cfg, rng=random.Random(seed), flip_p=0.0)(img)
        assert torch.all(out == out.flatten()[0])  # one factor for the whole image
        factor = out.flatten()[0].item() / base
        assert 1 - b - 1e-6 <= factor <= 1 + b + 1e-6
        factors.append(factor)
    assert min(factors) < 0.8 and max(factors) > 1.2  # spans the range, both darker and brighter
    # No jitter configured -> the image is unchanged.
    no_jitter = ImageTransformConfig(size=32, mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.testing.assert_close(full_crop_train(no_jitter, flip_p=0.0)(img), torch.full((3, 32, 32), base))
    # Brightening white is clipped at 1.
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    outs = [full_crop_train(cfg, rng=random.Random(s), flip_p=0.0)(white) for s in range(20)]
    assert max(o.max().item() for o in outs) == 1.0
    assert min(o.min().item() for o in outs) < 1.0


# --------------------------------------------------------------------------- datasets integration


def test_batch_transform_and_collate_with_datasets():
    datasets = pytest.importorskip("datasets")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (40 + 10 * i, 36), c) for i, c in enumerate(colours)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": images, "label": [2, 0, 1]}, features=features)
    cfg = ImageTransformConfig(size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = ds.with_transform(make_batch_transform(EvalTransform(cfg)))

    item = ds[0]
    assert set(item) == {"pixel_values", "labels"}
    assert item["labels"] == 2
    expected0 = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    torch.testing.assert_close(item["pixel_values"], expected0, rtol=0, atol=1e-5)

    batch = collate_fn([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [2, 0, 1]
    for i, c in enumerate(colours):
        want = (torch.tensor(c, dtype=torch.float32) / 255 - 0.5) / 0.5
        torch.testing.assert_close(batch["pixel_values"][i, :, 8, 8], want, rtol=0, atol=1e-5)

    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn)
    sizes = [b["pixel_values"].shape[0] for b in loader]
    assert sizes == [2, 1]


def test_batch_transform_custom_columns_and_grayscale_in_dataset():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=5)})
    ds = datasets.Dataset.from_dict(
        {
            "img": [Image.new("L", (20, 20), 51), Image.new("RGBA", (20, 20), (0, 0, 255, 128))],
            "fine_label": [4, 3],
        },
        features=features,
    )
    cfg = ImageTransformConfig(size=8, mean=(0.0,) * 3, std=(1.0,) * 3)
    ds = ds.with_transform(make_batch_transform(TrainTransform(cfg), "img", "fine_label"))
    batch = collate_fn([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["labels"].tolist() == [4, 3]
    torch.testing.assert_close(batch["pixel_values"][0], torch.full((3, 8, 8), 0.2), rtol=0, atol=1e-6)
    torch.testing.assert_close(batch["pixel_values"][1, 2], torch.ones(8, 8), rtol=0, atol=1e-6)
