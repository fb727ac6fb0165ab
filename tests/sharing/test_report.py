"""Files read from a run directory are data: a report writes only inside the run it reads."""

import json

import pytest


def test_report_writes_only_inside_the_run_directory(tmp_path):
    pytest.importorskip("matplotlib")
    from slca_peft.sharing.report import write_report

    run, victim = tmp_path / "run", tmp_path / "victim"
    victim.mkdir()
    metrics = {"accuracy_matrix": [[90.0], [80.0, 70.0]], "seen_accuracy": [90.0, 75.0], "task_sizes": [2, 2],
               "last_accuracy": 75.0, "average_incremental_accuracy": 82.5, "method": "slca++"}
    (victim / "metrics.json").write_text(json.dumps(metrics))
    run.mkdir()
    (run / "seeds.json").write_text(json.dumps({"runs": {"1": {"output_dir": "../victim"}}}))
    with pytest.raises(ValueError, match=r"seed 1's output_dir '../victim' is not a folder inside"):
        write_report(run)
    (run / "seeds.json").write_text(json.dumps({"runs": {"1": {"output_dir": str(victim)}}}))
    with pytest.raises(ValueError, match="is not a folder inside"):
        write_report(run)
    assert sorted(p.name for p in victim.iterdir()) == ["metrics.json"]
    assert sorted(p.name for p in run.iterdir()) == ["seeds.json"]
