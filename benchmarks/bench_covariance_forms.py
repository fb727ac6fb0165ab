"""Accuracy and memory cost of each `ClassStatistics` covariance form.

Synthetic class-incremental features at d = 768 (no pretrained weights needed): every class is a
Gaussian whose covariance lives mostly in a shared 128-d subspace with a decaying spectrum, plus
isotropic noise, and whose mean also lies mostly in that subspace -- so within-class covariance
matters to a linear classifier, as it does for ViT features. For each form the statistics are
computed from `--per-class` training samples per class, fresh heads are trained by
`ClassifierAligner` on samples of those statistics only, and accuracy is measured on held-out
samples of the true Gaussians. Also reported: storage per class, finalize time per class and the
relative Frobenius error of each stored covariance against the exact one.

    python benchmarks/bench_covariance_forms.py --quick --threads 1
    python benchmarks/bench_covariance_forms.py --device cuda --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup, synchronize  # noqa: E402

from slca_peft.method import AlignmentSettings, ClassifierAligner, ClassStatistics
from slca_peft.models import ContinualClassifier

FORMS = [("exact", None), ("full", None), ("low_rank", 64), ("low_rank", 16), ("low_rank", 4), ("diagonal", None)]


class Problem:
    """C Gaussian classes in d dimensions sharing a k-dimensional principal subspace."""

    def __init__(self, num_classes: int, dim: int, seed: int, k: int = 128, noise: float = 0.3):
        gen = torch.Generator().manual_seed(seed)
        self.gen = gen
        self.dim, self.noise = dim, noise
        basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen))
        spectrum = 1.0 / torch.arange(1, k + 1).float() ** 0.6
        self.factors = []  # class covariance = F F^T + noise^2 I
        self.means = []
        for _ in range(num_classes):
            mix = torch.randn(k, k, generator=gen) / k**0.5
            self.factors.append(basis @ (spectrum[:, None] * mix) * 2.0)
            self.means.append(basis @ (torch.randn(k, generator=gen) * spectrum * 0.9)
                              + 0.05 * torch.randn(dim, generator=gen))

    def draw(self, cls: int, n: int) -> torch.Tensor:
        f = self.factors[cls]
        z = torch.randn(n, f.shape[1], generator=self.gen)
        return self.means[cls] + z @ f.T + self.noise * torch.randn(n, self.dim, generator=self.gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--classes", type=int, default=None, help="default 100 (50 with --quick)")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--per-class", type=int, nargs="+", default=[30, 120])
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--epochs", type=int, default=10, help="CA epochs training the fresh heads")
    args = parser.parse_args()
    device = setup(args)
    num_classes = args.classes or (50 if args.quick else 100)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    size = num_classes // args.tasks
    settings = AlignmentSettings(epochs=args.epochs, lr=0.05, fc_scale_mu=0.0)
    print(f"# C={num_classes} in {args.tasks} tasks, d={args.dim}, {args.test_per_class} test samples per class, "
          f"{args.epochs} CA epochs (lr {settings.lr}) on fresh heads, seeds {seeds}")
    for per_class in args.per_class:
        rows: dict[str, dict[str, list[float]]] = {}
        for seed in seeds:
            problem = Problem(num_classes, args.dim, seed)
            train = [problem.draw(c, per_class) for c in range(num_classes)]
            test_x = torch.cat([problem.draw(c, args.test_per_class) for c in range(num_classes)]).to(device)
            test_y = torch.arange(num_classes).repeat_interleave(args.test_per_class).to(device)
            exact_cov = None
            for form, rank in FORMS:
                name = form + ("" if rank is None else f" r={rank}")
                stats = ClassStatistics(args.dim, covariance_form=form, covariance_rank=rank)
                finalize = 0.0
                for t in range(args.tasks):
                    classes = list(range(t * size, (t + 1) * size))
                    stats.update(torch.cat([train[c] for c in classes]).to(device),
                                 torch.tensor(classes).repeat_interleave(per_class).to(device))
                    synchronize(device)
                    start = time.perf_counter()
                    stats.finalize(t, classes)
                    finalize += time.perf_counter() - start
                covs = [stats.covariance(c) for c in range(0, num_classes, max(1, num_classes // 10))]
                if exact_cov is None:
                    exact_cov = covs
                error = statistics.mean(float((a - b).norm() / b.norm()) for a, b in zip(covs, exact_cov, strict=True))
                torch.manual_seed(seed)
                classifier = ContinualClassifier(args.dim, [size] * args.tasks).to(device)
                ClassifierAligner(settings, seed=seed).align(classifier, stats, args.tasks - 1)
                with torch.no_grad():
                    accuracy = (classifier(test_x).argmax(1) == test_y).float().mean().item() * 100
                row = rows.setdefault(name, {"acc": [], "err": [], "mib": [], "ms": []})
                row["acc"].append(accuracy)
                row["err"].append(error)
                row["mib"].append(stats.memory_bytes()["statistics"] / num_classes / 2**20)
                row["ms"].append(1000 * finalize / num_classes)
                print(f"# n={per_class} seed {seed} {name}: accuracy {accuracy:.2f}%", flush=True)
        exact_acc = statistics.mean(rows["exact"]["acc"])
        print(f"\n{per_class} training samples per class")
        print(f"{'form':<16} {'MiB/class':>9} {'GiB @ C=1000':>12} {'finalize/class':>15} {'cov rel. err':>12} "
              f"{'accuracy':>9} {'vs exact':>9}")
        for name, row in rows.items():
            acc = statistics.mean(row["acc"])
            mib_c = statistics.mean(row["mib"])
            print(f"{name:<16} {mib_c:>9.3f} {mib_c * 1000 / 1024:>12.3f} {statistics.mean(row['ms']):>12.1f} ms "
                  f"{statistics.mean(row['err']):>12.3f} {acc:>8.2f}% {acc - exact_acc:>+8.2f}")


if __name__ == "__main__":
    main()
