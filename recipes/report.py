"""Plots and a results table for a finished `train_seq.py` run (or a `--seeds` run).

    python recipes/report.py runs/cifar100_in21k_slca++      # same as: slca-peft report OUTPUT_DIR

Writes OUTPUT_DIR/accuracy_matrix.png, OUTPUT_DIR/accuracy_curve.png and OUTPUT_DIR/results.md
(Last-Acc / Inc-Acc per seed and mean ± std). Needs matplotlib (`pip install 'slca-peft[plot]'`).
"""

from __future__ import annotations

import argparse
import sys

from slca_peft.sharing import write_report


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a run's --output_dir (holding metrics.json or seeds.json)")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    written = [str(path) for path in write_report(ns.output_dir)]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
