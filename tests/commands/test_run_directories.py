"""Run directories as users name and size them: task folders numbered as the logs count tasks (`task_1` holds
task 1/T), a run directory accepted where a task checkpoint is asked for (its last complete task),
`save_total_limit` keeping the newest task checkpoints, and a continuation taking its new classes as one task
unless `--init_cls/--increment` say otherwise."""

import json

import pytest
from conftest import recipe_argv

from slca_peft import TaskSequence
from slca_peft.artifacts.layout import checkpoint_dirs, task_dir_name, task_index
from slca_peft.continual.run_dir import latest_checkpoint
from slca_peft.utils.errors import UserError


def test_task_folders_are_numbered_from_one_as_the_logs_count_tasks(tmp_path):
    assert [task_dir_name(t) for t in range(3)] == ["task_1", "task_2", "task_3"]
    assert [task_index(name) for name in ("task_1", "task_10", "task_0", "task_x", "task_")] == [0, 9, None, None, None]
    for name in ("task_2", "task_10", "task_0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "continual_state.json").write_text("{}")
    assert checkpoint_dirs(tmp_path) == {1: tmp_path / "task_2", 9: tmp_path / "task_10"}
    assert latest_checkpoint(tmp_path) == tmp_path / "task_10"  # task_0 is no name slca-peft writes


@pytest.mark.slow
def test_save_total_limit_keeps_the_newest_task_and_a_run_directory_stands_for_its_last_task(
        recipe, tmp_path, base_model_dir, tiny_image_folders, capsys):
    out = tmp_path / "run"
    argv = recipe_argv(base_model_dir, tiny_image_folders, out, "--save_total_limit", "1")
    first = recipe.main(argv)
    assert sorted(p.name for p in out.glob("task_*")) == ["task_2"]  # task_1 went once task_2 was whole
    state = json.loads((out / "task_2" / "continual_state.json").read_text())
    assert state["tasks_learned"] == 2 and len(state["accuracy_matrix"]) == 2
    assert not list(out.glob(".task_*"))
    # A finished run is recognised by its last checkpoint: the same command has nothing to do.
    capsys.readouterr()
    assert recipe.main(argv)["last_accuracy"] == first["last_accuracy"]
    assert "nothing to do" in capsys.readouterr().out
    # The run directory itself names its last complete task, for --resume_from and --continue_from.
    model_args, _, _ = recipe.parse_args(argv + ["--resume_from", str(out)])
    assert model_args.resume_from == str(out / "task_2")
    assert recipe.main(argv + ["--resume_from", str(out)])["last_accuracy"] == first["last_accuracy"]
    new = recipe_argv(None, tiny_image_folders, tmp_path / "more")
    model_args, _, _ = recipe.parse_args(new + ["--continue_from", str(out)])
    assert model_args.continue_from == str(out / "task_2")


def test_a_directory_without_a_task_checkpoint_is_refused_in_one_line(recipe, tmp_path, base_model_dir,
                                                                      tiny_image_folders):
    empty = tmp_path / "empty"
    (empty / "task_1").mkdir(parents=True)  # a folder, not a complete checkpoint
    argv = recipe_argv(base_model_dir, tiny_image_folders, tmp_path / "out")
    with pytest.raises(UserError) as refused:
        recipe.parse_args(argv + ["--resume_from", str(empty)])
    assert str(refused.value).endswith("give RUN/task_N or auto.") and "\n" not in str(refused.value)
    with pytest.raises(UserError, match=r"give RUN/task_N\.$"):
        recipe.parse_args(argv + ["--continue_from", str(empty)])


def test_a_continuation_takes_its_new_classes_as_one_task_unless_the_split_is_given(recipe, tmp_path,
                                                                                   tiny_image_folders):
    checkpoint = tmp_path / "run" / "task_3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "continual_state.json").write_text("{}")
    train_dir, test_dir = map(str, tiny_image_folders)
    argv = ["--continue_from", str(checkpoint), "--train_dir", train_dir, "--test_dir", test_dir,
            "--output_dir", str(tmp_path / "more")]
    _, _, args = recipe.parse_args(argv)
    assert (args.init_cls, args.increment) == (None, None)
    tasks = recipe.build_tasks(recipe.parse_args(argv)[1], args)
    assert tasks.task_sizes == [4] and (tasks.init_cls, tasks.increment) == (4, 4)
    _, _, args = recipe.parse_args(argv + ["--init_cls", "2"])
    assert (args.init_cls, args.increment) == (2, 10)
    (tmp_path / "split.yaml").write_text("increment: 1\n")
    _, _, args = recipe.parse_args(argv + ["--config", str(tmp_path / "split.yaml")])
    assert (args.init_cls, args.increment) == (10, 1)
    # Without a continuation the defaults stay the paper's.
    assert TaskSequence.from_image_folders(train_dir, test_dir, init_cls=2, increment=2).task_sizes == [2, 2]
