"""Property-based checks of task sequences over random splits, class counts and images per class."""

from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from slca_peft import TaskSequence


@settings(max_examples=40, deadline=None)
@given(
    num_classes=st.integers(2, 30),
    init_frac=st.floats(0.01, 1.0),
    increment=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    per_class=st.integers(1, 4),
)
def test_task_sequence_partitions_every_class_and_sample(num_classes, init_frac, increment, seed, per_class):
    init_cls = max(1, int(init_frac * num_classes))
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    train = Dataset.from_dict({"image": list(range(len(labels))), "label": labels})
    test = Dataset.from_dict({"image": list(range(num_classes)), "label": list(range(num_classes))})
    seq = TaskSequence(train, test, init_cls=init_cls, increment=increment, seed=seed)
    assert sum(seq.task_sizes) == num_classes and seq.task_sizes[0] == init_cls
    assert all(1 <= s <= increment for s in seq.task_sizes[1:])
    seen_classes, seen_images = [], []
    for task in seq:
        assert task.classes == list(range(seq.offsets()[task.task_id], seq.offsets()[task.task_id + 1]))
        assert set(task.train["label"]) == set(task.classes) and set(task.test["label"]) == set(task.classes)
        seen_classes += task.classes
        seen_images += task.train["image"]
        for image, label in zip(task.train["image"], task.train["label"], strict=True):
            assert seq.order[label] == labels[image]
    assert seen_classes == list(range(num_classes)) and sorted(seen_images) == list(range(len(labels)))
