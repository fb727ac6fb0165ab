"""What is read from a file is bounded before it is used, and a user error stays one line naming the
file or field: nested JSON, malformed metrics, file names that are not UTF-8, sys.exit in a callback."""

import json
import os
import sys

import pytest

from slca_peft.artifacts.safetensors_header import read_header
from slca_peft.models.adapters import load_peft_config
from slca_peft.utils.errors import UserError, no_exit, run_main
from slca_peft.utils.reading import read_json


def test_deeply_nested_json_is_one_error_naming_the_file(tmp_path, capsys):
    nested = "[" * 200_000 + "]" * 200_000
    path = tmp_path / "deep.json"
    path.write_text(nested)
    with pytest.raises(UserError, match=f"{path} nests JSON deeper than Python can parse"):
        read_json(path)
    with pytest.raises(UserError, match="nests JSON deeper"):
        load_peft_config(path)
    body = nested.encode()
    tensors = tmp_path / "deep.safetensors"
    tensors.write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(UserError, match="deep.safetensors's header nests JSON deeper"):
        read_header(tensors)
    (tmp_path / "metrics.json").write_text(nested)
    assert_one_line_error(capsys, ["report", str(tmp_path)], f"{tmp_path / 'metrics.json'} nests JSON deeper")



def assert_one_line_error(capsys, argv, expected):
    from slca_peft.commands.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(cli_main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err



@pytest.mark.parametrize("change, expected", [
    ({"accuracy_matrix": [[float("nan")]], "seen_accuracy": [1.0]}, "accuracy_matrix[0][0] must be an accuracy"),
    ({"seen_accuracy": "90"}, "seen_accuracy must be a list"),
    ({"accuracy_matrix": [[90.0, 80.0]], "seen_accuracy": [85.0]}, "accuracy_matrix[0] must hold 1 accuracies"),
    ({"task_sizes": None}, "task_sizes must be a list"),
    ({"last_accuracy": None}, "last_accuracy[0] must be an accuracy"),
])
def test_report_on_malformed_metrics_names_the_file_and_field(tmp_path, capsys, change, expected):
    pytest.importorskip("matplotlib")
    metrics = {"accuracy_matrix": [[90.0], [80.0, 70.0]], "seen_accuracy": [90.0, 75.0], "task_sizes": [2, 2],
               "last_accuracy": 75.0, "average_incremental_accuracy": 82.5, "method": "slca++", **change}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert_one_line_error(capsys, ["report", str(tmp_path)], f"{tmp_path / 'metrics.json'}: {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]



def test_a_file_name_that_is_not_utf8_is_named(tmp_path, capsys):
    pytest.importorskip("PIL")
    from PIL import Image

    from slca_peft.data.formats import load_split_image_folders

    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / label / "x.png")
    bad = os.fsdecode(os.fsencode(tmp_path / "train" / "a") + b"/\xff.png")
    Image.new("RGB", (8, 8)).save(bad, format="PNG")
    with pytest.raises(SystemExit):
        run_main(lambda argv: load_split_image_folders(tmp_path / "train", tmp_path / "test"), [])
    err = capsys.readouterr().err
    assert f"the name {bad!r} is not valid UTF-8" in err and len(err.strip().splitlines()) == 1, err



def test_sys_exit_in_a_callback_is_an_error_naming_it(capsys):
    def on_task_end():
        sys.exit(0)

    with pytest.raises(UserError, match=r"on_task_end \(.*test_errors.py:\d+\) called sys.exit\(0\) during training"):
        with no_exit("training"):
            on_task_end()

    def main(argv):
        with no_exit("training"):
            on_task_end()

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [])
    assert exit_info.value.code == 2 and "called sys.exit(0) during training" in capsys.readouterr().err


def test_a_missing_optional_dependency_is_one_line_naming_the_install(capsys, monkeypatch):
    from slca_peft.data.formats import load_digits_dataset

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(UserError, match=r"scikit-learn, which is not installed: pip install 'slca-peft\[demo\]'"):
        load_digits_dataset()

    def needs_matplotlib(argv):
        import matplotlib.pyplot  # noqa: F401

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(SystemExit) as exit_info:
        run_main(needs_matplotlib, [])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "optional package 'matplotlib'" in err and "slca-peft[plot]" in err

    def needs_timm(argv):  # transformers' requires_backends: an ImportError naming the package in its text only
        raise ImportError("TimmWrapperConfig requires the timm library but it was not found in your environment.")

    with pytest.raises(SystemExit):
        run_main(needs_timm, [])
    err = capsys.readouterr().err
    assert "optional package 'timm'" in err and "slca-peft[timm]" in err and "Traceback" not in err, err

    def bug(argv):
        import a_module_nobody_ships  # noqa: F401

    with pytest.raises(ModuleNotFoundError):  # not an optional dependency: a bug, with its traceback
        run_main(bug, [])
