"""A run directory belongs to one run; user errors are one line on stderr."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, recipe_argv

from slca_peft.utils.errors import UserError

SCRIPT = str(ROOT / "recipes" / "train_seq.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": str(ROOT)}


#: Two tasks of 4 and 2 classes.
FLAGS = dict(init_cls=4, ca_samples_per_class=16, ca_batch_size=32, learning_rate=0.05)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], env=env or ENV, capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["--method", "foo"], "method='foo' is not one of"),
    (["--ca_epochs", "-3"], "--ca_epochs -3 is out of range"),
    (["--seeds", "7", "7"], "repeats a seed"),
    (["--config"], "--config needs a value"),
    (["--config", "missing.yaml"], "no such file"),
])
def test_a_user_error_is_one_line_without_traceback(recipe, tmp_path, capsys, monkeypatch, args, message):
    from slca_peft.utils.errors import run_main

    argv = args if args[0] == "--config" else ["--model_config", "m.json", "--dataset", "digits",
                                               "--output_dir", str(tmp_path / "o"), *args]
    with pytest.raises(SystemExit) as exit_:
        run_main(recipe.main, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and message in err
    # --debug (or SLCA_PEFT_DEBUG=1) lets the exception through, traceback and all.
    monkeypatch.setenv("SLCA_PEFT_DEBUG", "1")
    with pytest.raises((ValueError, SystemExit), match=message.replace("[", r"\[").replace("(", r"\(")):
        run_main(recipe.main, argv)


@pytest.mark.slow
def test_a_user_error_in_a_real_process_exits_non_zero_with_one_line(tmp_path):
    proc = run_cli("--model_config", "m.json", "--dataset", "digits", "--output_dir", str(tmp_path / "o"),
                   "--ca_batch_size", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "train_seq.py: error: --ca_batch_size 0 is out of range: it must be >= 1 and <= 1048576. "
        "(run with --debug for the traceback)"
    ]


def test_broken_yaml_and_out_of_range_values_are_refused_at_parse_time(recipe, tmp_path):
    broken = tmp_path / "b.yaml"
    broken.write_text("method: [slca\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        recipe.parse_args(["--config", str(broken)])
    base = ["--model_config", "m.json", "--dataset", "digits", "--output_dir", str(tmp_path / "o")]
    for flag, value in [("ca_samples_per_class", "0"), ("lora_rank", "0"), ("fc_scale_mu", "-1"),
                        ("ca_ridge", "nan"), ("learning_rate", "-1"), ("lora_rank", "50000000")]:
        with pytest.raises(ValueError, match=f"--{flag} .* is out of range"):
            recipe.parse_args(base + [f"--{flag}", value])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_refused_before_any_work(recipe, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(UserError, match="is not writable"):
        recipe.parse_args(["--model_config", "m.json", "--dataset", "digits", "--output_dir", str(locked / "o")])


@pytest.mark.slow
def test_a_second_run_into_a_used_directory_is_refused_unless_overwrite(
    recipe, tmp_path, base_model_dir, image_folders
):
    out = tmp_path / "run"
    recipe.main(recipe_argv(base_model_dir, image_folders, out, **FLAGS))
    first = json.loads((out / "metrics.json").read_text())
    stamp = (out / "task_1" / "classifier.safetensors").stat().st_mtime_ns
    # The same command again has nothing to do: it reports the finished run.
    again = recipe.main(recipe_argv(base_model_dir, image_folders, out, **FLAGS))
    assert again["last_accuracy"] == first["last_accuracy"]
    (out / "metrics.json").rename(tmp_path / "metrics.json")  # as if interrupted before the end
    with pytest.raises(UserError, match="already holds a run .*--resume_from auto.*--overwrite_output_dir"):
        recipe.main(recipe_argv(base_model_dir, image_folders, out, **FLAGS))
    (tmp_path / "metrics.json").rename(out / "metrics.json")
    with pytest.raises(UserError, match=r"holds another run \(learning_rate \(0.05 -> 0.02\)"):
        recipe.main(recipe_argv(base_model_dir, image_folders, out, "--learning_rate", "0.02", **FLAGS))
    assert (out / "task_1" / "classifier.safetensors").stat().st_mtime_ns == stamp  # nothing was touched
    # resume auto of the finished run trains nothing and reports the same metrics.
    recipe.main(recipe_argv(base_model_dir, image_folders, out, "--resume_from", "auto", **FLAGS))
    assert json.loads((out / "metrics.json").read_text())["accuracy_matrix"] == first["accuracy_matrix"]
    # --overwrite_output_dir replaces the old run: other settings, fresh checkpoints.
    recipe.main(recipe_argv(base_model_dir, image_folders, out, "--init_cls", "2", "--overwrite_output_dir", "true",
                            **FLAGS))
    assert sorted(p.name for p in out.glob("task_*")) == ["task_1", "task_2", "task_3"]
    assert json.loads((out / "run_fingerprint.json").read_text())["init_cls"] == 2


@pytest.mark.slow
def test_resume_with_other_settings_or_without_unaligned_heads_is_refused(
    recipe, tmp_path, base_model_dir, image_folders
):
    out = tmp_path / "run"
    recipe.main(recipe_argv(base_model_dir, image_folders, out, **FLAGS))
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    changed = ["--lora_rank", "2", "--lora_target_modules", "q_proj", "v_proj", "--ca_covariance_form", "diagonal",
               "--learning_rate", "0.02"]
    for resume in ("auto", str(out / "task_1")):
        with pytest.raises(UserError) as err:
            recipe.main(recipe_argv(base_model_dir, image_folders, out, *changed, "--resume_from", resume, **FLAGS))
        for name in ("lora_rank", "lora_target_modules", "ca_covariance_form", "learning_rate"):
            assert name in str(err.value)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing
    # A checkpoint without the unaligned heads would resume from the aligned ones: refused.
    from safetensors.torch import load_file, save_file

    path = out / "task_1" / "classifier.safetensors"
    (out / "task_1" / "classifier_unaligned.safetensors").unlink(missing_ok=True)
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("unaligned.")}, path)
    with pytest.raises(UserError, match="has no unaligned heads"):
        recipe.main(recipe_argv(base_model_dir, image_folders, out, "--resume_from", str(out / "task_1"), **FLAGS))


@pytest.mark.slow
def test_a_concurrent_second_run_is_refused_naming_the_pid(tmp_path, base_model_dir, image_folders, recipe):
    from conftest import start_forked, wait_forked

    from slca_peft.continual.learner import ContinualLearner

    out, go = tmp_path / "run", tmp_path / "go"
    args = recipe_argv(base_model_dir, image_folders, out, "--init_cls", "6", **FLAGS)  # one task

    def first_run() -> int:  # another process, holding the directory until the test says go
        learn = ContinualLearner.learn_task

        def paused(self, task):
            while not go.exists():
                time.sleep(0.02)
            return learn(self, task)

        ContinualLearner.learn_task = paused
        recipe.main(args)
        return 0

    first = start_forked(first_run)
    lock = out / ".slca-run.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.read_text().strip()):
        assert os.waitpid(first, os.WNOHANG)[0] == 0, "the first run ended early"
        time.sleep(0.02)
    try:  # the second run is this process
        with pytest.raises(UserError, match=rf"another run \(pid {first}\) is using"):
            recipe.main(args)
    finally:
        go.touch()
    assert wait_forked(first) == 0
    assert json.loads((out / "metrics.json").read_text())["task_sizes"] == [6]


@pytest.mark.slow
def test_a_kill_between_the_two_renames_keeps_the_task_folder(tmp_path, forked):
    from slca_peft.artifacts.atomic import atomic_directory, mark_partial
    from slca_peft.continual.run_dir import claim_run_directory

    run = tmp_path / "run"
    (run / "task_1").mkdir(parents=True)
    (run / "task_1" / "weights").write_text("old")
    def crash_between_the_renames() -> int:  # SIGKILLed: no `finally`, no cleanup, as in a crash
        real, calls = os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:  # the old folder is aside, the new one not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)

        os.replace = replace  # the forked child only
        with atomic_directory(run / "task_1") as tmp:
            (tmp / "weights").write_text("new")
        return 0

    assert forked(crash_between_the_renames) == -signal.SIGKILL
    assert not (run / "task_1").exists() and len(list(run.glob(".task_1.old-*"))) == 1
    # The next start puts the old folder back.
    with claim_run_directory(run, {"method": "slca++"}, resume=True):
        assert (run / "task_1" / "weights").read_text() == "old"
    assert not list(run.glob(".task_1.old-*"))
    # A leftover slca-peft marked next to a complete folder is removed at the next write, and so is the killed
    # write's own temporary folder; a user's folder named alike (unmarked) stays.
    (run / ".task_1.old-1").mkdir()
    mark_partial(run / ".task_1.old-1")
    (run / ".task_1.old-mine").mkdir()
    with atomic_directory(run / "task_1") as tmp:
        (tmp / "weights").write_text("new")
    assert (run / "task_1" / "weights").read_text() == "new"
    assert [p.name for p in run.glob(".task_1.*")] == [".task_1.old-mine"]
    assert sorted(p.name for p in (run / "task_1").iterdir()) == ["weights"]


def test_written_files_follow_the_umask(tmp_path):
    from slca_peft.artifacts.atomic import atomic_directory, atomic_write_text

    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "task_1") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "task_1").stat().st_mode & 0o777 == 0o775


def test_a_model_config_run_never_replaces_the_base_model_under_checkpoints(recipe, tmp_path, vit_config):
    config = tmp_path / "vit.json"
    vit_config.to_json_file(config)
    out = tmp_path / "run"
    model_args, _, args = recipe.parse_args(["--model_config", str(config), "--dataset", "digits", "--output_dir",
                                             str(out), "--use_cpu", "true"])
    recipe.build_model(model_args, args)
    weights = (out / "base_model" / "model.safetensors").read_bytes()
    (out / "task_1").mkdir()
    (out / "task_1" / "continual_state.json").write_text("{}")
    with pytest.raises(UserError, match="holds checkpoints trained on its base_model/"):
        recipe.build_model(model_args, args)
    assert (out / "base_model" / "model.safetensors").read_bytes() == weights


def test_the_resume_checks_live_in_one_module_one_function_each():
    """Every check made before going on from an earlier run is a function of continual/resume.py, defined
    there only; no two functions of the continual package share a name (two `check_resumable`s did)."""
    import ast

    from slca_peft.continual import learner, resume

    continual = ROOT / "slca_peft" / "continual"
    assert not (continual / "previous_run.py").exists()
    defined: dict[str, list[str]] = {}
    for path in sorted(continual.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name, []).append(path.name)
    assert {name: files for name, files in defined.items() if len(files) > 1} == {}
    checks = {"finished_run", "checkpoint_fingerprint", "check_checkpoint_matches", "check_unaligned_heads",
              "check_run_state", "check_same_stream", "check_same_model", "check_heads_before", "check_learned_tasks"}
    assert {name: defined.get(name) for name in checks} == {name: ["resume.py"] for name in checks}
    assert "check_resumable" not in defined and learner.check_same_model is resume.check_same_model


def test_a_checkpoint_without_history_is_refused_in_one_line_naming_the_fix(tmp_path):
    from slca_peft.continual.resume import check_run_state

    for statistics, state in ((None, {"accuracy_matrix": []}), (object(), None)):
        with pytest.raises(UserError) as err:
            check_run_state(tmp_path / "ckpt", statistics, state)
        message = str(err.value)
        assert "\n" not in message and "cannot be resumed" in message
        assert message.endswith("give a task_<t> checkpoint written by ContinualLearner (or the recipe), or the "
                                "output_dir of a finished SLCATrainer run.")


def test_one_function_reads_a_result_from_a_task_history():
    from slca_peft.continual.result import ContinualResult

    history = {"accuracy_matrix": [[90.0], [80.0, 70.0]], "seen_accuracy": [90.0, 75.0], "task_test_sizes": [2, 2],
               "timings": [{"training_seconds": 1.0}, {"training_seconds": 2.0}]}
    result = ContinualResult.from_history(history, "ckpt")
    assert result.timings == history["timings"] and result.summary()["last_accuracy"] == 75.0
    for damaged in (None, [{"training_seconds": 1.0}], [{"training_seconds": -1}, {}]):
        with pytest.raises(ValueError, match="^ckpt: timings must be a list of 2 objects"):
            ContinualResult.from_history({**history, "timings": damaged}, "ckpt")
    # A run's next task: its record replaces the one a failed try left.
    result.timings.append({"training_seconds": 9.0})
    record = result.new_timing(2)
    assert result.timings == [{"training_seconds": 1.0}, {"training_seconds": 2.0}, {}] and result.timings[2] is record
