"""Datasets the recipes know by name, returned as a `DatasetDict` with train/test splits.

The Hub ids are the real ones; loading them needs internet (or a local Hub cache). The digits set
ships with scikit-learn and is the offline demo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark lives on the Hub and which columns hold images and labels."""

    hub_id: str
    image_column: str
    label_column: str
    train_split: str = "train"
    test_split: str = "test"
    config: str | None = None


KNOWN_DATASETS: dict[str, DatasetSpec] = {
    "cifar100": DatasetSpec("uoft-cs/cifar100", "img", "fine_label"),
}


def load_digits_dataset(image_size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes) as upscaled grayscale images,
    split per class so every digit is in both splits."""
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.RandomState(seed)
    train_idx, test_idx = [], []
    for label in range(10):
        idx = rng.permutation(np.nonzero(digits.target == label)[0])
        cut = int(round(len(idx) * test_fraction))
        test_idx.extend(idx[:cut].tolist())
        train_idx.extend(idx[cut:].tolist())
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)

    def build(indices: list[int]) -> Dataset:
        images = [PILImage.fromarray(pixels[i]).resize((image_size, image_size), PILImage.NEAREST) for i in indices]
        features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
        return Dataset.from_dict({"image": images, "label": digits.target[indices].tolist()}, features=features)

    return DatasetDict(train=build(sorted(train_idx)), test=build(sorted(test_idx)))


def load_named_dataset(name: str, revision: str | None = None) -> tuple[DatasetDict, DatasetSpec]:
    """A known benchmark by short name, or any Hub dataset with `image`/`label` columns."""
    if name == "digits":
        return load_digits_dataset(), DatasetSpec("sklearn:digits", "image", "label")
    spec = KNOWN_DATASETS.get(name, DatasetSpec(name, "image", "label"))
    data = load_dataset(spec.hub_id, spec.config, revision=revision)
    return data, spec
