"""Paired benchmark against the authors' released SLCA++ code, in one process with one torch.

Three passes, each timed INTERLEAVED (released, slca-peft fp32, slca-peft bf16, then again, for
`--rounds` rounds, the order rotating each round) on the same inputs, so machine load hits every
row alike; medians decide, ratios are released time / slca-peft time:

* training step: the released code's `models/slca_pp.py` `_run` step (forward with its
  `convs/vits.py` LoRA ViT, symmetric cross-entropy on the current task's logits, SGD with the
  optimizer groups of `_stage1_training`) against slca-peft's (`SLCATrainer.compute_loss`, its SGD
  from `create_optimizer`, its scheduler), bf16 under autocast as the recipe runs it;
* no-grad pass: the released code's evaluation forward (`models/base.py` `_compute_accuracy`:
  eval mode, `torch.no_grad`) and its statistics pass (`_extract_vectors`, which runs without
  `no_grad`) against slca-peft's statistics pass (as `inference_context`: inference mode, LoRA
  merged, autocast for bf16; features + `ClassStatistics.update`);
* classifier alignment: the released `_stage2_compact_classifier` itself (5 CA epochs, 256 draws
  per class, a `MultivariateNormal` per class and epoch) against `ClassifierAligner.align` on the
  same synthetic class statistics (C classes of 500 samples, 10 tasks), its sampling plan built
  inside the measurement. The released per-epoch test evaluation is left out (it is the eval pass).
  After the table, the arithmetic floor of that alignment on this machine: the time of its random
  normals and of its matrix products alone (the triangular sampling products, each SGD step's
  forward and weight-gradient product), timed here at this torch's speed, and the largest ratio
  against the released code that any exact fp32 implementation could reach.

ViT-B/16 at 224 px with random weights (speed does not depend on them). slca-peft runs in the paper
setting (LoRA on q/k/v/fc1/fc2) and in the released setting (`released_code=True`: one fused-qkv
LoRA, the same trained parameters as the released code); the trainable counts are printed.

The released code needs timm 0.5.4, which imports torchvision, which must match torch exactly. A
separate virtual environment holds both sides (slca-peft installed into it):

    git clone https://github.com/GengDavid/SLCA /tmp/SLCA          # the authors' code (main branch)
    python3 -m venv /tmp/venv-released
    /tmp/venv-released/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==0.5.4 scipy
    /tmp/venv-released/bin/pip install -e .                         # slca-peft, from this checkout
    /tmp/venv-released/bin/python benchmarks/bench_released.py --released_code_dir /tmp/SLCA --threads 1

Without `--released_code_dir` only the slca-peft rows run (any environment). `--quick`: a tiny ViT
and C = 20, seconds on a CPU, for checking that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup, synchronize  # noqa: E402
from bench_alignment import synthetic_statistics, task_sizes  # noqa: E402
from transformers import ViTConfig  # noqa: E402

from slca_peft import SLCAConfig, SLCAModel, SLCATrainer
from slca_peft.method import AlignmentSettings, ClassifierAligner, ClassStatistics
from slca_peft.models import (
    ContinualClassifier,
    adapters_merged_into_weights,  # noqa: E402
)
from slca_peft.utils import cpu_bf16_training  # noqa: E402

TASK_SIZE = 10  # classes per task: two tasks while training (the second one learns), C / 10 when aligning
RELEASED_SETTING = {"lora_rank": 4, "fc_scale_mu": 0.02, "sce_a": 1.0, "sce_b": 0.1, "bcb_lrscale": 0.1,
                    "lr": 0.01, "weight_decay": 5e-4, "logit_norm": 0.1}


def sizes(quick: bool) -> SimpleNamespace:
    if quick:
        return SimpleNamespace(image=32, patch=8, dim=32, depth=2, heads=4, train_batch=4, eval_batch=8,
                               classes=20, per_class=40)
    return SimpleNamespace(image=224, patch=16, dim=768, depth=12, heads=12, train_batch=8, eval_batch=32,
                           classes=100, per_class=500)


def vit_config(s) -> ViTConfig:
    return ViTConfig(image_size=s.image, patch_size=s.patch, hidden_size=s.dim, num_hidden_layers=s.depth,
                     num_attention_heads=s.heads, intermediate_size=4 * s.dim)


def count(params) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------- released code
class Released:
    """The authors' network and learner built from their checkout, without pre-trained weights."""

    def __init__(self, code_dir: str, s):
        sys.path.insert(0, str(Path(code_dir).resolve()))
        import utils.inc_net as inc_net  # the released code's modules
        from convs import vits
        from models import slca_pp

        def convnet(cfg, pretrained=False):
            # `vit_base_lora_patch16_224_in21k` with its sizes (smaller with --quick) and no download.
            model = vits.VisionTransformer(img_size=s.image, patch_size=s.patch, embed_dim=s.dim, depth=s.depth,
                                           num_heads=s.heads, lora_rank=cfg["lora_rank"])
            del model.head
            del model.norm
            model.norm = nn.LayerNorm(s.dim)
            return model

        inc_net.get_convnet = convnet
        self.inc_net, self.slca_pp, self.s = inc_net, slca_pp, s

    def network(self, num_tasks: int) -> nn.Module:
        torch.manual_seed(0)
        net = self.inc_net.FinetuneIncrementalNet(
            {"convnet_type": "vit-b-p16-lora", "lora_rank": RELEASED_SETTING["lora_rank"],
             "fc_scale_mu": RELEASED_SETTING["fc_scale_mu"]}, pretrained=False)
        for _ in range(num_tasks):
            net.update_fc(TASK_SIZE)
        for n, p in net.convnet.named_parameters():  # Hybrid-SL, as SLCApp.__init__
            p.requires_grad = any(k in n for k in ("norm", "bias", "cls_token", "lora"))
        return net

    def training_step(self, pixels, labels) -> tuple[Callable[[], None], dict]:
        net = self.network(2).train()
        known = TASK_SIZE
        named = [(n, p) for n, p in net.convnet.named_parameters() if p.requires_grad]
        lr, scale, wd = RELEASED_SETTING["lr"], RELEASED_SETTING["bcb_lrscale"], RELEASED_SETTING["weight_decay"]
        groups = [  # `_stage1_training` after the first task
            {"params": [p for n, p in named if "lora_A" in n], "lr": lr * scale, "weight_decay": wd},
            {"params": [p for n, p in named if "lora_B" in n], "lr": lr * scale, "weight_decay": wd},
            {"params": [p for n, p in named if "lora" not in n], "lr": lr * scale, "weight_decay": wd},
            {"params": [p for p in net.fc.parameters() if p.requires_grad], "lr": lr, "weight_decay": wd},
        ]
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)
        sce_a, sce_b = RELEASED_SETTING["sce_a"], RELEASED_SETTING["sce_b"]

        def step():  # `_run`'s loop body
            logits = net(pixels, bcb_no_grad=False)["logits"]
            cur_targets = torch.where(labels - known >= 0, labels - known, -100)
            cur_logits = logits[:, known:]
            ce_loss = F.cross_entropy(cur_logits, cur_targets)
            pred = torch.clamp(F.softmax(cur_logits, dim=1), min=1e-7, max=1.0)
            label_one_hot = torch.clamp(F.one_hot(cur_targets, pred.size(1)).float(), min=1e-4, max=1.0)
            rce_loss = -1 * torch.sum(pred * torch.log(label_one_hot), dim=1)
            loss = sce_a * ce_loss + sce_b * rce_loss.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()

        grads = [p for p in net.parameters() if p.requires_grad]
        info = {"optimized": count(p for g in groups for p in g["params"]), "with_grad": count(grads)}
        return step, info

    def no_grad_passes(self, pixels) -> tuple[Callable[[], None], Callable[[], None]]:
        net = self.network(2).eval()

        def evaluation():  # `_compute_accuracy`
            with torch.no_grad():
                outputs = net(pixels)["logits"]
            torch.max(outputs, dim=1)[1].cpu()

        def extract():  # `_extract_vectors`, which runs without torch.no_grad
            net.extract_vector(pixels).cpu().data.numpy()

        return evaluation, extract

    def alignment(self, stats: ClassStatistics, num_classes: int) -> Callable[[], None]:
        learner = self.slca_pp.SLCApp.__new__(self.slca_pp.SLCApp)
        d = stats.feature_dim
        learner._class_means = np.stack([stats.means[c].numpy() for c in range(num_classes)])
        learner._class_covs = torch.zeros((num_classes, d, d))  # float32, as `_compute_class_mean` keeps them
        for c in range(num_classes):  # `torch.cov(vectors) + 1e-4 I`, as `_compute_class_mean`
            learner._class_covs[c] = stats.covariance(c) + torch.eye(d, dtype=torch.float64) * 1e-4
        num_tasks = num_classes // TASK_SIZE
        learner._total_classes, learner._known_classes = num_classes, num_classes - TASK_SIZE
        learner._cur_task, learner.task_sizes = num_tasks - 1, [TASK_SIZE] * num_tasks
        learner.logit_norm, learner.fc_scale_mu = RELEASED_SETTING["logit_norm"], RELEASED_SETTING["fc_scale_mu"]
        learner._device, learner._multiple_gpus, learner.test_loader = "cpu", ["cpu"], None
        learner._compute_accuracy = lambda *a: 0.0  # its per-epoch test evaluation: the eval pass, timed apart
        fc = self.network(num_tasks).fc

        def run():
            learner._network = _FcOnly(copy.deepcopy(fc))
            learner._stage2_compact_classifier(TASK_SIZE)

        return run


