"""The GPU suite: where a real run spends its time, in one process, one JSON and one markdown table.

Random-init ViT-B/16 at 224 px, batch 128 (speed does not depend on the weights):

* Hybrid-SL training step (LoRA + norms + biases + class token, SGD foreach), fp32 and bf16;
* statistics pass (features + `ClassStatistics.update`) under `inference_context`: LoRA unmerged
  fp32, merged fp32, merged bf16;
* the data pipeline alone: JPEG decode + `TrainTransform` + collation through a `DataLoader`
  with 0, 1 and the default number of workers;
* classifier alignment (5 CA epochs, 256 draws per class, full-rank classes) at C = 100 and 1000,
  one matmul per step against the previous per-head step.

    PYTHONPATH=. bash benchmarks/gpu_suite.sh --out results/gpu       # < 8 minutes on one H200
    PYTHONPATH=. bash benchmarks/gpu_suite.sh --quick --out /tmp/q    # CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics as stats_mod
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, peak_memory, synchronize  # noqa: E402
from bench_alignment import previous_align, synthetic_statistics, task_sizes  # noqa: E402
from transformers import ViTConfig  # noqa: E402

from slca_peft import SLCAModel
from slca_peft.data import ImageTransformConfig, TrainTransform, collate_fn  # noqa: E402
from slca_peft.method import AlignmentSettings, ClassifierAligner, ClassStatistics
from slca_peft.models import inference_context  # noqa: E402
from slca_peft.utils import MAX_DEFAULT_WORKERS, available_cores  # noqa: E402


def sizes(quick: bool) -> SimpleNamespace:
    if quick:
        return SimpleNamespace(
            vit=ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64),
            batch=8, warmup=1, steps=3, images=16, image_wh=(64, 48), classes=[10, 20], dim=32, per_class=40,
            epochs=1,
        )
    return SimpleNamespace(
        vit=ViTConfig(), batch=128, warmup=3, steps=10, images=1024, image_wh=(500, 375), classes=[100, 1000],
        dim=768, per_class=500, epochs=5,
    )


def timed_loop(device, fn, warmup: int, steps: int) -> dict:
    """Median seconds per call after warm-up, and the peak memory of the timed calls."""
    for _ in range(warmup):
        fn()
    result: dict = {}
    times = []
    with peak_memory(device, result):
        for _ in range(steps):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return {"seconds": stats_mod.median(times), "peak_bytes": result.get("peak_bytes")}


def autocast(device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def bench_train_step(s, device, bf16: bool) -> dict:
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(s.vit, task_sizes=[10], lora_svd_init=False).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
    size = s.vit.image_size
    pixels = torch.randn(s.batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (s.batch,), device=device)

    def step():
        with autocast(device, bf16):
            loss = F.cross_entropy(model(pixel_values=pixels).logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    out = timed_loop(device, step, s.warmup, s.steps)
    out["images_per_s"] = s.batch / out["seconds"]
    return out


def bench_statistics(s, device, bf16: bool, merged: bool) -> dict:
    torch.manual_seed(0)
    model = SLCAModel.from_backbone(s.vit, task_sizes=[10], lora_svd_init=False).to(device)
    with torch.no_grad():  # non-zero LoRA, as after training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    size = s.vit.image_size
    pixels = torch.randn(s.batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (s.batch,), device=device)
    statistics = ClassStatistics(model.feature_dim)
    args = SimpleNamespace(bf16=bf16, fp16=False)

    def batch():
        statistics.update(model.features(pixels), labels)

    if merged:
        with inference_context(model, args):
            out = timed_loop(device, batch, s.warmup, s.steps)
    else:
        with torch.inference_mode(), autocast(device, bf16):
            model.eval()
            out = timed_loop(device, batch, s.warmup, s.steps)
    out["images_per_s"] = s.batch / out["seconds"]
    return out


class JpegFolder(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return {"pixel_values": self.transform(img.convert("RGB")), "labels": i % 10}


def write_jpegs(root: Path, count: int, wh: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    w, h = wh
    base = rng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish content, photo-like size
    paths = []
    for i in range(count):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((w, h), Image.Resampling.BILINEAR)
        path = root / f"{i}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def bench_data(s, device, workers: int, paths) -> dict:
    transform = TrainTransform(ImageTransformConfig.from_model_config(s.vit))
    loader = torch.utils.data.DataLoader(
        JpegFolder(paths, transform), batch_size=s.batch, shuffle=True, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )
    for _ in loader:  # warm-up: starts the workers, fills the page cache
        pass
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["labels"])
    seconds = time.perf_counter() - start
    return {"workers": workers, "seconds": seconds, "images_per_s": count / seconds}


def bench_alignment(s, device, num_classes: int) -> dict:
    stats = synthetic_statistics(num_classes, s.dim, s.per_class, 10, device)
    from slca_peft.models import ContinualClassifier

    classifier = ContinualClassifier(s.dim, task_sizes(num_classes, 10)).to(device)
    aligner = ClassifierAligner(AlignmentSettings(epochs=s.epochs))
    aligner.align(copy.deepcopy(classifier), stats, 9)  # warm-up (and the sampling plan)
    result: dict = {}
    with peak_memory(device, result):
        synchronize(device)
        start = time.perf_counter()
        aligner.align(copy.deepcopy(classifier), stats, 9)
        synchronize(device)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    previous_align(aligner, copy.deepcopy(classifier), stats, 9)
    synchronize(device)
    previous = time.perf_counter() - start
    return {"classes": num_classes, "seconds": seconds, "previous_seconds": previous,
            "speedup": previous / seconds, "peak_bytes": result.get("peak_bytes")}


def gib(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def table(results: dict) -> str:
    rows = ["| measurement | precision | throughput | peak memory |", "| --- | --- | ---: | ---: |"]
    for precision, r in results["train_step"].items():
        rows.append(f"| Hybrid-SL training step | {precision} | {r['images_per_s']:.1f} images/s | "
                    f"{gib(r['peak_bytes'])} |")
    for name, r in results["statistics"].items():
        rows.append(f"| statistics pass ({name.split('/')[0]}) | {name.split('/')[1]} | "
                    f"{r['images_per_s']:.1f} images/s | {gib(r['peak_bytes'])} |")
    step = results["train_step"]["bf16"]["images_per_s"]
    for r in results["data_pipeline"]:
        rows.append(f"| data pipeline alone (JPEG decode + train transform), {r['workers']} worker(s) | — | "
                    f"{r['images_per_s']:.1f} images/s = {r['images_per_s'] / step:.2f}x the bf16 step | |")
    for r in results["alignment"]:
        rows.append(f"| alignment C = {r['classes']} ({results['sizes']['ca_epochs']} CA epochs) | fp32 | "
                    f"{r['seconds']:.2f} s (previous per-head step {r['previous_seconds']:.2f} s, "
                    f"{r['speedup']:.1f}x) | {gib(r['peak_bytes'])} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (seconds)")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --quick)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    s = sizes(args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {
        "environment": environment(device),
        "sizes": {"image_size": s.vit.image_size, "batch": s.batch, "hidden_size": s.vit.hidden_size,
                  "layers": s.vit.num_hidden_layers, "ca_epochs": s.epochs, "ca_dim": s.dim,
                  "ca_train_samples_per_class": s.per_class},
    }
    print(results["environment"], flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    results["train_step"] = {p: bench_train_step(s, device, p == "bf16") for p in ("fp32", "bf16")}
    print("train step", results["train_step"], flush=True)
    results["statistics"] = {
        "LoRA unmerged/fp32": bench_statistics(s, device, bf16=False, merged=False),
        "LoRA merged/fp32": bench_statistics(s, device, bf16=False, merged=True),
        "LoRA merged/bf16": bench_statistics(s, device, bf16=True, merged=True),
    }
    print("statistics", results["statistics"], flush=True)
    default_workers = min(MAX_DEFAULT_WORKERS, available_cores()) if device.type == "cuda" else 0
    worker_counts = sorted({0, 1, default_workers, available_cores()}) if not args.quick else [0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), s.images, s.image_wh)
        results["data_pipeline"] = [bench_data(s, device, w, paths) for w in worker_counts]
    print("data pipeline", results["data_pipeline"], flush=True)
    results["alignment"] = [bench_alignment(s, device, c) for c in s.classes]
    print("alignment", results["alignment"], flush=True)
    results["total_seconds"] = time.perf_counter() - started
    markdown = table(results)
    (out / "gpu_suite.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gpu_suite.md").write_text(f"{results['environment']}\n\n{markdown}\n")
    print("\n" + markdown)
    print(f"\n# total {results['total_seconds']:.0f} s; wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
