"""Datasets in their usual on-disk layouts, read as a `DatasetDict` with `train`/`test` splits: image
folders (`train/<class>/*`, `test/<class>/*`), the ImageNet-R tree, CUB-200's tables, CIFAR-100's python
archive (read without running code) and scikit-learn's digits (the offline demo). `benchmarks` picks
the loader for a benchmark name."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from ..utils.errors import MissingFileError, UserError, one_line
from ..utils.reading import open_regular, read_text, require_path
from .checks import IMAGE_EXTENSIONS, list_class_folder

#: Largest list file of a dataset release read (CUB-200's, DomainNet's are megabytes).
LIST_FILE_BYTES = 256 << 20

#: Fraction of each ImageNet-R class held out for testing, as in the continual-learning literature (80/20).
IMAGENET_R_TEST_FRACTION = 0.2
#: Seed of that per-class split (numpy RandomState); fixed so every run sees the same split.
IMAGENET_R_SPLIT_SEED = 0


def stratified_split(labels: Sequence, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (sorted) of a per-class `1 - test_fraction` / `test_fraction` split."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    values = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for cls in sorted(set(values.tolist())):
        rows = np.nonzero(values == cls)[0]
        rows = rows[rng.permutation(len(rows))]
        n_test = min(int(round(len(rows) * test_fraction)), len(rows) - 1)
        test_idx.extend(rows[:n_test].tolist())
        train_idx.extend(rows[n_test:].tolist())
    return sorted(train_idx), sorted(test_idx)


def has_split_folders(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def image_dataset(paths: Sequence[str], labels: Sequence[int], names: Sequence[str]) -> Dataset:
    """Image files decoded lazily by `datasets`, with integer labels named by `names`."""
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    try:
        return Dataset.from_dict({"image": list(paths), "label": list(labels)}, features=features)
    except UnicodeEncodeError as err:  # a file or folder name that is not valid UTF-8: named, escaped
        raise UserError(one_line(err)) from None


def load_split_image_folders(train_dir: str | Path, test_dir: str | Path, *, min_classes: int = 2) -> DatasetDict:
    """`train/<class>/*` and `test/<class>/*`: class ids follow the sorted training folder names.

    Built from the file listing (`data_checks.list_class_folder`), not datasets' imagefolder: any folder
    name is a class name (even `train`), label files are refused, non-image files skipped with a warning,
    an empty class folder is an error. A class may lack a test folder (warned about before training).
    """
    train_root, test_root = Path(train_dir), Path(test_dir)
    for root in (train_root, test_root):
        require_path(root, folder=True, what="image folder",
                     fix="give a folder with one sub-folder of images per class (--train_dir, --test_dir)")
    names = [p.name for p in class_folders(train_root)]
    if len(names) < min_classes:
        raise UserError(f"{train_root} has {len(names)} class folder(s); put each class in its own sub-folder (at "
                         f"least {min_classes}).")
    unknown = sorted({p.name for p in class_folders(test_root)} - set(names))
    if unknown:
        raise UserError(f"test class folder(s) {unknown[:5]} have no training folder in {train_root}.")
    splits = {}
    for split, root in (("train", train_root), ("test", test_root)):
        paths, labels = list_class_folder(root, names, require_all=split == "train")
        if not paths:
            raise UserError(f"no images found under {root}.")
        splits[split] = image_dataset(paths, labels, names)
    return DatasetDict(splits)


def load_imagenet_r_folder(
    folder: str | Path, test_fraction: float = IMAGENET_R_TEST_FRACTION, seed: int = IMAGENET_R_SPLIT_SEED
) -> DatasetDict:
    """The released `imagenet-r/<wnid>/*.jpg` tree, split 80/20 per class (`stratified_split`).

    Files are listed in sorted order, so the split depends only on the files and the seed. The
    published runs used a fixed 80/20 split whose file lists are not part of the paper; to use a
    particular split instead, lay it out as `train/<wnid>/` and `test/<wnid>/` folders.
    """
    root = Path(folder)
    names = [p.name for p in class_folders(root)]
    paths, labels = [], []
    for label, name in enumerate(names):
        files = _image_files(root / name)
        paths.extend(str(p) for p in files)
        labels.extend([label] * len(files))
    if len(names) < 2 or not paths:
        raise UserError(f"{root} holds {len(names)} class folder(s) and {len(paths)} image(s); expected <wnid>/*.jpg.")
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    return DatasetDict(
        train=image_dataset([paths[i] for i in train_idx], [labels[i] for i in train_idx], names),
        test=image_dataset([paths[i] for i in test_idx], [labels[i] for i in test_idx], names),
    )


def _read_table(path: Path, columns: int) -> list[list[str]]:
    rows = []
    for number, line in enumerate(read_text(path, LIST_FILE_BYTES).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise UserError(f"{path}:{number}: expected {columns} fields, got {line!r}.")
        rows.append(parts)
    return rows


def load_cub200_folder(folder: str | Path) -> DatasetDict:
    """CUB-200-2011 as released: `images.txt` (id, path under `images/`), `image_class_labels.txt`
    (id, 1-based class), `train_test_split.txt` (id, 1 = train) and `classes.txt` (class, name).
    The official split is kept: 5,994 training and 5,794 test images."""
    root = Path(folder)
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        if not (root / name).is_file():
            raise MissingFileError(f"{root / name} is missing; expected the CUB_200_2011 release layout.")
    classes = sorted((int(i), n) for i, n in _read_table(root / "classes.txt", 2))
    names = [n for _, n in classes]
    index = {cid: k for k, (cid, _) in enumerate(classes)}
    image_path = {i: p for i, p in _read_table(root / "images.txt", 2)}
    label = {i: index[int(c)] for i, c in _read_table(root / "image_class_labels.txt", 2)}
    is_train = {i: s.strip() == "1" for i, s in _read_table(root / "train_test_split.txt", 2)}
    missing = sorted(set(image_path) - set(label) | set(image_path) - set(is_train))
    if missing:
        raise UserError(f"image id(s) {missing[:5]} have no class or split entry in {root}.")
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for image_id in sorted(image_path, key=int):
        paths, labels = splits["train" if is_train[image_id] else "test"]
        paths.append(str(root / "images" / image_path[image_id]))
        labels.append(label[image_id])
    return DatasetDict({split: image_dataset(p, y, names) for split, (p, y) in splits.items()})


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python batches and nothing else: only the numpy array reconstruction
    globals are resolvable, so a file that tries to import or call anything else is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2: str -> bytes, nothing more
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-100 batch holds only lists, bytes and numpy arrays."
            )
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own reconstructor, whatever its module
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def _unpickle_cifar(path: Path) -> dict:
    with open_regular(path, fix="give the CIFAR archive's batch files") as handle:
        data = _CifarUnpickler(handle, encoding="bytes").load()
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a CIFAR batch (a dict).")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def load_cifar100_python(folder: str | Path) -> DatasetDict:
    """The official CIFAR-100 python archive (`cifar-100-python/{train,test,meta}`).

    That format is a Python pickle. Only these three files are read, and with a restricted unpickler
    (`encoding="bytes"`, as the archive's own instructions say) that can rebuild numpy arrays and
    nothing else, so a tampered file fails instead of running code. Images are 32x32 RGB; the
    `fine_labels` (100 classes) are the labels.
    """
    root = Path(folder)
    meta = _unpickle_cifar(root / "meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]
    splits = {}
    for split in ("train", "test"):
        batch = _unpickle_cifar(root / split)
        pixels = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = [int(v) for v in batch["fine_labels"]]
        if len(labels) != len(pixels):
            raise UserError(f"{root / split}: {len(pixels)} images but {len(labels)} labels.")
        features = Features({"image": Image(), "label": ClassLabel(names=names)})
        splits[split] = Dataset.from_dict({"image": list(pixels), "label": labels}, features=features)
    return DatasetDict(splits)


# ---------------------------------------------------------------------------------------------- demo
def load_digits_dataset(image_size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes) as upscaled grayscale images,
    split per class so every digit is in both splits."""
    from PIL import Image as PILImage

    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise UserError("the digits dataset (the offline demo, --dataset digits) comes from scikit-learn, which is "
                        "not installed: pip install 'slca-peft[demo]' (or scikit-learn).") from err

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
