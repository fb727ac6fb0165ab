"""Classifier-alignment time and peak memory: slca_peft's fast path against a naive port.

The naive port is what the reference code does: it keeps a dense float64 covariance per class and,
every CA epoch, builds a `torch.distributions.MultivariateNormal` per class (two Cholesky
factorisations: argument validation and the scale) and samples it, then trains on a shuffled copy.
The fast path (`ClassifierAligner` + `ClassStatistics`) factorises each covariance once at
`finalize`, keeps the factor in the most compact exact form and draws all classes in batched
products. Both run in the same process on the same statistics, one after the other.

    python benchmarks/bench_alignment.py --quick            # CPU: 1 CA epoch, C = 100, 200, 1000
    python benchmarks/bench_alignment.py --device cuda      # GPU: 5 CA epochs, C = 100, 200, 1000

Class data is synthetic (`--per-class` samples per class, 10 tasks); only its shape matters here.
`--per-class 120` is ImageNet-R-like (rank-119 factors); use `--per-class 1000` for full-rank classes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, gib, mib, peak_memory, setup, synchronize, timed  # noqa: E402

from slca_peft.method import AlignmentSettings, ClassifierAligner, ClassStatistics
from slca_peft.models import ContinualClassifier


def task_sizes(num_classes: int, num_tasks: int) -> list[int]:
    base = num_classes // num_tasks
    return [base] * (num_tasks - 1) + [num_classes - base * (num_tasks - 1)]


def synthetic_statistics(num_classes, dim, per_class, num_tasks, device, seed=0, **stats_kwargs):
    """Statistics of synthetic class data streamed through update/finalize like a data loader."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, 64, generator=gen) / 8
    stats = ClassStatistics(dim, **stats_kwargs)
    offset = 0
    for task, size in enumerate(task_sizes(num_classes, num_tasks)):
        classes = torch.arange(offset, offset + size)
        means = torch.randn(size, dim, generator=gen)
        labels = classes.repeat_interleave(per_class)
        latent = torch.randn(len(labels), 64, generator=gen)
        noise = 0.3 * torch.randn(len(labels), dim, generator=gen)
        x = means.repeat_interleave(per_class, 0) + latent @ basis.T + noise
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), 256):
            index = order[start : start + 256]
            stats.update(x[index].to(device), labels[index].to(device))
        stats.finalize(task, classes.tolist())
        offset += size
        del x, latent, noise
    return stats


# ---------------------------------------------------------------------------- per-head steps
def per_head_logits(classifier, x):
    """What the reference's classifier does: one matmul per task head."""
    return torch.cat([head(x * classifier.scales[i]) for i, head in enumerate(classifier.heads)], dim=1)


def per_task_normalized_logits(logits, offsets, temperature):
    """The reference's logit normalisation: one norm per task slice."""
    pairs = zip(offsets[:-1], offsets[1:], strict=True)
    norms = torch.stack([logits[:, a:b].norm(p=2, dim=1) + 1e-7 for a, b in pairs], dim=1)
    return logits / norms.mean(dim=1, keepdim=True) / temperature


