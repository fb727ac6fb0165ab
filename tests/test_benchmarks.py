import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import python_forked

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_quick_runs_on_the_cpu_and_writes_json_and_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--quick", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert set(results["train_step"]) == {"fp32", "bf16"}
    assert set(results["statistics"]) == {"LoRA unmerged/fp32", "LoRA merged/fp32", "LoRA merged/bf16"}
    assert [r["classes"] for r in results["alignment"]] == [10, 20]
    numbers = [r["images_per_s"] for r in [*results["train_step"].values(), *results["statistics"].values(),
                                           *results["data_pipeline"]]]
    assert all(n > 0 for n in numbers)
    assert all(r["seconds"] > 0 and r["previous_seconds"] > 0 for r in results["alignment"])
    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.count("\n| ") == 2 + 2 + 3 + len(results["data_pipeline"]) + 2 and "| alignment C = 20" in table
    assert table in done.stdout or table.split("\n\n", 1)[1].strip() in done.stdout


def test_the_long_stream_and_check_pass_benchmarks_print_their_numbers(tmp_path):
    def run(script, *flags):  # the script as `python script --threads 1 flags` runs it, in a forked process
        path = ROOT / "benchmarks" / script
        done = python_forked(f"import runpy, sys; sys.path.insert(0, {str(path.parent)!r}); "
                             f"runpy.run_path({str(path)!r}, run_name='__main__')", "--threads", "1", *flags,
                             cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    out = run("bench_long_stream.py", "--tasks", "4", "--every", "1")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    for row in rows:  # the phases of a task add up to its wall time
        assert sum(map(float, row[1:7])) == pytest.approx(float(row[7]), abs=2e-3)
        assert float(row[7]) == pytest.approx(float(row[8]), rel=0.05, abs=0.01)
    assert "total ~ T^" in out and "other" in out
    out = run("bench_check_pass.py", "--sizes", "300", "600")
    assert "growth" in out and "record of 600 digests" in out
