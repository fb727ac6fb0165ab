"""Files read from a run or checkpoint directory are data: class statistics are checked and bounded before
anything is allocated."""

import json
import struct
from pathlib import Path

import pytest


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


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_sparse_statistics_declaring_512_gib_are_refused_without_allocating(tmp_path, forked):
    path = sparse_statistics(tmp_path, 512 << 30)
    assert path.stat().st_size > 512 << 30 and path.stat().st_blocks * 512 < 1 << 20

    def load_under_a_cap() -> int:  # in a child process: the address-space cap must not reach pytest
        import resource

        from slca_peft.method.statistics import ClassStatistics

        with open("/proc/self/status") as fh:
            used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        # Half a GiB more than now.
        resource.setrlimit(resource.RLIMIT_AS, (used + (512 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            ClassStatistics.load(str(tmp_path), feature_dim=768)
        except ValueError as err:
            (tmp_path / "refused.txt").write_text(str(err))
            return 0
        except MemoryError:
            return 1
        return 2

    assert forked(load_under_a_cap) == 0  # 1: it tried to allocate; 2: it loaded
    refusal = (tmp_path / "refused.txt").read_text()
    assert "stores only" in refusal and "class_statistics.safetensors" in refusal
