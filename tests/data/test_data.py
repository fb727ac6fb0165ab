"""Benchmark loaders: local copies in each dataset's release layout, the Hub path (mocked), the recipe flags."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as HFImage
from PIL import Image

import slca_peft.data.benchmarks as data_module
from slca_peft.data.benchmarks import KNOWN_DATASETS, load_benchmark
from slca_peft.data.formats import stratified_split
from slca_peft.utils.errors import UserError


def save_image(path: Path, value: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path, format=fmt)


# ------------------------------------------------------------------------------------------ CIFAR-100
def write_cifar_archive(root: Path, names=("apple", "bear", "cloud"), train_per_class=4, test_per_class=2) -> Path:
    """The official cifar-100-python layout: pickled dicts with bytes keys, data rows as R|G|B planes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for c in range(len(names)) for _ in range(per_class)]
        batch = {
            b"filenames": [f"{split}_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": split.encode(),
            b"fine_labels": labels,
            b"coarse_labels": [0] * len(labels),
            b"data": rng.randint(0, 256, size=(len(labels), 3072)).astype(np.uint8),
        }
        with (folder / split).open("wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    with (folder / "meta").open("wb") as fh:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"all"]}, fh, protocol=2)
    return folder


def test_cifar100_official_python_archive(tmp_path):
    folder = write_cifar_archive(tmp_path)
    data, spec = load_benchmark("cifar100", data_dir=tmp_path)
    assert (len(data["train"]), len(data["test"])) == (12, 6)
    assert data["train"].features["label"].names == ["apple", "bear", "cloud"]
    assert (spec.image_column, spec.label_column, spec.hub_id) == ("image", "label", str(tmp_path))
    with (folder / "train").open("rb") as fh:
        raw = pickle.load(fh, encoding="bytes")  # the test's own file
    expected = raw[b"data"][5].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(data["train"][5]["image"].convert("RGB")), expected)
    assert data["train"][5]["label"] == raw[b"fine_labels"][5]
    # data_dir may also be the cifar-100-python folder itself.
    assert len(load_benchmark("cifar-100", data_dir=folder)[0]["test"]) == 6


def test_cifar100_loader_refuses_a_pickle_that_runs_code(tmp_path, exploit):
    folder = write_cifar_archive(tmp_path)
    payload, marker = exploit
    with (folder / "train").open("wb") as fh:
        pickle.dump({b"data": payload, b"fine_labels": []}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_benchmark("cifar100", data_dir=tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ ImageNet-R
def test_imagenet_r_folder_is_split_80_20_per_class_reproducibly(tmp_path):
    wnids = ["n01443537", "n01484850", "n01494475"]
    for k, wnid in enumerate(wnids):
        for i in range(10):
            save_image(tmp_path / "imagenet-r" / wnid / f"art_{i}.jpg", 20 * k + i, fmt="JPEG")
    (tmp_path / "imagenet-r" / "README.txt").write_text("not an image")
    data, _ = load_benchmark("imagenet-r", data_dir=tmp_path)
    again, _ = load_benchmark("imagenet_r", data_dir=tmp_path / "imagenet-r")
    assert data["train"].features["label"].names == wnids
    train_labels, test_labels = data["train"]["label"], data["test"]["label"]
    assert [train_labels.count(c) for c in range(3)] == [8, 8, 8]
    assert [test_labels.count(c) for c in range(3)] == [2, 2, 2]
    train_paths = {r["path"] for r in data["train"].cast_column("image", HFImage(decode=False))["image"]}
    test_paths = {r["path"] for r in data["test"].cast_column("image", HFImage(decode=False))["image"]}
    assert not train_paths & test_paths and len(train_paths | test_paths) == 30
    assert again["test"]["label"] == test_labels and again["train"].num_rows == 24


def test_stratified_split_keeps_every_class_in_training():
    labels = ["a"] * 5 + ["b"] * 1 + ["c"] * 2
    train, test = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + test) == list(range(8))
    assert {labels[i] for i in train} == {"a", "b", "c"}
    assert stratified_split(labels, 0.2, seed=0) == (train, test)


# ------------------------------------------------------------------------------------------ CUB-200
def write_cub(root: Path) -> Path:
    folder = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split = [], [], []
    image_id = 0
    for c, name in enumerate(classes, 1):
        for i in range(4):
            image_id += 1
            rel = f"{name}/{name.split('.')[1]}_{i:04d}.jpg"
            save_image(folder / "images" / rel, 10 * c + i, fmt="JPEG")
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {1 if i < 3 else 0}")
    (folder / "classes.txt").write_text("\n".join(f"{c} {n}" for c, n in enumerate(classes, 1)) + "\n")
    (folder / "images.txt").write_text("\n".join(images) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return folder


def test_cub200_release_layout_keeps_the_official_split(tmp_path):
    write_cub(tmp_path)
    data, spec = load_benchmark("cub200", data_dir=tmp_path)
    assert data["train"].features["label"].names[0] == "001.Black_footed_Albatross"
    assert data["train"]["label"] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and data["test"]["label"] == [0, 1, 2]
    image = data["test"][1]["image"]
    assert image.size == (8, 8) and abs(int(np.asarray(image)[0, 0, 0]) - 23) <= 2  # class 2, image 3
    assert spec.num_classes == 200 and spec.train_split == "train"


# ------------------------------------------------------------------------------------------ Cars-196
def test_cars196_image_folders_and_a_clear_error_for_other_layouts(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for k, name in enumerate(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]):
            for i in range(count):
                save_image(tmp_path / "cars" / split / name / f"{i:05d}.jpg", 50 * k + i, fmt="JPEG")
    data, _ = load_benchmark("cars", data_dir=tmp_path / "cars")
    assert data["train"].features["label"].names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert (data["train"].num_rows, data["test"].num_rows) == (6, 4)
    (tmp_path / "devkit").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train/<class>/ and test/<class>/"):
        load_benchmark("cars196", data_dir=tmp_path / "devkit")


# ------------------------------------------------------------------------------------------ Hub
def test_hub_loading_uses_the_documented_repo_columns_and_revision(monkeypatch):
    calls = []
    features = Features({"image": Value("string"), "wnid": Value("string"), "label": ClassLabel(names=["a", "b"])})

    def fake_load_dataset(path, name=None, revision=None):
        calls.append((path, name, revision))
        rows = {"image": [f"img{i}" for i in range(20)], "wnid": ["n1"] * 10 + ["n2"] * 10, "label": [0, 1] * 10}
        ds = Dataset.from_dict(rows, features=features)
        return DatasetDict(test=ds) if "imagenet-r" in path else DatasetDict(train=ds, test=ds)

    monkeypatch.setattr(data_module, "load_dataset", fake_load_dataset)
    data, spec = load_benchmark("CUB")
    assert calls[-1] == ("Donghyun99/CUB-200-2011", None, KNOWN_DATASETS["cub200"].revision)
    assert (spec.image_column, spec.label_column) == ("image", "label") and set(data) == {"train", "test"}
    load_benchmark("cars196", revision="main")
    assert calls[-1] == ("Donghyun99/Stanford-Cars", None, "main")
    data, spec = load_benchmark("imagenet_r")
    assert calls[-1][0] == "axiong/imagenet-r" and spec.label_column == "wnid"
    assert (data["train"].num_rows, data["test"].num_rows) == (16, 4)
    assert sorted(data["test"]["wnid"]) == ["n1", "n1", "n2", "n2"]
    assert load_benchmark("cifar100")[1].label_column == "fine_label"
    assert calls[-1] == ("uoft-cs/cifar100", None, None)
    load_benchmark("someone/their-images")
    assert calls[-1] == ("someone/their-images", None, None)


def test_known_datasets_are_documented():
    doc = data_module.__doc__ + (ROOT / "docs" / "recipes.md").read_text()
    for name, spec in KNOWN_DATASETS.items():
        assert name in doc and spec.hub_id in doc
        if spec.revision:
            assert spec.revision in (ROOT / "docs" / "recipes.md").read_text()


# ------------------------------------------------------------------------------------------ recipe
def test_recipe_dataset_and_data_dir_flags(tmp_path, recipe):
    write_cub(tmp_path)
    _, data_args, args = recipe.parse_args([
        "--model_config", "m.json", "--dataset", "cub200", "--data_dir", str(tmp_path), "--init_cls", "2",
        "--increment", "1", "--class_order_seed", "1993", "--output_dir", str(tmp_path / "out"),
    ])
    tasks = recipe.build_tasks(data_args, args)
    assert tasks.num_classes == 3 and tasks.task_sizes == [2, 1]
    assert (len(tasks.train), len(tasks.test)) == (9, 3)
    assert sorted(tasks.label_names)[0] == "001.Black_footed_Albatross"
    with pytest.raises(UserError, match="--data_dir needs --dataset"):
        recipe.parse_args(["--model_config", "m.json", "--train_dir", "a", "--test_dir", "b", "--data_dir", "x",
                           "--output_dir", "o"])
