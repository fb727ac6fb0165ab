"""A long class-incremental stream end to end: where each task's time goes as the task index t grows.

A tiny ViT (2 layers, hidden 32, 32x32 images, saved to a temporary folder) learns `--tasks` tasks of
2 classes each (8 training and 4 test images per class, in-memory `datasets.Dataset`s) with
`ContinualLearner` on the CPU: 1 training epoch, 1 alignment epoch of 16 draws per class, a
checkpoint per task. Prints

1. the phase seconds of every `--every`-th task (training, statistics, alignment, evaluation,
   checkpoint and `other`, the rest of the task's wall time), with the least-squares slope of each
   phase against t (ms per task) and the growth exponent b of seconds ~ t^b over the second half;
2. the cumulative wall time at T = 5, 10, 20, ... tasks (a T-task stream does the same work as the
   first T tasks of this one: 2 classes each) with the exponent of total ~ T^b;
3. whether the phases add up to the wall time the loop measured.

`--rebuild-tasks` builds every task again each time the loop asks for it (the behaviour before tasks
were built once), for comparison.

    python benchmarks/bench_long_stream.py --threads 1                 # 20 tasks, about a minute
    python benchmarks/bench_long_stream.py --threads 1 --tasks 100     # the 100-task stream
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from transformers import ViTConfig, ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup  # noqa: E402

from slca_peft import (  # noqa: E402
    ContinualCallback,  # noqa: E402
    ContinualLearner,
    EvalTransform,
    ImageTransformConfig,
    SLCAConfig,
    SLCAModel,
    TaskSequence,
    TrainTransform,
)
from slca_peft.utils import PHASES  # noqa: E402

ALL_PHASES = (*PHASES, "other")


def images(num_classes: int, per_class: int, seed: int) -> Dataset:
    """Class k: a bright square at a class-specific place over noise (as the tests' image folders)."""
    rng = np.random.RandomState(seed)
    pictures, labels = [], []
    for k in range(num_classes):
        for _ in range(per_class):
            img = rng.randint(0, 60, size=(32, 32, 3)).astype(np.uint8)
            row, col = divmod(k % 16, 4)
            img[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 255 - (k // 16) % 200
            pictures.append(PILImage.fromarray(img))
            labels.append(k)
    return Dataset.from_dict({"image": pictures, "label": labels},
                             features=Features({"image": Image(), "label": Value("int64")}))


class WallClock(ContinualCallback):
    """Each task's wall time, from the end of the previous task's last step to the end of its own."""

    def __init__(self):
        self.walls: list[float] = []
        self.started = 0.0

    def on_run_begin(self, learner):
        self.started = time.perf_counter()

    def on_task_end(self, learner, task):
        now = time.perf_counter()
        self.walls.append(now - self.started)
        self.started = now


def exponent(x: list[float], y: list[float]) -> float:
    """b of y ~ x^b (least squares on logs; values at or below 0 are left out)."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a > 0 and b > 0]
    if len(pairs) < 2:
        return float("nan")
    xs, ys = zip(*pairs, strict=True)
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--tasks", type=int, default=None, help="tasks of 2 classes (default 20; 10 with --quick)")
    parser.add_argument("--every", type=int, default=None, help="print every n-th task (default: tasks // 10)")
    parser.add_argument("--rebuild-tasks", action="store_true", help="build a task again at every ask (before)")
    args = parser.parse_args()
    setup(args, measures_memory=False)
    num_tasks = args.tasks or (10 if args.quick else 20)
    every = args.every or max(1, num_tasks // 10)
    logging.getLogger("slca_peft").setLevel(logging.WARNING)
    if args.rebuild_tasks:
        TaskSequence.__getitem__ = lambda self, t: self._build(t)  # noqa: ARG005 - the uncached stream

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        base = Path(tmp) / "base"
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, hidden_dropout_prob=0.0, initializer_range=1.0)
        ViTModel(config, add_pooling_layer=False).save_pretrained(base)
        classes = 2 * num_tasks
        tasks = TaskSequence(images(classes, 8, args.seed + 1), images(classes, 4, args.seed + 2), init_cls=2,
                             increment=2, seed=1993)
        settings = SLCAConfig(output_dir=str(Path(tmp) / "run"), use_cpu=True, num_train_epochs=1,
                              per_device_train_batch_size=8, learning_rate=0.05, ca_lr=0.01, seed=0,
                              disable_tqdm=True, report_to="none", ca_epochs=1, ca_samples_per_class=16,
                              ca_batch_size=64, logging_strategy="no", log_level="warning")
        clock = WallClock()
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its metrics with disable_tqdm
            model = SLCAModel.from_backbone(str(base), settings)
            learner = ContinualLearner(model, settings, tasks, callbacks=[clock])
            transforms = ImageTransformConfig.from_model_config(model.config)
            learner.set_transforms(TrainTransform(transforms, scale=(0.8, 1.0), flip_p=0.0),
                                   EvalTransform(transforms))
            start = time.perf_counter()
            result = learner.run()
            wall = time.perf_counter() - start

    timings = result.timings
    print(f"# {num_tasks} tasks of 2 classes, tiny ViT, {'tasks rebuilt at every ask' if args.rebuild_tasks else ''}"
          f"{'' if args.rebuild_tasks else 'tasks built once'}; run wall {wall:.1f} s")
    header = f"{'t':>4} " + " ".join(f"{p:>11}" for p in ALL_PHASES) + f" {'sum':>8} {'wall':>8}"
    print(header)
    for t, record in enumerate(timings, start=1):
        if t % every and t != 1:
            continue
        total = sum(record.get(f"{p}_seconds", 0.0) for p in ALL_PHASES)
        print(f"{t:>4} " + " ".join(f"{record.get(f'{p}_seconds', 0.0):>11.3f}" for p in ALL_PHASES)
              + f" {total:>8.3f} {clock.walls[t - 1]:>8.3f}")
    index = list(range(1, num_tasks + 1))
    half = index[num_tasks // 2 :]
    print("slope against t (ms per task) and exponent b of seconds ~ t^b over tasks "
          f"{half[0]}-{half[-1]}:")
    for phase in ALL_PHASES:
        seconds = [r.get(f"{phase}_seconds", 0.0) for r in timings]
        slope = float(np.polyfit(index, seconds, 1)[0]) * 1000
        print(f"  {phase:<11} {slope:+8.2f} ms/task   b = {exponent(half, seconds[num_tasks // 2 :]):5.2f}   "
              f"mean {np.mean(seconds):.3f} s")
    cumulative = np.cumsum(clock.walls)
    marks = [m for m in (5, 10, 20, 40, 60, 80, 100, 200, 500) if m <= num_tasks]
    print("total wall time against T: " + ", ".join(f"T={m}: {cumulative[m - 1]:.1f} s" for m in marks)
          + f"; total ~ T^{exponent(marks, [float(cumulative[m - 1]) for m in marks]):.2f}")
    sums = [sum(r.get(f"{p}_seconds", 0.0) for p in ALL_PHASES) for r in timings]
    gaps = [abs(s - w) / w for s, w in zip(sums, clock.walls, strict=True)]
    print(f"phases against wall time: sum {sum(sums):.1f} s of {sum(clock.walls):.1f} s; "
          f"largest gap of a task {100 * max(gaps):.1f} %")


if __name__ == "__main__":
    main()
