"""Benchmarks the recipes know by name, returned as a `DatasetDict` with `train`/`test` splits.

`load_benchmark(name, data_dir=None, revision=None)` gives the paper's four class-incremental
benchmarks either from the Hugging Face Hub (the repositories in `KNOWN_DATASETS`, each pinned to the
commit whose files and columns were looked up when the entry was written) or, with `data_dir`, from a
local copy in the dataset's usual on-disk layout, so a machine without Hub access can run them:

=============  ===============================================  ==========================================
name           Hub repository (image / label columns)           local layout under `data_dir`
=============  ===============================================  ==========================================
cifar100       uoft-cs/cifar100 (`img` / `fine_label`)          `cifar-100-python/{train,test,meta}` (the
                                                                official python archive) or image folders
imagenet_r     axiong/imagenet-r (`image` / `wnid`), one        `imagenet-r/<wnid>/*.jpg`, split 80/20 per
               split of 30,000 images, split 80/20 here         class here, or image folders
cub200         Donghyun99/CUB-200-2011 (`image` / `label`)      `CUB_200_2011/` with `images/`,
                                                                `images.txt`, `image_class_labels.txt`,
                                                                `train_test_split.txt`, `classes.txt`
cars196        Donghyun99/Stanford-Cars (`image` / `label`)     image folders
=============  ===============================================  ==========================================

"Image folders" means `train/<class>/*` and `test/<class>/*` under `data_dir` (the layout the authors'
released code, `utils/data.py`, reads for every benchmark); any benchmark accepts it. The digits set ships with
scikit-learn and is the offline demo.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from ..utils.errors import MissingFileError, UserError
from ..utils.reading import require_path
from .formats import (
    IMAGENET_R_SPLIT_SEED,
    IMAGENET_R_TEST_FRACTION,
    class_folders,
    has_split_folders,
    load_cifar100_python,
    load_cub200_folder,
    load_digits_dataset,
    load_imagenet_r_folder,
    load_split_image_folders,
    stratified_split,
)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark lives and which columns hold images and labels.

    `train_split`/`test_split` name the splits of the `DatasetDict` that `load_benchmark` returns.
    `revision` is the Hub commit loaded when the caller gives none. `single_split` marks a Hub copy that
    ships every image in one split (ImageNet-R); `load_benchmark` splits it per class.
    """

    hub_id: str
    image_column: str
    label_column: str
    train_split: str = "train"
    test_split: str = "test"
    config: str | None = None
    revision: str | None = None
    num_classes: int | None = None
    single_split: str | None = None


KNOWN_DATASETS: dict[str, DatasetSpec] = {
    # 50,000 / 10,000 images, 100 classes. Parquet on `main` since the "Convert dataset to Parquet (#4)"
    # commit; not pinned because only its short hash (aadb3af) was available when this was written.
    "cifar100": DatasetSpec("uoft-cs/cifar100", "img", "fine_label", num_classes=100),
    # 30,000 renditions of 200 ImageNet classes in one `test` split (config `test`), with columns
    # image / wnid / class_name. Split 80/20 per class by `load_benchmark`.
    "imagenet_r": DatasetSpec(
        "axiong/imagenet-r", "image", "wnid", revision="762a23f169e080bef0be7c9d96bf73a126cbb660",
        num_classes=200, single_split="test",
    ),
    # 5,994 train / 5,794 test images (the official train_test_split.txt), 200 species.
    "cub200": DatasetSpec(
        "Donghyun99/CUB-200-2011", "image", "label", revision="0e344a8256fa95fe1e5c05325d407a94a961dbab",
        num_classes=200,
    ),
    # `train` / `test` splits, 196 car models (class names such as "AM General Hummer SUV 2000").
    "cars196": DatasetSpec(
        "Donghyun99/Stanford-Cars", "image", "label", revision="c9c43a068ed98f2bb655814a01eacbe2afc2e3f1",
        num_classes=196,
    ),
}

ALIASES = {
    "cifar-100": "cifar100", "imagenet-r": "imagenet_r", "imagenetr": "imagenet_r", "cub": "cub200",
    "cub-200": "cub200", "cub200_2011": "cub200", "cars": "cars196", "cars-196": "cars196",
    "stanford_cars": "cars196",
}


