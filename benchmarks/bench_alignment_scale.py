"""What classifier alignment costs as the seen classes C grow, and what `ca_samples_per_epoch` buys.

1. Seconds of one CA epoch (`ClassifierAligner.align`, d = 768, exact statistics of `--per-class`
   synthetic samples per class, 10 tasks) at each C, with the method's default (256 samples per class:
   256·C samples scored against C outputs, so about C²) and with `ca_samples_per_epoch` capping the
   epoch (each class gets cap // C samples: about cap·C). The growth exponent is fitted on log-log over
   the measured C; seconds per task (`--ca-epochs` epochs) at 100, 1,000 and 5,000 classes are read off
   the fit (and marked as measured where C was).
2. Accuracy effect of the cap: synthetic Gaussian classes (the problem of `bench_covariance_forms.py`),
   fresh heads aligned on samples of the statistics only, accuracy on held-out samples of the true
   Gaussians, at the default and at caps giving 128, 64, 25 and 10 samples per class.

    python benchmarks/bench_alignment_scale.py --threads 1            # C = 100 .. 1000 (about 3 min)
    python benchmarks/bench_alignment_scale.py --threads 1 --classes 100 250 500 1000 2000
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup, synchronize  # noqa: E402
from bench_alignment import synthetic_statistics, task_sizes  # noqa: E402
from bench_covariance_forms import Problem  # noqa: E402

from slca_peft.method import AlignmentSettings, ClassifierAligner, ClassStatistics  # noqa: E402
from slca_peft.models import ContinualClassifier  # noqa: E402


def epoch_seconds(stats, num_classes: int, tasks: int, dim: int, device, cap: int | None, rounds: int) -> float:
    """Median seconds of one CA epoch over `rounds` alignments of fresh heads."""
    times = []
    for r in range(rounds):
        classifier = ContinualClassifier(dim, task_sizes(num_classes, tasks)).to(device)
        aligner = ClassifierAligner(AlignmentSettings(epochs=1, samples_per_epoch=cap), seed=r)
        stats.sampling_plan(device)  # built once per finalize in a run: not part of an epoch
        synchronize(device)
        start = time.perf_counter()
        aligner.align(classifier, stats, tasks - 1)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(exponent b, factor a) of seconds = a · C^b, least squares on logs."""
    b, log_a = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return float(b), float(math.exp(log_a))


def accuracy(num_classes: int, tasks: int, dim: int, per_class: int, seed: int, cap: int | None, device) -> float:
    problem = Problem(num_classes, dim, seed)
    size = num_classes // tasks
    stats = ClassStatistics(dim)
    for t in range(tasks):
        classes = list(range(t * size, (t + 1) * size))
        stats.update(torch.cat([problem.draw(c, per_class) for c in classes]).to(device),
                     torch.tensor(classes).repeat_interleave(per_class).to(device))
        stats.finalize(t, classes)
    test_x = torch.cat([problem.draw(c, 100) for c in range(num_classes)]).to(device)
    test_y = torch.arange(num_classes).repeat_interleave(100).to(device)
    torch.manual_seed(seed)
    classifier = ContinualClassifier(dim, [size] * tasks).to(device)
    settings = AlignmentSettings(epochs=10, lr=0.05, fc_scale_mu=0.0, samples_per_epoch=cap)
    ClassifierAligner(settings, seed=seed).align(classifier, stats, tasks - 1)
    with torch.no_grad():
        return (classifier(test_x).argmax(1) == test_y).float().mean().item() * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="default 100 250 500 1000")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--per-class", type=int, default=30, help="training samples per class of the statistics")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--cap", type=int, default=25_600, help="ca_samples_per_epoch timed (256 x 100 classes)")
    parser.add_argument("--ca-epochs", type=int, default=5, help="CA epochs per task (the method's default)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--accuracy-classes", type=int, default=100)
    parser.add_argument("--accuracy-seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 with --quick)")
    args = parser.parse_args()
    device = setup(args, measures_memory=False)
    sizes = args.classes or ([50, 100, 200] if args.quick else [100, 250, 500, 1000])

    print(f"# one CA epoch, d={args.dim}, {args.per_class} samples per class (exact statistics), {args.tasks} tasks")
    print(f"{'C':>6} {'default (256/class)':>20} {'cap ' + str(args.cap):>20} {'draws/class':>12}")
    default, capped = [], []
    for num_classes in sizes:
        stats = synthetic_statistics(num_classes, args.dim, args.per_class, args.tasks, device, seed=args.seed)
        if num_classes == sizes[0]:  # warm-up: one-time costs (kernels, allocator) are no epoch's
            epoch_seconds(stats, num_classes, args.tasks, args.dim, device, None, 1)
        default.append(epoch_seconds(stats, num_classes, args.tasks, args.dim, device, None, args.rounds))
        capped.append(epoch_seconds(stats, num_classes, args.tasks, args.dim, device, args.cap, args.rounds))
        draws = ClassifierAligner(AlignmentSettings(samples_per_epoch=args.cap)).draws_per_class(num_classes)
        print(f"{num_classes:>6} {default[-1]:>18.2f} s {capped[-1]:>18.2f} s {draws:>12}", flush=True)
        del stats
    for name, seconds in (("default", default), (f"cap {args.cap}", capped)):
        b, a = fit(sizes, seconds)
        where = ", ".join(f"C={c}: {a * c**b * args.ca_epochs:.1f} s{' (measured C)' if c in sizes else ''}"
                          for c in (100, 1000, 5000))
        print(f"{name}: epoch seconds ~ C^{b:.2f}; per task ({args.ca_epochs} epochs) {where}")

    seeds = args.accuracy_seeds or ([0] if args.quick else [0, 1, 2])
    c = args.accuracy_classes
    print(f"\n# accuracy, C={c} in {args.tasks} tasks, d={args.dim}, 120 samples per class, 10 CA epochs on fresh "
          f"heads, seeds {seeds}")
    caps = [None] + [c * n for n in (128, 64, 25, 10)]
    base = None
    for cap in caps:
        scores = [accuracy(c, args.tasks, args.dim, 120, seed, cap, device) for seed in seeds]
        mean = statistics.mean(scores)
        base = mean if base is None else base
        per = ClassifierAligner(AlignmentSettings(samples_per_epoch=cap)).draws_per_class(c)
        label = "default" if cap is None else f"cap {cap}"
        print(f"{label:>12} ({per:>3}/class): {mean:6.2f} %  {mean - base:+6.2f}", flush=True)


if __name__ == "__main__":
    main()