class _FcOnly(nn.Module):
    """The released network as `_stage2_compact_classifier` uses it: `self._network(x, fc_only=True)`
    is its classifier alone (no backbone, no `old_fc`)."""

    def __init__(self, fc: nn.Module):
        super().__init__()
        self.fc = fc

    def forward(self, x, bcb_no_grad=False, fc_only=False):
        return self.fc(x)


# ---------------------------------------------------------------------------------------------- slca-peft
def slca_args(setting: str, out: str) -> SLCAConfig:
    return SLCAConfig(output_dir=out, use_cpu=True, report_to="none", disable_tqdm=True,
                      released_code=setting == "released", learning_rate=RELEASED_SETTING["lr"])


def slca_model(s, args: SLCAConfig) -> SLCAModel:
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(vit_config(s), args)
    model.grow(TASK_SIZE)
    model.grow(TASK_SIZE)
    return model


def slca_training_steps(s, setting: str, pixels, labels, out: str) -> tuple[dict[bool, Callable[[], None]], dict]:
    """fp32 and bf16 steps of one model (precision is autocast around the forward and loss, as
    Accelerate applies `--bf16`)."""
    args = slca_args(setting, out)
    model = slca_model(s, args).train()
    trainer = SLCATrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    scheduler = trainer.create_scheduler(1000, optimizer)
    inputs = {"pixel_values": pixels, "labels": labels}

    def step(bf16: bool) -> None:  # what the Trainer's loop does per step (no clipping: max_grad_norm is 0)
        with cpu_bf16_training(model, SimpleNamespace(bf16=bf16)):  # as `SLCATrainer.train` runs
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = trainer.compute_loss(model, inputs)
            loss.backward()
        optimizer.step()
        scheduler.step()
        model.zero_grad(set_to_none=True)
        loss.item()

    steps = {bf16: (lambda bf16=bf16: step(bf16)) for bf16 in (False, True)}
    return steps, {"optimized": count(p for g in optimizer.param_groups for p in g["params"])}


