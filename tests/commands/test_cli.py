"""The command line and the library behave as Hugging Face users expect: config files in any of the
example scripts' forms, per-command usage lines, `push --token`, a finished run not repeated, quiet
progress bars with `--disable_tqdm`, and each task's result shown without any logging set-up."""

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
from conftest import recipe_argv
from transformers import TrainingArguments

from slca_peft.commands.cli import main as cli_main
from slca_peft.utils.errors import UserError


def test_config_as_equals_flag_or_first_argument_and_listed_in_help(recipe, tmp_path, capsys):
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "c.yaml").write_text("model_config: m.json\ndataset: digits\nlearning_rate: 0.1\noutput_dir: out\n")
    (tmp_path / "c.json").write_text(json.dumps({"model_config": "m.json", "dataset": "digits", "learning_rate": 0.3,
                                                 "output_dir": "out"}))
    for argv, rate in (([f"--config={tmp_path / 'c.yaml'}"], 0.1), ([str(tmp_path / "c.yaml")], 0.1),
                       ([str(tmp_path / "c.json"), "--learning_rate", "0.02"], 0.02),
                       (["--config", str(tmp_path / "c.json")], 0.3)):
        model_args, data_args, args = recipe.parse_args(argv)
        assert (args.learning_rate, data_args.dataset) == (rate, "digits"), argv
    with pytest.raises(UserError, match="only one config file"):
        recipe.parse_args([str(tmp_path / "c.yaml"), "--config", str(tmp_path / "c.json")])

    with pytest.raises(SystemExit) as done:
        cli_main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: slca-peft train ") and "--config FILE" in text
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    assert capsys.readouterr().out.startswith("usage: slca-peft export ")


