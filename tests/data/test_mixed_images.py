"""Image folders that mix PIL modes and sizes go through a whole continual run: modes are converted
exactly (with a warning), every image of every size is used."""

import numpy as np
import pytest
import torch
from PIL import Image

from slca_peft import TaskSequence

# Conversions warn once per mode by design; this module feeds them on purpose.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:images in mode")]

MODES = ["RGB", "L", "RGBA", "I;16", "LA", "P"]
GREY_PALETTE = [v for i in range(256) for v in (i, i, i)]


def grey_image(rng, k: int) -> np.ndarray:
    """Class k: a bright square at a class-specific place on grey noise (grey, so every mode holds it exactly)."""
    img = rng.randint(0, 60, size=(32, 32)).astype(np.uint8)
    img[(k // 4) * 8 : (k // 4) * 8 + 8, (k % 4) * 8 : (k % 4) * 8 + 8] = 255
    return img


def encode(grey: np.ndarray, mode: str, rng) -> Image.Image:
    """The same grey picture in `mode`; alpha channels get random values (they are dropped)."""
    alpha = rng.randint(0, 256, size=grey.shape).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(np.stack([grey] * 3, axis=-1))
    if mode == "L":
        return Image.fromarray(grey)
    if mode == "RGBA":
        return Image.fromarray(np.stack([grey, grey, grey, alpha], axis=-1))
    if mode == "LA":
        return Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA")
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257)
    img = Image.fromarray(grey).convert("P")  # index == grey level, under a grey palette
    img.putdata(grey.flatten().tolist())
    img.putpalette(GREY_PALETTE)
    return img


def write_folder(root, num_classes, per_class, seed, mixed: bool, sizes=None):
    rng = np.random.RandomState(seed)
    modes = {}
    for k in range(num_classes):
        (root / f"class_{k}").mkdir(parents=True)
        for i in range(per_class):
            grey = grey_image(rng, k)
            img = encode(grey, MODES[(k + i) % len(MODES)] if mixed else "RGB", rng)
            if sizes is not None:
                img = img.resize(sizes[(k * per_class + i) % len(sizes)], Image.NEAREST)
            path = root / f"class_{k}" / f"{i}.png"
            img.save(path)
            with Image.open(path) as reread:
                modes[reread.mode] = modes.get(reread.mode, 0) + 1
    return modes


def run(tmp_path, make_learner, train_dir, test_dir):
    tasks = TaskSequence.from_image_folders(train_dir, test_dir, init_cls=2, increment=2, seed=1993)
    learner = make_learner(tasks, tmp_path / f"run-{train_dir.parent.name}", num_train_epochs=1,
                           per_device_eval_batch_size=8, ca_samples_per_class=32, ca_epochs=2)
    return learner, learner.run()


def test_mixed_modes_give_exactly_the_run_of_the_rgb_originals(tmp_path, make_learner):
    for name, mixed in (("rgb", False), ("mixed", True)):
        modes = write_folder(tmp_path / name / "train", 4, 8, seed=1, mixed=mixed)
        write_folder(tmp_path / name / "test", 4, 4, seed=2, mixed=mixed)
        if mixed:  # every mode really is on disk as such (PNG keeps 16-bit grey, palettes, alpha)
            assert set(modes) >= {"RGB", "L", "RGBA", "LA", "P"} and ({"I;16", "I"} & set(modes))
    rgb_learner, rgb = run(tmp_path, make_learner, tmp_path / "rgb" / "train", tmp_path / "rgb" / "test")
    with pytest.warns(UserWarning, match=r"mode 'RGBA' are converted to 'RGB' for the model \(alpha dropped"):
        mixed_learner, mixed = run(tmp_path, make_learner, tmp_path / "mixed" / "train", tmp_path / "mixed" / "test")
    assert mixed.accuracy_matrix == rgb.accuracy_matrix
    for a, b in zip(rgb_learner.model.parameters(), mixed_learner.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for c in range(4):
        assert torch.equal(rgb_learner.statistics.means[c], mixed_learner.statistics.means[c])


def test_images_of_very_different_sizes_are_all_used(tmp_path, make_learner):
    sizes = [(32, 32), (5, 5), (7, 300), (300, 7), (640, 480), (33, 1)]
    write_folder(tmp_path / "data" / "train", 4, 6, seed=1, mixed=True, sizes=sizes)
    write_folder(tmp_path / "data" / "test", 4, 3, seed=2, mixed=True, sizes=sizes)
    learner, result = run(tmp_path, make_learner, tmp_path / "data" / "train", tmp_path / "data" / "test")
    assert learner.statistics.counts == {c: 6 for c in range(4)}  # no image skipped
    assert result.task_test_sizes == [6, 6]
    assert all(0.0 <= acc <= 100.0 for row in result.accuracy_matrix for acc in row)
    assert all(torch.isfinite(learner.statistics.means[c]).all() for c in range(4))