@contextlib.contextmanager
def slca_statistics_pass(s, setting: str, bf16: bool, pixels, labels, out: str):
    """The statistics pass of `StatisticsStep.compute` (continual/steps.py): what `inference_context` does, with
    the merge (once per pass) held for the whole benchmark and the thread-wide modes (inference mode,
    autocast) entered per call, so the rows interleaved with it run in their own."""
    model = slca_model(s, slca_args(setting, out)).eval()
    with torch.no_grad():  # non-zero LoRA, as after training, so merging changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    stats = ClassStatistics(model.feature_dim)

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            stats.update(model.features(pixels), labels)

    with adapters_merged_into_weights(model):  # under no_grad itself; no thread-wide mode held between calls
        yield run


def slca_alignment(stats: ClassStatistics, num_classes: int) -> Callable[[], None]:
    settings = AlignmentSettings.from_config(slca_args("released", tempfile.gettempdir()))
    classifier = ContinualClassifier(stats.feature_dim, task_sizes(num_classes, num_classes // TASK_SIZE))
    aligner = ClassifierAligner(settings)

    def run():
        stats._changed()  # the sampling plan is built inside the measurement
        aligner.align(copy.deepcopy(classifier), stats, num_classes // TASK_SIZE - 1)

    return run


def alignment_floor(s, times: dict[str, dict[str, list[float]]]) -> None:
    """Time only what an exact fp32 alignment cannot skip (C classes, 256 draws each, 5 epochs, batches
    of 256), with torch's generator and this machine's matrix products: the normal draws, the sampling
    products z @ L^T in slca-peft's column blocks (8 at d >= 256, skipping 7/16 of the dense product; a
    perfect triangular product would skip 1/2), and the forward and weight-gradient product of every
    SGD step. Everything else (the softmax, the optimizer, gathering batches) is left at zero cost."""
    settings = AlignmentSettings()
    epochs, n, d, c = settings.epochs, settings.samples_per_class, s.dim, s.classes
    steps = epochs * (c * n // settings.batch_size)
    gen = torch.Generator().manual_seed(0)
    chunk = min(c, 32)
    factors = torch.randn(chunk, d, d, generator=gen).tril()
    z = torch.randn(chunk, n, d, generator=gen)
    x = torch.randn(settings.batch_size, d, generator=gen)
    w = torch.randn(c, d, generator=gen)
    blocks = 8 if d >= 256 else 1  # as `SamplingPlan.sample`: one dense product for small d
    edges = [d * i // blocks for i in range(blocks + 1)]

    def draws():
        for _ in range(epochs):
            torch.randn(c, n, d, generator=gen)

    def products():  # `chunk` classes per product, scaled to C classes below
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            torch.bmm(z[..., :b], factors[:, a:b, :b].mT)

    def head_steps():
        for _ in range(100):
            logits = x @ w.T
            logits.T @ x

    parts = {}
    for name, fn, scale in (("normal draws", draws, 1.0), ("sampling products", products, epochs * c / chunk),
                            ("head products (forward, weight gradient)", head_steps, steps / 100)):
        fn()
        timed_runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            timed_runs.append(time.perf_counter() - start)
        parts[name] = min(timed_runs) * scale
    floor = sum(parts.values())
    print("Arithmetic floor of an exact fp32 alignment here, torch's generator and matrix products (fastest of 3 "
          "timings each): "
          + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()) + f"; total {floor:.3f} s")
    line = f"slca-peft fp32 {statistics.median(times['slca-peft fp32']['wall']):.3f} s"
    if "released code fp32" in times:
        released = statistics.median(times["released code fp32"]["wall"])
        line += (f"; released code / floor = {released / floor:.1f}x, the most an exact fp32 alignment built on "
                 "them can reach")
    print(line + "\n", flush=True)


# ---------------------------------------------------------------------------------------------- timing
def interleaved(rows: dict[str, Callable[[], None]], rounds: int, device) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds per call of each row: one warm-up call each, then `rounds` rounds,
    the row order rotating every round. On a loaded machine the CPU time (this process's, all of its
    threads) moves far less than the wall time; with `--threads 1` it is the idle machine's wall time."""
    names = list(rows)
    for name in names:
        rows[name]()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            rows[name]()
            synchronize(device)
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
        print(f"#   round {r + 1}/{rounds} (wall/cpu s): "
              + ", ".join(f"{n} {times[n]['wall'][-1]:.3f}/{times[n]['cpu'][-1]:.3f}" for n in names), flush=True)
    return times


def table(title: str, times: dict[str, dict[str, list[float]]], baseline: str | None, unit: str) -> None:
    print(f"\n{title} ({unit}; ratio = released code fp32 / row, from the medians)\n"
          "| row | wall median | wall min | ratio (wall) | cpu median | ratio (cpu) | n |\n" + "|---" * 7 + "|")
    base = {k: statistics.median(times[baseline][k]) for k in ("wall", "cpu")} if baseline in times else None
    for name, values in times.items():
        wall, cpu = statistics.median(values["wall"]), statistics.median(values["cpu"])
        ratio = (f"{base['wall'] / wall:.2f}x", f"{base['cpu'] / cpu:.2f}x") if base else ("n/a", "n/a")
        print(f"| {name} | {wall:.3f} | {min(values['wall']):.3f} | {ratio[0]} | {cpu:.3f} | {ratio[1]} | "
              f"{len(values['wall'])} |")
    print(flush=True)


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, list[float]]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--released_code_dir", default=None, help="a checkout of the authors' SLCA code")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 2 with --quick)")
    parser.add_argument("--passes", nargs="+", default=["train", "eval", "align"], choices=["train", "eval", "align"])
    parser.add_argument("--settings", nargs="+", default=["released", "paper"], choices=["released", "paper"])
    args = parser.parse_args(argv)
    args.device = "cpu"  # the released code's alignment is written for one device; this benchmark is the CPU's
    device = setup(args, measures_memory=False)
    s = sizes(args.quick)
    rounds = args.rounds or (2 if args.quick else 5)
    released = Released(args.released_code_dir, s) if args.released_code_dir else None
    print(f"# ViT {s.image}px/{s.patch} d={s.dim} depth {s.depth}; train batch {s.train_batch}, eval batch "
          f"{s.eval_batch}; alignment C={s.classes}, {s.per_class}/class; {rounds} interleaved rounds; released code: "
          f"{args.released_code_dir or 'not given (slca-peft rows only)'}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    train_pixels = torch.randn(s.train_batch, 3, s.image, s.image, generator=gen)
    train_labels = torch.randint(TASK_SIZE, 2 * TASK_SIZE, (s.train_batch,), generator=gen)
    eval_pixels = torch.randn(s.eval_batch, 3, s.image, s.image, generator=gen)
    eval_labels = torch.randint(0, 2 * TASK_SIZE, (s.eval_batch,), generator=gen)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as out:
        if "train" in args.passes:
            rows = {}
            if released:
                rows["released code fp32"], info = released.training_step(train_pixels, train_labels)
                print(f"# released code: {info['optimized']:,} parameters optimized ({info['with_grad']:,} with "
                      "requires_grad: its MLP LoRA gets gradients but is in no optimizer group)")
            for setting in args.settings:
                steps, info = slca_training_steps(s, setting, train_pixels, train_labels, out)
                for bf16, step in steps.items():
                    rows[f"slca-peft {setting} {'bf16' if bf16 else 'fp32'}"] = step
                print(f"# slca-peft {setting} setting: {info['optimized']:,} parameters optimized")
            results["train"] = interleaved(rows, rounds, device)
            table(f"Training step, batch {s.train_batch}", results["train"], "released code fp32", "seconds per step")
        if "eval" in args.passes:
            with contextlib.ExitStack() as stack:
                rows = {}
                if released:
                    evaluation, extract = released.no_grad_passes(eval_pixels)
                    rows["released code fp32 (eval, no_grad)"] = evaluation
                    rows["released code fp32 (_extract_vectors)"] = extract
                for setting in args.settings:
                    for bf16 in (False, True):
                        rows[f"slca-peft {setting} {'bf16' if bf16 else 'fp32'}"] = stack.enter_context(
                            slca_statistics_pass(s, setting, bf16, eval_pixels, eval_labels, out))
                results["eval"] = interleaved(rows, rounds, device)
            table(f"No-grad pass (features of one batch of {s.eval_batch})", results["eval"],
                  "released code fp32 (eval, no_grad)", "seconds per batch")
        if "align" in args.passes:
            stats = synthetic_statistics(s.classes, s.dim, s.per_class, s.classes // TASK_SIZE, "cpu", seed=args.seed)
            rows = {}
            if released:
                rows["released code fp32"] = released.alignment(stats, s.classes)
            rows["slca-peft fp32"] = slca_alignment(stats, s.classes)
            results["align"] = interleaved(rows, max(1, rounds // 2), device)
            table(f"Classifier alignment, C = {s.classes}, 5 epochs", results["align"], "released code fp32",
                  "seconds per alignment")
            alignment_floor(s, results["align"])
    return results


if __name__ == "__main__":
    main()
