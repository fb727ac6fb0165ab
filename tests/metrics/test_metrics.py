"""Tests for the local `continual_accuracy` evaluate module and its helpers.

Expected values are computed by hand in the comments, not with a second implementation.
"""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import pytest

from slca_peft.metrics import (
    CONTINUAL_ACCURACY_PATH,
    format_accuracy_table,
    load_continual_accuracy,
    summarize_accuracy_matrix,
)

# A[t][j]: accuracy on task j after learning task t.
MATRIX = [[90.0], [70.0, 85.0], [60.0, 75.0, 95.0]]
SIZES = [100, 100, 50]


@pytest.fixture
def metric():
    return load_continual_accuracy(keep_in_memory=True)


def test_module_folder_layout():
    folder = Path(CONTINUAL_ACCURACY_PATH)
    # evaluate.load(folder) looks for <folder>/<folder name>.py
    assert (folder / f"{folder.name}.py").is_file()


def test_loads_offline_from_package_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    module = evaluate.load(CONTINUAL_ACCURACY_PATH, keep_in_memory=True)
    assert isinstance(module, evaluate.Metric)
    assert module.name == "continual_accuracy"
    assert "2408.08295" in module.citation
    assert set(module.features) == {"accuracy_row", "task_test_size"}
    out = module.compute(accuracy_row=[[50.0]], task_test_size=[10])
    assert out["last_accuracy"] == pytest.approx(50.0)


def test_hand_computed_3x3(metric):
    out = metric.compute(accuracy_row=MATRIX, task_test_size=SIZES)
    # step 0: 90
    # step 1: (70*100 + 85*100) / 200 = 15500 / 200 = 77.5
    # step 2: (60*100 + 75*100 + 95*50) / 250 = (6000 + 7500 + 4750) / 250 = 18250 / 250 = 73.0
    assert out["accuracy_per_step"] == pytest.approx([90.0, 77.5, 73.0])
    assert out["last_accuracy"] == pytest.approx(73.0)
    # (90 + 77.5 + 73) / 3 = 240.5 / 3
    assert out["average_incremental_accuracy"] == pytest.approx(240.5 / 3)
    # forgetting: task 0: max(90, 70) - 60 = 30 ; task 1: max(85) - 75 = 10 ; mean = 20
    assert out["average_forgetting"] == pytest.approx(20.0)
    # BWT: task 0: 60 - 90 = -30 ; task 1: 75 - 85 = -10 ; mean = -20
    assert out["backward_transfer"] == pytest.approx(-20.0)
    assert set(out) == {
        "accuracy_per_step",
        "last_accuracy",
        "average_incremental_accuracy",
        "average_forgetting",
        "backward_transfer",
        "missing_entries",
        "forgetting_tasks",
    }
    assert (out["missing_entries"], out["forgetting_tasks"]) == (0, [0, 1])  # every entry measured


def test_forgetting_uses_best_earlier_accuracy_not_diagonal(metric):
    # Task 0 improves after task 1 (80 -> 85), so forgetting and -BWT differ.
    matrix = [[80.0], [85.0, 90.0], [70.0, 88.0, 95.0]]
    out = metric.compute(accuracy_row=matrix, task_test_size=[1, 1, 1])
    # forgetting: task 0: max(80, 85) - 70 = 15 ; task 1: max(90) - 88 = 2 ; mean = 8.5
    assert out["average_forgetting"] == pytest.approx(8.5)
    # BWT: task 0: 70 - 80 = -10 ; task 1: 88 - 90 = -2 ; mean = -6
    assert out["backward_transfer"] == pytest.approx(-6.0)
    # equal sizes: step 2 = (70 + 88 + 95) / 3 = 253 / 3
    assert out["accuracy_per_step"][2] == pytest.approx(253.0 / 3)


def test_micro_weighting_depends_on_sizes(metric):
    matrix = [[100.0], [100.0, 40.0]]
    # sizes 300 / 100: (100*300 + 40*100) / 400 = 34000 / 400 = 85
    out = metric.compute(accuracy_row=matrix, task_test_size=[300, 100])
    assert out["accuracy_per_step"] == pytest.approx([100.0, 85.0])
    # sizes 100 / 300: (100*100 + 40*300) / 400 = 22000 / 400 = 55
    out = load_continual_accuracy(keep_in_memory=True).compute(accuracy_row=matrix, task_test_size=[100, 300])
    assert out["accuracy_per_step"] == pytest.approx([100.0, 55.0])
    # equal sizes reduce to the plain mean (100 + 40) / 2 = 70
    assert summarize_accuracy_matrix(matrix)["last_accuracy"] == pytest.approx(70.0)


