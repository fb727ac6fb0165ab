"""Statistics extraction (images/s) against plain inference, and the cost of `finalize` per form.

1. ViT-B/16 at 224 px (random weights from `ViTConfig()`), eval mode, `torch.inference_mode`:
   plain feature extraction versus the same pass plus `ClassStatistics.update` (float64 count, sum
   and packed outer-product sum per class), as `StatisticsStep.compute` (slca_peft.continual.steps) runs it.
   Rows run interleaved over rounds; the median batch is reported.
2. `ClassStatistics` alone at d = 768: update throughput on precomputed features and `finalize`
   time per class for each covariance form.

    python benchmarks/bench_statistics.py --quick --threads 1   # CPU
    python benchmarks/bench_statistics.py --device cuda         # GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import ViTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, mib, setup, synchronize  # noqa: E402

from slca_peft import SLCAModel
from slca_peft.method import ClassStatistics


def extraction(args, device) -> None:
    model = SLCAModel.from_backbone(ViTConfig(), use_lora=True, lora_svd_init=False).to(device).eval()
    if args.bf16:
        model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    batches = [
        (torch.randn(args.batch_size, 3, 224, 224, generator=gen).to(device, dtype),
         torch.randint(0, args.task_classes, (args.batch_size,), generator=gen).to(device))
        for _ in range(args.batches)
    ]
    times: dict[str, list[float]] = {"plain inference": [], "inference + statistics": []}
    update_times: list[float] = []
    finalize_times = []
    with torch.inference_mode():
        model.features(batches[0][0])  # warm-up
        for _ in range(args.rounds):
            for kind in times:
                stats = ClassStatistics(model.feature_dim) if kind != "plain inference" else None
                for pixels, labels in batches:
                    synchronize(device)
                    start = time.perf_counter()
                    feats = model.features(pixels)
                    if stats is not None:
                        synchronize(device)
                        middle = time.perf_counter()
                        stats.update(feats, labels)
                        synchronize(device)
                        update_times.append(time.perf_counter() - middle)
                    synchronize(device)
                    times[kind].append(time.perf_counter() - start)
                if stats is not None:
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        stats.finalize(0)
                    synchronize(device)
                    finalize_times.append(time.perf_counter() - start)
    images = args.batch_size * args.batches
    print(f"\n{'ViT-B/16 224 px, batch ' + str(args.batch_size):<34} {'median batch':>12} {'images/s':>9}")
    median = {k: statistics.median(v) for k, v in times.items()}
    for kind, value in median.items():
        print(f"{kind:<34} {value:>10.3f} s {args.batch_size / value:>9.2f}")
    update = statistics.median(update_times)
    fin = statistics.median(finalize_times)
    end_to_end = median["inference + statistics"] / median["plain inference"] - 1
    print(f"ClassStatistics.update inside that loop: {1000 * update:.2f} ms per batch = "
          f"{100 * update / median['plain inference']:.2f}% of a plain inference batch "
          f"(end-to-end medians differ by {100 * end_to_end:+.1f}%, machine noise when the first number is small)")
    print(f"finalize of {args.task_classes} classes after {images} images: {fin:.2f} s (once per task)")


def statistics_only(args, device) -> None:
    d = 768
    gen = torch.Generator().manual_seed(args.seed)
    n_batches = 4 if args.quick else 40
    feats = torch.randn(n_batches, 128, d, generator=gen).to(device)
    labels = torch.randint(0, 20, (n_batches, 128), generator=gen).to(device)
    stats = ClassStatistics(d)
    with torch.inference_mode():
        stats.update(feats[0], labels[0])
        synchronize(device)
        start = time.perf_counter()
        for i in range(1, n_batches):
            stats.update(feats[i], labels[i])
        synchronize(device)
    rate = 128 * (n_batches - 1) / (time.perf_counter() - start)
    print(f"\nClassStatistics.update alone, d={d}, batch 128 over 20 classes: {rate:,.0f} features/s; "
          f"pending accumulators {mib(stats.memory_bytes()['pending'])} for 20 classes")
    print(f"\nfinalize, d={d}, 20 classes of n samples each (time per class, stored size per class):")
    forms = [("exact", None), ("full", None), ("low_rank", 64), ("low_rank", 16), ("diagonal", None)]
    print(f"{'n':>5} " + " ".join(f"{f + ('' if r is None else f' r={r}'):>22}" for f, r in forms))
    for n in args.finalize_sizes:
        x = (torch.randn(20 * n, 64, generator=gen) @ torch.randn(64, d, generator=gen) / 8
             + 0.3 * torch.randn(20 * n, d, generator=gen)).to(device)
        y = torch.arange(20).repeat_interleave(n).to(device)
        cells = []
        for form, rank in forms:
            s = ClassStatistics(d, covariance_form=form, covariance_rank=rank)
            for lo in range(0, len(y), 512):
                s.update(x[lo : lo + 512], y[lo : lo + 512])
            synchronize(device)
            start = time.perf_counter()
            s.finalize(0)
            synchronize(device)
            per_class = (time.perf_counter() - start) / 20
            size = s.memory_bytes()["statistics"] / 20
            cells.append(f"{per_class * 1000:>8.1f} ms {mib(size):>9}/c")
        print(f"{n:>5} " + " ".join(f"{c:>22}" for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (8 with --quick)")
    parser.add_argument("--batches", type=int, default=None, help="batches per round (20; 3 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; 2 with --quick)")
    parser.add_argument("--task-classes", type=int, default=20)
    parser.add_argument("--finalize-sizes", type=int, nargs="+", default=[30, 120, 500])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--skip-vit", action="store_true")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (8 if args.quick else 128)
    args.batches = args.batches or (3 if args.quick else 20)
    args.rounds = args.rounds or (2 if args.quick else 3)
    device = setup(args)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not args.skip_vit:
        extraction(args, device)
    statistics_only(args, device)


if __name__ == "__main__":
    main()