def previous_align(aligner, classifier, stats, task_id):
    """slca_peft's previous alignment: the same batched sampling, but every SGD step looped over
    the heads and over the task norm slices."""
    s = aligner.settings
    device = classifier.heads[0].weight.device
    classifier.scales.fill_(1.0)
    params = list(classifier.heads.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, s.epochs))
    generator = torch.Generator(device=device).manual_seed(aligner.seed + task_id)
    offsets = classifier.task_offsets()
    for _ in range(s.epochs):
        feats, labels = aligner.sample(stats, task_id, generator)
        order = torch.randperm(len(labels), generator=generator, device=device)
        total = torch.zeros((), device=device)
        for start in range(0, len(labels), s.batch_size):
            index = order[start : start + s.batch_size]
            logits = per_head_logits(classifier, feats.index_select(0, index))
            loss = F.cross_entropy(per_task_normalized_logits(logits, offsets, s.temperature), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        total.item()
        scheduler.step()


# ---------------------------------------------------------------------------- the naive port
def naive_sample(means, covariances, task_of_class, settings, task_id):
    classes = sorted(means)
    feats = []
    for c in classes:  # a new distribution (and its factorisations) per class, every epoch
        mean = means[c].float()
        gap = task_id - task_of_class[c]
        if not settings.slca_plus_plus:
            mean = mean * (0.9 + 0.1 * (task_of_class[c] + 1) / (task_id + 1))
        x = MultivariateNormal(mean, covariances[c].float()).sample((settings.samples_per_class,))
        if settings.slca_plus_plus and settings.fc_scale_mu:
            step = settings.fc_scale_mu + 0.02 * (torch.rand(settings.samples_per_class, device=x.device) - 0.5)
            x = x / (1.0 + step * gap)[:, None]
        feats.append(x)
    labels = torch.tensor(classes).repeat_interleave(settings.samples_per_class)
    return torch.cat(feats), labels.to(feats[0].device)


def naive_align(classifier, means, covariances, task_of_class, settings, task_id, seed=0):
    torch.manual_seed(seed + task_id)
    classifier.scales.fill_(1.0)
    params = list(classifier.heads.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, settings.epochs))
    offsets = classifier.task_offsets()
    losses = []
    for _ in range(settings.epochs):
        feats, labels = naive_sample(means, covariances, task_of_class, settings, task_id)
        order = torch.randperm(len(labels), device=feats.device)
        feats, labels = feats[order], labels[order]
        total = 0.0
        for start in range(0, len(labels), settings.batch_size):
            x, y = feats[start : start + settings.batch_size], labels[start : start + settings.batch_size]
            logits = per_task_normalized_logits(per_head_logits(classifier, x), offsets, settings.temperature)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise RuntimeError("non-finite loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        scheduler.step()
        losses.append(total)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 200, 1000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--per-class", type=int, default=120, help="training samples per class")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="CA epochs (default 5; 1 with --quick)")
    parser.add_argument("--form", default="exact", help="covariance_form of the fast path")
    parser.add_argument("--rank", type=int, default=None, help="covariance_rank of the fast path")
    parser.add_argument("--skip-naive-above", type=int, default=None, help="run the naive port only up to this C")
    parser.add_argument("--rounds", type=int, default=1, help="fast/previous alignments, interleaved (median)")
    parser.add_argument("--reference-seconds", type=float, default=None,
                        help="the authors' code's time for this workload, measured separately: printed as a ratio")
    args = parser.parse_args()
    device = setup(args)
    epochs = args.epochs or (1 if args.quick else 5)
    settings = AlignmentSettings(epochs=epochs)
    d = args.dim
    print(f"# d={d}, {args.per_class} samples per class, {args.tasks} tasks, {epochs} CA epoch(s), "
          f"{settings.samples_per_class} draws per class per epoch, batch {settings.batch_size}, "
          f"fast form={args.form} rank={args.rank}")
    header = (f"{'C':>5} | {'stats fast':>11} {'stats naive':>11} | {'sample/epoch fast':>17} {'naive':>8} "
              f"{'ratio':>6} | {'align fast':>10} {'previous':>8} {'naive':>8} {'ratio':>6} | "
              f"{'peak fast':>10} {'peak naive':>10}")
    rows = []
    # Warm-up: the first LAPACK call of a process pays a one-time initialisation.
    eye = torch.eye(d, device=device)
    MultivariateNormal(torch.zeros(d, device=device), eye).sample((2,))
    torch.linalg.cholesky(eye.double())
    for num_classes in args.classes:
        start = time.perf_counter()
        stats = synthetic_statistics(num_classes, d, args.per_class, args.tasks, device, seed=args.seed,
                                     covariance_form=args.form, covariance_rank=args.rank)
        synchronize(device)
        build = time.perf_counter() - start
        ranks = sorted(set(stats.ranks.values()))
        mem = stats.memory_bytes()["statistics"]
        print(f"# C={num_classes}: statistics (update + finalize) {build:.1f} s, factor ranks {ranks[:3]}"
              f"{'...' if len(ranks) > 3 else ''}, stored {gib(mem)}", flush=True)
        task_id = args.tasks - 1
        classifier = ContinualClassifier(d, task_sizes(num_classes, args.tasks)).to(device)
        aligner = ClassifierAligner(settings, seed=args.seed)

        fast: dict = {}
        gen = torch.Generator(device=device).manual_seed(1)
        with timed(device, fast, "plan"):
            stats.sampling_plan(device)
        with timed(device, fast, "sample"):
            aligner.sample(stats, task_id, gen)
        stats._changed()  # the alignment below builds its plan again, inside the measurement
        gc.collect()
        with peak_memory(device, fast), timed(device, fast):
            aligner.align(copy.deepcopy(classifier), stats, task_id)
        fast_times, previous_times = [fast["seconds"]], []
        for round_ in range(args.rounds):
            if round_:
                with timed(device, fast, "again"):
                    aligner.align(copy.deepcopy(classifier), stats, task_id)
                fast_times.append(fast["again"])
            previous: dict = {}
            with timed(device, previous):
                previous_align(aligner, copy.deepcopy(classifier), stats, task_id)
            previous_times.append(previous["seconds"])
        fast["seconds"] = statistics.median(fast_times)
        fast["previous"] = statistics.median(previous_times)
        print(f"# C={num_classes}: align with one matmul per step {fast_times} s, with the previous per-head "
              f"step {previous_times} s: {fast['previous'] / fast['seconds']:.2f}x", flush=True)
        if args.reference_seconds:
            print(f"# C={num_classes}: against the authors' code ({args.reference_seconds} s): one matmul per step "
                  f"{args.reference_seconds / fast['seconds']:.1f}x, previous per-head step "
                  f"{args.reference_seconds / fast['previous']:.1f}x", flush=True)
        fast_plan = stats.memory_bytes()["sampling_plan"]
        plan_cached = stats.sampling_plan(device).cached

        naive: dict = {}
        run_naive = args.skip_naive_above is None or num_classes <= args.skip_naive_above
        if run_naive:
            task_of_class = dict(stats.task_of_class)
            means = {c: stats.means[c].to(device) for c in stats.classes}
            covariances = {c: stats.covariance(c).to(device) for c in stats.classes}  # dense float64
            naive_mem = sum(v.numel() * v.element_size() for v in [*means.values(), *covariances.values()])
            del stats
            gc.collect()
            with timed(device, naive, "sample"):
                naive_sample(means, covariances, task_of_class, settings, task_id)
            with peak_memory(device, naive), timed(device, naive):
                naive_align(copy.deepcopy(classifier), means, covariances, task_of_class, settings, task_id)
            del means, covariances
        else:
            naive_mem = num_classes * (d * d + d) * 8
            del stats
        gc.collect()

        def ratio(a, b):
            return f"{b / a:5.1f}x" if a and b else "   n/a"

        row = (f"{num_classes:>5} | {gib(mem):>11} {gib(naive_mem):>11} | {fast['sample']:>15.3f} s "
               f"{naive.get('sample', float('nan')):>6.2f} s {ratio(fast['sample'], naive.get('sample')):>6} |"
               f" {fast['seconds']:>8.2f} s {fast['previous']:>6.2f} s {naive.get('seconds', float('nan')):>6.1f} s "
               f"{ratio(fast['seconds'], naive.get('seconds')):>6} | {gib(fast['peak_bytes']):>10} "
               f"{gib(naive.get('peak_bytes')):>10}")
        rows.append(row)
        print(f"# C={num_classes}: fast plan build {fast['plan']:.3f} s, plan {mib(fast_plan)} "
              f"(factors cached: {plan_cached}); peak memory: {fast.get('method')}", flush=True)
        print(header)
        print(row, flush=True)
    print("\n" + header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