def test_relative_paths_in_a_config_resolve_next_to_it_first(recipe, tmp_path, monkeypatch):
    configs = tmp_path / "project" / "configs"
    (configs / "models").mkdir(parents=True)
    (configs / "models" / "m.json").write_text("{}")
    (configs / "c.yaml").write_text("model_config: models/m.json\ndataset: digits\ndata_dir: data\n"
                                    "output_dir: runs/x\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)  # exists only relative to the working directory
    monkeypatch.chdir(elsewhere)
    model_args, data_args, args = recipe.parse_args(["--config", str(configs / "c.yaml")])
    assert Path(model_args.model_config) == configs / "models" / "m.json"
    assert data_args.data_dir == "data" and args.output_dir == "runs/x"  # as written: the working directory's

    # A shipped config by name, from a directory that has nothing of the source tree.
    model_args, _, _ = recipe.parse_args(["--config", "demo_digits.yaml", "--output_dir", "o"])
    assert (Path(model_args.model_name_or_path) / "config.json").is_file()


def test_push_takes_a_token(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import slca_peft.continual.checkpoint
    import slca_peft.data.transforms
    import slca_peft.sharing.hub

    calls = []
    loaded = SimpleNamespace(model=SimpleNamespace(image_processor=None))
    monkeypatch.setattr(slca_peft.continual.checkpoint, "load_checkpoint", lambda *a, **k: loaded)
    monkeypatch.setattr(slca_peft.data.transforms, "default_image_processor", lambda model: None)
    monkeypatch.setattr(slca_peft.sharing.hub, "push_folder", lambda *a, **k: calls.append(k) or "https://hub/commit")
    cli_main(["push", str(tmp_path), "me/model", "--token", "hf_secret"])
    assert calls[0]["token"] == "hf_secret" and "https://hub/commit" in capsys.readouterr().out


@pytest.mark.slow
def test_a_finished_run_started_again_reports_its_results(recipe, tmp_path, base_model_dir, tiny_image_folders,
                                                           monkeypatch, capsys):
    from slca_peft.continual.learner import ContinualLearner

    out = tmp_path / "run"
    argv = recipe_argv(base_model_dir, tiny_image_folders, out) + ["--seeds", "1", "2"]
    first = recipe.main(argv)
    capsys.readouterr()
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name.startswith("task_")}

    def no_training(self):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(ContinualLearner, "run", no_training)
    again = recipe.main(argv)
    text = capsys.readouterr().out
    assert again == first
    for seed in (1, 2):
        assert f"nothing to do: {out / f'seed_{seed}'} already holds this run" in text
        assert str(out / f"seed_{seed}" / "metrics.json") in text
    assert {p: p.stat().st_mtime_ns for p in written} == written  # no checkpoint rewritten
    # Other settings are still refused.
    with pytest.raises(ValueError, match="holds another run"):
        recipe.main(argv + ["--learning_rate", "0.02"])


def test_image_check_progress_bar_follows_disable_tqdm_and_the_main_process(recipe, tmp_path, tiny_image_folders,
                                                                             base_model_dir, monkeypatch, capsys):
    import datasets
    from transformers.utils import logging as hf_logging

    import slca_peft.data.checks as data_checks
    from slca_peft.method.config import SLCAConfig
    from slca_peft.utils.logging import is_progress_bar_enabled, progress_bars

    monkeypatch.setattr(data_checks, "_decode", lambda source: None)
    many = [f"image_{i}.png" for i in range(600)]
    data_checks.check_images(many, progress=False)
    with progress_bars(False):
        data_checks.check_images(many)
    assert "checking images" not in capsys.readouterr().err
    data_checks.check_images(many)
    assert "checking images" in capsys.readouterr().err

    # The recipe turns the check's bars off with --disable_tqdm, and on every process but the main one.
    shown = []
    check = data_checks.check_images

    def recorded(sources, progress=None, **kwargs):
        shown.append(is_progress_bar_enabled() if progress is None else progress)
        return check(sources, progress=progress, **kwargs)

    monkeypatch.setattr(data_checks, "check_images", recorded)
    argv = recipe_argv(base_model_dir, tiny_image_folders, tmp_path / "o")
    for disable, main_process, expected in (("false", True, True), ("true", True, False), ("false", False, False)):
        argv[argv.index("--disable_tqdm") + 1] = disable
        _, data_args, args = recipe.parse_args(argv)
        if not main_process:
            monkeypatch.setattr(SLCAConfig, "process_index", property(lambda self: 1))
        shown.clear()
        recipe.build_tasks(data_args, args)
        assert shown and set(shown) == {expected}, (disable, main_process)
        # The whole run: transformers' (loading, writing weights) and datasets' bars follow too.
        monkeypatch.setattr(recipe, "_start", lambda *a: (hf_logging.is_progress_bar_enabled(),
                                                          not datasets.are_progress_bars_disabled()))
        assert recipe.train(None, data_args, args) == (expected, expected)
        assert hf_logging.is_progress_bar_enabled()  # restored after the run


@contextlib.contextmanager
def bare_logging():
    """Logging as in a fresh Python process whose transformers' default handler is off (so the library's
    fallback writes, to the current stdout): no handler on the root or transformers' logger (pytest adds its
    own to both for each test's call), the library's logger untouched; restored afterwards."""
    from transformers.utils import logging as hf_logging

    from slca_peft.utils.logging import get_logger

    root, library, transformers = logging.getLogger(), get_logger(), hf_logging.get_logger()
    saved = root.handlers, library.handlers, library.propagate, transformers.handlers, library.level
    root.handlers, library.handlers, library.propagate, transformers.handlers = [], [], True, []
    library.setLevel(logging.NOTSET)
    get_logger()  # the fallback handler back
    try:
        yield
    finally:
        root.handlers, library.handlers, library.propagate, transformers.handlers = saved[:4]
        library.setLevel(saved[4])


def test_a_run_logs_its_results_without_logging_set_up(tmp_path, capsys):
    with bare_logging():
        _check_run_verbosity(tmp_path, capsys)


def _check_run_verbosity(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    from slca_peft.method.config import SLCAConfig
    from slca_peft.utils.logging import set_verbosity_from_args

    task_line = logging.getLogger("slca_peft.continual.callbacks")
    for log_level, shown in (("passive", True), ("info", True), ("warning", False)):
        set_verbosity_from_args(SLCAConfig(output_dir=str(tmp_path), use_cpu=True, log_level=log_level))
        task_line.info("task 1/5 | seen classes  99.0%")
        assert ("task 1/5" in capsys.readouterr().out) is shown, log_level
    previous = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_debug()
        set_verbosity_from_args(SLCAConfig(output_dir=str(tmp_path), use_cpu=True))
        logging.getLogger("slca_peft.method.alignment").debug("alignment losses")
        assert "alignment losses" in capsys.readouterr().out
    finally:
        hf_logging.set_verbosity(previous)
    # Once the application configures logging (transformers' handlers, or the root's when transformers
    # propagates), the records go to its handlers only (never twice).
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    hf_logging.add_handler(handler)
    try:
        task_line.warning("once")
    finally:
        hf_logging.remove_handler(handler)
    root_stream = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(root_stream))
    hf_logging.enable_propagation()
    try:
        task_line.warning("twice")
    finally:
        hf_logging.disable_propagation()
    assert stream.getvalue() == "once\n" and root_stream.getvalue() == "twice\n"
    assert "once" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_python_api_run_shows_each_task_result(make_learner, tmp_path, tiny_image_folders, capsys):
    from slca_peft import TaskSequence

    tasks = TaskSequence.from_image_folders(*tiny_image_folders, init_cls=2, increment=2, seed=1993)
    learner = make_learner(tasks, tmp_path / "run", num_train_epochs=1, ca_epochs=1, ca_samples_per_class=8)
    with bare_logging(), contextlib.redirect_stderr(io.StringIO()):
        learner.run()
    out = capsys.readouterr().out
    assert "task 1/2" in out and "task 2/2" in out and "Last-Acc" in out


def test_a_config_key_that_is_no_flag_is_refused_naming_it(recipe, tmp_path):
    """Keys are checked as HfArgumentParser.parse_dict checks them, not matched as argparse prefixes (which
    trained `learning_rat: 0.1` silently with learning_rate 0.1)."""
    (tmp_path / "m.json").write_text("{}")
    base = "model_config: m.json\ndataset: digits\noutput_dir: out\n"
    (tmp_path / "typo.yaml").write_text(base + "learning_rat: 0.1\nfoo: 1\n")
    with pytest.raises(UserError) as refused:
        recipe.parse_args([str(tmp_path / "typo.yaml")])
    message = str(refused.value)
    assert "unknown keys learning_rat (did you mean learning_rate?), foo" in message and "\n" not in message
    (tmp_path / "hyphen.json").write_text(json.dumps({"model_config": "m.json", "dataset": "digits",
                                                      "output_dir": "out", "learning-rate": 0.1}))
    with pytest.raises(UserError, match=r"unknown key learning-rate \(did you mean learning_rate\?\)"):
        recipe.parse_args(["--config", str(tmp_path / "hyphen.json")])
    # Exact keys keep working, mappings reach TrainingArguments as the JSON it reads, booleans and lists as flags.
    (tmp_path / "ok.yaml").write_text(base + "learning_rate: 0.1\nlr_scheduler_type: cosine\n"
                                      "lr_scheduler_kwargs: {num_cycles: 0.25}\nhorizontal_flip: false\n"
                                      "lora_target_modules: [q_proj, v_proj]\ntrain_resize: null\n")
    _, data_args, args = recipe.parse_args([str(tmp_path / "ok.yaml"), "--learning_rate", "0.2"])
    assert (args.learning_rate, args.lr_scheduler_kwargs, data_args.horizontal_flip) == (0.2, {"num_cycles": 0.25},
                                                                                          False)
    assert args.lora_target_modules == ["q_proj", "v_proj"] and data_args.train_resize is None


def test_help_lists_the_recipes_own_flags_before_training_arguments_and_the_version_is_shown(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--help"], prog="slca-peft train")
    text = capsys.readouterr().out
    usage, _, body = text.partition("\n\n")
    assert usage == "usage: slca-peft train [CONFIG.yaml | --config FILE] [--FLAG VALUE ...]"
    order = [body.index(heading) for heading in ("--config FILE", "model arguments:", "  --resume_from ",
                                                  "data arguments:", "  --train_dir ", "SLCA++ method (SLCAConfig):",
                                                  "  --ca_epochs ", "  --init_cls ", "TrainingArguments with",
                                                  "  --learning_rate ", "other TrainingArguments", "  --adam_beta1 ")]
    assert order == sorted(order)
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0
    import slca_peft

    assert capsys.readouterr().out.startswith(f"slca-peft {slca_peft.__version__} (transformers ")


@pytest.mark.slow
def test_disable_tqdm_quiets_every_bar_of_a_python_api_run(tmp_path, base_model_dir, tiny_image_folders, capfd):
    """Not only the recipe: loading the backbone or a checkpoint with the run's arguments, the run and the
    trainer turn transformers', datasets' and the Hub's bars off with `disable_tqdm`, and put them back."""
    from transformers.utils import logging as hf_logging

    from slca_peft import (
        ContinualLearner,
        EvalTransform,
        ImageTransformConfig,
        SLCAConfig,
        SLCAModel,
        TaskSequence,
        TrainTransform,
    )

    tasks = TaskSequence.from_image_folders(*map(str, tiny_image_folders), init_cls=2, increment=2)
    capfd.readouterr()
    for disable in (False, True):
        args = SLCAConfig(output_dir=str(tmp_path / str(disable)), use_cpu=True, num_train_epochs=1,
                          per_device_train_batch_size=8, report_to="none", ca_samples_per_class=8, ca_batch_size=8,
                          ca_epochs=1, disable_tqdm=disable)
        model = SLCAModel.from_backbone(str(base_model_dir), args)
        config = ImageTransformConfig.from_model_config(model.config)
        learner = ContinualLearner(model, args, tasks, train_transform=TrainTransform(config),
                                   eval_transform=EvalTransform(config))
        learner.run()
        ContinualLearner.from_checkpoint(learner.output_dir / "task_2", args, tasks)
        bars = capfd.readouterr().err
        assert ("Loading weights" in bars and "%|" in bars) is not disable, bars[-2000:]
        assert hf_logging.is_progress_bar_enabled()  # put back after each call


def test_the_known_third_party_warnings_are_filtered_in_the_cli_and_the_api(tmp_path, base_model_dir):
    import warnings

    from slca_peft import SLCAModel
    from slca_peft.continual import save_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = SLCAModel.from_backbone(str(base_model_dir))
        model.grow(2)
        save_checkpoint(model, tmp_path / "run" / "task_1", state={"tasks_learned": 1, "accuracy_matrix": [[50.0]]})
        cli_main(["info", str(tmp_path / "run" / "task_1")])
        cli_main(["export", str(tmp_path / "run" / "task_1"), str(tmp_path / "export")])
        filters = list(warnings.filters)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert filters == [warnings.filters[0]] or "is_gradient_checkpointing" not in str(filters)  # scoped, not global


def test_export_and_info_take_a_run_directory_as_its_last_task(tmp_path, base_model_dir, capsys):
    from slca_peft import SLCAModel
    from slca_peft.continual import save_checkpoint
    from slca_peft.utils.errors import UserError

    model = SLCAModel.from_backbone(str(base_model_dir))
    model.grow(2)
    save_checkpoint(model, tmp_path / "run" / "task_1", state={"tasks_learned": 1, "accuracy_matrix": [[50.0]]})
    model.grow(2)
    state = {"tasks_learned": 2, "accuracy_matrix": [[50.0], [40.0, 30.0]]}
    save_checkpoint(model, tmp_path / "run" / "task_2", state=state)
    cli_main(["info", str(tmp_path / "run")])
    assert json.loads(capsys.readouterr().out)["task_sizes"] == [2, 2]  # task_2, the run's last
    cli_main(["export", str(tmp_path / "run"), str(tmp_path / "export")])
    assert len(json.loads((tmp_path / "export" / "config.json").read_text())["id2label"]) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="^export .*empty: a directory with no complete task checkpoint.*RUN/task_N"):
        cli_main(["export", str(tmp_path / "empty"), str(tmp_path / "export2")])


def _help_of(text: str, flag: str) -> str:
    """The help paragraph of `--flag` in an argparse `--help` text (its lines up to the next flag)."""
    start = text.index(f"\n  --{flag} ")
    end = text.find("\n  --", start + 1)
    return " ".join(text[start:end].split())


# Each TrainingArguments field slca-peft refuses, with a value refused, and who refuses it.
REFUSED_FLAGS = {
    "eval_strategy": ("epoch", "recipe"), "save_strategy": ("epoch", "recipe"),
    "load_best_model_at_end": (True, "recipe"), "resume_from_checkpoint": ("ckpt", "recipe"),
    "label_smoothing_factor": (0.1, "trainer"), "lr_scheduler_kwargs": ({"num_cycles": 1}, "trainer"),
    "optim": ("adamw_bnb_8bit", "trainer"),
}


def test_help_of_every_refused_training_argument_says_it_is_refused_and_why(recipe, capsys):
    import re

    from slca_peft.commands.arguments import TRAINER_FLAG_RULES, refuse_trainer_flags
    from slca_peft.method.config import SLCAConfig
    from slca_peft.method.trainer import check_honoured

    # Every flag the recipe's rules name is in the table (a new rule needs its help too).
    ruled = {re.match(r"--(\w+)", problem).group(1) for _, problem in TRAINER_FLAG_RULES}
    assert ruled <= set(REFUSED_FLAGS)
    with pytest.raises(SystemExit):
        recipe.parse_args(["--help"], prog="slca-peft train")
    text = capsys.readouterr().out
    for flag, (value, refuser) in REFUSED_FLAGS.items():
        args = SLCAConfig(output_dir="out", use_cpu=True, report_to="none", **{flag: value})
        with pytest.raises(UserError, match=flag):
            (refuse_trainer_flags if refuser == "recipe" else check_honoured)(args)
        shown = _help_of(text, flag)
        assert "refuse" in shown.lower(), f"--{flag}: {shown}"
        assert ("slca-peft train" in shown or "recipe" in shown) if refuser == "recipe" else True, shown
    # transformers' own TrainingArguments keep their help.
    assert "Refused" not in TrainingArguments.__dataclass_fields__["label_smoothing_factor"].metadata["help"]


def test_an_unknown_flag_is_argparse_s_one_usage_line(recipe, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        recipe.parse_args(["--model_config", "m.json", "--dataset", "digits", "--output_dir", str(tmp_path / "o"),
                           "--no_such_flag", "1"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "unrecognized arguments: --no_such_flag 1" in err and "Traceback" not in err
