"""Reports from finished runs: PNG figures of the expected size and a results table matching the metrics."""

import json
import re
import statistics
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from slca_peft.commands.cli import main as cli_main  # noqa: E402
from slca_peft.sharing.report import FIGURE_SIZE, write_report  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_metrics(shift: float) -> dict:
    matrix = [[98.0 - shift], [95.5 - shift, 92.25], [90.0, 88.5 - shift, 91.0]]
    seen = [98.0 - shift, 93.875 - shift / 2, 89.8]
    return {
        "accuracy_matrix": matrix, "seen_accuracy": seen, "task_sizes": [4, 4, 2], "method": "slca++",
        "last_accuracy": seen[-1], "average_incremental_accuracy": sum(seen) / 3,
        "average_forgetting": 3.0, "backward_transfer": -2.0, "class_order": list(range(10)),
    }


def write_run(root: Path, shift: float = 0.0) -> dict:
    """A finished run in `root` (created) as the report reads it: its metrics.json, returned."""
    root.mkdir(parents=True, exist_ok=True)
    metrics = fake_metrics(shift)
    (root / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def assert_png(path: Path, size=FIGURE_SIZE):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        assert img.size == size


def table_rows(results: Path) -> dict[str, list[str]]:
    """{class-order seed (or "mean ± std"): [Last-Acc, Inc-Acc]} from results.md."""
    rows = {}
    for line in results.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.match(r"^[\d.]+", cells[2]):
            rows[cells[0] if cells[0].startswith("mean") else cells[1]] = cells[2:]
    return rows


def test_single_run_report(tmp_path, capsys):
    run = tmp_path / "run"
    metrics = write_run(run)
    cli_main(["report", str(run)])
    assert "results.md" in capsys.readouterr().out
    assert_png(run / "accuracy_matrix.png")
    assert_png(run / "accuracy_curve.png")
    rows = table_rows(run / "results.md")
    assert rows == {"–": [f"{metrics['last_accuracy']:.2f}", f"{metrics['average_incremental_accuracy']:.2f}"]}


def test_seeds_report_has_per_seed_rows_and_mean_std(tmp_path, load_script):
    root = tmp_path / "seeds"
    runs = {}
    for seed, shift in ((1993, 0.0), (1996, 1.5), (1997, 3.0)):
        metrics = write_run(root / f"seed_{seed}", shift)
        runs[str(seed)] = {"output_dir": f"seed_{seed}", "last_accuracy": metrics["last_accuracy"],
                           "average_incremental_accuracy": metrics["average_incremental_accuracy"]}
    (root / "seeds.json").write_text(json.dumps({"method": "slca++", "seeds": [1993, 1996, 1997], "runs": runs}))
    report = load_script("report")
    written = report.main([str(root), ])
    assert str(root / "results.md") in written
    for directory in (root, root / "seed_1996"):
        assert_png(directory / "accuracy_matrix.png")
        assert_png(directory / "accuracy_curve.png")
    rows = table_rows(root / "results.md")
    for seed, run in runs.items():
        assert rows[seed] == [f"{run['last_accuracy']:.2f}", f"{run['average_incremental_accuracy']:.2f}"]
    inc = [run["average_incremental_accuracy"] for run in runs.values()]
    last = [run["last_accuracy"] for run in runs.values()]
    assert rows["mean ± std"] == [f"{statistics.mean(last):.2f} ± {statistics.stdev(last):.2f}",
                                  f"{statistics.mean(inc):.2f} ± {statistics.stdev(inc):.2f}"]


def test_report_size_is_configurable_and_missing_metrics_are_explained(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    write_report(run, size=(400, 300))
    assert_png(run / "accuracy_curve.png", size=(400, 300))
    with pytest.raises(FileNotFoundError, match="finished run"):
        write_report(tmp_path / "empty")


def test_train_seq_seeds_writes_seeds_json_and_report_reads_it(tmp_path, recipe, monkeypatch):
    """`--seeds`: one run per class-order seed into seed_<s>/ (each with its own Hub repo), seeds.json with
    every seed's numbers and their mean and sample std, and the report over the seeds at the end. The runs
    themselves are stood in for by their metrics.json (a seed's run is `recipe.train`, tested elsewhere)."""
    out = tmp_path / "runs"
    shifts, calls = {5: 0.0, 7: 2.5}, []

    def seed_metrics(shift):  # both summary numbers differ between the seeds
        return {**fake_metrics(shift), "last_accuracy": 89.8 - shift}

    def train(model_args, data_args, args):
        calls.append((args.class_order_seed, args.output_dir, args.hub_model_id))
        metrics = seed_metrics(shifts[args.class_order_seed])
        Path(args.output_dir).mkdir(parents=True)
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(recipe, "train", train)
    result = recipe.main(["--model_config", "m.json", "--train_dir", "train", "--test_dir", "test",
                          "--output_dir", str(out), "--seeds", "5", "7", "--push_to_hub", "true",
                          "--hub_model_id", "me/run"])
    assert calls == [(5, str(out / "seed_5"), "me/run-seed5"), (7, str(out / "seed_7"), "me/run-seed7")]
    seeds = json.loads((out / "seeds.json").read_text())
    assert seeds == result and seeds["seeds"] == [5, 7] and seeds["method"] == "slca++"
    for seed, shift in shifts.items():
        metrics = seed_metrics(shift)
        assert seeds["runs"][str(seed)] == {"output_dir": f"seed_{seed}", "last_accuracy": metrics["last_accuracy"],
                                            "average_incremental_accuracy": metrics["average_incremental_accuracy"]}
    for key in ("last_accuracy", "average_incremental_accuracy"):
        a, b = (seed_metrics(shift)[key] for shift in shifts.values())
        # Two values: mean (a + b) / 2, sample standard deviation |a - b| / sqrt(2).
        assert seeds[key]["mean"] == pytest.approx((a + b) / 2)
        assert seeds[key]["std"] == pytest.approx(abs(a - b) / 2**0.5) and seeds[key]["std"] > 0
    # The --seeds run writes the report over its seeds (and each seed's) at its end; `slca-peft report`
    # rewrites the same.
    assert_png(out / "accuracy_matrix.png")
    assert (out / "seed_7" / "results.md").is_file()
    assert set(table_rows(out / "results.md")) == {"5", "7", "mean ± std"}
    write_report(out)
    assert set(table_rows(out / "results.md")) == {"5", "7", "mean ± std"}


def captured_figures(monkeypatch) -> dict[str, object]:
    """The figures write_report draws, by file name (saved as usual)."""
    import slca_peft.sharing.figures as plotting

    figures, save = {}, plotting._save

    def keep(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plotting, "_save", keep)
    return figures


def test_report_names_both_seeds_the_all_seen_column_and_what_each_curve_is(tmp_path, monkeypatch):
    run = tmp_path / "run"
    metrics = write_run(run)
    (run / "run_fingerprint.json").write_text(json.dumps({"seed": 42, "class_order_seed": 1993, "domains": None}))
    figures = captured_figures(monkeypatch)
    write_report(run)
    text = (run / "results.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| training seed"))
    assert "class-order seed" in header
    assert f"| 42 | 1993 | {metrics['last_accuracy']:.2f} |" in text
    assert "std" not in text  # one run: no standard deviation to speak of
    ax = figures["accuracy_matrix.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "all seen"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"]
    shown = {t.get_text() for t in ax.texts}
    assert {f"{v:.1f}" for v in metrics["seen_accuracy"]} <= shown
    legend = figures["accuracy_curve.png"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["class order seed 1993, training seed 42"]


def test_a_partial_all_seen_figure_is_marked_on_the_accuracy_matrix(tmp_path, monkeypatch):
    """A continuation whose old tasks had no test data: the "all seen" number of that row is over the measured
    tasks only, and the figure says so (an asterisk and a note), not only the dash of the missing entry."""
    from slca_peft.sharing.figures import PARTIAL_MARK, plot_accuracy_matrix

    figures = captured_figures(monkeypatch)
    plot_accuracy_matrix([[90.0], [None, 70.0], [60.0, 50.0, 80.0]], tmp_path / "m.png", seen=[90.0, 70.0, 63.3])
    fig = figures["m.png"]
    shown = [t.get_text() for t in fig.axes[0].texts]
    assert "—" in shown and f"70.0{PARTIAL_MARK}" in shown
    assert "90.0" in shown and "63.3" in shown and f"63.3{PARTIAL_MARK}" not in shown  # whole rows unmarked
    (note,) = [t.get_text() for t in fig.texts]
    assert note.startswith(f"{PARTIAL_MARK} partial: over the tasks with test data only")
    plot_accuracy_matrix([[90.0], [80.0, 70.0]], tmp_path / "whole.png", seen=[90.0, 75.0])
    whole = figures["whole.png"]
    assert not whole.texts and not any(PARTIAL_MARK in t.get_text() for t in whole.axes[0].texts)
