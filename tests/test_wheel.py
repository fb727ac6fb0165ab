"""The package as users install it: a wheel built from the tree, imported from somewhere else."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_slca_peft_train_runs_from_an_installed_wheel(tmp_path, tiny_image_folders):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("slca_peft", "recipes/configs", "recipes/assets"):
        shutil.copytree(ROOT / part, src / part, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("slca_peft-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    shutil.rmtree(src)  # nothing may come from the tree the wheel was built from
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # One interpreter (imports dominate the time): the installed console script's --help, the demo's defaults
    # and a config shipped in the wheel resolved by name, then one tiny task on the demo's shipped backbone.
    train_dir, test_dir = tiny_image_folders
    script = f"""
import contextlib, io, json, runpy, sys
import slca_peft
from slca_peft.commands.recipe import parse_args
help_text = io.StringIO()
sys.argv = ["slca-peft", "train", "--help"]
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    runpy.run_path({str(target / "bin" / "slca-peft")!r}, run_name="__main__")
demo, demo_data, _ = parse_args([])
shipped, _, _ = parse_args(["--config", "cifar100_in21k_slca++.yaml"])
sys.argv = ["slca-peft", "train", "--model_name_or_path", demo.model_name_or_path, "--train_dir", {str(train_dir)!r},
            "--test_dir", {str(test_dir)!r}, "--init_cls", "4", "--num_train_epochs", "1", "--ca_epochs", "1",
            "--ca_samples_per_class", "8", "--output_dir", "run", "--disable_tqdm", "true", "--report_to", "none"]
try:
    runpy.run_path({str(target / "bin" / "slca-peft")!r}, run_name="__main__")
except SystemExit as done:  # the console script ends with sys.exit(main())
    assert not done.code, done.code
print(json.dumps({{"module": slca_peft.__file__, "backbone": demo.model_name_or_path, "dataset": demo_data.dataset,
                  "shipped": shipped.model_name_or_path, "help": help_text.getvalue()}}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    where = json.loads(out.stdout.strip().splitlines()[-1])
    assert "--resume_from" in where["help"] and "--lora_rank" in where["help"]
    assert Path(where["module"]).is_relative_to(target) and Path(where["backbone"]).is_relative_to(target)
    assert where["dataset"] == "digits" and where["shipped"] == "google/vit-base-patch16-224-in21k"
    metrics = json.loads((cwd / "run" / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 1 and (cwd / "run" / "task_0" / "slca_config.json").is_file()
