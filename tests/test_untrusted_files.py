"""Files read from a run or checkpoint directory are data: checked before use, bounded, contained."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SPARSE_UNDER_CAP = """
import resource, sys
from slca_peft.statistics import ClassStatistics
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
with open("/proc/self/status") as fh:
    used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + (512 << 20), hard))  # half a GiB more than now
try:
    ClassStatistics.load(sys.argv[1], feature_dim=768)
except ValueError as err:
    print("REFUSED", err)
except MemoryError:
    print("ALLOCATED")
"""


def sparse_statistics(directory: Path, declared: int) -> Path:
    """A class_statistics.safetensors whose header is consistent but declares `declared` bytes of
    factors, written as a sparse file (a few KB on disk)."""
    num, dim = 1000, 768
    tensors = {"classes": ("I64", [num]), "tasks": ("I64", [num]), "counts": ("I64", [num]),
               "kinds": ("I64", [num]), "ranks": ("I64", [num]), "ridge": ("F64", []),
               "means": ("F64", [num, dim]), "noise": ("F64", [num, dim]), "factors": ("F64", [declared // 8])}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = 8
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "slca-peft class statistics", "version": "2"}
    blob = json.dumps(header).encode()
    path = directory / "class_statistics.safetensors"
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)
    return path


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_sparse_statistics_declaring_512_gib_are_refused_without_allocating(tmp_path):
    path = sparse_statistics(tmp_path, 512 << 30)
    assert path.stat().st_size > 512 << 30 and path.stat().st_blocks * 512 < 1 << 20
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SPARSE_UNDER_CAP, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.startswith("REFUSED"), proc.stdout + proc.stderr[-2000:]
    assert "stores only" in proc.stdout and "class_statistics.safetensors" in proc.stdout


def test_report_writes_only_inside_the_run_directory(tmp_path):
    pytest.importorskip("matplotlib")
    from slca_peft.plotting import write_report

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
