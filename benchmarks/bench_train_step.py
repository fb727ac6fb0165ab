"""Training throughput (images/s) of one optimizer step on ViT-B/16 at 224 px.

Rows (random weights from `ViTConfig()`, which is ViT-B/16 at 224 px; speed does not depend on them):

* slca++ Hybrid-SL   -- SLCATrainer + SLCAModel, LoRA r=4 on q/k/v/fc1/fc2 + norms + biases + class token
* slca full FT       -- SLCATrainer + SLCAModel, the whole backbone trains
* plain Trainer, same model -- transformers.Trainer on the same Hybrid-SL SLCAModel (CE on all logits):
                        the difference to the first row is SLCATrainer's own overhead
* plain PEFT LoRA    -- transformers.Trainer on a PEFT-wrapped ViTForImageClassification with the same
                        trainable set (same LoRA, norms, biases, class token, head)

Each step is timed from `on_step_begin` to `on_step_end` (forward, backward, optimizer and scheduler
step; not data loading). Rows run interleaved over several rounds; the median step decides the
verdict, the fastest step is printed for reference.

    python benchmarks/bench_train_step.py --quick --threads 1   # CPU: batch 4, a few steps
    python benchmarks/bench_train_step.py --device cuda         # GPU: batch 128, 20 timed steps
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup  # noqa: E402

from slca_peft import SLCAConfig, SLCAModel, SLCATrainer  # noqa: E402

NUM_CLASSES = 10


class StepTimer(TrainerCallback):
    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        import time

        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import time

        self._sync()
        self.times.append(time.perf_counter() - self._start)


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, size: int, image_size: int = 224, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(size, 3, image_size, image_size, generator=gen)
        self.labels = torch.randint(0, NUM_CLASSES, (size,), generator=gen)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def common_arguments(out: str, args, steps: int) -> dict:
    return dict(
        output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=steps, learning_rate=0.01,
        weight_decay=5e-4, report_to="none", disable_tqdm=True, logging_strategy="no", save_strategy="no",
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=args.device == "cpu", bf16=args.bf16,
        seed=args.seed,
    )


def plain_peft_vit(config: ViTConfig) -> nn.Module:
    """ViTForImageClassification wrapped by PEFT with the Hybrid-SL trainable set."""
    from peft import LoraConfig, get_peft_model

    model = ViTForImageClassification(config)
    norms = sorted({n.rsplit(".", 1)[-1] for n, m in model.vit.named_modules() if isinstance(m, nn.LayerNorm)})
    lora = LoraConfig(r=4, lora_alpha=3.2, target_modules=["q_proj", "k_proj", "v_proj", "fc1", "fc2"],
                      lora_dropout=0.0, bias="all", modules_to_save=[*norms, "classifier"])
    wrapped = get_peft_model(model, lora)
    for name, param in wrapped.named_parameters():
        if ".original_module." in name:
            param.requires_grad_(False)
    wrapped.get_base_model().vit.embeddings.cls_token.requires_grad_(True)
    return wrapped


def build(kind: str, args, out: str, steps: int, dataset, timer: StepTimer) -> Trainer:
    config = ViTConfig()  # ViT-B/16, 224 px
    common = common_arguments(out, args, steps)
    if kind in ("slca++ Hybrid-SL", "slca full FT", "plain Trainer, same model"):
        method = "slca" if kind == "slca full FT" else "slca++"
        slca_args = SLCAConfig(method=method, lora_svd_init=False, momentum=0.9, **common)
        model = SLCAModel.from_backbone(config, slca_args)
        model.grow(NUM_CLASSES)
        if kind == "plain Trainer, same model":
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
            return Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                           optimizers=(optimizer, None), callbacks=[timer])
        # Steps are what is timed: no class statistics pass when each round's training ends.
        return SLCATrainer(model=model, args=slca_args, train_dataset=dataset, callbacks=[timer],
                           gather_statistics=False)
    model = plain_peft_vit(ViTConfig(num_labels=NUM_CLASSES))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    return Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                   optimizers=(optimizer, None), callbacks=[timer])


def trainable(trainer: Trainer) -> int:
    return sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (4 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per round (5; 1 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3 in both modes)")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (4 if args.quick else 128)
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    rounds = args.rounds or 3
    device = setup(args)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"# ViT-B/16 224 px, batch {args.batch_size}, {warmup} warm-up + {steps} timed steps x {rounds} rounds, "
          f"bf16={args.bf16}", flush=True)
    kinds = ["slca++ Hybrid-SL", "slca full FT", "plain Trainer, same model", "plain PEFT LoRA"]
    dataset = RandomImages(args.batch_size * (warmup + steps), seed=args.seed)
    results: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as out:
        trainers = {}
        timers = {}
        for kind in kinds:
            timers[kind] = StepTimer(device)
            trainers[kind] = build(kind, args, out, warmup + steps, dataset, timers[kind])
            print(f"# {kind}: {trainable(trainers[kind]):,} trainable parameters", flush=True)
        for r in range(rounds):
            for kind in kinds:
                timers[kind].times.clear()
                trainers[kind].train()
                timed = timers[kind].times[warmup:]
                results[kind].extend(timed)
                print(f"# round {r}: {kind}: median step {statistics.median(timed):.3f} s", flush=True)
    print(f"\n{'configuration':<28} {'median step':>12} {'min step':>10} {'images/s':>9} {'steps':>6}")
    median = {k: statistics.median(v) for k, v in results.items()}
    best = {k: min(v) for k, v in results.items()}
    for kind in kinds:
        print(f"{kind:<28} {median[kind]:>10.3f} s {best[kind]:>8.3f} s {args.batch_size / median[kind]:>9.2f} "
              f"{len(results[kind]):>6}")
    for label, base in [("a plain Trainer step on the same model", "plain Trainer, same model"),
                        ("a plain PEFT LoRA ViTForImageClassification step", "plain PEFT LoRA")]:
        over_median = median["slca++ Hybrid-SL"] / median[base] - 1
        over_min = best["slca++ Hybrid-SL"] / best[base] - 1
        verdict = "PASS" if over_median < 0.05 else "FAIL"
        print(f"SLCATrainer Hybrid-SL overhead over {label}: {100 * over_median:+.1f}% (median), "
              f"{100 * over_min:+.1f}% (min) -- {verdict} (median < 5%)")
    print(f"full fine-tuning / Hybrid-SL step time: {median['slca full FT'] / median['slca++ Hybrid-SL']:.2f}x")

if __name__ == "__main__":
    main()
