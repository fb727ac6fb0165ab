"""Every file the library reads goes through one bounded reader (`slca_peft.utils.errors.open_regular`):
a regular file only, a size limit, no FIFO or device, and no symlink where the library wrote the file
itself. The package is walked for any other read; each reader of its own (the no-follow walk of a
manifest's files, the lock, safetensors' loader after the header was checked) is listed here with why."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from conftest import hangs, python_forked

from slca_peft.utils.errors import UserError
from slca_peft.utils.reading import open_regular, read_bytes, read_json, read_own_json

PACKAGE = Path(__file__).resolve().parents[2] / "slca_peft"

#: (module, function) -> why its read is not `open_regular`'s.
OWN_READERS = {
    ("utils/reading.py", "open_regular"): "the bounded reader itself",
    ("artifacts/listed.py", "parent_fd"): "opens folders with O_NOFOLLOW, component by component",
    ("artifacts/listed.py", "open_listed"): "opens a listed file with O_NOFOLLOW | O_NONBLOCK, regular files only",
    ("artifacts/atomic.py", "settle_files"): "fsyncs files the library just wrote (O_NOFOLLOW), reads nothing",
    ("artifacts/manifest.py", "open_for_write"): "opens for writing (O_WRONLY | O_NOFOLLOW), reads nothing",
    ("artifacts/lock.py", "_open_lock"): "the lock file, O_RDWR | O_NOFOLLOW | O_NONBLOCK, regular files only",
    ("export/lock.py", "export_lock"): "the export lock, O_RDWR | O_NOFOLLOW | O_NONBLOCK, regular only",
    ("artifacts/atomic.py", "is_partial"): "the partial-folder marker, O_NOFOLLOW | O_NONBLOCK, its length only",
    ("method/statistics_file.py", "read_statistics_file"): "safetensors' loader, after read_header checked the file",
    ("models/saving.py", "read_safetensors"): "safetensors' loader, after read_header checked the file",
    ("data/checks.py", "_decode"): "PIL decodes bytes open_regular read (or the path it checked)",
    ("continual/tracking.py", "log_image"): "PIL decodes a handle open_regular opened",
}
_READ_ATTRIBUTES = {"read_text", "read_bytes", "open", "fdopen", "safe_open", "load_file"}


def _is_write(call: ast.Call) -> bool:
    """`open(path, "w"...)`, `os.open(path, O_WRONLY | ...)`: a write, which is not what this test is about."""
    text = ast.unparse(call)
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wxa+"):
        return True
    return any(flag in text for flag in ("O_WRONLY", "O_CREAT", "O_RDWR"))


def reads_outside_the_reader(allowed: set | None = None) -> list[str]:
    """Every read outside `open_regular` and `OWN_READERS`; `allowed` collects the listed readers met."""
    found = []
    allowed = set() if allowed is None else allowed
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        stack: list[tuple[ast.AST, str]] = [(tree, "<module>")]
        while stack:
            node, function = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                function = node.name
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                reads = name in _READ_ATTRIBUTES if isinstance(func, ast.Attribute) else name in ("open", "safe_open")
                if reads and not _is_write(node):
                    if (module, function) in OWN_READERS:
                        allowed.add((module, function))
                    else:
                        found.append(f"{module}:{node.lineno} {function}: {ast.unparse(node)[:80]}")
            stack.extend((child, function) for child in ast.iter_child_nodes(node))
    return found


def test_the_package_reads_files_only_through_the_bounded_reader():
    met: set = set()
    assert reads_outside_the_reader(met) == []
    assert met == set(OWN_READERS)  # every exception listed still reads (the list does not outlive the code)


def test_a_fifo_a_device_a_symlink_and_a_large_file_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "metrics.json"
    os.mkfifo(fifo)
    for reader in (lambda p: read_json(p), lambda p: read_own_json(p, 1 << 20, "remove it")):
        result = hangs(reader, fifo)
        assert isinstance(result, UserError) and "is a FIFO" in str(result)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    result = hangs(read_json, zero)
    assert isinstance(result, UserError) and "is a device" in str(result)
    result = hangs(read_own_json, zero, 1 << 20, "remove it")
    assert isinstance(result, UserError) and "symbolic link" in str(result)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2048)
    with pytest.raises(UserError, match="larger than 1024 bytes"):
        read_bytes(big, 1024)
    # A link inside a run directory that leads out of it.
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "secret.json").write_text("{}")
    (run / "metrics.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(UserError, match="leads outside"):
        read_json(run / "metrics.json", root=run)
    with open_regular(big) as fh:  # a regular file reads as usual
        assert fh.read(3) == b"   "


def test_the_report_refuses_a_fifo_metrics_json_instead_of_hanging(tmp_path):
    from slca_peft.sharing.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "metrics.json")
    result = hangs(write_report, run)
    assert isinstance(result, UserError) and "is a FIFO" in str(result)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json"]


def _parse(*args):
    from slca_peft.commands.arguments import parse_args

    return parse_args(["--model_config", "m.json", "--dataset", "digits", *args])


def test_a_resumed_auto_run_reads_its_recorded_precision_bounded(tmp_path, monkeypatch):
    from slca_peft.utils import hardware

    monkeypatch.setattr(hardware, "choose_bf16", lambda use_cpu: (False, "no native bf16"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_fingerprint.json").write_text(json.dumps({"bf16": True}))
    args = _parse("--output_dir", str(out), "--resume_from", "auto", "--use_cpu", "true")[2]
    assert args.bf16 is True and "the run being resumed recorded it" in args.precision_choice
    (out / "run_fingerprint.json").unlink()
    os.mkfifo(out / "run_fingerprint.json")
    result = hangs(_parse, "--output_dir", str(out), "--resume_from", "auto", "--use_cpu", "true")
    assert isinstance(result, UserError) and "FIFO" in str(result)
    (out / "run_fingerprint.json").unlink()
    (out / "run_fingerprint.json").symlink_to("/dev/zero")
    result = hangs(_parse, "--output_dir", str(out), "--resume_from", "auto", "--use_cpu", "true")
    assert isinstance(result, UserError) and "symbolic link" in str(result)


@pytest.mark.slow
def test_a_fifo_fingerprint_is_one_line_from_the_command(tmp_path):
    """The whole command, as a user runs it (`slca-peft train ...`, in a process of its own): a FIFO at
    run_fingerprint.json ends with one line, exit 2."""
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / "run_fingerprint.json")
    done = python_forked("from slca_peft.commands.cli import main; main()", "train", "--output-dir", str(out),
                         "--resume-from", "auto")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "is a FIFO" in done.stderr and "Traceback" not in done.stderr