def canonical_name(name: str) -> str:
    """The `KNOWN_DATASETS` key for a benchmark name or alias (case-insensitive); other names unchanged."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in KNOWN_DATASETS or key == "digits" else name


def short_names() -> list[str]:
    """The names `load_benchmark` knows without a Hub id."""
    return [*KNOWN_DATASETS, "digits"]


def unknown_dataset_message(name: str, err: BaseException | None = None) -> str:
    """One line for a `--dataset` that is neither a short name nor a loadable Hub dataset."""
    close = difflib.get_close_matches(name.strip().lower(), [*short_names(), *ALIASES], n=1)
    hint = f"did you mean {canonical_name(close[0])!r}? " if close else ""
    reason = f" ({' '.join(str(err).split())[:200]})" if err is not None else ""
    return (f"--dataset {name!r} is not a known benchmark and did not load as a Hub dataset id{reason}; {hint}"
            f"the short names are {', '.join(short_names())} (or a Hub id such as uoft-cs/cifar100, or image "
            "folders with --train_dir/--test_dir).")


def load_benchmark(
    name: str, data_dir: str | Path | None = None, revision: str | None = None
) -> tuple[DatasetDict, DatasetSpec]:
    """A benchmark as a `DatasetDict` (`train`, `test`) and the `DatasetSpec` describing its columns.

    `name` is `cifar100`, `imagenet_r`, `cub200`, `cars196` (aliases: `imagenet-r`, `cub`, `cars`, ...),
    `digits`, or any Hub dataset id with `train`/`test` splits and `image`/`label` columns. With
    `data_dir`, nothing is downloaded: the data is read from the benchmark's on-disk layout (see the
    module docstring) or from `train/<class>/` and `test/<class>/` image folders. `revision` overrides
    the Hub commit the benchmark is pinned to.
    """
    key = canonical_name(name)
    if key == "digits":
        return load_digits_dataset(), DatasetSpec("sklearn:digits", "image", "label", num_classes=10)
    if data_dir is not None:
        return _load_local(key, Path(data_dir).expanduser())
    spec = KNOWN_DATASETS.get(key, DatasetSpec(name, "image", "label"))
    try:
        data = load_dataset(spec.hub_id, spec.config, revision=revision or spec.revision)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        if key in KNOWN_DATASETS or Path(name).exists():
            raise
        raise UserError(unknown_dataset_message(name, err)) from err
    if spec.single_split is not None:
        if spec.single_split not in data:
            raise UserError(f"{spec.hub_id} has no {spec.single_split!r} split (splits: {list(data)}).")
        data = split_per_class(data[spec.single_split], spec.label_column)
    if revision is not None:
        spec = replace(spec, revision=revision)
    return data, spec


# ---------------------------------------------------------------------------------------------- splits
def split_per_class(
    data: Dataset,
    label_column: str,
    test_fraction: float = IMAGENET_R_TEST_FRACTION,
    seed: int = IMAGENET_R_SPLIT_SEED,
) -> DatasetDict:
    """Hold out `test_fraction` of every class for testing, the rest for training.

    Deterministic for a given row order and seed: classes are visited in sorted order and one
    `numpy.random.RandomState(seed)` permutes each class's rows. Every class keeps at least one
    training image, so the split never drops a class from the stream.
    """
    labels = data[label_column]
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    return DatasetDict(train=data.select(train_idx), test=data.select(test_idx))


# ---------------------------------------------------------------------------------------------- local
def _load_local(key: str, root: Path) -> tuple[DatasetDict, DatasetSpec]:
    require_path(root, folder=True, what="--data_dir", fix="give the folder that holds the data set's files")
    spec = KNOWN_DATASETS.get(key, DatasetSpec(key, "image", "label"))
    local = replace(spec, hub_id=str(root), image_column="image", label_column="label", revision=None,
                    config=None, single_split=None, train_split="train", test_split="test")
    if has_split_folders(root):
        return load_split_image_folders(root / "train", root / "test"), local
    if key == "cifar100":
        archive = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        if (archive / "train").is_file() and (archive / "meta").is_file():
            return load_cifar100_python(archive), local
    elif key == "imagenet_r":
        folder = root / "imagenet-r" if (root / "imagenet-r").is_dir() else root
        if has_split_folders(folder):
            return load_split_image_folders(folder / "train", folder / "test"), local
        if class_folders(folder):
            return load_imagenet_r_folder(folder), local
    elif key == "cub200":
        folder = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
        if (folder / "images.txt").is_file():
            return load_cub200_folder(folder), local
    layouts = {
        "cifar100": "cifar-100-python/{train,test,meta} (the official python archive)",
        "imagenet_r": "imagenet-r/<wnid>/*.jpg",
        "cub200": "CUB_200_2011/ with images/, images.txt, image_class_labels.txt, train_test_split.txt",
    }
    expected = "train/<class>/ and test/<class>/ image folders"
    if key in layouts:
        expected = f"{layouts[key]}, or {expected}"
    raise MissingFileError(f"{root} does not hold {key} data: expected {expected}.")