def test_single_task(metric):
    out = metric.compute(accuracy_row=[[42.5]], task_test_size=[7])
    assert out["accuracy_per_step"] == pytest.approx([42.5])
    assert out["last_accuracy"] == pytest.approx(42.5)
    assert out["average_incremental_accuracy"] == pytest.approx(42.5)
    assert out["average_forgetting"] == 0.0
    assert out["backward_transfer"] == 0.0


def test_incremental_add_matches_compute(metric):
    for row, size in zip(MATRIX, SIZES, strict=True):
        metric.add(accuracy_row=row, task_test_size=size)
    out = metric.compute()
    assert out["accuracy_per_step"] == pytest.approx([90.0, 77.5, 73.0])
    assert out["average_forgetting"] == pytest.approx(20.0)


def test_summarize_accuracy_matrix_uses_sizes():
    out = summarize_accuracy_matrix(MATRIX, task_test_sizes=SIZES)
    assert out["accuracy_per_step"] == pytest.approx([90.0, 77.5, 73.0])
    assert out["backward_transfer"] == pytest.approx(-20.0)
    # without sizes every task weighs the same: step 2 = (60 + 75 + 95) / 3 = 230 / 3
    assert summarize_accuracy_matrix(MATRIX)["last_accuracy"] == pytest.approx(230.0 / 3)


def test_summarize_accepts_numpy_rows():
    np = pytest.importorskip("numpy")
    rows = [np.asarray(r, dtype=np.float32) for r in MATRIX]
    out = summarize_accuracy_matrix(rows, task_test_sizes=np.asarray(SIZES))
    assert out["last_accuracy"] == pytest.approx(73.0)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([[90.0], [70.0, 85.0, 0.0]], r"accuracy_row 1 must have exactly 2 entries.*row\[: t \+ 1\]"),
        ([[90.0, 0.0], [70.0, 85.0]], r"accuracy_row 0 must have exactly 1 entries"),
        ([[70.0, 85.0]], r"accuracy_row 0 must have exactly 1 entries"),
    ],
)
def test_bad_row_length_raises(metric, rows, match):
    with pytest.raises(ValueError, match=match):
        metric.compute(accuracy_row=rows, task_test_size=[10] * len(rows))


def test_full_square_matrix_rejected():
    square = [[90.0, 0.0, 0.0], [70.0, 85.0, 0.0], [60.0, 75.0, 95.0]]
    with pytest.raises(ValueError, match="lower triangle"):
        summarize_accuracy_matrix(square)
    # the suggested fix works
    fixed = [row[: t + 1] for t, row in enumerate(square)]
    assert summarize_accuracy_matrix(fixed, SIZES)["last_accuracy"] == pytest.approx(73.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_accuracy_raises(metric, bad):
    with pytest.raises(ValueError, match=r"accuracy_row 1 entry 0 must be a finite number"):
        metric.compute(accuracy_row=[[90.0], [bad, 85.0]], task_test_size=[10, 10])


@pytest.mark.parametrize("size", [0, -5])
def test_non_positive_size_raises(metric, size):
    with pytest.raises(ValueError, match=r"task_test_size 1 must be a positive"):
        metric.compute(accuracy_row=MATRIX, task_test_size=[100, size, 50])


def test_size_count_mismatch_raises():
    # evaluate itself rejects columns of different lengths before _compute runs
    with pytest.raises(ValueError, match=r"accuracy_row \(3\) and task_test_size \(2\)"):
        summarize_accuracy_matrix(MATRIX, task_test_sizes=[100, 100])


def test_empty_matrix_raises():
    with pytest.raises(ValueError, match="at least one task step"):
        summarize_accuracy_matrix([])


def test_the_accuracy_table_as_text_and_as_markdown():
    matrix, seen = [[90.0], [80.0, 70.5]], [90.0, 75.25]
    assert format_accuracy_table(matrix, seen).splitlines() == [
        "after \\ on T1     T2      all seen",
        "task 1       90.0             90.0",  # a task not yet learned leaves its column blank
        "task 2       80.0   70.5      75.2",
    ]
    assert format_accuracy_table(matrix, seen, markdown=True).splitlines() == [
        "| after task | T1 | T2 | all seen |",
        "|---|---|---|---|",
        "| 1 | 90.0 | | 90.0 |",
        "| 2 | 80.0 | 70.5 | 75.2 |",
    ]
