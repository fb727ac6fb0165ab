"""The data check pass at scale: memory per image, images/s, and what a second check of the same bytes costs.

Writes N small PNGs (8x8 RGB, random pixels, 100 class folders) to a temporary folder, then runs
`slca_peft.data.checks.check_images` over their paths:

1. first pass (decode + hash every image), with the memory it keeps afterwards (`tracemalloc`, the
   digests `content_digest` answers the fingerprint from) and its peak, both per image; the growth is
   fitted over two sizes, so fixed costs (thread pool, Pillow's plugins) do not count per image;
2. the same paths again in the same process (the next seed of a `--seeds` run: hashed, not decoded);
3. a new process's view: the in-process digests forgotten, a decoded record (`use_decoded_record`,
   the recipe's `--image_check_record`) written by pass 1 read back: hashed, not decoded.

Timed passes run without `tracemalloc` (it slows allocation-heavy code); memory is measured in a
separate pass.

    python benchmarks/bench_check_pass.py --threads 1 --quick     # 2,000 and 8,000 images
    python benchmarks/bench_check_pass.py --threads 1             # 10,000 and 40,000 images
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup  # noqa: E402

from slca_peft.data import checks  # noqa: E402


def write_images(root: Path, count: int, seed: int) -> list[str]:
    rng = np.random.RandomState(seed)
    paths = []
    for i in range(count):
        folder = root / f"class_{i % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:08d}.png"
        Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def memory(paths: list[str], workers: int) -> tuple[int, int]:
    """(bytes kept, peak bytes) of a first check of `paths`, above the level before it."""
    checks.forget_content_digests()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    checks.check_images(paths, workers=workers, progress=False)
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return kept - base, peak - base


def timed(paths: list[str], workers: int) -> float:
    start = time.perf_counter()
    checks.check_images(paths, workers=workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--sizes", type=int, nargs=2, default=None, help="two image counts (default 10000 40000)")
    parser.add_argument("--workers", type=int, default=2, help="decode threads (the library: min(8, CPUs))")
    args = parser.parse_args()
    setup(args, measures_memory=False)
    small, large = args.sizes or ((2000, 8000) if args.quick else (10_000, 40_000))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp) / "images", large, args.seed)
        record = Path(tmp) / "decoded.safetensors"
        kept_small, peak_small = memory(paths[:small], args.workers)
        kept_large, peak_large = memory(paths, args.workers)
        per_image = (kept_large - kept_small) / (large - small)
        peak_per_image = (peak_large - peak_small) / (large - small)
        print(f"memory kept after the pass: {kept_small / small:.0f} B/image at {small}, {kept_large / large:.0f} "
              f"B/image at {large}; growth {per_image:.0f} B/image (peak growth {peak_per_image:.0f} B/image)")

        checks.forget_content_digests()
        checks.use_decoded_record(record)
        first = timed(paths, args.workers)
        again = timed(paths, args.workers)
        checks.forget_content_digests()
        trusted = checks.use_decoded_record(record)
        later = timed(paths, args.workers)
        checks.use_decoded_record(None)
        print(f"{large} images, {args.workers} decode threads:")
        print(f"  first check (decode + hash)           {first:7.2f} s  {large / first:8.0f} images/s")
        print(f"  same process again (--seeds)          {again:7.2f} s  {large / again:8.0f} images/s")
        print(f"  new process, record of {trusted} digests {later:7.2f} s  {large / later:8.0f} images/s  "
              f"(record {record.stat().st_size / large:.0f} B/image on disk)")


if __name__ == "__main__":
    main()
