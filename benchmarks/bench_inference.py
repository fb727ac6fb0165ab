"""Inference (statistics and evaluation passes) with LoRA merged versus unmerged, paired.

ViT-B/16 at 224 px with random weights (non-zero LoRA B, as after training), eval mode,
`torch.inference_mode`. Rows run interleaved over rounds on the same batches; the median batch
is reported:

* LoRA unmerged: PEFT's forward adds the low-rank path to every adapted linear (what the passes
  ran before `merged_adapters`);
* LoRA merged: inside `SLCAModel.merged_adapters()` (the merge and the exact restore are timed
  separately, once per pass);
* plain backbone: the same `ViTModel` without PEFT, the lower bound.

    python benchmarks/bench_inference.py --quick --threads 1     # CPU, batch 4
    python benchmarks/bench_inference.py --device cuda           # batch 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import ViTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup, synchronize  # noqa: E402

from slca_peft import SLCAModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 with --quick, else 128")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = setup(args)
    batch = args.batch_size or (4 if args.quick else 128)
    model = SLCAModel.from_backbone(ViTConfig(), task_sizes=[10]).to(device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    plain = copy.deepcopy(model.backbone).merge_and_unload()  # the same function without PEFT's wrappers
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randn(batch, 3, 224, 224, generator=gen).to(device) for _ in range(args.batches)]
    times: dict[str, list[float]] = {"LoRA unmerged": [], "LoRA merged": [], "plain backbone": []}
    merge_times = []
    with torch.inference_mode():
        model.features(batches[0])
        plain(pixel_values=batches[0])  # warm-up
        for _ in range(args.rounds):
            for kind in times:
                synchronize(device)
                start = time.perf_counter()
                if kind == "LoRA merged":
                    context = model.merged_adapters()
                    context.__enter__()
                    synchronize(device)
                    merge_times.append(time.perf_counter() - start)
                for pixels in batches:
                    synchronize(device)
                    start = time.perf_counter()
                    if kind == "plain backbone":
                        plain(pixel_values=pixels)
                    else:
                        model.features(pixels)
                    synchronize(device)
                    times[kind].append(time.perf_counter() - start)
                if kind == "LoRA merged":
                    start = time.perf_counter()
                    context.__exit__(None, None, None)
                    synchronize(device)
                    merge_times[-1] += time.perf_counter() - start
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    print(f"# ViT-B/16 224 px, batch {batch}, {args.batches} batches x {args.rounds} interleaved rounds")
    print("| path | median batch | images/s | vs unmerged |")
    print("| --- | ---: | ---: | ---: |")
    for kind, seconds in medians.items():
        print(f"| {kind} | {seconds:.3f} s | {batch / seconds:.2f} | {medians['LoRA unmerged'] / seconds:.2f}x |")
    print(f"# merge + exact restore: median {statistics.median(merge_times):.3f} s per pass")


if __name__ == "__main__":
    main()
