"""Domain-incremental learning: the same classes arrive in a new domain per task."""

import json
import shutil

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from slca_peft.data.domains import DomainSequence
from slca_peft.utils.errors import UserError

NAMES = ["a", "b", "c", "d"]


def domain(style: int, per_class: int, seed: int) -> Dataset:
    """Class k: a bright square at position k. Domains differ in tint and background noise."""
    rng = np.random.RandomState(seed)
    images, labels = [], []
    for k in range(len(NAMES)):
        for _ in range(per_class):
            img = rng.randint(0, 40 + 40 * style, size=(32, 32, 3)).astype(np.uint8)
            img[(k // 2) * 16 : (k // 2) * 16 + 12, (k % 2) * 16 : (k % 2) * 16 + 12] = 255
            img[..., style % 3] //= 2  # tint
            images.append(PILImage.fromarray(img))
            labels.append(k)
    features = Features({"image": Image(), "label": ClassLabel(names=NAMES)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.mark.slow
def test_domain_incremental_run_has_one_head_and_per_domain_metrics(tmp_path, make_learner):
    domains = [(domain(s, 8, seed=s), domain(s, 4, seed=10 + s)) for s in range(3)]
    tasks = DomainSequence(domains, domain_names=["clean", "noisy", "noisier"])
    learner = make_learner(tasks, tmp_path, num_train_epochs=3, ca_samples_per_class=64)
    model = learner.model
    lora_rates = []
    original = learner.learn_task

    def spy(task):
        row = original(task)
        lora_rates.append(learner.trainer.group_learning_rates()["adapter"])
        return row

    learner.learn_task = spy
    result = learner.run()
    assert model.classifier.task_sizes == [4]  # one head over all domains
    assert [len(r) for r in result.accuracy_matrix] == [1, 2, 3]
    assert result.task_test_sizes == [16, 16, 16]
    assert all(row[t] > 25.0 for t, row in enumerate(result.accuracy_matrix)), result.accuracy_matrix
    # Statistics per domain and class, keyed domain * 4 + class, tagged with their domain.
    assert learner.statistics.classes == list(range(12))
    assert [learner.statistics.task_of_class[k] for k in (0, 5, 11)] == [0, 1, 2]
    # The slow learner's LoRA rate drops after the first domain, as for class-incremental tasks.
    assert lora_rates == pytest.approx([0.025, 0.005, 0.005])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task_sizes"] == [4, 4, 4]
    state = json.loads((tmp_path / "task_2" / "continual_state.json").read_text())
    assert state["incremental"] == "domain" and state["domains"] == ["clean", "noisy", "noisier"]


def test_domains_must_share_their_classes():
    other = Dataset.from_dict({"image": [0, 1], "label": ["x", "y"]})
    same = Dataset.from_dict({"image": [0, 1], "label": ["a", "b"]})
    with pytest.raises(ValueError, match="share the same class names"):
        DomainSequence([(same, same), (other, other)])
    with pytest.raises(ValueError, match="at least 2 domains"):
        DomainSequence([(same, same)])


def write_domain(root, name: str, style: int, release_layout: bool, label_ids=(0, 1, 2, 3)) -> None:
    """A domain on disk, as DomainNet's release (list files, class NAMES[k] listed with id
    label_ids[k]) or as train/ and test/ class folders."""
    for split, per_class, seed in (("train", 8, style), ("test", 4, 10 + style)):
        ds = domain(style, per_class, seed)
        lines = []
        for i, row in enumerate(ds):
            cls = NAMES[row["label"]]
            rel = f"{name}/{cls}/{name}_{split}_{i:03d}.png" if release_layout else f"{name}/{split}/{cls}/{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            row["image"].save(root / rel)
            lines.append(f"{rel} {label_ids[row['label']]}")
        if release_layout:
            (root / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_domain_folders_in_both_layouts_load_with_shared_classes(tmp_path):
    from slca_peft.data.domains import load_domain_folders

    # The release lists number the classes in another order than the folders' sorted names.
    write_domain(tmp_path, "real", 0, release_layout=True, label_ids=(2, 0, 3, 1))
    write_domain(tmp_path, "sketch", 1, release_layout=False)
    tasks = DomainSequence.from_folders(tmp_path, ["sketch", "real"])
    assert tasks.domain_names == ["sketch", "real"] and tasks.label_names == NAMES
    for task in tasks:
        assert (len(task.train), len(task.test)) == (32, 16)
        # Every image sits under the label of its class (label k: a bright square at position k).
        for split in (task.train, task.test):
            for row in split.with_format("numpy"):
                k = int(row["label"])
                assert row["image"][(k // 2) * 16 + 4, (k % 2) * 16 + 4].min() >= 127
    # Damaged list files and missing domains are errors that name the file and the fix.
    lines = (tmp_path / "real_train.txt").read_text().splitlines()
    (tmp_path / "real_train.txt").write_text("\n".join(lines[:-1] + [lines[-1].replace(" 1", " 0")]) + "\n")
    with pytest.raises(ValueError, match=r"real_train.txt:32: label 0 is 'b' on earlier lines, here 'd'"):
        load_domain_folders(tmp_path, ["real"])
    (tmp_path / "real_train.txt").write_text("\n".join(lines + ["real/b/gone.png 0"]) + "\n")
    with pytest.raises(FileNotFoundError, match=r"real_train.txt:33: .*gone.png does not exist"):
        load_domain_folders(tmp_path, ["real"])
    with pytest.raises(FileNotFoundError, match="domain 'quickdraw': expected quickdraw_train.txt"):
        load_domain_folders(tmp_path, ["quickdraw"])


@pytest.mark.slow
def test_recipe_runs_a_domain_incremental_stream(tmp_path, base_model_dir, recipe):
    root = tmp_path / "domainnet"
    for style, name in enumerate(["clipart", "painting"]):
        write_domain(root, name, style, release_layout=True)
    out = tmp_path / "run"
    args = ["--model_name_or_path", str(base_model_dir), "--data_dir", str(root), "--domains", "clipart", "painting",
            "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "0.05",
            "--ca_samples_per_class", "32", "--ca_batch_size", "32", "--ca_epochs", "2", "--use_cpu", "true",
            "--disable_tqdm", "true", "--output_dir", str(out)]
    summary = recipe.main(args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(row) for row in metrics["accuracy_matrix"]] == [1, 2] and metrics["task_sizes"] == [4, 4]
    assert summary["last_accuracy"] == metrics["last_accuracy"]
    state = json.loads((out / "task_1" / "continual_state.json").read_text())
    assert state["incremental"] == "domain" and state["domains"] == ["clipart", "painting"]
    with pytest.raises(UserError, match="--seeds varies the class order"):
        recipe.parse_args(args + ["--seeds", "1", "2"])
    with pytest.raises(UserError, match="--domains reads every domain from --data_dir"):
        recipe.parse_args(args + ["--test_dir", str(root)])
    # Killed after the first domain: resuming finishes with the same matrix; another domain order is refused.
    shutil.rmtree(out / "task_1")
    (out / "metrics.json").unlink()
    swap = {"clipart": "painting", "painting": "clipart"}
    swapped = [swap.get(a, a) for a in args]
    with pytest.raises(ValueError, match="domains"):
        recipe.main(swapped + ["--resume_from", "auto"])
    recipe.main(args + ["--resume_from", "auto"])
    assert json.loads((out / "metrics.json").read_text())["accuracy_matrix"] == metrics["accuracy_matrix"]
