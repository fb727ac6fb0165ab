"""Paired comparison of two `train_seq.py --seeds` runs over the same class orders.

    python recipes/compare_seeds.py outputs/released outputs/paper

Prints, for Last-Acc and Inc-Acc, each run's mean ± sample std and the paired difference (first minus
second) with its std and paired t statistic. Class orders vary far more than settings do, so only
the paired difference says whether one setting beats the other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slca_peft.sharing import mean_std
from slca_peft.utils import UserError, read_json, run_main

METRICS = {"Last-Acc": "last_accuracy", "Inc-Acc": "average_incremental_accuracy"}


def _runs(path: Path) -> dict[str, dict[str, float]]:
    """The `runs` of a seeds.json, or one error naming the file."""
    if not path.is_file():
        raise UserError(f"{path} not found; give the output_dir of a train_seq.py --seeds run.")
    data = read_json(path)
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict) or not all(
            isinstance(run, dict) and all(isinstance(run.get(k), (int, float)) for k in METRICS.values())
            for run in runs.values()):
        raise UserError(f"{path} has no 'runs' mapping of seed -> {sorted(METRICS.values())}; it was not written by "
                        "train_seq.py --seeds.")
    return runs


def paired(first: str | Path, second: str | Path) -> dict[str, dict[str, float]]:
    """Per metric: means and stds of both runs and of their per-seed difference, and the paired t."""
    runs = [_runs(Path(d) / "seeds.json") for d in (first, second)]
    seeds = sorted(set(runs[0]) & set(runs[1]), key=int)
    if len(seeds) < 2:
        raise SystemExit(f"{first} and {second} share {len(seeds)} class-order seed(s); a paired comparison needs 2+.")
    result = {}
    for label, key in METRICS.items():
        a = [runs[0][s][key] for s in seeds]
        b = [runs[1][s][key] for s in seeds]
        diff = [x - y for x, y in zip(a, b, strict=True)]
        (a_mean, a_std), (b_mean, b_std), (d_mean, d_std) = mean_std(a), mean_std(b), mean_std(diff)
        result[label] = {
            "first_mean": a_mean, "first_std": a_std, "second_mean": b_mean, "second_std": b_std,
            "diff_mean": d_mean, "diff_std": d_std,
            "t": d_mean / (d_std / len(diff) ** 0.5) if d_std > 0 else float("inf"),
            "seeds": len(seeds),
        }
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    if argv is None:  # the command line: a user error is one line
        return run_main(main, prog="compare_seeds.py")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="a --seeds run's output_dir (holding seeds.json)")
    parser.add_argument("second", help="another one, over the same class-order seeds")
    ns = parser.parse_args(argv)
    result = paired(ns.first, ns.second)
    for label, r in result.items():
        print(f"{label}: {r['first_mean']:.1f} ± {r['first_std']:.1f} vs {r['second_mean']:.1f} ± {r['second_std']:.1f}"
              f" | paired difference {r['diff_mean']:+.1f} ± {r['diff_std']:.1f}, t = {r['t']:.1f}"
              f" ({r['seeds']} class orders)")
    return result


if __name__ == "__main__":
    main()
