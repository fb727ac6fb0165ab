import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value
from PIL import Image

from slca_peft import TaskSequence
from slca_peft.data.tasks import class_order, split_sizes


def labelled(labels, names=None) -> Dataset:
    feature = ClassLabel(names=names) if names else Value("int64")
    return Dataset.from_dict({"image": list(range(len(labels))), "label": labels},
                             features=Features({"image": Value("int64"), "label": feature}))


def test_class_order_for_seed_1993_is_numpys_permutation():
    np.random.seed(1993)
    expected = np.random.permutation(100).tolist()
    assert class_order(100, 1993) == expected
    assert class_order(5, None) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("num", "init", "inc", "expected"),
    [(100, 10, 10, [10] * 10), (200, 20, 20, [20] * 10), (196, 20, 20, [20] * 9 + [16]), (10, 2, 2, [2] * 5)],
)
def test_splits_of_the_paper_benchmarks(num, init, inc, expected):
    assert split_sizes(num, init, inc) == expected


def test_labels_are_remapped_to_class_order_positions():
    train_labels = [c for c in range(6) for _ in range(3)]
    test_labels = [c for c in range(6) for _ in range(2)]
    names = [f"c{i}" for i in range(6)]
    seq = TaskSequence(labelled(train_labels, names), labelled(test_labels, names), init_cls=2, increment=2, seed=7)
    order = class_order(6, 7)
    assert seq.order == order and seq.label_names == names and seq.position_names == [names[c] for c in order]
    assert len(seq) == 3 and seq.offsets() == [0, 2, 4, 6]
    for task in seq:
        assert sorted(set(task.train["label"])) == task.classes
        assert len(task.train) == 3 * len(task.classes) and len(task.test) == 2 * len(task.classes)
        # The raw id of every image maps back to its original class through the order.
        for idx, label in zip(task.train["image"], task.train["label"], strict=True):
            assert order[label] == train_labels[idx]
    assert len(seq.seen_test(1)) == 8
    assert seq.task_of_class(5) == 2


def test_a_task_is_built_once_with_the_rows_a_label_scan_gives(monkeypatch):
    rng = np.random.RandomState(0)
    train_labels, test_labels = rng.randint(0, 30, size=600).tolist(), rng.randint(0, 30, size=200).tolist()
    seq = TaskSequence(labelled(train_labels), labelled(test_labels), init_cls=4, increment=3, seed=5)
    selects = []
    original = Dataset.select
    monkeypatch.setattr(Dataset, "select", lambda self, *a, **k: selects.append(1) or original(self, *a, **k))
    position = np.empty(30, dtype=np.int64)
    position[seq.order] = np.arange(30)
    for _ in range(3):  # the loop asks for every seen task after each task
        for t in range(len(seq)):
            task = seq[t]
            assert task is seq[t]
            lo, hi = seq.offsets()[t], seq.offsets()[t + 1]
            for data, raw in ((task.train, train_labels), (task.test, test_labels)):
                mapped = position[np.asarray(raw)]
                # Rows in their order in the data, exactly those of the task's classes.
                assert data["image"] == np.nonzero((mapped >= lo) & (mapped < hi))[0].tolist()
    assert len(selects) == 2 * len(seq)  # train and test of each task, once
    assert [t.task_id for t in seq] == list(range(len(seq)))


def test_string_labels_are_accepted():
    train = Dataset.from_dict({"image": [0, 1, 2, 3], "label": ["cat", "dog", "cat", "eel"]})
    test = Dataset.from_dict({"image": [0, 1, 2], "label": ["dog", "eel", "cat"]})
    seq = TaskSequence(train, test, init_cls=2, increment=1, seed=None)
    assert seq.label_names == ["cat", "dog", "eel"]
    assert seq.test["label"] == [1, 2, 0]


def test_bad_inputs_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="init_cls=8 is larger than the 3 classes"):
        TaskSequence(labelled([0, 1, 2]), labelled([0, 1, 2]), init_cls=8, increment=1)
    with pytest.raises(ValueError, match=r"test label\(s\) \[5\] are absent from the training data"):
        TaskSequence(labelled([0, 1, 2]), labelled([0, 5]), init_cls=2, increment=1)
    with pytest.raises(ValueError, match=r"test class\(es\) \['zebra'\] are absent"):
        TaskSequence(Dataset.from_dict({"image": [0, 1], "label": ["a", "b"]}),
                     Dataset.from_dict({"image": [0], "label": ["zebra"]}), init_cls=1, increment=1)
    with pytest.raises(ValueError, match="no column 'img'"):
        TaskSequence(labelled([0, 1]), labelled([0, 1]), init_cls=1, increment=1, image_column="img")


def test_image_folder_errors_name_the_problem(tmp_path):
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "only" / "a.png")
    with pytest.raises(ValueError, match="1 class sub-folder"):
        TaskSequence.from_image_folders(one, one, init_cls=1, increment=1)
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(bad / c / "ok.png")
    (bad / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"unreadable image .*broken\.png"):
        TaskSequence.from_image_folders(bad, bad, init_cls=1, increment=1)


def test_image_folders_load_with_matching_class_names(image_folders):
    train_dir, test_dir = image_folders
    seq = TaskSequence.from_image_folders(train_dir, test_dir, init_cls=2, increment=2, seed=1993)
    assert seq.num_classes == 6 and len(seq) == 3
    assert sorted(seq.label_names) == [f"class_{k:02d}" for k in range(6)]
    task = seq[1]
    assert len(task.train) == 24 and len(task.test) == 10
