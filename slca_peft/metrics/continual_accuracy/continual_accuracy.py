# Copyright 2025 The slca-peft Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Continual-learning accuracy summary (last / average incremental accuracy, forgetting, BWT).

This is a local `evaluate` module: load it offline with
``evaluate.load("<path to this folder>")`` (``slca_peft.metrics.load_continual_accuracy()`` does that).
It must stay self-contained (no relative imports) because ``evaluate`` copies the file into its
modules cache before importing it.
"""

from __future__ import annotations

import math

import datasets
import evaluate

_CITATION = """\
@article{zhang2024slcapp,
  title={SLCA++: Unleash the Power of Sequential Fine-tuning for Continual Learning with Pre-training},
  author={Zhang, Gengwei and Wang, Liyuan and Kang, Guoliang and Chen, Ling and Wei, Yunchao},
  journal={arXiv preprint arXiv:2408.08295},
  year={2024}
}
@inproceedings{chaudhry2018riemannian,
  title={Riemannian Walk for Incremental Learning: Understanding Forgetting and Intransigence},
  author={Chaudhry, Arslan and Dokania, Puneet K. and Ajanthan, Thalaiyasingam and Torr, Philip H. S.},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2018}
}
@inproceedings{lopezpaz2017gradient,
  title={Gradient Episodic Memory for Continual Learning},
  author={Lopez-Paz, David and Ranzato, Marc'Aurelio},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2017}
}
"""

_DESCRIPTION = """\
Summary metrics for class-incremental continual learning, as reported by SLCA / SLCA++.

Each example is one task step t and carries row t of the lower-triangular accuracy matrix A, where
A[t][j] is the accuracy (in percent) on the test classes of task j after training on task t
(j = 0..t), together with n_t, the number of test samples of task t. From T such rows the metric reports:

- accuracy_per_step[t] = sum_j A[t][j] * n_j / sum_j n_j, the micro accuracy over all classes seen so
  far (what SLCA++ calls the accuracy after step t);
- last_accuracy = accuracy_per_step[T-1];
- average_incremental_accuracy = mean_t accuracy_per_step[t] (over the steps scored);
- average_forgetting = mean_{j<T-1} (max_{l in [j, T-2]} A[l][j] - A[T-1][j]) (Chaudhry et al., 2018);
- backward_transfer = mean_{j<T-1} (A[T-1][j] - A[j][j]) (Lopez-Paz & Ranzato, 2017).

Forgetting and backward transfer are 0.0 when only one task has been seen.

An entry may be missing (None): a task whose test data was not at hand when the row was measured
(a model continued later on new data, without the old test sets). Every summary is then computed over
the measured entries only: a step's accuracy over its measured tasks, forgetting and backward transfer
over the old tasks measured at the end (and, for forgetting, at least once before). `missing_entries`
counts the None entries and `forgetting_tasks` lists the tasks forgetting and BWT are averaged over,
so a report can say what its numbers cover. A step may be scored on no task at all (a model trained
without an evaluation, continued later): its accuracy_per_step is None; the last step must be scored.
"""

_KWARGS_DESCRIPTION = """
Args:
    accuracy_row (`list` of `list` of `float`): one row per task step, in task order. Row t holds
        exactly t + 1 accuracies (percent), A[t][0..t], None where task j was not measured. Rows of a
        full square matrix must be cut to their lower-triangular part first:
        `[row[: t + 1] for t, row in enumerate(matrix)]`.
    task_test_size (`list` of `int`): number of test samples of each task (one per row; positive for
        every task measured at least once, 0 for a task never measured). Required: `evaluate` needs
        every declared input. Pass the same value for every task (e.g. all 1s) to weight tasks equally.
Returns:
    accuracy_per_step (`list` of `float`): micro accuracy over all seen classes after each step (None for a
        step scored on no task).
    last_accuracy (`float`): accuracy after the final step.
    average_incremental_accuracy (`float`): mean of `accuracy_per_step`.
    average_forgetting (`float`): mean drop from the best earlier accuracy to the final accuracy over
        the old tasks (lower is better).
    backward_transfer (`float`): mean change from the just-learned accuracy to the final accuracy over
        the old tasks (negative means forgetting).
    missing_entries (`int`): entries of the matrix that were not measured (None).
    forgetting_tasks (`list` of `int`): the old tasks forgetting and backward transfer average over.
Examples:
    >>> import evaluate
    >>> from slca_peft.metrics import CONTINUAL_ACCURACY_PATH
    >>> metric = evaluate.load(CONTINUAL_ACCURACY_PATH)
    >>> results = metric.compute(
    ...     accuracy_row=[[90.0], [70.0, 85.0], [60.0, 75.0, 95.0]],
    ...     task_test_size=[100, 100, 50],
    ... )
    >>> results["accuracy_per_step"]
    [90.0, 77.5, 73.0]
    >>> results["average_forgetting"], results["backward_transfer"]
    (20.0, -20.0)
"""


def _validate(rows: list[list[float]], sizes: list[int]) -> None:
    """Reject malformed input with errors that say which row is wrong and how to fix it."""
    if len(rows) == 0:
        raise ValueError("continual_accuracy needs at least one task step (one accuracy_row); got none.")
    if len(sizes) != len(rows):
        raise ValueError(
            f"Got {len(rows)} accuracy rows but {len(sizes)} task_test_size values; "
            "pass one test size per task."
        )
    for t, row in enumerate(rows):
        if row is None or len(row) != t + 1:
            got = "None" if row is None else f"{len(row)} entries"
            raise ValueError(
                f"accuracy_row {t} must have exactly {t + 1} entries (accuracy on tasks 0..{t} after "
                f"learning task {t}), got {got}. Pass rows in task order and cut a square matrix to its "
                f"lower triangle: [row[: t + 1] for t, row in enumerate(matrix)]."
            )
        for j, value in enumerate(row):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"accuracy_row {t} entry {j} must be a finite number or None, got {value!r}.")
        if t == len(rows) - 1 and all(value is None for value in row):
            raise ValueError(f"accuracy_row {t} has no measured entry; the last step is scored on at least one task.")
    for t, size in enumerate(sizes):
        measured = any(row[t] is not None for row in rows[t:])
        if size is None or size < 0 or (measured and size == 0):
            raise ValueError(f"task_test_size {t} must be a positive number of test samples, got {size!r}.")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ContinualAccuracy(evaluate.Metric):
    """Last / average incremental accuracy, forgetting and backward transfer from an accuracy matrix."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "accuracy_row": datasets.Sequence(datasets.Value("float64")),
                    "task_test_size": datasets.Value("int64"),
                }
            ),
            reference_urls=[
                "https://arxiv.org/abs/2408.08295",
                "https://arxiv.org/abs/1801.10112",
                "https://arxiv.org/abs/1706.08840",
            ],
        )

    def _compute(self, accuracy_row, task_test_size):
        rows = [list(r) if r is not None else None for r in accuracy_row]
        sizes = list(task_test_size)
        _validate(rows, sizes)
        rows = [[None if v is None else float(v) for v in r] for r in rows]
        num_tasks = len(rows)

        per_step = []
        for t, row in enumerate(rows):
            measured = [(a, n) for a, n in zip(row, sizes[: t + 1], strict=True) if a is not None]
            per_step.append(sum(a * n for a, n in measured) / sum(n for _, n in measured) if measured else None)
        scored = [a for a in per_step if a is not None]

        final = rows[-1]
        forgetting, bwt, tasks = [], [], []
        for j in range(num_tasks - 1):
            earlier = [rows[s][j] for s in range(j, num_tasks - 1) if rows[s][j] is not None]
            if final[j] is None or not earlier:
                continue
            tasks.append(j)
            forgetting.append(max(earlier) - final[j])
            if rows[j][j] is not None:
                bwt.append(final[j] - rows[j][j])

        return {
            "accuracy_per_step": per_step,
            "last_accuracy": per_step[-1],
            "average_incremental_accuracy": sum(scored) / len(scored),
            "average_forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
            "backward_transfer": sum(bwt) / len(bwt) if bwt else 0.0,
            "missing_entries": sum(v is None for row in rows for v in row),
            "forgetting_tasks": tasks,
        }
